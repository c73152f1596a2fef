"""The one validator of user input to `protoclr.ops`.

Every public op calls one of the `check_*` functions below before dispatch, so every backend sees the same
validated inputs and every mistake raises `ValueError` naming the function, the argument, what was expected
and what to do. Value checks (label ranges) need one device-to-host copy; they are skipped while
`torch.compile` traces, for meta tensors and when `PROTOCLR_VALUE_CHECKS=0`.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

FN_MODES = ("none", "mask", "attract")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
VALUE_CHECKS = os.environ.get("PROTOCLR_VALUE_CHECKS", "1") != "0"


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong Python type (a list for a tensor, a string for a float): a TypeError, as Python
    code expects, and a ValueError, as SPEC §3 promises for every bad input."""


def _fail(fn: str, msg: str, error: type[Exception] = ValueError) -> None:
    raise error(f"{fn}: {msg}")


def _type_name(x) -> str:
    return f"a Tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_features(fn: str, name: str, t, dim_name: str = "D") -> None:
    """A feature matrix: a 2-D float tensor (N, dim_name) with at least one column."""
    if not isinstance(t, torch.Tensor):
        _fail(fn, f"{name} must be a torch.Tensor of shape (N, {dim_name}), got {_type_name(t)}", ArgumentTypeError)
    if t.dim() != 2:
        _fail(fn, f"{name} must be 2-D of shape (N, {dim_name}), got shape {_shape(t)}")
    if t.dtype not in FLOAT_DTYPES:
        _fail(fn, f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}; cast with .float()")
    if t.size(1) < 1:
        _fail(fn, f"{name} must have at least one feature column, got shape {_shape(t)}")


def _check_labels(fn: str, name: str, t, n: int, ref: torch.Tensor, hint: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(fn, f"{name} must be a torch.Tensor, got {_type_name(t)}; {hint}", ArgumentTypeError)
    if t.dtype != torch.int64 or t.shape != (n,):
        _fail(fn, f"{name} must be int64 of shape (N,)=({n},), got {t.dtype} {_shape(t)}; {hint}")
    if t.device != ref.device:
        _fail(fn, f"{name} must be on {ref.device} like the features, got {t.device}")


def _values_checked(t: torch.Tensor) -> bool:
    # meta tensors (shape propagation) have no values to check
    return VALUE_CHECKS and t.device.type != "meta" and not torch.compiler.is_compiling()


def _check_label_values(fn: str, inst: torch.Tensor, proto: torch.Tensor, num_prototypes: int | None = None) -> None:
    if not _values_checked(inst) or inst.numel() == 0:
        return
    inst_min, proto_min, proto_max = torch.stack([inst.min(), proto.min(), proto.max()]).tolist()
    if inst_min < 0:
        _fail(fn, f"inst must hold non-negative image ids (dataset indices), got min {inst_min}")
    if proto_min < -1:
        _fail(fn, f"proto must hold prototype ids >= 0, or -1 for unknown, got min {proto_min}")
    if num_prototypes is not None and proto_max >= num_prototypes:
        _fail(fn, f"proto must be < the number of prototypes {num_prototypes}, got max {proto_max}")


def check_batch(fn: str, x: torch.Tensor, inst: torch.Tensor, proto: torch.Tensor, x_name: str = "z") -> None:
    """Rows of one batch: x (N, D) float, inst (N,) int64 >= 0, proto (N,) int64 >= -1, N >= 2."""
    check_features(fn, x_name, x)
    n = x.size(0)
    if n < 2:
        _fail(fn, f"{x_name} must hold at least 2 rows (N >= 2) to form pairs, got N={n}")
    _check_labels(fn, "inst", inst, n, x, "pass dataset indices as a LongTensor")
    _check_labels(fn, "proto", proto, n, x, "pass prototype ids as a LongTensor (-1 = unknown)")
    _check_label_values(fn, inst, proto)


# Valid temperatures. Logits, loss and gradients scale as 1/tau, and so does the rounding of fp32 logits c/tau:
# at tau = 1e-4 even the fp32 reference misses SPEC's 1e-5 gradient bound (1.3e-5, N = 300), at 1e-50 fp32's
# 1/tau overflows (NaN loss). CLIP clamps its learned temperature at 0.01; we allow 10x below that. Above 1e3
# the softmax is uniform to 1e-3 and fp16 gradients sink into subnormals.
TAU_RANGE = (1e-3, 1e3)


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_tau(fn: str, tau) -> None:
    lo, hi = TAU_RANGE
    if not _is_real(tau):
        _fail(fn, f"tau must be a float in [{lo:g}, {hi:g}], got {_type_name(tau)}", ArgumentTypeError)
    if not lo <= tau <= hi:  # NaN fails the comparison too
        _fail(fn, f"tau must be a float in [{lo:g}, {hi:g}], got {tau!r}; the SimCLR default is 0.5")


def check_weight(fn: str, name: str, value) -> None:
    """A loss weight (lambda_*): a finite real number (a Python float, not a tensor or a bool)."""
    if not _is_real(value):
        _fail(fn, f"{name} must be a finite float, got {_type_name(value)}", ArgumentTypeError)
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int no float holds (10**400)
        finite = False
    if not finite:
        _fail(fn, f"{name} must be a finite float, got {value!r}")


def check_fn_mode(fn: str, fn_mode) -> None:
    if fn_mode not in FN_MODES:
        _fail(fn, f"fn_mode must be one of {FN_MODES}, got {fn_mode!r}")


def check_head(fn: str, h: torch.Tensor, weight, bias) -> None:
    """Siamese head: weight (Dh,) or (1, Dh), bias () or (1,), floating, on h's device."""
    dh = h.size(1)
    want = f"shape (Dh,)=({dh},) or (1, {dh}) (nn.Linear(Dh, 1).weight)"
    if not isinstance(weight, torch.Tensor):
        _fail(fn, f"weight must be a torch.Tensor of {want}, got {_type_name(weight)}", ArgumentTypeError)
    if weight.shape not in ((dh,), (1, dh)):  # a (2, 2) weight for Dh = 4 is a mistake, not a flat vector
        _fail(fn, f"weight must have {want}, got {_shape(weight)}")
    if not isinstance(bias, torch.Tensor):
        _fail(fn, f"bias must be a one-element torch.Tensor, got {_type_name(bias)}", ArgumentTypeError)
    if bias.numel() != 1:
        _fail(fn, f"bias must be a one-element tensor (nn.Linear(Dh, 1).bias), got {_shape(bias)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t.dtype not in FLOAT_DTYPES:
            _fail(fn, f"{name} must be floating point, got {t.dtype}")
        if t.device != h.device:
            _fail(fn, f"{name} must be on {h.device} like h, got {t.device}")


def check_pairs(fn: str, pairs, n: int, device: torch.device) -> None:
    if pairs is None:
        return
    if not isinstance(pairs, (tuple, list)) or len(pairs) != 2:
        _fail(fn, "pairs must be None (all pairs) or a tuple (i_idx, j_idx) of int64 tensors")
    i_idx, j_idx = pairs
    for name, t in (("pairs[0]", i_idx), ("pairs[1]", j_idx)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 1:
            _fail(fn, f"{name} must be a 1-D int64 tensor of row indices")
        if t.device != device:
            _fail(fn, f"{name} must be on {device}, got {t.device}")
    if i_idx.shape != j_idx.shape:
        _fail(fn, f"pairs[0] and pairs[1] must have one shape, got {_shape(i_idx)} and {_shape(j_idx)}")
    if i_idx.numel() == 0:
        _fail(fn, "pairs must list at least one pair; pass pairs=None for all pairs")
    if _values_checked(i_idx):
        lo, hi = torch.stack(
            [torch.minimum(i_idx.min(), j_idx.min()), torch.maximum(i_idx.max(), j_idx.max())]
        ).tolist()
        if lo < 0 or hi >= n:
            _fail(fn, f"pairs must index rows in [0, {n}), got values in [{lo}, {hi}]")


def check_assign(fn: str, x, prototypes, bias, x_name: str = "x") -> None:
    """x (M, D) rows and prototypes (K >= 1, D) of one dtype and device, optional bias (K,); x_name names x."""
    check_features(fn, x_name, x)
    check_features(fn, "prototypes", prototypes)
    if prototypes.size(1) != x.size(1):
        _fail(fn, f"prototypes must have shape (K, D) with D={x.size(1)} like {x_name}, got {_shape(prototypes)}")
    if prototypes.size(0) < 1:
        _fail(fn, "prototypes must hold at least one row (K >= 1)")
    if prototypes.dtype != x.dtype:
        _fail(
            fn,
            f"prototypes must have {x_name}'s dtype {x.dtype}, got {prototypes.dtype}; cast with .to({x_name}.dtype)",
        )
    if prototypes.device != x.device:
        _fail(fn, f"prototypes must be on {x.device} like {x_name}, got {prototypes.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            _fail(fn, f"bias must be None or a torch.Tensor of shape (K,), got {_type_name(bias)}", ArgumentTypeError)
        if bias.shape != (prototypes.size(0),):
            _fail(fn, f"bias must have shape (K,)=({prototypes.size(0)},), got {_shape(bias)}")
        if bias.dtype not in FLOAT_DTYPES:
            _fail(fn, f"bias must be floating point, got {bias.dtype}")
        if bias.device != x.device:
            _fail(fn, f"bias must be on {x.device} like {x_name}, got {bias.device}")


def check_same_device(fn: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        _fail(fn, "tensors must be on one device, got " + ", ".join(f"{k} on {v}" for k, v in devices.items()))


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator/statistic dtype: float32, or float64 for float64 inputs (SPEC §3 numerics)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
