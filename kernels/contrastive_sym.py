"""Symmetric contrastive kernels (SPEC 1.1, contract in csrc/ops.cpp): rows and columns are one set.

When zc is z itself (single process: same tensor, same labels, row_offset 0), c_ij = z_i·z_j = c_ji and
every membership test is symmetric (A, P and F; Den too), so one upper-triangle tile (I, J >= I) of c serves
both its rows and its columns: half the `tl.dot` work of the two-sided kernels in `contrastive.py`.

Work split: the row strips pair up end to end (strip a with strip nb-1-a: nb+1 tiles per pair, every pair
the same length) and each pair's tile list is cut into CHUNK-tile segments, one program per (pair, segment,
output feature chunk); CHUNK is sized so that the grid holds >= `programs` programs (`_grid`). Inside a
segment a strip's row side stays in registers; it is written once at the segment's end.

- Forward: the row side is the online log-sum-exp of `contrastive.py`; the column side of an off-diagonal
  tile, (max, sum) of the tile's rows per column, is written to a partial buffer. Slot K of row x holds x's
  entries against block K: the column side of tile (K, X) for K < X, the row side of strip X's segment that
  starts at K for K >= X (slots inside a segment are written empty). `_sym_lse_kernel` then merges the nb
  slots of each row in slot order. Partials, not locks or atomics: an online (max, sum) pair has no atomic
  merge, and a fixed merge order keeps the forward deterministic. Extra memory: 2·nb·N accumulators
  (N = 65,536, BLOCK = 64: 1024 × 65,536 × 8 B = 512 MiB fp32), written and read once.
- Backward: M_ij = G_ij + G_ji (G as in contrastive.py, the log-sum-exp part; the statistics' part comes
  from the segment sums): the row side M·z_J accumulates in registers, the column side M^T·z_I is added to
  an fp32 (N, D) buffer with `tl.atomic_add`, as is each segment's row side at its end. Why atomics and not
  per-tile partial buffers + a reduction: the column sides are a (BLOCK, D) tile per tile pair, N²·D/(2·BLOCK)
  values (N = 65,536, D = 128, BLOCK = 64: 4.3e9, 17 GB fp32), far beyond memory, while atomics need O(N·D).
  The cost: as many fp32 atomic adds (as flash-attention-2's dQ issues for one head of that length; the
  general kernels avoid them by recomputing c in a second pass), and a summation order that varies from run
  to run: dz is reproducible to fp32 rounding, not bitwise (the GPU test at N = 16,384 asserts run-to-run
  agreement within 1e-5, the bound the atomic segment sums of the statistics already need). The general
  kernels stay the default until a GPU measures both (bench/kernels.py provider `triton-sym`).

Selected by `selected()`: PROTOCLR_TRITON_SYMMETRIC=1 and the symmetric form. The DDP split (rows local,
columns gathered, row_offset > 0) always takes the general kernels.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import contrastive as _c
from .utils import INTERPRET, acc_dtype, autotune, launch, upcast

ENV = "PROTOCLR_TRITON_SYMMETRIC"


def _cfgs(rows) -> list:
    return [triton.Config({"BLOCK": b}, num_warps=w, num_stages=s) for b, w, s in rows]


# Square tiles (the diagonal of a tile is the diagonal of c); [0] of each family is the default (no tuning).
# Defaults chosen to compile without register spills for sm_90 at D = 128 in every fn_mode (bench/sm90_resources.py
# machinery; not yet in its audit list); the others are autotuning candidates.
_FWD = {
    "16bit": _cfgs([(64, 4, 3), (64, 4, 2), (128, 8, 2), (128, 8, 3)]),
    "tf32x3": _cfgs([(64, 4, 1), (64, 8, 1)]),
}
# backward: two (BLOCK, BLOCK_D) fp32 tiles (row accumulator, column side) besides the c and G tiles; tf32x3's
# operand splits leave room for 16-row tiles only
_BWD = {
    "16bit": _cfgs([(64, 8, 2), (64, 4, 2), (128, 8, 2), (32, 8, 2)]),
    "tf32x3": _cfgs([(16, 4, 1), (32, 8, 2), (32, 8, 1)]),
}
# ragged problems (see contrastive._RAGGED_DEFAULTS): scalar masked loads; 64-row backward tiles spill there
_BWD_RAGGED = {"16bit": _BWD["16bit"][3]}
_FWD_CONFIGS, _BWD_CONFIGS = (f["16bit"] + [c for c in f["tf32x3"] if c not in f["16bit"]] for f in (_FWD, _BWD))
_SAFE_CONFIG = triton.Config({"BLOCK": 64}, num_warps=4, num_stages=1)
# the forward's slot buffer is sized for the smallest BLOCK a launch may take
_MIN_FWD_BLOCK = min(c.kwargs["BLOCK"] for c in (*_FWD_CONFIGS, _SAFE_CONFIG))
_INTERP = {"BLOCK": 64}
_LSE_MERGE_ROWS = 256  # rows per program of the merge kernel


def _prune(grad_tile: bool, families: dict, defaults: dict):
    """contrastive.py's shared-memory prune on square tiles, with a square fallback config."""
    prune = _c._pruner("BLOCK", "BLOCK", grad_tile, families, defaults)

    def run(configs, named_args, **kwargs):
        kept = prune(configs, named_args, **kwargs)
        return [_SAFE_CONFIG] if kept == [_c._SAFE_CONFIG] else kept

    return run


_prune_fwd = _prune(False, _FWD, {})
_prune_bwd = _prune(True, _BWD, {"ragged": _BWD_RAGGED})


def _work(args) -> int:
    return args["N"] * args["N"] * args["D"] // 2


# ------------------------------------------------------------------------------------------- selection


def enabled() -> bool:
    """PROTOCLR_TRITON_SYMMETRIC=1 (read at every call; default off: the general kernels)."""
    return os.environ.get(ENV, "0") == "1"


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    if a.shape != b.shape or a.stride() != b.stride() or a.dtype != b.dtype:
        return False
    try:
        return a.data_ptr() == b.data_ptr()
    except RuntimeError:  # fake/functional tensors (torch.compile tracing) have no data pointer
        return False


def symmetric_form(z, zc, inst, instc, proto, protoc, row_offset: int) -> bool:
    """Rows and columns are one set: zc is z (same memory, shape and strides), instc is inst, protoc is proto,
    row_offset 0. Equal but distinct label tensors do not count (comparing values would sync the host)."""
    return row_offset == 0 and _same(z, zc) and _same(inst, instc) and _same(proto, protoc)


def selected(z, zc, inst, instc, proto, protoc, row_offset: int, symmetric: bool | None = None) -> bool:
    """Whether the symmetric kernels run: `symmetric` (None: the environment, `enabled()`) and the form."""
    on = enabled() if symmetric is None else symmetric
    return on and symmetric_form(z, zc, inst, instc, proto, protoc, row_offset)


def _programs(device: torch.device) -> int:
    """Programs the grid should hold: 4 per SM on a GPU; 1 in the interpreter (whole pairs per program)."""
    if INTERPRET or device.type != "cuda":
        return 1
    return 4 * torch.cuda.get_device_properties(device).multi_processor_count


def _grid(n: int, block: int, programs: int) -> tuple[int, int, int]:
    """(pairs, segments per pair, CHUNK tiles per segment); `_segment_range` repeats it in the kernels."""
    nb = triton.cdiv(n, block)
    pairs = (nb + 1) // 2
    chunk = max(1, triton.cdiv(pairs * (nb + 1), programs))
    return pairs, triton.cdiv(nb + 1, chunk), chunk


# ------------------------------------------------------------------------------------------ helpers


@triton.jit
def _segment_range(N, PROGRAMS, BLOCK: tl.constexpr):
    """(nb, n_first, b0, b1): this program's tiles [b0, b1) of its pair's list (strip a: tiles 0..nb-a-1 are
    J = a.., then strip nb-1-a: J = nb-1-a..); `_grid` on the host."""
    a = tl.program_id(0).to(tl.int64)
    nb = ((N + BLOCK - 1) // BLOCK).to(tl.int64)  # pairs·(nb + 1) passes 2^31 near N = 2^21 (BLOCK 64)
    pairs = (nb + 1) // 2
    chunk = tl.maximum((pairs * (nb + 1) + PROGRAMS - 1) // PROGRAMS, 1)
    b0 = tl.program_id(1).to(tl.int64) * chunk
    return a, nb, nb - a, b0, b0 + chunk


@triton.jit
def _strip_range(u: tl.constexpr, a, nb, n_first, b0, b1):
    """(I, J0, J1): strip u of pair a and the tiles J in [J0, J1) of it in the segment (J0 >= J1: none)."""
    if u == 0:
        i = a
        lo = b0
        hi = tl.minimum(b1, n_first)
    else:
        i = nb - 1 - a
        lo = tl.maximum(b0 - n_first, 0)
        hi = tl.where(i == a, lo, tl.minimum(b1 - n_first, nb - i))  # the middle strip of an odd nb: once
    return i, i + lo, i + hi


@triton.jit
def _fneg(inst_i, instc, proto_i, protoc):
    """j ∈ F(i), for anchors on axis 0 (proto_i with unknown = -2) and columns on axis 1 (unknown = -1): the
    test is symmetric, so it also says i ∈ F(j)."""
    return (proto_i[:, None] == protoc[None, :]) & (inst_i[:, None] != instc[None, :])


@triton.jit
def _masked_logits(c, inv_tau, rows, cols, inst_i, instc, proto_i, protoc, N,
                   MASKED: tl.constexpr, MASK: tl.constexpr):  # fmt: skip
    """s = c/tau with -inf outside Den (the same set from both sides); MASKED: the tile meets the diagonal or
    the ragged end."""
    s = c * inv_tau
    if MASK:
        out = _fneg(inst_i, instc, proto_i, protoc)
        if MASKED:
            out = out | (rows[:, None] == cols[None, :]) | (cols[None, :] >= N)
        s = tl.where(out, float("-inf"), s)
    elif MASKED:
        s = tl.where((rows[:, None] != cols[None, :]) & (cols[None, :] < N), s, float("-inf"))
    return s


@triton.jit
def _lse_merge(m, l_sum, m2, l2, log2e):
    """Online log-sum-exp: (max, sum of exp(x - max)) of two sets; empty sets are (-inf, 0)."""
    m_new = tl.maximum(m, m2)
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, l_sum * tl.exp2((m - m_ref) * log2e) + l2 * tl.exp2((m2 - m_ref) * log2e)


@triton.jit
def _load_labels(inst_ptr, proto_ptr, idx, mask):
    """(inst, proto as anchors (unknown -2), proto as columns (unknown -1)) of rows idx."""
    inst = tl.load(inst_ptr + idx, mask=mask, other=-3)
    proto = tl.load(proto_ptr + idx, mask=mask, other=-3)
    return inst, tl.where(proto >= 0, proto, -2), proto


@triton.jit
def _load_rows(z_ptr, rows, rmask, d0, D, stride_zn, stride_zd, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    d = d0 + tl.arange(0, BLOCK_D)
    x = tl.load(z_ptr + rows[:, None] * stride_zn + d[None, :] * stride_zd, mask=rmask[:, None] & (d < D)[None, :],
                other=0.0)  # fmt: skip
    if UPCAST:
        x = x.to(tl.float32)
    return x


# ------------------------------------------------------------------------------------------- forward


@triton.jit
def _fwd_tile(
    m, l_sum, q, z_ptr, inst_ptr, proto_ptr, pmax_ptr, psum_ptr,
    rows, inst_i, proto_i, i, j, j0, inv_tau, log2e,
    N, D, stride_zn, stride_zd,
    MASKED: tl.constexpr, MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    """Off-diagonal tile (I, J): merge the rows' side into (m, l_sum), write the columns' (max, sum) to slot I
    and an empty row slot J (unless J starts the segment)."""
    cols = j * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    c, _k = _c._sim_tile(
        q, z_ptr, z_ptr, rows, rows < N, cols, cmask, D, 0, stride_zn, stride_zd, stride_zn, stride_zd,
        BLOCK, BLOCK, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, not MASKED, EVEN_D,
    )  # fmt: skip
    if MASK:
        instc, _proto_j, protoc = _load_labels(inst_ptr, proto_ptr, cols, cmask)
    else:
        instc, protoc = cols, cols
    s = _masked_logits(c, inv_tau, rows, cols, inst_i, instc, proto_i, protoc, N, MASKED, MASK)
    m, l_sum = _lse_merge(m, l_sum, tl.max(s, 1), tl.zeros_like(l_sum), log2e)
    m_ref = tl.where(m == float("-inf"), 0.0, m)
    l_sum += tl.sum(tl.exp2((s - m_ref[:, None]) * log2e), 1)
    cm = tl.max(s, 0)
    cm_ref = tl.where(cm == float("-inf"), 0.0, cm)
    cl = tl.sum(tl.exp2((s - cm_ref[None, :]) * log2e), 0)
    tl.store(pmax_ptr + i * N + cols, cm, mask=cmask)
    tl.store(psum_ptr + i * N + cols, cl, mask=cmask)
    empty = (rows < N) & (j != j0)
    tl.store(pmax_ptr + j * N + rows, tl.full([BLOCK], float("-inf"), ACC), mask=empty)
    tl.store(psum_ptr + j * N + rows, tl.zeros([BLOCK], ACC), mask=empty)
    return m, l_sum


@triton.jit
def _fwd_strip(
    i, j0, j1, z_ptr, inst_ptr, proto_ptr, pmax_ptr, psum_ptr, inv_tau, log2e,
    N, D, stride_zn, stride_zd,
    MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    """Tiles J in [j0, j1) of row strip i; the rows' (max, sum) goes to slot j0."""
    rows = i * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    inst_i, proto_i, protoc_i = _load_labels(inst_ptr, proto_ptr, rows, rmask)
    q = _load_rows(z_ptr, rows, rmask, 0, D, stride_zn, stride_zd, BLOCK_D, UPCAST)
    m = tl.full([BLOCK], float("-inf"), ACC)
    l_sum = tl.zeros([BLOCK], ACC)
    if j0 == i:  # the diagonal tile holds both (i, j) and (j, i): rows' side only
        c, _k = _c._sim_tile(
            q, z_ptr, z_ptr, rows, rmask, rows, rmask, D, 0, stride_zn, stride_zd, stride_zn, stride_zd,
            BLOCK, BLOCK, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, False, EVEN_D,
        )  # fmt: skip
        s = _masked_logits(c, inv_tau, rows, rows, inst_i, inst_i, proto_i, protoc_i, N, True, MASK)
        m = tl.max(s, 1)
        m_ref = tl.where(m == float("-inf"), 0.0, m)
        l_sum = tl.sum(tl.exp2((s - m_ref[:, None]) * log2e), 1)
    n_full = N // BLOCK
    for j in range(tl.maximum(j0, i + 1), tl.minimum(j1, n_full)):
        m, l_sum = _fwd_tile(
            m, l_sum, q, z_ptr, inst_ptr, proto_ptr, pmax_ptr, psum_ptr, rows, inst_i, proto_i, i, j, j0,
            inv_tau, log2e, N, D, stride_zn, stride_zd,
            False, MASK, BLOCK, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, EVEN_D,
        )  # fmt: skip
    for j in range(tl.maximum(tl.maximum(j0, i + 1), n_full), j1):  # the ragged last block
        m, l_sum = _fwd_tile(
            m, l_sum, q, z_ptr, inst_ptr, proto_ptr, pmax_ptr, psum_ptr, rows, inst_i, proto_i, i, j, j0,
            inv_tau, log2e, N, D, stride_zn, stride_zd,
            True, MASK, BLOCK, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, EVEN_D,
        )  # fmt: skip
    tl.store(pmax_ptr + j0 * N + rows, m, mask=rmask)
    tl.store(psum_ptr + j0 * N + rows, l_sum, mask=rmask)


@autotune(_FWD_CONFIGS, key=["N", "D"], interp_config=_INTERP, work=_work, prune=_prune_fwd)
@triton.jit
def _contrastive_sym_fwd_kernel(
    z_ptr,  # (N, D) rows = columns
    inst_ptr, proto_ptr,  # int32 label codes (utils.label_codes)
    consts_ptr,  # [1/tau, ln 2, log2(e)] in ACC
    pmax_ptr, psum_ptr,  # (>= nb, N) ACC out: slot partials (module docstring)
    nb_ptr,  # (1,) int32 out: nb, the slot count of this BLOCK, for the merge kernel
    N, D, PROGRAMS, stride_zn, stride_zd,
    MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    EVEN_D: tl.constexpr,
):  # fmt: skip
    inv_tau = tl.load(consts_ptr)
    log2e = tl.load(consts_ptr + 2)
    a, nb, n_first, b0, b1 = _segment_range(N, PROGRAMS, BLOCK)
    if (a == 0) & (tl.program_id(1) == 0):
        tl.store(nb_ptr, nb.to(tl.int32))
    for u in tl.static_range(2):
        i, j0, j1 = _strip_range(u, a, nb, n_first, b0, b1)
        if j0 < j1:
            _fwd_strip(
                i, j0, j1, z_ptr, inst_ptr, proto_ptr, pmax_ptr, psum_ptr, inv_tau, log2e,
                N, D, stride_zn, stride_zd,
                MASK, BLOCK, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, EVEN_D,
            )  # fmt: skip


@triton.jit
def _sym_lse_kernel(pmax_ptr, psum_ptr, nb_ptr, consts_ptr, lse_ptr, N, ROWS: tl.constexpr):
    """lse_x = the online merge of row x's nb slots, in slot order (deterministic)."""
    nb = tl.load(nb_ptr).to(tl.int64)
    ln2 = tl.load(consts_ptr + 1)
    log2e = tl.load(consts_ptr + 2)
    x = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    xm = x < N
    m = tl.full([ROWS], float("-inf"), lse_ptr.dtype.element_ty)
    l_sum = tl.zeros([ROWS], lse_ptr.dtype.element_ty)
    for k in range(nb):
        pm = tl.load(pmax_ptr + k * N + x, mask=xm, other=float("-inf"))
        ps = tl.load(psum_ptr + k * N + x, mask=xm, other=0.0)
        m, l_sum = _lse_merge(m, l_sum, pm, ps, log2e)
    tl.store(lse_ptr + x, m + tl.log2(l_sum) * ln2, mask=xm)  # l_sum = 0 (Den empty): -inf


# ------------------------------------------------------------------------------------------ backward
# SPEC 1.1, notation of contrastive.py: G_ij = [j∈Den(i)]·gl_i·exp(c_ij/tau − lse_i)/tau (the log-sum-exp
# part). With zc = z the gradient w.r.t. z is d_x = Σ_j G_xj z_j (rows) + Σ_i G_ix z_i (columns)
# = Σ_j M_xj z_j with M = G + G^T, symmetric: tile (I, J > I) gives d_I += M_IJ z_J and d_J += M_IJ^T z_I,
# with M_IJ = G_IJ + (G_JI)^T computed from the one c tile (G_JI^T has row j's gl and lse along axis 1);
# a diagonal tile gives d_I += (G_II + G_II^T) z_I.


@triton.jit
def _bwd_tile(
    acc, q, qo, z_ptr, inst_ptr, proto_ptr, grad_lse_ptr, lse_ptr, dz_ptr,
    rows, inst_i, proto_i, gl, lse, j, inv_tau, log2e,
    N, D, d_out0, stride_zn, stride_zd,
    MASKED: tl.constexpr, MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    G_FP32: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Off-diagonal tile (I, J): acc += M·z_J (rows), dz_J += M^T·z_I (columns, atomically)."""
    cols = j * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < N
    c, k = _c._sim_tile(
        q, z_ptr, z_ptr, rows, rows < N, cols, cmask, D, d_out0, stride_zn, stride_zd, stride_zn, stride_zd,
        BLOCK, BLOCK, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, not MASKED, EVEN_D,
    )  # fmt: skip
    if MASK:
        instc, proto_j, protoc = _load_labels(inst_ptr, proto_ptr, cols, cmask)
    else:
        instc, proto_j, protoc = cols, cols, cols
    glc, lsec = _c._load_anchor(grad_lse_ptr, lse_ptr, cols, cmask, inv_tau)
    diag = rows[:, None] == cols[None, :]  # never in an off-diagonal tile; MASKED covers the ragged end
    bounds = cmask[None, :]
    g = _c._softmax_grad(
        c, gl[:, None], lse[:, None], inv_tau, log2e, inst_i[:, None], instc[None, :], proto_i[:, None],
        protoc[None, :], diag, bounds, MASKED, MASK,
    )  # fmt: skip
    g += _c._softmax_grad(
        c, glc[None, :], lsec[None, :], inv_tau, log2e, instc[None, :], inst_i[:, None], proto_j[None, :],
        tl.where(proto_i >= 0, proto_i, -1)[:, None], diag, bounds, MASKED, MASK,
    )  # fmt: skip
    acc = _c._acc_dot(acc, g, k, DOT_PRECISION, ACC, G_FP32)
    col = _c._acc_dot(tl.zeros([BLOCK, BLOCK_D], ACC), tl.trans(g), qo, DOT_PRECISION, ACC, G_FP32)
    d = d_out0 + tl.arange(0, BLOCK_D)
    tl.atomic_add(dz_ptr + cols[:, None] * D + d[None, :], col, mask=cmask[:, None] & (d < D)[None, :], sem="relaxed")
    return acc


@triton.jit
def _bwd_strip(
    i, j0, j1, z_ptr, inst_ptr, proto_ptr, grad_lse_ptr, lse_ptr, dz_ptr, inv_tau, log2e,
    N, D, d_out0, stride_zn, stride_zd,
    MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    G_FP32: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    """Tiles J in [j0, j1) of row strip i; the rows' accumulator is added to dz at the end."""
    rows = i * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < N
    inst_i, proto_i, protoc_i = _load_labels(inst_ptr, proto_ptr, rows, rmask)
    gl, lse = _c._load_anchor(grad_lse_ptr, lse_ptr, rows, rmask, inv_tau)
    q = _load_rows(z_ptr, rows, rmask, 0, D, stride_zn, stride_zd, BLOCK_D, UPCAST)
    if D_SINGLE:
        qo = q
    else:
        qo = _load_rows(z_ptr, rows, rmask, d_out0, D, stride_zn, stride_zd, BLOCK_D, UPCAST)
    acc = tl.zeros([BLOCK, BLOCK_D], ACC)
    if j0 == i:
        c, k = _c._sim_tile(
            q, z_ptr, z_ptr, rows, rmask, rows, rmask, D, d_out0, stride_zn, stride_zd, stride_zn, stride_zd,
            BLOCK, BLOCK, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, False, EVEN_D,
        )  # fmt: skip
        g = _c._softmax_grad(
            c, gl[:, None], lse[:, None], inv_tau, log2e, inst_i[:, None], inst_i[None, :], proto_i[:, None],
            protoc_i[None, :], rows[:, None] == rows[None, :], rmask[None, :],
            True, MASK,
        )  # fmt: skip
        acc = _c._acc_dot(acc, g + tl.trans(g), k, DOT_PRECISION, ACC, G_FP32)
    n_full = N // BLOCK
    for j in range(tl.maximum(j0, i + 1), tl.minimum(j1, n_full)):
        acc = _bwd_tile(
            acc, q, qo, z_ptr, inst_ptr, proto_ptr, grad_lse_ptr, lse_ptr, dz_ptr, rows, inst_i, proto_i, gl, lse,
            j, inv_tau, log2e, N, D, d_out0, stride_zn, stride_zd,
            False, MASK, BLOCK, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, G_FP32, EVEN_D,
        )  # fmt: skip
    for j in range(tl.maximum(tl.maximum(j0, i + 1), n_full), j1):
        acc = _bwd_tile(
            acc, q, qo, z_ptr, inst_ptr, proto_ptr, grad_lse_ptr, lse_ptr, dz_ptr, rows, inst_i, proto_i, gl, lse,
            j, inv_tau, log2e, N, D, d_out0, stride_zn, stride_zd,
            True, MASK, BLOCK, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, G_FP32, EVEN_D,
        )  # fmt: skip
    d = d_out0 + tl.arange(0, BLOCK_D)
    tl.atomic_add(dz_ptr + rows[:, None] * D + d[None, :], acc, mask=rmask[:, None] & (d < D)[None, :], sem="relaxed")


@autotune(_BWD_CONFIGS, key=["N", "D"], interp_config=_INTERP, work=_work, prune=_prune_bwd, reset_to_zero=["dz_ptr"])
@triton.jit
def _contrastive_sym_bwd_kernel(
    grad_lse_ptr, lse_ptr,  # (N,), (N,) ACC
    z_ptr, inst_ptr, proto_ptr, consts_ptr,
    dz_ptr,  # (N, D) ACC contiguous, zero-initialised: M·z, accumulated atomically
    N, D, PROGRAMS, stride_zn, stride_zd,
    MASK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    D_SINGLE: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    G_FP32: tl.constexpr, EVEN_D: tl.constexpr,
):  # fmt: skip
    inv_tau = tl.load(consts_ptr)
    log2e = tl.load(consts_ptr + 2)
    d_out0 = tl.program_id(2).to(tl.int64) * BLOCK_D
    a, nb, n_first, b0, b1 = _segment_range(N, PROGRAMS, BLOCK)
    for u in tl.static_range(2):
        i, j0, j1 = _strip_range(u, a, nb, n_first, b0, b1)
        if j0 < j1:
            _bwd_strip(
                i, j0, j1, z_ptr, inst_ptr, proto_ptr, grad_lse_ptr, lse_ptr, dz_ptr, inv_tau, log2e,
                N, D, d_out0, stride_zn, stride_zd,
                MASK, BLOCK, BLOCK_D, D_SINGLE, UPCAST, DOT_PRECISION, ACC, G_FP32, EVEN_D,
            )  # fmt: skip


# ----------------------------------------------------------------------------------------- launchers


def contrastive_fwd(z, zc, inst, instc, proto, protoc, row_offset: int, tau: float, mask: bool):
    """`contrastive.contrastive_fwd` for the symmetric form (`symmetric_form`), same outputs."""
    lse, _ = _c.alloc_fwd(z)
    n, d = z.shape
    if n == 0:
        return lse, z.new_zeros(0, 5, dtype=acc_dtype(z.dtype))
    consts, meta, _ = _c._common(z, tau, mask)
    codes = _c._codes(inst, instc, proto, protoc)
    programs = _programs(z.device)
    slots = triton.cdiv(n, _MIN_FWD_BLOCK)
    pmax = z.new_empty(slots, n, dtype=lse.dtype)
    psum = z.new_empty(slots, n, dtype=lse.dtype)
    nb = z.new_empty(1, dtype=torch.int32)
    launch(
        _contrastive_sym_fwd_kernel,
        lambda m: _grid(n, m["BLOCK"], programs)[:2],
        z, codes[0], codes[2], consts, pmax, psum, nb,
        n, d, programs, z.stride(0), z.stride(1),
        **meta,
    )  # fmt: skip
    launch(_sym_lse_kernel, (triton.cdiv(n, _LSE_MERGE_ROWS),), pmax, psum, nb, consts, lse, n, ROWS=_LSE_MERGE_ROWS)
    return lse, _c._stats_and_grads(z, zc, codes, row_offset)


def contrastive_bwd(grad_lse, grad_stats, z, zc, inst, instc, proto, protoc, lse, row_offset: int, tau: float,
                    mask: bool):  # fmt: skip
    """(dz, dzc) for the symmetric form: the whole gradient w.r.t. z in dz, zeros in dzc (csrc/ops.cpp)."""
    n, d = z.shape
    if n == 0:
        return z.new_zeros(z.shape), zc.new_zeros(zc.shape)
    consts, meta, n_dout = _c._common(z, tau, mask)
    acc = acc_dtype(z.dtype)
    codes = _c._codes(inst, instc, proto, protoc)
    dz = z.new_zeros(z.shape, dtype=acc)
    meta["G_FP32"] = z.dtype == torch.float16 and not upcast(z.dtype)
    programs = _programs(z.device)
    launch(
        _contrastive_sym_bwd_kernel,
        lambda m: (*_grid(n, m["BLOCK"], programs)[:2], n_dout),
        grad_lse.to(acc).contiguous(), lse.to(acc).contiguous(), z, codes[0], codes[2], consts, dz,
        n, d, programs, z.stride(0), z.stride(1),
        **meta,
    )  # fmt: skip
    extra_z, extra_zc = _c._stats_and_grads(z, zc, codes, row_offset, grad_stats)
    return (dz + extra_z + extra_zc).to(z.dtype), torch.zeros_like(zc)
