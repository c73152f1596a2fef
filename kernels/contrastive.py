"""Contrastive building block (SPEC 1.1, contract in csrc/ops.cpp): fused forward and backward.

Row/column form: rows z (N, D) are anchors with global index row_offset + r, columns zc (Nc, D) the batch.
With c_ij = z_i·zc_j, P(i) = {j != i: inst_j = inst_i}, F(i) = {j: inst_j != inst_i, proto_i >= 0,
protoc_j = proto_i}, A(i) = {j != i}, Den(i) = A(i) \\ F(i) when `mask` (fn_mode "mask"), else A(i):
  forward:  lse_i = logsumexp_{j in Den(i)} c_ij / tau,  stats_i = [sum_P c, |P|, sum_F c, |F|, sum_A c]
  backward: gradients of sum(grad_lse·lse) + sum(grad_stats·stats).

Design (flash-attention style; no N×Nc buffer anywhere):
- The log-sum-exp is the only term that needs every (i, j): one program per BLOCK_M anchor rows sweeps the
  columns in BLOCK_N tiles, each tile of c one `tl.dot` (fp32 accumulator), with an online log-sum-exp
  (running max, running sum) per row. Under fn_mode "mask" the false-negative mask comes from the labels,
  loaded per tile as int32 codes (`utils.label_codes`). Column tiles that touch the diagonal j = i or the
  ragged end are MASKED (evaluate A(i) and the bounds); the others skip those comparisons.
- Max and lse are in natural units, x = c·(1/tau) rounded once, as the backward rounds it; the backward's
  weight exp(x − lse) of a row's dominant column is then exactly 1 at small tau, as in the reference. (A
  base-2 lse converted to natural units and back is off by ulps of 1/tau, which scaled every weight: gradient
  error 1.2e-4 at tau = 1e-4 in the interpreter. On a GPU a fused multiply-add may still skip the rounding.)
- The statistics are linear in c over label-defined sets, so they need no pass over (i, j):
  sum_P c_i = z_i·Σ_{j∈P(i)} zc_j, and Σ_{j∈P(i)} zc_j is a per-image segment sum of zc (minus the anchor's
  own column); likewise F (per-prototype sum minus the per-(image, prototype) sum) and A (the column total
  minus the own column). These O((N + Nc)·D) segment sums (`_stats_and_grads`) are exact and replace five
  masked reductions per (i, j), which push the fused tile loop past sm_90's register file (spills, a
  forward ~10x slower: bench/results/README.md). Their gradients are the same segment sums weighted by
  grad_stats.
- Backward recomputes c tile by tile, twice: a row pass (dz_i = Σ_j G_ij zc_j; the column tile is both the
  `tl.dot` operand for c and the one for G·zc) and a column pass (dzc_j = Σ_i G_ij z_i; tiles computed
  transposed, c^T = zc_J·z_I^T, so dzc_J accumulates in registers), with G the log-sum-exp part only; the
  statistics' part, an (N, D) / (Nc, D) term from the segment sums, is added in the epilogue before the
  single rounding to the input dtype. Why not atomics for dzc: one pass would do 6N²D instead of 8N²D
  FLOPs but issue N²·D/BLOCK_M fp32 atomic adds (4.3e9 at N = 65,536, D = 128), more than the L2 atomic
  units hide under the tensor-core work; two passes are deterministic and each is an attention-forward-
  shaped loop that Triton pipelines well.
- D up to 512 bytes per row (256 bf16 features; 256 bytes = 64 features for fp32 with tf32x3, whose operand
  splits double the registers, see `_D_SINGLE_BYTES_TF32X3`) is one tile (the stationary tile is loaded once);
  wider rows loop over BLOCK_D chunks for c and spread the backward's output chunks over grid axis 1.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .utils import (
    INTERPRET,
    LN_2,
    LOG2_E,
    SMEM_BUDGET,
    acc_dtype,
    autotune,
    block_d,
    dot_precision,
    label_codes,
    launch,
    prefer,
    scalars,
    tl_acc,
    upcast,
)

_D_SINGLE_BYTES = 512  # widest feature row held as one tile: 256 bf16 features
# fp32 with tf32x3: Triton splits each fp32 operand into two TF32 halves in registers, so a stationary
# (BLOCK, 128) fp32 tile costs twice its size in registers and every backward config spills at D = 128.
# 64-feature chunks (D_SINGLE = False beyond 64 features) leave configs below that compile without spills; the
# backward then recomputes c once per 64-feature output chunk (2x at D = 128), far cheaper than local memory.
_D_SINGLE_BYTES_TF32X3 = 256
# fp32 inputs: "tf32x3" (three TF32 products, ~fp32 accuracy) on tensor cores; "tf32" is ~3x faster and
# within SPEC's GPU bound of 1e-3; "ieee" is FMA (spills heavily at D = 128).
FP32_DOT_PRECISION = os.environ.get("PROTOCLR_TRITON_FP32_DOT", "tf32x3")


def _cfgs(rows) -> list:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in rows]


# Hopper (sm_90) candidates per operand kind (`_kind`); [0] is the default (no tuning). bf16/fp16 (D = 128,
# 06-fused-attention shapes) also serve fp64 and the opt-in fp32 "tf32"/"ieee", within the shared-memory prune.
# Every default compiles without register spills for sm_90 in every fn_mode and feature width (D_SINGLE,
# EVEN_D) for bf16, fp16 and fp32, aligned or ragged (`_RAGGED_DEFAULTS`), except the fp32 row pass at
# D % 16 != 0: tests/test_sm90_resources.py keeps it so (bench/sm90_resources.py; figures in
# bench/results/README.md).
_FWD = {
    "16bit": _cfgs(
        [(128, 64, 8, 4), (128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 2)]
    ),
    # tf32x3 in 64-feature chunks: the configs that compile without spills (128x64 and 64x64 tiles spill)
    "tf32x3": _cfgs([(128, 32, 8, 2), (64, 32, 4, 2), (128, 32, 8, 1)]),
}
# Backward row pass: a (BLOCK_M, BLOCK_D) fp32 accumulator besides the c tile.
_ROWS = {
    "16bit": _cfgs(
        [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2)]
    ),
    # tf32x3: pipelined (num_stages 2) 64x32 and 128x32 tiles spill; one stage or 16 columns do not
    "tf32x3": _cfgs([(64, 32, 4, 1), (128, 32, 8, 1), (128, 16, 8, 2), (128, 16, 8, 1)]),
}
# Backward column pass: BLOCK_N stationary columns, BLOCK_M moving anchors; the anchors' statistics lie along
# the tile's second axis, so each thread holds many of them: fewer moving anchors per tile.
_COLS = {
    "16bit": _cfgs([(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (64, 128, 8, 3), (64, 64, 4, 2), (32, 64, 4, 2)]),
    "tf32x3": _cfgs([(64, 32, 8, 2), (64, 32, 8, 1)]),
}
# Defaults that differ by fn_mode: "mask" loads and compares labels per tile. The 16-bit column pass's 64x128
# default spills under "mask" at D = 128; 32x128 does not.
_MASK_DEFAULTS = {"cols": {"16bit": _COLS["16bit"][1]}}
# Defaults for ragged problems (N, Nc, D, a row stride or row_offset not a multiple of 16: Triton cannot prove
# alignment, so loads are scalar and masked, with one 64-bit address per element): the aligned defaults spill
# there, these do not, except fp32 rows with D % 16 != 0, which spill in every config tried (128x16 the least).
_RAGGED_DEFAULTS = {
    "fwd": {"tf32x3": _FWD["tf32x3"][2]},
    "rows": {"16bit": _ROWS["16bit"][5], "tf32x3": _ROWS["tf32x3"][3]},
    "cols": {"16bit": _COLS["16bit"][5], "tf32x3": _COLS["tf32x3"][1]},
}
# the autotuners' lists: every family, the 16-bit one first (its [0] is what an unpruned launch would use)
_FWD_CONFIGS, _ROWS_CONFIGS, _COLS_CONFIGS = (
    f["16bit"] + [c for c in f["tf32x3"] if c not in f["16bit"]] for f in (_FWD, _ROWS, _COLS)
)
_INTERP = {"BLOCK_M": 64, "BLOCK_N": 128}


def _work(args) -> int:
    return args["N"] * args["Nc"] * args["D"]


def _kind(esize: int, dot_precision: str | None) -> str:
    """Config family of the operands: "tf32x3" for fp32 on the default fp32 path, else "16bit" (whose list
    the shared-memory prune adapts to fp32 "tf32"/"ieee" and fp64)."""
    return "tf32x3" if esize == 4 and dot_precision == "tf32x3" else "16bit"


def _ragged(named_args) -> bool:
    """Some size, row stride or offset is not a multiple of 16 (no divisibility specialisation)."""
    names = ("N", "Nc", "D", "row_offset", "stride_zn", "stride_zcn")
    return any(isinstance(named_args.get(k), int) and named_args[k] % 16 for k in names)


def _pruner(stationary: str, moving: str, grad_tile: bool, families: dict, defaults: dict):
    """The candidates of the operands' family (`_kind`), the default for ragged sizes or fn_mode "mask" first
    (`defaults`: {"ragged"|"mask": {kind: config}}), minus configs whose pipelined tiles exceed shared memory
    (fp32/fp64 tiles are 2-4x bf16's; tf32x3 keeps split copies of the operands, ~1.5x more) or whose registers
    cannot hold a wide-feature accumulator; a small safe config remains when nothing fits. The model is an upper
    bound of Triton 3.6's sm_90 allocation (bench/sm90_resources.py compiles every config and checks the real
    figure)."""

    def prune(configs, named_args, **kwargs):
        esize = named_args["z_ptr"].element_size()
        bd = kwargs["BLOCK_D"]
        kind = _kind(esize, kwargs.get("DOT_PRECISION"))
        family = families[kind]
        configs = [c for c in family if c in configs] or list(configs)  # in the family's order: [0] its default
        if _ragged(named_args) and kind in defaults.get("ragged", {}):
            configs = prefer(configs, defaults["ragged"][kind])
        elif kwargs.get("MASK"):
            configs = prefer(configs, defaults.get("mask", {}).get(kind))
        eff = esize * (1.5 if kind == "tf32x3" else 1.0)
        keep = []
        for c in configs:
            bs, bmv, st = c.kwargs[stationary], c.kwargs[moving], max(c.num_stages, 1)
            if kwargs.get("D_SINGLE", True):  # stationary tile once, moving tiles pipelined
                smem = eff * bd * (bs + st * bmv)
            else:  # both operands stream through the feature loop
                smem = eff * bd * (bs + bmv) * st
            smem += eff * bs * bmv if grad_tile else 0
            wide_ok = bd * esize <= 256 or bs * bmv <= 128 * 64
            if smem <= SMEM_BUDGET and wide_ok:
                keep.append(c)
        return keep or [_SAFE_CONFIG]

    return prune


_prune_fwd = _pruner("BLOCK_M", "BLOCK_N", False, _FWD, {"ragged": _RAGGED_DEFAULTS["fwd"]})
_prune_rows = _pruner("BLOCK_M", "BLOCK_N", True, _ROWS, {"ragged": _RAGGED_DEFAULTS["rows"]})
_prune_cols = _pruner(
    "BLOCK_N", "BLOCK_M", True, _COLS, {"ragged": _RAGGED_DEFAULTS["cols"], "mask": _MASK_DEFAULTS["cols"]}
)
_SAFE_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)


# ------------------------------------------------------------------------------------------- helpers


@triton.jit
def _tile_plan(diag_start, stationary, length, BLOCK: tl.constexpr):
    """Split the moving axis (length, tiles of BLOCK) into tiles that need the j != i / bounds masks and
    tiles that do not. The moving indices diag_start + [0, stationary) meet the diagonal.
    Returns (u1_end, u2_start, n_full, band_lo, band_hi, tail_lo, tail_hi): unmasked tiles are
    [0, u1_end) and [u2_start, n_full); masked tiles are [band_lo, band_hi) and [tail_lo, tail_hi)."""
    lo = tl.minimum(tl.maximum(diag_start, 0), length)
    hi = tl.minimum(tl.maximum(diag_start + stationary, 0), length)
    band_lo = lo // BLOCK
    band_hi = tl.where(hi > lo, (hi + BLOCK - 1) // BLOCK, band_lo)
    n_full = length // BLOCK
    n_tiles = (length + BLOCK - 1) // BLOCK
    u1_end = tl.minimum(band_lo, n_full)
    tail_in_band = (n_full >= band_lo) & (n_full < band_hi)
    tail_hi = tl.where((n_full < n_tiles) & (~tail_in_band), n_tiles, n_full)
    return u1_end, band_hi, n_full, band_lo, band_hi, n_full, tail_hi


@triton.jit
def _sim_tile(
    q,  # (BLOCK_A, BLOCK_D) stationary tile, used when D_SINGLE
    a_ptr,
    b_ptr,
    a_idx,
    a_mask,
    b_idx,
    b_mask,
    D,
    d_out0,
    stride_an,
    stride_ad,
    stride_bn,
    stride_bd,
    BLOCK_A: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    FULL: tl.constexpr,
    EVEN_D: tl.constexpr,
    TRANS_LOAD: tl.constexpr = INTERPRET,
):
    """(c (BLOCK_A, BLOCK_B) = a·b^T in ACC, the moving tile's features [d_out0, d_out0 + BLOCK_D)).
    FULL: every moving index is in range; EVEN_D: D == BLOCK_D (D_SINGLE). Both drop load masks."""
    offs_d = tl.arange(0, BLOCK_D)
    if D_SINGLE:
        b_ptrs = b_ptr + b_idx[:, None] * stride_bn + offs_d[None, :] * stride_bd
        if FULL and EVEN_D:
            b = tl.load(b_ptrs)
        elif EVEN_D:
            b = tl.load(b_ptrs, mask=b_mask[:, None], other=0.0)
        elif FULL:
            b = tl.load(b_ptrs, mask=(offs_d < D)[None, :], other=0.0)
        else:
            b = tl.load(b_ptrs, mask=b_mask[:, None] & (offs_d < D)[None, :], other=0.0)
        if UPCAST:
            b = b.to(tl.float32)
        if TRANS_LOAD:  # interpreter: numpy's matmul is ~100x slower on a transposed view than on a fresh load
            bt = tl.load(
                b_ptr + b_idx[None, :] * stride_bn + offs_d[:, None] * stride_bd,
                mask=b_mask[None, :] & (offs_d < D)[:, None],
                other=0.0,
            )
            if UPCAST:
                bt = bt.to(tl.float32)
        else:  # GPU: one load; the transpose is a shared-memory layout choice for the MMA operand
            bt = tl.trans(b)
        c = tl.dot(q, bt, input_precision=DOT_PRECISION, out_dtype=ACC)
    else:
        c = tl.zeros([BLOCK_A, BLOCK_B], ACC)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + offs_d
            dm = d < D
            a = tl.load(
                a_ptr + a_idx[:, None] * stride_an + d[None, :] * stride_ad,
                mask=a_mask[:, None] & dm[None, :],
                other=0.0,
            )
            bt = tl.load(  # transposed (BLOCK_D, BLOCK_B)
                b_ptr + b_idx[None, :] * stride_bn + d[:, None] * stride_bd,
                mask=b_mask[None, :] & dm[:, None],
                other=0.0,
            )
            if UPCAST:
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            c = tl.dot(a, bt, c, input_precision=DOT_PRECISION, out_dtype=ACC)
        d = d_out0 + offs_d
        b = tl.load(
            b_ptr + b_idx[:, None] * stride_bn + d[None, :] * stride_bd,
            mask=b_mask[:, None] & (d < D)[None, :],
            other=0.0,
        )
        if UPCAST:
            b = b.to(tl.float32)
    return c, b


# ------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_range(
    m, l_sum, t_start, t_end,
    q, z_ptr, zc_ptr, instc_ptr, protoc_ptr,
    rows, rmask, gi, inst_i, proto_i, inv_tau, log2e,
    Nc, D, stride_zn, stride_zd, stride_zcn, stride_zcd,
    MASKED: tl.constexpr, MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    for t in range(t_start, t_end):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < Nc
        c, _ = _sim_tile(
            q, z_ptr, zc_ptr, rows, rmask, cols, cmask, D, 0, stride_zn, stride_zd, stride_zcn, stride_zcd,
            BLOCK_M, BLOCK_N, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, not MASKED, EVEN_D,
        )  # fmt: skip
        # online log-sum-exp over Den(i) of s = c/tau; exp through exp2 of (s − max)·log2(e)
        s = c * inv_tau
        if MASK:  # Den(i) = A(i) \ F(i)
            instc = tl.load(instc_ptr + cols, mask=cmask, other=-3)
            protoc = tl.load(protoc_ptr + cols, mask=cmask, other=-3)
            fneg = (proto_i[:, None] == protoc[None, :]) & (inst_i[:, None] != instc[None, :])
            if MASKED:
                fneg = fneg | (gi[:, None] == cols[None, :]) | (~cmask[None, :])
            s = tl.where(fneg, float("-inf"), s)
        elif MASKED:
            s = tl.where((gi[:, None] != cols[None, :]) & cmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-excluded row so far: no inf - inf
        l_sum = l_sum * tl.exp2((m - m_ref) * log2e) + tl.sum(tl.exp2((s - m_ref[:, None]) * log2e), 1)
        m = m_new
    return m, l_sum


@triton.jit
def _plan_ranges(which: tl.constexpr, u1_end, u2_start, n_full, band_lo, band_hi, tail_lo, tail_hi):
    if which == 0:
        return 0, u1_end
    elif which == 1:
        return u2_start, n_full
    elif which == 2:
        return band_lo, band_hi
    else:
        return tail_lo, tail_hi


@autotune(_FWD_CONFIGS, key=["N", "Nc", "D"], interp_config=_INTERP, work=_work, prune=_prune_fwd)
@triton.jit
def _contrastive_fwd_kernel(
    z_ptr,  # (N, D) rows
    zc_ptr,  # (Nc, D) columns
    inst_ptr, instc_ptr, proto_ptr, protoc_ptr,  # int32 label codes (utils.label_codes); read for "mask"
    consts_ptr,  # [1/tau, ln 2, log2(e)] in ACC
    lse_ptr,  # (N,) out
    N, Nc, D, row_offset,
    stride_zn, stride_zd, stride_zcn, stride_zcd,
    MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0).to(tl.int64)
    i0 = pid * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    rmask = rows < N
    gi = row_offset + rows
    inst_i = tl.load(inst_ptr + rows, mask=rmask, other=-1)
    proto_i = tl.load(proto_ptr + rows, mask=rmask, other=-1)
    proto_i = tl.where(proto_i >= 0, proto_i, -2)  # unknown anchors match no column (columns hold >= -1)
    inv_tau = tl.load(consts_ptr)
    ln2 = tl.load(consts_ptr + 1)
    log2e = tl.load(consts_ptr + 2)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        z_ptr + rows[:, None] * stride_zn + offs_d[None, :] * stride_zd,
        mask=rmask[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)

    m = tl.full([BLOCK_M], float("-inf"), ACC)
    l_sum = tl.zeros([BLOCK_M], ACC)
    plan = _tile_plan(row_offset + i0, BLOCK_M, Nc, BLOCK_N)
    for which in tl.static_range(4):
        t_start, t_end = _plan_ranges(which, *plan)
        m, l_sum = _fwd_range(
            m, l_sum, t_start, t_end,
            q, z_ptr, zc_ptr, instc_ptr, protoc_ptr, rows, rmask, gi, inst_i, proto_i, inv_tau, log2e,
            Nc, D, stride_zn, stride_zd, stride_zcn, stride_zcd,
            which >= 2, MASK, BLOCK_M, BLOCK_N, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, EVEN_D,
        )  # fmt: skip
    tl.store(lse_ptr + rows, m + tl.log2(l_sum) * ln2, mask=rmask)  # l_sum = 0 (Den empty): -inf


# ------------------------------------------------------------------------------------------ backward
#
# SPEC 1.1 / csrc/ops.cpp. The backward differentiates
#   L = Σ_i gl_i·lse_i + Σ_i (gs_i0·Σ_{j∈P(i)} c_ij + gs_i2·Σ_{j∈F(i)} c_ij + gs_i4·Σ_{j∈A(i)} c_ij)
# (count columns gs_i1, gs_i3 carry no gradient). With lse_i = log Σ_{j∈Den(i)} exp(c_ij/tau):
#   ∂lse_i/∂c_ij = [j∈Den(i)]·exp(c_ij/tau − lse_i)/tau,  so
#   G_ij := ∂L/∂c_ij = [j∈Den(i)]·gl_i·exp2((c_ij·(1/tau) − lse_i)·log2(e))/tau         (the kernels)
#                     + [j∈P(i)]·gs_i0 + [j∈F(i)]·gs_i2 + [j∈A(i)]·gs_i4                (segment sums)
# c_ij = z_i·zc_j gives dz_i = Σ_j G_ij zc_j (row pass) and dzc_j = Σ_i G_ij z_i (column pass). The
# label-set part of Σ_j G_ij zc_j is gs_i0·Σ_P zc + gs_i2·Σ_F zc + gs_i4·Σ_A zc, per row from the same
# segment sums as the forward statistics, and for columns the mirrored sums of gs·z (`_label_grads`).
# Rows with Den(i) empty have lse_i = −inf and no Den term: lse is replaced by 0 there so that the
# masked-out exp2 never produces inf·0 = NaN.


@triton.jit
def _acc_dot(acc, g, x, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr, G_FP32: tl.constexpr):
    """acc += g @ x with G on tensor cores. G in the input dtype (bf16 keeps fp32's exponent range), except
    for fp16 inputs: at large N, G ~ gl·softmax/tau ~ 1e-9 underflows fp16, so G stays fp32 and the
    product runs in TF32 (fp16 features convert to TF32 exactly)."""
    if G_FP32:
        acc = tl.dot(g, x.to(tl.float32), acc, input_precision="tf32", out_dtype=ACC)
    else:
        acc = tl.dot(g.to(x.dtype), x, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _softmax_grad(c, gl, lse, inv_tau, log2e, inst_a, inst_b, proto_a, proto_b, diag, bounds,
                  MASKED: tl.constexpr, MASK: tl.constexpr):  # fmt: skip
    """[j∈Den(i)]·gl_i/tau·exp(c/tau − lse_i) for one tile, c/tau rounded as in the forward; every argument
    arrives broadcast to the tile's orientation (anchors on axis 0 in the row pass, on axis 1 in the column
    pass); diag: g_i == j, bounds: the moving index is in range."""
    g = gl * tl.exp2((c * inv_tau - lse) * log2e)
    if MASK:
        out = (proto_a == proto_b) & (inst_a != inst_b)
        if MASKED:
            out = out | diag | (~bounds)
        g = tl.where(out, 0.0, g)
    elif MASKED:
        g = tl.where(diag | (~bounds), 0.0, g)
    return g


@triton.jit
def _load_anchor(grad_lse_ptr, lse_ptr, rows, rmask, inv_tau):
    gl = tl.load(grad_lse_ptr + rows, mask=rmask, other=0.0) * inv_tau
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    return gl, tl.where(lse == float("-inf"), 0.0, lse)


@triton.jit
def _bwd_rows_range(
    acc, t_start, t_end,
    q, z_ptr, zc_ptr, instc_ptr, protoc_ptr,
    rows, rmask, gi, inst_i, proto_i, gl, lse, inv_tau, log2e,
    Nc, D, d_out0, stride_zn, stride_zd, stride_zcn, stride_zcd,
    MASKED: tl.constexpr, MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    G_FP32: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    for t in range(t_start, t_end):
        cols = t * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < Nc
        c, k = _sim_tile(
            q, z_ptr, zc_ptr, rows, rmask, cols, cmask, D, d_out0, stride_zn, stride_zd, stride_zcn, stride_zcd,
            BLOCK_M, BLOCK_N, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, not MASKED, EVEN_D,
        )  # fmt: skip
        if MASK:
            instc = tl.load(instc_ptr + cols, mask=cmask, other=-3)
            protoc = tl.load(protoc_ptr + cols, mask=cmask, other=-3)
        else:
            instc = cols
            protoc = cols
        g = _softmax_grad(
            c, gl[:, None], lse[:, None], inv_tau, log2e, inst_i[:, None], instc[None, :], proto_i[:, None],
            protoc[None, :], gi[:, None] == cols[None, :], cmask[None, :], MASKED, MASK,
        )  # fmt: skip
        acc = _acc_dot(acc, g, k, DOT_PRECISION, ACC, G_FP32)
    return acc


@autotune(_ROWS_CONFIGS, key=["N", "Nc", "D"], interp_config=_INTERP, work=_work, prune=_prune_rows)
@triton.jit
def _contrastive_bwd_rows_kernel(
    grad_lse_ptr, lse_ptr,  # (N,), (N,) ACC
    z_ptr, zc_ptr, inst_ptr, instc_ptr, proto_ptr, protoc_ptr, consts_ptr,
    extra_ptr,  # (N, D) ACC contiguous: the statistics' part of dz, added before rounding
    dz_ptr,  # (N, D) out, input dtype
    N, Nc, D, row_offset,
    stride_zn, stride_zd, stride_zcn, stride_zcd, stride_dzn, stride_dzd,
    MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    G_FP32: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Row pass: dz_i = Σ_j G_ij zc_j (derivation above)."""
    pid = tl.program_id(0).to(tl.int64)
    d_out0 = tl.program_id(1).to(tl.int64) * BLOCK_D
    i0 = pid * BLOCK_M
    rows = i0 + tl.arange(0, BLOCK_M)
    rmask = rows < N
    gi = row_offset + rows
    inst_i = tl.load(inst_ptr + rows, mask=rmask, other=-1)
    proto_i = tl.load(proto_ptr + rows, mask=rmask, other=-1)
    proto_i = tl.where(proto_i >= 0, proto_i, -2)
    inv_tau = tl.load(consts_ptr)
    log2e = tl.load(consts_ptr + 2)
    gl, lse = _load_anchor(grad_lse_ptr, lse_ptr, rows, rmask, inv_tau)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        z_ptr + rows[:, None] * stride_zn + offs_d[None, :] * stride_zd,
        mask=rmask[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)

    plan = _tile_plan(row_offset + i0, BLOCK_M, Nc, BLOCK_N)
    for which in tl.static_range(4):
        t_start, t_end = _plan_ranges(which, *plan)
        acc = _bwd_rows_range(
            acc, t_start, t_end, q, z_ptr, zc_ptr, instc_ptr, protoc_ptr,
            rows, rmask, gi, inst_i, proto_i, gl, lse, inv_tau, log2e,
            Nc, D, d_out0, stride_zn, stride_zd, stride_zcn, stride_zcd,
            which >= 2, MASK, BLOCK_M, BLOCK_N, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, G_FP32, EVEN_D,
        )  # fmt: skip

    d = d_out0 + offs_d
    omask = rmask[:, None] & (d < D)[None, :]
    acc += tl.load(extra_ptr + rows[:, None] * D + d[None, :], mask=omask, other=0.0)
    tl.store(dz_ptr + rows[:, None] * stride_dzn + d[None, :] * stride_dzd, acc.to(dz_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _bwd_cols_range(
    acc, t_start, t_end,
    q, z_ptr, zc_ptr, inst_ptr, proto_ptr, grad_lse_ptr, lse_ptr,
    cols, cmask, instc, protoc, inv_tau, log2e,
    N, D, d_out0, row_offset, stride_zn, stride_zd, stride_zcn, stride_zcd,
    MASKED: tl.constexpr, MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    G_FP32: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    for t in range(t_start, t_end):
        rows = t * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < N
        gl, lse = _load_anchor(grad_lse_ptr, lse_ptr, rows, rmask, inv_tau)
        if MASK:
            inst_i = tl.load(inst_ptr + rows, mask=rmask, other=-1)
            proto_i = tl.load(proto_ptr + rows, mask=rmask, other=-1)
            proto_i = tl.where(proto_i >= 0, proto_i, -2)
        else:
            inst_i = rows
            proto_i = rows
        # transposed tile: c^T (BLOCK_N columns, BLOCK_M anchors) = zc_J · z_I^T
        ct, zi = _sim_tile(
            q, zc_ptr, z_ptr, cols, cmask, rows, rmask, D, d_out0, stride_zcn, stride_zcd, stride_zn, stride_zd,
            BLOCK_N, BLOCK_M, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, not MASKED, EVEN_D,
        )  # fmt: skip
        gt = _softmax_grad(
            ct, gl[None, :], lse[None, :], inv_tau, log2e, inst_i[None, :], instc[:, None], proto_i[None, :],
            protoc[:, None], (row_offset + rows)[None, :] == cols[:, None], rmask[None, :], MASKED, MASK,
        )  # fmt: skip
        acc = _acc_dot(acc, gt, zi, DOT_PRECISION, ACC, G_FP32)
    return acc


@autotune(_COLS_CONFIGS, key=["N", "Nc", "D"], interp_config=_INTERP, work=_work, prune=_prune_cols)
@triton.jit
def _contrastive_bwd_cols_kernel(
    grad_lse_ptr, lse_ptr,
    z_ptr, zc_ptr, inst_ptr, instc_ptr, proto_ptr, protoc_ptr, consts_ptr,
    extra_ptr,  # (Nc, D) ACC contiguous: the statistics' part of dzc
    dzc_ptr,  # (Nc, D) out, input dtype
    N, Nc, D, row_offset,
    stride_zn, stride_zd, stride_zcn, stride_zcd, stride_dzn, stride_dzd,
    MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    G_FP32: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Column pass: dzc_j = Σ_i G_ij z_i (derivation above); this program owns BLOCK_N columns."""
    pid = tl.program_id(0).to(tl.int64)
    d_out0 = tl.program_id(1).to(tl.int64) * BLOCK_D
    j0 = pid * BLOCK_N
    cols = j0 + tl.arange(0, BLOCK_N)
    cmask = cols < Nc
    instc = tl.load(instc_ptr + cols, mask=cmask, other=-3)
    protoc = tl.load(protoc_ptr + cols, mask=cmask, other=-3)
    inv_tau = tl.load(consts_ptr)
    log2e = tl.load(consts_ptr + 2)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(
        zc_ptr + cols[:, None] * stride_zcn + offs_d[None, :] * stride_zcd,
        mask=cmask[:, None] & (offs_d < D)[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], ACC)

    # anchors r with row_offset + r in [j0, j0 + BLOCK_N) sit on the diagonal
    plan = _tile_plan(j0 - row_offset, BLOCK_N, N, BLOCK_M)
    for which in tl.static_range(4):
        t_start, t_end = _plan_ranges(which, *plan)
        acc = _bwd_cols_range(
            acc, t_start, t_end, q, z_ptr, zc_ptr, inst_ptr, proto_ptr, grad_lse_ptr, lse_ptr,
            cols, cmask, instc, protoc, inv_tau, log2e,
            N, D, d_out0, row_offset, stride_zn, stride_zd, stride_zcn, stride_zcd,
            which >= 2, MASK, BLOCK_M, BLOCK_N, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, G_FP32, EVEN_D,
        )  # fmt: skip

    d = d_out0 + offs_d
    omask = cmask[:, None] & (d < D)[None, :]
    acc += tl.load(extra_ptr + cols[:, None] * D + d[None, :], mask=omask, other=0.0)
    tl.store(
        dzc_ptr + cols[:, None] * stride_dzn + d[None, :] * stride_dzd, acc.to(dzc_ptr.dtype.element_ty), mask=omask
    )


# ------------------------------------------------------------------------------- label-set statistics
# P, F and A are defined by labels alone, so their sums over j are segment sums (SPEC 1.1 sets, exact):
#   Σ_{j∈P(i)} x_j = S_img[inst_i] − [self_i]·x_{g_i}        S_img[u]  = Σ_{j: instc_j = u} x_j
#   Σ_{j∈F(i)} x_j = [proto_i >= 0]·(S_pro[proto_i] − S_pair[(inst_i, proto_i)])
#   Σ_{j∈A(i)} x_j = Σ_j x_j − [g_i < Nc]·x_{g_i}
# with self_i = [g_i < Nc and instc_{g_i} = inst_i] (the anchor's own column, excluded from P and A).
# The mirrored sums over anchors i give the column gradients. Codes come from one joint ranking of the
# row and column labels (utils.label_codes), so segment ids are < N + Nc and all buffers are O((N+Nc)·D).


def _codes(inst, instc, proto, protoc):
    inst, instc = label_codes(inst, instc)
    proto, protoc = label_codes(proto, protoc)
    # (image, prototype) pairs: codes are < 2^31, so code_img·2^32 + code_proto + 1 is injective
    pair, pairc = label_codes(inst.long() * (1 << 32) + proto + 1, instc.long() * (1 << 32) + protoc + 1)
    return inst, instc, proto, protoc, pair, pairc


def _segment(values, ids, size):
    """(size + 1, ...) sums of values by ids; ids < 0 go to the last (discarded) slot."""
    ids = torch.where(ids >= 0, ids, size).long()
    out = values.new_zeros((size + 1, *values.shape[1:]))
    return out.index_add_(0, ids, values)


def _gather(table, ids):
    return table[torch.where(ids >= 0, ids, table.size(0) - 1).long()]


def _stats_and_grads(z, zc, codes, row_offset, grad_stats=None):
    """Forward statistics (N, 5) or, with grad_stats (N, 5), the statistics' parts of dz (N, D), dzc (Nc, D)."""
    acc = acc_dtype(z.dtype)
    inst, instc, proto, protoc, pair, pairc = codes
    n, nc = z.size(0), zc.size(0)
    size = n + nc
    g = row_offset + torch.arange(n, device=z.device)
    has_self = g < nc
    self_col = g.clamp(max=nc - 1)
    self_p = has_self & (instc[self_col] == inst)  # own column counted in S_img[inst_i]
    known = proto >= 0
    zf, zcf = z.to(acc), zc.to(acc)

    def row_sums(xc):  # Σ over columns of xc (Nc, ...) restricted to P(i), F(i), A(i), per anchor i
        s_img, s_pro, s_pair = _segment(xc, instc, size), _segment(xc, protoc, size), _segment(xc, pairc, size)
        own = xc[self_col]
        shape = (-1,) + (1,) * (xc.dim() - 1)
        p = _gather(s_img, inst) - self_p.reshape(shape) * own
        f = known.reshape(shape) * (
            _gather(s_pro, torch.where(known, proto, -1)) - _gather(s_pair, torch.where(known, pair, -1))
        )
        a = xc.sum(0) - has_self.reshape(shape) * own
        return p, f, a

    if grad_stats is None:
        p, f, a = row_sums(zcf)
        cp, cf, _ = row_sums(torch.ones(nc, dtype=acc, device=z.device))
        return torch.stack([(zf * p).sum(1), cp, (zf * f).sum(1), cf, (zf * a).sum(1)], 1)

    gs = grad_stats.to(acc)
    p, f, a = row_sums(zcf)
    dz = gs[:, 0:1] * p + gs[:, 2:3] * f + gs[:, 4:5] * a
    del p, f, a
    # columns: Σ over anchors i with j ∈ P(i) / F(i) / A(i) of gs_i·z_i (mirror of row_sums)
    wp, wf, wa = gs[:, 0:1] * zf, (gs[:, 2:3] * known[:, None]) * zf, gs[:, 4:5] * zf
    t_img = _segment(wp, inst, size)
    t_pro = _segment(wf, torch.where(known, proto, -1), size)
    t_pair = _segment(wf, torch.where(known, pair, -1), size)
    dzc = _gather(t_img, instc) + (protoc >= 0)[:, None] * (_gather(t_pro, protoc) - _gather(t_pair, pairc))
    dzc = dzc + wa.sum(0)
    # the anchor whose own column is j: excluded from A always, from P when the images match
    r = torch.arange(nc, device=z.device) - row_offset
    is_row = (r >= 0) & (r < n)
    rr = r.clamp(0, max(n - 1, 0))
    own_p = is_row & (inst[rr] == instc)
    dzc = dzc - own_p[:, None] * wp[rr] - is_row[:, None] * wa[rr]
    return dz, dzc


# ----------------------------------------------------------------------------------------- launchers


def _common(z: torch.Tensor, tau: float, mask: bool):
    d = z.size(1)
    tf32x3 = z.dtype == torch.float32 and FP32_DOT_PRECISION == "tf32x3"
    single_bytes = _D_SINGLE_BYTES_TF32X3 if tf32x3 else _D_SINGLE_BYTES
    row_bytes = single_bytes // z.element_size()  # 256 bf16/fp16, 64 fp32 (tf32x3; else 128), 64 fp64 features
    bd = block_d(d, row_bytes)
    d_single = bd >= d
    if not d_single:
        bd = min(128, row_bytes)
    consts = scalars([1.0 / tau, LN_2, LOG2_E], z.dtype, z.device)
    meta = dict(
        MASK=bool(mask),
        BLOCK_D=bd,
        D_SINGLE=d_single,
        UPCAST=upcast(z.dtype),
        DOT_PRECISION=dot_precision(z.dtype, fp32=FP32_DOT_PRECISION),
        ACC=tl_acc(z.dtype),
        EVEN_D=d_single and bd == d,
    )
    return consts, meta, (1 if d_single else triton.cdiv(d, bd))


def alloc_fwd(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = acc_dtype(z.dtype)
    return z.new_empty(z.size(0), dtype=acc), z.new_empty(z.size(0), 5, dtype=acc)


def alloc_bwd(z: torch.Tensor, zc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return z.new_empty(z.shape), zc.new_empty(zc.shape)


def contrastive_fwd(z, zc, inst, instc, proto, protoc, row_offset: int, tau: float, mask: bool):
    """(lse (N,), stats (N, 5)) in fp32 (fp64 for fp64 z); see the module docstring."""
    lse, _ = alloc_fwd(z)
    n, d = z.shape
    nc = zc.size(0)
    if n == 0 or nc == 0:
        return lse.fill_(float("-inf")), z.new_zeros(n, 5, dtype=acc_dtype(z.dtype))
    consts, meta, _ = _common(z, tau, mask)
    codes = _codes(inst, instc, proto, protoc)
    launch(
        _contrastive_fwd_kernel,
        lambda m: (triton.cdiv(n, m["BLOCK_M"]),),
        z, zc, *codes[:4], consts, lse,
        n, nc, d, row_offset,
        z.stride(0), z.stride(1), zc.stride(0), zc.stride(1),
        **meta,
    )  # fmt: skip
    return lse, _stats_and_grads(z, zc, codes, row_offset)


def contrastive_bwd(grad_lse, grad_stats, z, zc, inst, instc, proto, protoc, lse, row_offset: int, tau: float,
                    mask: bool):  # fmt: skip
    """(dz (N, D), dzc (Nc, D)) in the input dtype: two recomputing passes, no atomics in the kernels."""
    dz, dzc = alloc_bwd(z, zc)
    n, d = z.shape
    nc = zc.size(0)
    if n == 0 or nc == 0:
        return dz.zero_(), dzc.zero_()
    consts, meta, n_dout = _common(z, tau, mask)
    acc = acc_dtype(z.dtype)
    codes = _codes(inst, instc, proto, protoc)
    extra_z, extra_zc = _stats_and_grads(z, zc, codes, row_offset, grad_stats)
    args = (grad_lse.to(acc).contiguous(), lse.to(acc).contiguous(), z, zc, *codes[:4], consts)
    strides = (z.stride(0), z.stride(1), zc.stride(0), zc.stride(1))
    meta["G_FP32"] = z.dtype == torch.float16 and not upcast(z.dtype)
    launch(
        _contrastive_bwd_rows_kernel,
        lambda m: (triton.cdiv(n, m["BLOCK_M"]), n_dout),
        *args, extra_z.contiguous(), dz, n, nc, d, row_offset, *strides, dz.stride(0), dz.stride(1),
        **meta,
    )  # fmt: skip
    launch(
        _contrastive_bwd_cols_kernel,
        lambda m: (triton.cdiv(nc, m["BLOCK_N"]), n_dout),
        *args, extra_zc.contiguous(), dzc, n, nc, d, row_offset, *strides, dzc.stride(0), dzc.stride(1),
        **meta,
    )  # fmt: skip
    return dz, dzc
