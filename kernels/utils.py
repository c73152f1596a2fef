"""Helpers shared by the Triton kernels of `protoclr.kernels`: dtype policy, launch configuration, autotuning.

Dtype policy (SPEC §3 numerics): tiles are loaded in the input dtype and multiplied on tensor cores
(bf16/fp16 natively, fp32 as `tf32x3` — three TF32 products, ~fp32 accuracy — fp64 as IEEE FMA);
every accumulator and per-row statistic is float32, or float64 for float64 inputs. Under the CPU
interpreter (`TRITON_INTERPRET=1`) bf16 arithmetic is unreliable, so low-precision tiles are converted
to float32 right after the load (`UPCAST`), which is exact.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Natural-log <-> base-2 conversions for the online log-sum-exp (kernels work in base 2).
LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453


def interpreting() -> bool:
    """True when Triton runs on the CPU interpreter (must be decided before kernels are decorated)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


INTERPRET = interpreting()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator / statistic dtype for inputs of `dtype` (SPEC: fp32, fp64 for fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype: torch.dtype, fp32: str = "tf32x3") -> str:
    """tl.dot input_precision for `dtype` operands: fp32 ones use `fp32` ("tf32x3": three TF32 products,
    ~fp32 accuracy, within SPEC's GPU bound of 1e-3; "ieee": FMA), fp64 (and the interpreter) "ieee"."""
    if dtype == torch.float64 or INTERPRET:
        return "ieee"
    if dtype == torch.float32:
        return fp32
    return "tf32"  # unused for bf16/fp16 operands


def upcast(dtype: torch.dtype) -> bool:
    """Convert loaded tiles to fp32 before arithmetic (interpreter only, see the module docstring)."""
    return INTERPRET and dtype in (torch.float16, torch.bfloat16)


def block_d(d: int, cap: int) -> int:
    """Feature chunk: the whole (power-of-2 padded) row when it fits in `cap`, else `cap`; >= 16 for tl.dot."""
    return max(16, min(triton.next_power_of_2(d), cap))


def scalars(values, dtype: torch.dtype, device) -> torch.Tensor:
    """Float scalars as a small tensor in the accumulator dtype: Triton passes Python floats as fp32,
    which would cost float64 inputs their precision (e.g. 1/tau)."""
    return torch.tensor(values, dtype=acc_dtype(dtype), device=device)


# Shared memory a config may plan for (H100/H200: 227 KiB per block; leave room for reductions/layouts).
SMEM_BUDGET = 200 * 1024
# PROTOCLR_TRITON_AUTOTUNE=0: always the first (default) config — no tuning runs, one compile per variant.
AUTOTUNE = os.environ.get("PROTOCLR_TRITON_AUTOTUNE", "1") != "0"
# Problems below this many pair-feature products (N·Nc·D, M·K·D) take the default config: tuning them
# costs more (compiles + benchmark runs) than it can save.
AUTOTUNE_MIN_WORK = 1 << 30


def label_codes(rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 codes for int64 labels with rows[i] == cols[j] iff their codes are equal; negative labels
    (proto = -1, unknown) map to -1. Dense ranks from one sort: no host sync, O((N + Nc) log(N + Nc)).

    The kernels compare labels for every (i, j) pair; int64 comparisons cost twice the instructions and,
    broadcast over a tile, twice the registers of int32 ones (register pressure is what limits the tiles)."""
    same = rows is cols
    allv = cols if same else torch.cat([rows, cols])
    if allv.numel() == 0:
        empty = allv.to(torch.int32)
        return (empty, empty) if same else (empty[: rows.numel()], empty[rows.numel() :])
    sv, perm = torch.sort(allv)
    new = torch.ones_like(sv, dtype=torch.int32)
    new[1:] = (sv[1:] != sv[:-1]).to(torch.int32)
    rank = torch.cumsum(new, 0, dtype=torch.int32) - 1
    codes = torch.empty_like(rank).scatter_(0, perm, rank)
    codes = torch.where(allv >= 0, codes, -1)
    if same:
        return codes, codes
    return codes[: rows.numel()], codes[rows.numel() :]


def prefer(configs: list, default) -> list:
    """`configs` with `default` first (added when absent): the config a launch uses without tuning."""
    if default is None:
        return list(configs)
    return [default, *(c for c in configs if c != default)]


_TUNED: dict[str, object] = {}  # kernel name -> its triton Autotuner (GPU only), for `tuned_configs`


def tuned_configs() -> dict[str, dict[str, str]]:
    """{kernel: {autotune key: chosen config}} of every launch tuned so far in this process: what the benchmark
    records next to its timings, so that measured winners can become the defaults (configs[0])."""
    out = {}
    for name, tuner in _TUNED.items():
        cache = getattr(tuner, "cache", None) or {}
        if cache:
            out[name] = {str(k): str(c) for k, c in cache.items()}
    return out


def autotune(configs, key, interp_config: dict, work=None, prune=None, **kwargs):
    """`triton.autotune(configs, key)` on a GPU; configs[0] is the default. Under the interpreter the kernel
    is returned as is and launched with `interp_config` (one fixed config: large blocks keep it fast).

    work(named_args) -> int sizes the problem (see AUTOTUNE_MIN_WORK); prune(configs, named_args, **kw)
    drops configs that cannot fit (e.g. wide features)."""

    def early_prune(cfgs, named_args, **kw):
        cfgs = prune(cfgs, named_args, **kw) if prune is not None else cfgs
        if not AUTOTUNE or (work is not None and work(named_args) < AUTOTUNE_MIN_WORK):
            return cfgs[:1]
        return cfgs

    def deco(fn):
        if INTERPRET:
            fn.interp_config = dict(interp_config)
            return fn
        tuned = triton.autotune(
            configs=configs, key=key, prune_configs_by={"early_config_prune": early_prune}, **kwargs
        )(fn)
        tuned.interp_config = None
        _TUNED[fn.__name__] = tuned
        return tuned

    return deco


def _one_blas_thread():
    """The interpreter's tl.dot is numpy's matmul: with OpenBLAS threads competing against torch's spinning
    OpenMP workers on a small CPU, one 128×128 product takes 40 ms instead of 0.1 ms."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def launch(kernel, grid, *args, **kwargs) -> None:
    """Launch a kernel made by `autotune` (or a plain @triton.jit one) through `torch.library.wrap_triton`
    (traceable by torch.compile); under the interpreter with its fixed config."""
    if INTERPRET:
        meta = dict(getattr(kernel, "interp_config", None) or {})  # a plain @triton.jit kernel: none
        meta.pop("num_warps", None)
        meta.pop("num_stages", None)
        g = grid({**kwargs, **meta}) if callable(grid) else grid
        with _one_blas_thread():
            kernel[g](*args, **kwargs, **meta)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
