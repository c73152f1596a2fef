"""Prototype assignment (SPEC 1.4): idx_m = argmax_k x_m·c_k + bias_k (lowest k on ties), score_m the max.

One program owns BLOCK_M rows of x and sweeps the K prototypes in BLOCK_K tiles: each tile of scores is
one `tl.dot` (fp32/fp64 accumulator, D in BLOCK_D chunks), reduced at once into a running (max, argmax)
per row. No M×K buffer exists, in registers or memory: extra memory is the two (M,) outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import SMEM_BUDGET, acc_dtype, autotune, block_d, dot_precision, launch, prefer, tl_acc, upcast

# Hopper (sm_90): 128×128 score tiles keep wgmma busy; D=256 (PCA features) runs as two 128 chunks.
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 3), (128, 128, 4, 4), (64, 64, 4, 4)]
]
# Defaults by element size where configs[0] spills (sm_90 audit, bench/sm90_resources.py, Triton 3.6 and 3.8):
# fp32 (tf32x3 splits both operands in registers) spills 36-88 B at 128x128, fp64 16-32 B; these do not. The
# fp32 one is k-means' E-step on float32 PCA features (protoclr/cluster/lloyd.py), 1.28M × 256 against K = 3000.
_DEFAULTS = {
    4: triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    8: triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
}
_INTERP = {"BLOCK_M": 64, "BLOCK_K": 64}
_SAFE_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)


def _prune(configs, named_args, **kwargs):
    """The element size's default first; pipelined x and prototype tiles must fit shared memory (fp32/fp64
    tiles are 2-4x bf16's)."""
    esize, bd = named_args["x_ptr"].element_size(), kwargs["BLOCK_D"]
    keep = [
        c for c in prefer(configs, _DEFAULTS.get(esize))
        if esize * bd * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_K"]) * max(c.num_stages, 1) <= SMEM_BUDGET
    ]  # fmt: skip
    return keep or [_SAFE_CONFIG]


@autotune(_CONFIGS, key=["M", "K", "D"], interp_config=_INTERP, work=lambda a: a["M"] * a["K"] * a["D"], prune=_prune)
@triton.jit
def _assign_kernel(
    x_ptr,  # (M, D)
    c_ptr,  # (K, D) prototypes
    bias_ptr,  # (K,) accumulator dtype, read only if HAS_BIAS
    idx_ptr,  # (M,) int64 out
    score_ptr,  # (M,) accumulator dtype out
    M,
    K,
    D,
    stride_xm,
    stride_xd,
    stride_ck,
    stride_cd,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: M·D overflows int32 at ImageNet scale
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    offs_d = tl.arange(0, BLOCK_D)
    best = tl.full([BLOCK_M], float("-inf"), ACC)
    best_idx = tl.zeros([BLOCK_M], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        s = tl.zeros([BLOCK_M, BLOCK_K], ACC)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            dmask = d < D
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + d[None, :] * stride_xd,
                mask=rmask[:, None] & dmask[None, :],
                other=0.0,
            )
            c = tl.load(  # (BLOCK_D, BLOCK_K): the transposed tile, loaded as such
                c_ptr + ks[None, :] * stride_ck + d[:, None] * stride_cd,
                mask=kmask[None, :] & dmask[:, None],
                other=0.0,
            )
            if UPCAST:
                x = x.to(tl.float32)
                c = c.to(tl.float32)
            s = tl.dot(x, c, s, input_precision=DOT_PRECISION, out_dtype=ACC)
        if HAS_BIAS:
            s += tl.load(bias_ptr + ks, mask=kmask, other=0.0)[None, :]
        s = tl.where(kmask[None, :], s, float("-inf"))
        tile_max = tl.max(s, 1)
        # lowest index among the tile's maxima; a later tile wins only if strictly better (lowest k on ties)
        tile_idx = tl.min(tl.where(s == tile_max[:, None], ks[None, :], 2147483647), 1)
        better = tile_max > best
        best = tl.where(better, tile_max, best)
        best_idx = tl.where(better, tile_idx, best_idx)
    tl.store(idx_ptr + rows, best_idx.to(tl.int64), mask=rmask)
    tl.store(score_ptr + rows, best, mask=rmask)


def alloc_assign(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = x.size(0)
    return x.new_empty(m, dtype=torch.int64), x.new_empty(m, dtype=acc_dtype(x.dtype))


def assign(x: torch.Tensor, prototypes: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, D), prototypes (K, D), bias (K,) or None -> (idx (M,) int64, score (M,) fp32|fp64)."""
    idx, score = alloc_assign(x)
    m, d = x.shape
    k = prototypes.size(0)
    if m == 0:
        return idx, score
    if k == 0:
        return idx.zero_(), score.fill_(float("-inf"))
    has_bias = bias is not None
    b = bias.to(acc_dtype(x.dtype)).contiguous() if has_bias else score  # dummy pointer when absent
    launch(
        _assign_kernel,
        lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),),
        x, prototypes, b, idx, score,
        m, k, d,
        x.stride(0), x.stride(1), prototypes.stride(0), prototypes.stride(1),
        HAS_BIAS=has_bias,
        BLOCK_D=block_d(d, 256 // x.element_size()),  # 128 bf16, 64 fp32, 32 fp64 features per chunk
        UPCAST=upcast(x.dtype),
        DOT_PRECISION=dot_precision(x.dtype),
        ACC=tl_acc(x.dtype),
    )  # fmt: skip
    return idx, score
