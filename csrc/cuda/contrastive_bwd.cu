// SPEC 1.1 on the GPU, backward (forward and design notes: contrastive.cu).
//
// Gradient (SPEC 1.1, csrc/ops.cpp). The forward outputs are lse_i = logsumexp_{j in Den(i)} c_ij / tau and
// stats_i = [Σ_P c, |P|, Σ_F c, |F|, Σ_A c] with c_ij = z_i · zc_j. For L = Σ_i gl_i lse_i + Σ_i gs_i · stats_i
// (gl = grad_lse, gs = grad_stats; the count columns carry no gradient):
//   ∂lse_i/∂c_ij = [j ∈ Den(i)] exp(c_ij / tau − lse_i) / tau          (softmax over Den(i))
//   ∂L/∂c_ij = G_ij = [j ∈ Den(i)] gl_i exp(c_ij / tau − lse_i) / tau
//                   + [j ∈ P(i)] gs_i0 + [j ∈ F(i)] gs_i2 + [j ∈ A(i)] gs_i4
//   dz_i = Σ_j G_ij zc_j,   dzc_j = Σ_i G_ij z_i.
// A row with lse_i = -inf has an empty Den(i) and no softmax term: its exponent is taken against +inf, so it
// gives exp2(-inf) = 0 and never -inf − -inf = NaN.
//
// Design: two passes that recompute the similarity tiles, no atomics (deterministic), no N × Nc buffer:
//  - row pass: a CTA owns 128 rows of z (8 warps × 16), streams column tiles of zc (cp.async, two stages),
//    forms G in registers and accumulates dz_rows += G · zc_tile on the tensor cores;
//  - column pass: the same kernel with the roles swapped (owns 128 rows of zc, streams z; the per-row
//    quantities lse, gl, gs of the streamed rows are staged in shared memory) for dzc_cols += G^T · z_tile.
// The alternative, one pass with fp32 atomics for dzc (FA2's dq), recomputes S once less but issues
// N/128 · Nc · D atomic adds and is not deterministic; SPEC's FLOP model (8 N²D fwd+bwd) counts one
// recomputation, so this design does 10 N²D of tensor-core work for it.
// G · Y on the tensor cores: the S accumulator fragment is re-packed as the A operand (16-bit: two adjacent
// n8 tiles form one k16 A fragment, as flash-attention's P·V; fp32: the k index of m16n8k8 is permuted so
// that thread (g, t) supplies columns 2t and 2t + 1, then Y is read with scalar shared loads), the streamed
// tile is the B operand (ldmatrix.trans for 16-bit). fp16 G values are scaled by 2^14 / max_i(|gl_i| / tau
// + |gs_i0| + |gs_i2| + |gs_i4|) before the conversion (a bound on |G|), so they neither overflow nor flush.
#include "contrastive_common.cuh"

namespace protoclr {
namespace cuda {
namespace contrastive {
namespace {

constexpr int kBwdThreads = 256;
constexpr int kStreamStats = 5;  // lse2, gl, gs0, gs2, gs4 of a streamed row (column pass)

template <typename T, int DB>
constexpr int bwd_smem_bytes() {
  return (kOwnRows + 2 * kCols) * Geom<T, DB>::kRowBytes + 2 * 2 * kCols * static_cast<int>(sizeof(int64_t)) +
         2 * kStreamStats * kCols * static_cast<int>(sizeof(float));
}

// log2-scaled lse for the softmax weight exp2(c · log2e / tau − lse2); +inf for an empty Den (weight 0).
template <typename A>
__device__ __forceinline__ A lse_log2(A lse) {
  return lse > neg_inf<A>() ? lse * static_cast<A>(1.4426950408889634) : static_cast<A>(INFINITY);
}

template <typename T, int DB, bool kMask, bool kCol>
__global__ void __launch_bounds__(kBwdThreads, 1) contrastive_bwd_mma_kernel(const ContrastiveParams p) {
  using G = Geom<T, DB>;
  constexpr int NF = kCols / 8, DF = DB / 8;
  extern __shared__ __align__(16) char smem[];
  char* s_own = smem;
  char* s_str = s_own + kOwnRows * G::kRowBytes;
  int64_t* s_lab = reinterpret_cast<int64_t*>(s_str + 2 * kCols * G::kRowBytes);  // [stage][inst|proto][kCols]
  float* s_st = reinterpret_cast<float*>(s_lab + 2 * 2 * kCols);                  // [stage][kStreamStats][kCols]

  // own = the rows whose gradient this CTA writes; streamed = the other side.
  const T* x = static_cast<const T*>(kCol ? p.zc : p.z);
  const T* y = static_cast<const T*>(kCol ? p.z : p.zc);
  const int64_t nx = kCol ? p.nc : p.n, ny = kCol ? p.n : p.nc;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int64_t own0 = static_cast<int64_t>(blockIdx.x) * kOwnRows;
  const bool vec = vec16_ok(x, p.d) && vec16_ok(y, p.d);
  const float inv_tau = static_cast<float>(1.0 / p.tau);
  const float scale_log2 = static_cast<float>(1.4426950408889634 / p.tau);
  const float gscale = p.g_scale != nullptr ? *p.g_scale : 1.f;
  const float* grad_lse = static_cast<const float*>(p.grad_lse);
  const float* grad_stats = static_cast<const float*>(p.grad_stats);
  const float* lse_in = static_cast<const float*>(p.lse_in);

  load_tile<T, DB, kOwnRows, kBwdThreads>(s_own, x, own0, nx, p.d, vec, tid);
  auto load_stage = [&](int64_t t) {
    const int st = static_cast<int>(t & 1);
    const int64_t s0 = t * kCols;
    load_tile<T, DB, kCols, kBwdThreads>(s_str + st * kCols * G::kRowBytes, y, s0, ny, p.d, vec, tid);
    if (tid < kCols) {
      const int64_t j = s0 + tid;
      const bool ok = j < ny;
      int64_t* lab = s_lab + st * 2 * kCols;
      lab[tid] = ok ? (kCol ? p.inst[j] : p.instc[j]) : 0;
      lab[kCols + tid] = ok ? (kCol ? p.proto[j] : p.protoc[j]) : -1;
      if (kCol) {  // the streamed rows are anchors i: their softmax and statistic weights (0 when padding)
        float* sst = s_st + st * kStreamStats * kCols;
        sst[0 * kCols + tid] = ok ? lse_log2(lse_in[j]) : INFINITY;
        sst[1 * kCols + tid] = ok ? grad_lse[j] * inv_tau * gscale : 0.f;
        sst[2 * kCols + tid] = ok ? grad_stats[j * 5 + 0] * gscale : 0.f;
        sst[3 * kCols + tid] = ok ? grad_stats[j * 5 + 2] * gscale : 0.f;
        sst[4 * kCols + tid] = ok ? grad_stats[j * 5 + 4] * gscale : 0.f;
      }
    }
  };
  load_stage(0);
  cp_async_commit();

  // Own rows of this thread: h = 0, 1 -> local row 16 warp + 8 h + g. Row pass: they are anchors i.
  // F needs proto_i == protoc_j >= 0, so "has a prototype" can be tested on either side: the own side.
  int64_t go[2], inst_o[2], proto_o[2];
  bool fok_o[2];
  float lse2_o[2] = {0.f, 0.f}, gl_o[2] = {0.f, 0.f}, gs0_o[2] = {0.f, 0.f}, gs2_o[2] = {0.f, 0.f},
        gs4_o[2] = {0.f, 0.f};
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t o = own0 + warp * 16 + h * 8 + g;
    const bool ok = o < nx;
    if (kCol) {
      go[h] = o;
      inst_o[h] = ok ? p.instc[o] : 0;
      proto_o[h] = ok ? p.protoc[o] : -1;
      fok_o[h] = proto_o[h] >= 0;
    } else {
      go[h] = p.row_offset + o;
      inst_o[h] = ok ? p.inst[o] : 0;
      proto_o[h] = ok ? p.proto[o] : -1;
      fok_o[h] = proto_o[h] >= 0;
      if (ok) {
        lse2_o[h] = lse_log2(lse_in[o]);
        gl_o[h] = grad_lse[o] * inv_tau * gscale;
        gs0_o[h] = grad_stats[o * 5 + 0] * gscale;
        gs2_o[h] = grad_stats[o * 5 + 2] * gscale;
        gs4_o[h] = grad_stats[o * 5 + 4] * gscale;
      } else {
        lse2_o[h] = INFINITY;
      }
    }
  }

  float dacc[DF][4];
#pragma unroll
  for (int df = 0; df < DF; ++df)
#pragma unroll
    for (int q = 0; q < 4; ++q) dacc[df][q] = 0.f;

  const int64_t ntiles = (ny + kCols - 1) / kCols;
  for (int64_t t = 0; t < ntiles; ++t) {
    if (t + 1 < ntiles) {
      load_stage(t + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int st = static_cast<int>(t & 1);
    const char* sy = s_str + st * kCols * G::kRowBytes;
    float acc[1][NF][4];
#pragma unroll
    for (int nf = 0; nf < NF; ++nf)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[0][nf][q] = 0.f;
    gemm_xyt<T, DB, 1, NF>(acc, s_own + warp * 16 * G::kRowBytes, sy, lane);

    // G_ij in place of c_ij. The streamed index of local column `col` is s0 + col; A(i) excludes gj == gi.
    // Padding columns (col >= nvalid) get G = 0: their zero-filled Y rows would otherwise multiply a softmax
    // weight exp2(0 - lse2) that overflows to inf when every member of Den(i) has c_ij / tau < -88 (fp32,
    // bf16) or gives an fp16 G above 65504 after the 2^14 scaling, and inf · 0 = NaN in the MMA.
    const int64_t s0 = t * kCols;
    const int nvalid = static_cast<int>(min(static_cast<int64_t>(kCols), ny - s0));
    int diag[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t dd = kCol ? go[h] - (p.row_offset + s0) : go[h] - s0;
      diag[h] = (dd >= 0 && dd < kCols) ? static_cast<int>(dd) : -1;
    }
    const int64_t* lab_inst = s_lab + st * 2 * kCols;
    const int64_t* lab_proto = lab_inst + kCols;
    const float* sst = s_st + st * kStreamStats * kCols;
#pragma unroll
    for (int nf = 0; nf < NF; ++nf) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = nf * 8 + 2 * tq + e;
        const int64_t inst_s = lab_inst[col], proto_s = lab_proto[col];
        float lse2_s = 0.f, gl_s = 0.f, gs0_s = 0.f, gs2_s = 0.f, gs4_s = 0.f;
        if (kCol) {
          lse2_s = sst[0 * kCols + col];
          gl_s = sst[1 * kCols + col];
          gs0_s = sst[2 * kCols + col];
          gs2_s = sst[3 * kCols + col];
          gs4_s = sst[4 * kCols + col];
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float& c = acc[0][nf][h * 2 + e];
          // row quantities come from the anchor side: own in the row pass, streamed in the column pass
          const float lse2 = kCol ? lse2_s : lse2_o[h], gl = kCol ? gl_s : gl_o[h];
          const float gs0 = kCol ? gs0_s : gs0_o[h], gs2 = kCol ? gs2_s : gs2_o[h], gs4 = kCol ? gs4_s : gs4_o[h];
          const bool same = inst_s == inst_o[h];
          const bool in_a = col < nvalid && col != diag[h];
          const bool in_p = in_a && same;
          const bool in_f = fok_o[h] && !same && proto_s == proto_o[h];  // padding: proto_s = -1, never
          const bool den = kMask ? (in_a && !in_f) : in_a;
          float gv = den ? gl * fast_exp2(c * scale_log2 - lse2) : 0.f;
          if (in_p) gv += gs0;  // predicated adds: fewer live temporaries than selects
          if (in_f) gv += gs2;
          if (in_a) gv += gs4;
          c = gv;
        }
      }
    }

    // dacc (16 own rows × DB) += G (16 × 64) · Y_tile (64 × DB).
    if constexpr (sizeof(T) == 2) {
#pragma unroll
      for (int kk = 0; kk < kCols / 16; ++kk) {
        typename Mma<T>::AFrag a;
        a.x[0] = pack2<T>(acc[0][2 * kk][0], acc[0][2 * kk][1]);
        a.x[1] = pack2<T>(acc[0][2 * kk][2], acc[0][2 * kk][3]);
        a.x[2] = pack2<T>(acc[0][2 * kk + 1][0], acc[0][2 * kk + 1][1]);
        a.x[3] = pack2<T>(acc[0][2 * kk + 1][2], acc[0][2 * kk + 1][3]);
#pragma unroll
        for (int dp = 0; dp < DF / 2; ++dp) {
          uint32_t b[4];  // x4.trans: (k 0-7, d 0-7), (k 8-15, d 0-7), (k 0-7, d 8-15), (k 8-15, d 8-15)
          ldmatrix_x4_trans(b, sy + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * G::kRowBytes + dp * 32 +
                                   (lane >> 4) * 16);
          Mma<T>::run(dacc[2 * dp], a, b[0], b[1]);
          Mma<T>::run(dacc[2 * dp + 1], a, b[2], b[3]);
        }
      }
    } else {
      // m16n8k8 tf32 with mma-k index t <-> column 2t and t + 4 <-> column 2t + 1 of each n8 tile, so that the
      // C fragment (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1) is the A fragment as it stands.
#pragma unroll
      for (int nf = 0; nf < NF; ++nf) {
        const uint32_t raw[4] = {__float_as_uint(acc[0][nf][0]), __float_as_uint(acc[0][nf][2]),
                                 __float_as_uint(acc[0][nf][1]), __float_as_uint(acc[0][nf][3])};
        typename Mma<T>::AFrag a;
        Mma<T>::prep_a(raw, a);
        const char* y0 = sy + (nf * 8 + 2 * tq) * G::kRowBytes + g * 4;
        const char* y1 = y0 + G::kRowBytes;
#pragma unroll
        for (int df = 0; df < DF; ++df) {
          BFrag<float> b;
          b.set(lds32(y0 + df * 32), lds32(y1 + df * 32));
          b.mma(dacc[df], a);
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }

  T* out = static_cast<T*>(kCol ? p.dzc : p.dz);
  const float unscale = 1.f / gscale;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t o = own0 + warp * 16 + h * 8 + g;
    if (o >= nx) continue;
#pragma unroll
    for (int df = 0; df < DF; ++df) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int64_t dcol = df * 8 + 2 * tq + e;
        if (dcol < p.d) out[o * p.d + dcol] = from_acc<T>(dacc[df][h * 2 + e] * unscale);
      }
    }
  }
}

// SIMT backward (float / double inputs, any D). G tile (64 × 64) via exact FMAs into shared memory, then
// out[own] += G · Y walked over D in chunks of 64, read-modify-write of the zero-initialised output rows this
// CTA owns (deterministic: one writer, fixed order).
template <typename A, bool kMask, bool kCol>
__global__ void __launch_bounds__(256) contrastive_bwd_simt_kernel(const ContrastiveParams p) {
  extern __shared__ __align__(16) char smem_raw[];
  A* xs = reinterpret_cast<A*>(smem_raw);
  A* ys = xs + kSimtChunk * kSimtLd;
  A* gs = ys + kSimtChunk * kSimtLd;  // [own][streamed]
  A* yd = gs + kSimtTile * kSimtLd;   // [streamed][d chunk]
  const A* x = static_cast<const A*>(kCol ? p.zc : p.z);
  const A* y = static_cast<const A*>(kCol ? p.z : p.zc);
  const int64_t nx = kCol ? p.nc : p.n, ny = kCol ? p.n : p.nc;
  const A* grad_lse = static_cast<const A*>(p.grad_lse);
  const A* grad_stats = static_cast<const A*>(p.grad_stats);
  const A* lse_in = static_cast<const A*>(p.lse_in);
  A* out = static_cast<A*>(kCol ? p.dzc : p.dz);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t own0 = static_cast<int64_t>(blockIdx.x) * kSimtTile;
  const A inv_tau = static_cast<A>(1.0 / p.tau);

  // Per-anchor quantities of row i: (global index, inst, proto, lse, gl / tau, gs0, gs2, gs4).
  struct Anchor {
    int64_t g, inst, proto;
    A lse, gl, gs0, gs2, gs4;
  };
  auto anchor = [&](int64_t i) {
    Anchor r{p.row_offset + i, 0, -1, neg_inf<A>(), A(0), A(0), A(0), A(0)};
    if (i < p.n) {
      r.inst = p.inst[i];
      r.proto = p.proto[i];
      r.lse = lse_in[i];
      r.gl = grad_lse[i] * inv_tau;
      r.gs0 = grad_stats[i * 5 + 0];
      r.gs2 = grad_stats[i * 5 + 2];
      r.gs4 = grad_stats[i * 5 + 4];
    }
    return r;
  };
  // The column side j: (global index, inst, proto).
  auto column = [&](int64_t j) {
    Anchor r{j, 0, -1, neg_inf<A>(), A(0), A(0), A(0), A(0)};
    if (j < p.nc) {
      r.inst = p.instc[j];
      r.proto = p.protoc[j];
    }
    return r;
  };

  Anchor own[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) own[a] = kCol ? column(own0 + ty + 16 * a) : anchor(own0 + ty + 16 * a);

  for (int64_t s0 = 0; s0 < ny; s0 += kSimtTile) {
    A c[4][4];
    simt_gemm(c, xs, ys, x, own0, nx, y, s0, ny, p.d, tid);
    Anchor str[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) str[b] = kCol ? anchor(s0 + tx + 16 * b) : column(s0 + tx + 16 * b);
#pragma unroll
    for (int a = 0; a < 4; ++a) {
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const Anchor& ri = kCol ? str[b] : own[a];
        const Anchor& cj = kCol ? own[a] : str[b];
        const bool valid = (kCol ? s0 + tx + 16 * b : own0 + ty + 16 * a) < p.n &&
                           (kCol ? own0 + ty + 16 * a : s0 + tx + 16 * b) < p.nc;
        const bool in_a = valid && in_all(ri.g, cj.g);
        const bool in_p = valid && in_pos(ri.g, cj.g, ri.inst, cj.inst);
        const bool in_f = valid && in_false_neg(ri.inst, cj.inst, ri.proto, cj.proto);
        const bool den = kMask ? (in_a && !in_f) : in_a;
        const A w = den ? softmax_weight(c[a][b] * inv_tau, ri.lse) : A(0);
        gs[(ty + 16 * a) * kSimtLd + tx + 16 * b] =
            ri.gl * w + (in_p ? ri.gs0 : A(0)) + (in_f ? ri.gs2 : A(0)) + (in_a ? ri.gs4 : A(0));
      }
    }
    for (int64_t d0 = 0; d0 < p.d; d0 += kSimtTile) {
      __syncthreads();  // gs written; yd free
#pragma unroll 4
      for (int q = 0; q < kSimtTile * kSimtTile / 256; ++q) {
        const int e = tid + q * 256, j = e / kSimtTile, dd = e % kSimtTile;
        const int64_t gj = s0 + j, gd = d0 + dd;
        yd[j * kSimtLd + dd] = (gj < ny && gd < p.d) ? y[gj * p.d + gd] : A(0);
      }
      __syncthreads();
      A o[4][4] = {};
#pragma unroll 8
      for (int j = 0; j < kSimtTile; ++j) {
        A gv[4], yv[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) gv[a] = gs[(ty + 16 * a) * kSimtLd + j];
#pragma unroll
        for (int b = 0; b < 4; ++b) yv[b] = yd[j * kSimtLd + tx + 16 * b];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) o[a][b] = fma(gv[a], yv[b], o[a][b]);
      }
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        const int64_t r = own0 + ty + 16 * a;
        if (r >= nx) continue;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
          const int64_t dd = d0 + tx + 16 * b;
          if (dd < p.d) out[r * p.d + dd] += o[a][b];
        }
      }
    }
    __syncthreads();  // gs is rewritten by the next tile
  }
}

// One CTA: G scale for fp16 = 2^14 / max_i (|gl_i| / tau + |gs_i0| + |gs_i2| + |gs_i4|) (1 when that is 0).
__global__ void __launch_bounds__(1024) g_scale_kernel(const ContrastiveParams p) {
  __shared__ float red[32];
  const float* gl = static_cast<const float*>(p.grad_lse);
  const float* gs = static_cast<const float*>(p.grad_stats);
  const float inv_tau = static_cast<float>(1.0 / p.tau);
  float mx = 0.f;
  for (int64_t i = threadIdx.x; i < p.n; i += blockDim.x)
    mx = fmaxf(mx, fabsf(gl[i]) * inv_tau + fabsf(gs[i * 5]) + fabsf(gs[i * 5 + 2]) + fabsf(gs[i * 5 + 4]));
  mx = group_max<32>(mx);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = mx;
  __syncthreads();
  if (threadIdx.x < 32) {
    mx = group_max<32>(threadIdx.x < blockDim.x / 32 ? red[threadIdx.x] : 0.f);
    // capped at 2^126: 16384 / mx overflows for mx < ~2^-114, and 1 / 2^126 is still a normal float
    if (threadIdx.x == 0) *p.g_scale = (mx > 0.f && mx < INFINITY) ? fminf(16384.f / mx, 0x1p126f) : 1.f;
  }
}

template <typename T, int DB>
void launch_bwd_mma(const ContrastiveParams& p, cudaStream_t stream) {
  constexpr int smem = bwd_smem_bytes<T, DB>();
  PROTOCLR_BOOL_SWITCH(p.mask, kMask, [&] {
    if (p.n > 0) {
      auto kernel = contrastive_bwd_mma_kernel<T, DB, kMask, false>;
      set_smem(reinterpret_cast<const void*>(kernel), smem);
      kernel<<<static_cast<unsigned>((p.n + kOwnRows - 1) / kOwnRows), kBwdThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (p.nc > 0) {
      auto kernel = contrastive_bwd_mma_kernel<T, DB, kMask, true>;
      set_smem(reinterpret_cast<const void*>(kernel), smem);
      kernel<<<static_cast<unsigned>((p.nc + kOwnRows - 1) / kOwnRows), kBwdThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

template <typename A>
void launch_bwd_simt(const ContrastiveParams& p, cudaStream_t stream) {
  constexpr int smem = (2 * kSimtChunk + 2 * kSimtTile) * kSimtLd * static_cast<int>(sizeof(A));
  PROTOCLR_BOOL_SWITCH(p.mask, kMask, [&] {
    if (p.n > 0) {
      auto kernel = contrastive_bwd_simt_kernel<A, kMask, false>;
      set_smem(reinterpret_cast<const void*>(kernel), smem);
      kernel<<<static_cast<unsigned>((p.n + kSimtTile - 1) / kSimtTile), 256, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (p.nc > 0) {
      auto kernel = contrastive_bwd_simt_kernel<A, kMask, true>;
      set_smem(reinterpret_cast<const void*>(kernel), smem);
      kernel<<<static_cast<unsigned>((p.nc + kSimtTile - 1) / kSimtTile), 256, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace
}  // namespace contrastive

void contrastive_bwd_launch(const ContrastiveParams& p, cudaStream_t stream) {
  using namespace contrastive;
  if (!contrastive_uses_mma(p.dtype, p.d)) {
    if (p.dtype == DType::kDouble)
      launch_bwd_simt<double>(p, stream);
    else
      launch_bwd_simt<float>(p, stream);  // float32 copies of 16-bit inputs, float32 zeroed outputs
    return;
  }
  switch (p.dtype) {
    case DType::kHalf:
      if (p.g_scale != nullptr && p.n > 0) {
        g_scale_kernel<<<1, 1024, 0, stream>>>(p);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      return p.d <= 64 ? launch_bwd_mma<__half, 64>(p, stream) : launch_bwd_mma<__half, 128>(p, stream);
    case DType::kBFloat16:
      return p.d <= 64 ? launch_bwd_mma<__nv_bfloat16, 64>(p, stream)
                       : launch_bwd_mma<__nv_bfloat16, 128>(p, stream);
    default:
      return p.d <= 64 ? launch_bwd_mma<float, 64>(p, stream) : launch_bwd_mma<float, 128>(p, stream);
  }
}

}  // namespace cuda
}  // namespace protoclr
