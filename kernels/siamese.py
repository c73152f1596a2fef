"""Dense siamese building block (SPEC 1.2, contract in csrc/ops.cpp): fused forward and backward.

Pairs (i, j) with g_i < g_j (g_i = row_offset + i, column j has global index j), d_ij = Σ_k w_k |h_ik − hc_jk| + b,
y_ij = [inst_i = instc_j or proto_i = protoc_j >= 0], l_ij = softplus(d_ij) − y_ij·d_ij:
  forward:  loss (N, 2) = per-row sums of l over pairs with y = 0 / y = 1, count (N, 2) the pair counts
  backward: gradients of sum(grad_loss·loss) for h, hc, w, b.

This is not a GEMM (|·| has no tensor-core form), so the kernels are FMA-bound and laid out for it:
- One program per (BLOCK_M × BLOCK_N) pair tile; tiles entirely on or below the diagonal g_i >= g_j exit at
  once (half the grid). The tile's d lives in registers (fp32, fp64 for fp64 inputs).
- The launcher hands the kernels column-major views of h/hc (an O(N·D) transposed copy), so feature k of a
  tile's rows (columns) is one contiguous segment: coalesced across the warp, L1-resident while the D loop
  runs. The D loop walks k in unrolled chunks of BLOCK_K, each step a rank-1 update acc += w_k·|a_i − b_j|
  (one FADD + one FFMA with |·| operand per pair): no (BLOCK_M, BLOCK_N, D) intermediate, no reduction
  inside the loop, O(BLOCK_M + BLOCK_N) loads per k. Known limit: Triton's default register layout for the
  tile gives each thread a strip of rows and ~1 column, so per k a thread issues about one load per FMA
  (L1 hits); a square per-thread sub-tile would need explicit layouts (not in Triton 3.6's language).
- Backward: recompute d (same loop), form G in registers, then a second D loop that per k reduces
  G·sign(a_i − b_j) along both tile axes (R, C; dh, dhc and dw all follow from them in O(N·D), see the
  derivation). R and C are accumulated with atomics into fp32 (fp64) buffers: per tile
  O((BLOCK_M + BLOCK_N)·D) adds, small next to the O(BLOCK_M·BLOCK_N·D) arithmetic; a recomputing
  column pass (as in the contrastive backward) would double the dominant cost here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .utils import acc_dtype, autotune, label_codes, launch, tl_acc

# Hopper (sm_90): FMA-bound, no shared memory to speak of. Triton's default register layout gives each thread
# a column of rows, so per k a thread loads ~BLOCK_M/warps_m values for as many FMAs, and ptxas hoists the
# loads of all BLOCK_K unrolled steps: registers grow with elements per thread × BLOCK_K. The sm_90 audit
# (bench/sm90_resources.py, Triton 3.6 and 3.8) found every former config spilling (64x64 K8 w4, the old default:
# 36-60 B forward, 0.3-2.7 KB backward; 64x128 and 128x128 K4: 0.3-7 KB). These compile without spills in both
# passes for fp32 and bf16 in both versions; configs[0] keeps the 64x64 tile with 8 warps (16 pairs per thread)
# and no unroll. One stage: the per-k loads are L1 hits.
_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [
        (64, 64, 1, 8, 1),
        (64, 32, 4, 8, 1),
        (32, 64, 2, 8, 1),
        (64, 64, 2, 8, 1),
        (64, 32, 2, 4, 1),
        (32, 32, 4, 8, 1),
    ]
]
_INTERP = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 8}


def _work(args) -> int:
    return args["N"] * args["Nc"] * args["D"] // 8  # FMA-bound: tuning pays off at smaller sizes


@triton.jit
def _tile_setup(
    inst_ptr, instc_ptr, proto_ptr, protoc_ptr, N, Nc, row_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    cmask = cols < Nc
    # pairs with g_i < g_j only; a tile with min g_i >= max g_j has none
    active = row_offset + pid_m * BLOCK_M + 1 < tl.minimum(pid_n * BLOCK_N + BLOCK_N, Nc)
    inst_i = tl.load(inst_ptr + rows, mask=rmask, other=-1)
    instc = tl.load(instc_ptr + cols, mask=cmask, other=-3)
    proto_i = tl.load(proto_ptr + rows, mask=rmask, other=-1)
    proto_i = tl.where(proto_i >= 0, proto_i, -2)  # unknown rows match no column
    protoc = tl.load(protoc_ptr + cols, mask=cmask, other=-3)
    y = (inst_i[:, None] == instc[None, :]) | (proto_i[:, None] == protoc[None, :])
    valid = ((row_offset + rows)[:, None] < cols[None, :]) & rmask[:, None] & cmask[None, :]
    return rows, cols, rmask, cmask, active, y, valid


@triton.jit
def _l1_tile(
    h_ptr, hc_ptr, w_ptr, rows, cols, N, Nc, D, stride_hn, stride_hd, stride_hcn, stride_hcd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Σ_k w_k |h_ik − hc_jk| for the tile, as a (BLOCK_M, BLOCK_N) register accumulator."""
    # clamped indices: ragged rows/columns read a valid row and are masked out later (no load masks)
    a_ptrs = h_ptr + tl.minimum(rows, N - 1) * stride_hn
    b_ptrs = hc_ptr + tl.minimum(cols, Nc - 1) * stride_hcn
    w_ptrs = w_ptr
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    # pointers advance by increments: k·stride_hd (= k·N for column-major h) may overflow int32
    for _kt in range(0, D // BLOCK_K):
        for kk in tl.static_range(BLOCK_K):
            a = tl.load(a_ptrs + kk * stride_hd).to(ACC)
            b = tl.load(b_ptrs + kk * stride_hcd).to(ACC)
            acc += tl.load(w_ptrs + kk) * tl.abs(a[:, None] - b[None, :])
        a_ptrs += BLOCK_K * stride_hd
        b_ptrs += BLOCK_K * stride_hcd
        w_ptrs += BLOCK_K
    for _kr in range(0, D % BLOCK_K):
        a = tl.load(a_ptrs).to(ACC)
        b = tl.load(b_ptrs).to(ACC)
        acc += tl.load(w_ptrs) * tl.abs(a[:, None] - b[None, :])
        a_ptrs += stride_hd
        b_ptrs += stride_hcd
        w_ptrs += 1
    return acc


@autotune(_CONFIGS, key=["N", "Nc", "D"], interp_config=_INTERP, work=_work, reset_to_zero=["loss_ptr", "count_ptr"])
@triton.jit
def _siamese_fwd_kernel(
    h_ptr, hc_ptr,  # (N, D), (Nc, D); column-major views preferred (see the module docstring)
    inst_ptr, instc_ptr, proto_ptr, protoc_ptr,
    w_ptr, b_ptr,  # (D,), (1,) in ACC
    loss_ptr, count_ptr,  # (N, 2) ACC, zero-initialised, accumulated atomically
    N, Nc, D, row_offset,
    stride_hn, stride_hd, stride_hcn, stride_hcd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    rows, cols, rmask, cmask, active, y, valid = _tile_setup(
        inst_ptr, instc_ptr, proto_ptr, protoc_ptr, N, Nc, row_offset, BLOCK_M, BLOCK_N
    )
    if active:
        d = _l1_tile(
            h_ptr, hc_ptr, w_ptr, rows, cols, N, Nc, D, stride_hn, stride_hd, stride_hcn, stride_hcd,
            BLOCK_M, BLOCK_N, BLOCK_K, ACC,
        ) + tl.load(b_ptr)  # fmt: skip
        # softplus(d) = max(d, 0) + log1p(exp(-|d|)), log1p by its series where 1 + x rounds
        x = tl.exp(-tl.abs(d))
        l1p = tl.where(x < 1e-4, x * (1.0 - 0.5 * x), tl.log(1.0 + x))
        loss = tl.maximum(d, 0.0) + l1p - tl.where(y, d, 0.0)
        neg = valid & (~y)
        pos = valid & y
        tl.atomic_add(loss_ptr + rows * 2, tl.sum(tl.where(neg, loss, 0.0), 1), mask=rmask, sem="relaxed")
        tl.atomic_add(loss_ptr + rows * 2 + 1, tl.sum(tl.where(pos, loss, 0.0), 1), mask=rmask, sem="relaxed")
        tl.atomic_add(count_ptr + rows * 2, tl.sum(neg.to(tl.int32), 1).to(ACC), mask=rmask, sem="relaxed")
        tl.atomic_add(count_ptr + rows * 2 + 1, tl.sum(pos.to(tl.int32), 1).to(ACC), mask=rmask, sem="relaxed")


# SPEC 1.2 / csrc/ops.cpp. L = Σ_i Σ_{j: g_i<g_j} gL[i, y_ij]·l_ij with l = softplus(d) − y·d, so
#   G_ij := ∂L/∂d_ij = gL[i, y_ij]·(σ(d_ij) − y_ij)  (0 outside the valid pairs)
# and with d_ij = Σ_k w_k |h_ik − hc_jk| + b,  ∂|u|/∂u = sign(u) (sign(0) = 0), S_ijk = G_ij sign(h_ik − hc_jk):
#   dh_ik  =  w_k R_ik,   R_ik = Σ_j S_ijk           (row sums of the tile)
#   dhc_jk = −w_k C_jk,   C_jk = Σ_i S_ijk           (column sums of the tile)
#   dw_k   =  Σ_ij G_ij |h_ik − hc_jk| = Σ_ij S_ijk (h_ik − hc_jk) = Σ_i h_ik R_ik − Σ_j hc_jk C_jk
#   db     =  Σ_ij G_ij
# The kernel accumulates only R and C (atomics into (D, N) / (D, Nc) buffers: the per-k atomics of a tile
# hit contiguous addresses); w and dw are applied afterwards in O(N·D), so the D loop holds two tile
# reductions per k and nothing else.
@autotune(
    _CONFIGS,
    key=["N", "Nc", "D"],
    interp_config=_INTERP,
    work=_work,
    reset_to_zero=["r_ptr", "c_ptr", "db_ptr"],
)
@triton.jit
def _siamese_bwd_kernel(
    grad_loss_ptr,  # (N, 2) ACC, contiguous
    h_ptr, hc_ptr, inst_ptr, instc_ptr, proto_ptr, protoc_ptr, w_ptr, b_ptr,
    r_ptr, c_ptr,  # R (D, N) and C (D, Nc) ACC accumulators, contiguous
    db_ptr,  # (1,) ACC accumulator
    N, Nc, D, row_offset,
    stride_hn, stride_hd, stride_hcn, stride_hcd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    rows, cols, rmask, cmask, active, y, valid = _tile_setup(
        inst_ptr, instc_ptr, proto_ptr, protoc_ptr, N, Nc, row_offset, BLOCK_M, BLOCK_N
    )
    if active:
        d = _l1_tile(
            h_ptr, hc_ptr, w_ptr, rows, cols, N, Nc, D, stride_hn, stride_hd, stride_hcn, stride_hcd,
            BLOCK_M, BLOCK_N, BLOCK_K, ACC,
        ) + tl.load(b_ptr)  # fmt: skip
        gl0 = tl.load(grad_loss_ptr + rows * 2, mask=rmask, other=0.0)
        gl1 = tl.load(grad_loss_ptr + rows * 2 + 1, mask=rmask, other=0.0)
        sig = 1.0 / (1.0 + tl.exp(-d))
        g = tl.where(y, gl1[:, None] * (sig - 1.0), gl0[:, None] * sig)
        g = tl.where(valid, g, 0.0)
        tl.atomic_add(db_ptr, tl.sum(tl.sum(g, 1), 0), sem="relaxed")

        a_ptrs = h_ptr + tl.minimum(rows, N - 1) * stride_hn
        b_ptrs = hc_ptr + tl.minimum(cols, Nc - 1) * stride_hcn
        r_ptrs = r_ptr + rows
        c_ptrs = c_ptr + cols
        for _kt in range(0, D // BLOCK_K):
            for kk in tl.static_range(BLOCK_K):
                a = tl.load(a_ptrs + kk * stride_hd).to(ACC)
                b = tl.load(b_ptrs + kk * stride_hcd).to(ACC)
                diff = a[:, None] - b[None, :]
                s = tl.where(diff > 0, g, tl.where(diff < 0, -g, 0.0))
                tl.atomic_add(r_ptrs + kk * N, tl.sum(s, 1), mask=rmask, sem="relaxed")
                tl.atomic_add(c_ptrs + kk * Nc, tl.sum(s, 0), mask=cmask, sem="relaxed")
            a_ptrs += BLOCK_K * stride_hd
            b_ptrs += BLOCK_K * stride_hcd
            r_ptrs += BLOCK_K * N
            c_ptrs += BLOCK_K * Nc
        for _kr in range(0, D % BLOCK_K):
            a = tl.load(a_ptrs).to(ACC)
            b = tl.load(b_ptrs).to(ACC)
            diff = a[:, None] - b[None, :]
            s = tl.where(diff > 0, g, tl.where(diff < 0, -g, 0.0))
            tl.atomic_add(r_ptrs, tl.sum(s, 1), mask=rmask, sem="relaxed")
            tl.atomic_add(c_ptrs, tl.sum(s, 0), mask=cmask, sem="relaxed")
            a_ptrs += stride_hd
            b_ptrs += stride_hcd
            r_ptrs += N
            c_ptrs += Nc


# ----------------------------------------------------------------------------------------- launchers


def _col_major(h: torch.Tensor) -> torch.Tensor:
    """h (N, D) as a column-major view (stride(0) == 1): feature k of consecutive rows is contiguous."""
    if h.stride(0) == 1 or h.size(0) <= 1:
        return h
    return h.t().contiguous().t()


def _grid(n: int, nc: int):
    return lambda m: (triton.cdiv(n, m["BLOCK_M"]), triton.cdiv(nc, m["BLOCK_N"]))


def alloc_fwd(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acc = acc_dtype(h.dtype)
    return h.new_zeros(h.size(0), 2, dtype=acc), h.new_zeros(h.size(0), 2, dtype=acc)


def alloc_bwd(h, hc, weight, bias):
    """Output shapes/dtypes of `siamese_bwd` (for the fake implementation)."""
    return h.new_empty(h.shape), hc.new_empty(hc.shape), weight.new_empty(weight.shape), bias.new_empty(bias.shape)


def siamese_fwd(h, hc, inst, instc, proto, protoc, weight, bias, row_offset: int):
    """(loss (N, 2), count (N, 2)) in fp32 (fp64 for fp64 h); see the module docstring."""
    loss, count = alloc_fwd(h)
    n, d = h.shape
    nc = hc.size(0)
    if n == 0 or nc == 0:
        return loss, count
    acc = acc_dtype(h.dtype)
    hm = _col_major(h)
    hcm = hm if hc is h else _col_major(hc)
    w = weight.reshape(-1).to(acc).contiguous()
    b = bias.reshape(-1).to(acc).contiguous()
    inst, instc = label_codes(inst, instc)
    proto, protoc = label_codes(proto, protoc)
    launch(
        _siamese_fwd_kernel,
        _grid(n, nc),
        hm, hcm, inst, instc, proto, protoc, w, b, loss, count,
        n, nc, d, row_offset,
        hm.stride(0), hm.stride(1), hcm.stride(0), hcm.stride(1),
        ACC=tl_acc(h.dtype),
    )  # fmt: skip
    return loss, count


def siamese_bwd(grad_loss, h, hc, inst, instc, proto, protoc, weight, bias, row_offset: int):
    """(dh, dhc) in h's dtype, (dweight, dbias) in weight's/bias's dtype and shape (derivation above)."""
    n, d = h.shape
    nc = hc.size(0)
    acc = acc_dtype(h.dtype)
    r = h.new_zeros(d, n, dtype=acc)
    c = h.new_zeros(d, nc, dtype=acc)
    db = h.new_zeros(1, dtype=acc)
    w = weight.reshape(-1).to(acc).contiguous()
    if n > 0 and nc > 0:
        hm = _col_major(h)
        hcm = hm if hc is h else _col_major(hc)
        inst, instc = label_codes(inst, instc)
        proto, protoc = label_codes(proto, protoc)
        launch(
            _siamese_bwd_kernel,
            _grid(n, nc),
            grad_loss.to(acc).contiguous(), hm, hcm,
            inst, instc, proto, protoc,
            w, bias.reshape(-1).to(acc).contiguous(), r, c, db,
            n, nc, d, row_offset,
            hm.stride(0), hm.stride(1), hcm.stride(0), hcm.stride(1),
            ACC=tl_acc(h.dtype),
        )  # fmt: skip
    r, c = r.t(), c.t()  # (N, D), (Nc, D)
    dh = (r * w).to(h.dtype).contiguous()
    dhc = (c * -w).to(hc.dtype).contiguous()
    dw = (h.to(acc) * r).sum(0) - (hc.to(acc) * c).sum(0)
    return dh, dhc, dw.to(weight.dtype).reshape(weight.shape), db.to(bias.dtype).reshape(bias.shape)
