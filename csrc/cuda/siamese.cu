// SPEC 1.2 on the GPU, dense pairs g_i < g_j: d_ij = Σ_k w_k |h_ik − hc_jk| + b, y_ij = inst_i == instc_j or
// proto_i == protoc_j >= 0, l_ij = softplus(d_ij) − y_ij d_ij; forward loss/count (N, 2) split by y.
//
// Design. |h_i − hc_j| is not bilinear, so there is no tensor-core form: the work is two fp32 instructions
// (FADD, FFMA with |.|) per (i, j, k), done as a register-tiled "GEMM" (64 × 64 pair tile per CTA of 256
// threads, 4 × 4 pairs per thread) over D in chunks of kChunk, both operands staged in shared memory in the
// accumulator type through 16-byte vectorised global loads (scalar loads when rows are not 16-byte aligned).
// A CTA owns a block of 64 rows and walks only the column tiles that hold pairs g_i < g_j; it takes row
// blocks b and nb − 1 − b so that every CTA has the same share of the triangle. Per-row results are reduced
// inside the CTA (no atomics): deterministic, O(N) outputs, no N × Nc buffer.
//
// Backward (SPEC 1.2). With G_ij = grad_loss[i, y_ij] (σ(d_ij) − y_ij) on pairs g_i < g_j (0 elsewhere):
//   ∂l_ij/∂d_ij = σ(d_ij) − y_ij,  ∂d_ij/∂h_ik = w_k sign(h_ik − hc_jk) = −∂d_ij/∂hc_jk,
//   ∂d_ij/∂w_k = |h_ik − hc_jk|,  ∂d_ij/∂b = 1, so
//   dh_i = w ⊙ Σ_j G_ij sign(h_i − hc_j),  dhc_j = w ⊙ Σ_i G_ij sign(hc_j − h_i),
//   dw = Σ_ij G_ij |h_i − hc_j|,  db = Σ_ij G_ij   (sign(0) = 0).
// Deterministic column-gradient reduction: two passes with the same kernel instead of atomics. The row pass
// owns row blocks of h and writes dh (plus per-CTA partial sums of dw and db); the column pass owns column
// blocks of hc and writes dhc. Each pass recomputes d_ij for its tile, keeps G in shared memory, and then
// walks D again: thread (own rows 4, features 4) accumulates Σ_s G sign(own − streamed) over the tile's 64
// streamed rows and adds it to its own rows of an fp32 (fp64) accumulator in global memory (one writer per
// element, fixed order). A last kernel multiplies by w and converts to the input dtype, and sums the dw / db
// partials in CTA order. Extra memory: O((N + Nc) · D) accumulators for 16-bit inputs, O(CTAs · D) partials.
#include <c10/cuda/CUDAException.h>

#include <algorithm>

#include "params.cuh"
#include "protoclr/math.h"

namespace protoclr {
namespace cuda {
namespace {

constexpr int kTile = 64;
constexpr int kThreads = 256;
constexpr int kChunk = 32;  // features per step of the d_ij sweep
constexpr int kGradChunk = 64;  // features per step of the gradient sweep
constexpr int kLd = kTile + 4;  // shared row length: 16-byte aligned 4-wide reads, spread transposed stores

template <typename A>
__device__ __forceinline__ void load4(const A* s, A (&v)[4]) {
  if constexpr (sizeof(A) == 4) {
    const float4 q = *reinterpret_cast<const float4*>(s);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
    const double2 q0 = *reinterpret_cast<const double2*>(s);
    const double2 q1 = *reinterpret_cast<const double2*>(s + 2);
    v[0] = q0.x, v[1] = q0.y, v[2] = q1.x, v[3] = q1.y;
  }
}

template <typename T>
__device__ __forceinline__ bool vec16_ok(const T* ptr, int64_t d) {
  return d % (16 / static_cast<int64_t>(sizeof(T))) == 0 && (reinterpret_cast<uintptr_t>(ptr) & 15) == 0;
}

// The ROWS × COLS block [r0, r0 + ROWS) × [k0, k0 + COLS) of a row-major (rows, d) matrix into shared memory
// as A, transposed (s[k * kLd + r]) or not (s[r * kLd + k]), zero outside the matrix.
template <typename T, typename A, int ROWS, int COLS, bool kTrans>
__device__ __forceinline__ void stage(A* s, const T* g, int64_t r0, int64_t rows, int64_t k0, int64_t d, bool vec,
                                      int tid) {
  constexpr int VE = 16 / static_cast<int>(sizeof(T));
  static_assert(COLS % VE == 0, "chunk must hold whole 16-byte vectors");
  if (vec) {  // d % VE == 0 and k0 % VE == 0: a vector is wholly inside or wholly outside the row
#pragma unroll
    for (int v = tid; v < ROWS * COLS / VE; v += kThreads) {
      const int r = v / (COLS / VE), kv = (v % (COLS / VE)) * VE;
      const int64_t gr = r0 + r, gk = k0 + kv;
      uint4 raw = make_uint4(0, 0, 0, 0);
      if (gr < rows && gk < d) raw = *reinterpret_cast<const uint4*>(g + gr * d + gk);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int u = 0; u < VE; ++u) {
        const A val = static_cast<A>(to_acc(e[u]));
        if (kTrans)
          s[(kv + u) * kLd + r] = val;
        else
          s[r * kLd + kv + u] = val;
      }
    }
  } else {
#pragma unroll 4
    for (int e = tid; e < ROWS * COLS; e += kThreads) {
      const int r = e / COLS, k = e % COLS;
      const int64_t gr = r0 + r, gk = k0 + k;
      const A val = (gr < rows && gk < d) ? static_cast<A>(to_acc(g[gr * d + gk])) : A(0);
      if (kTrans)
        s[k * kLd + r] = val;
      else
        s[r * kLd + k] = val;
    }
  }
}

// acc[a][b] = Σ_k w_k |x[x0 + 4 ty + a, k] − y[y0 + 4 tx + b, k]| (no bias); xs, ys: kChunk × kLd each.
template <typename T, typename A>
__device__ __forceinline__ void l1_tile(A (&acc)[4][4], A* xs, A* ys, A* ws, const T* x, int64_t x0, int64_t nx,
                                        const T* y, int64_t y0, int64_t ny, const A* w, int64_t d, bool vec,
                                        int tid) {
  const int ty = tid / 16, tx = tid % 16;
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = A(0);
  for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
    __syncthreads();
    stage<T, A, kTile, kChunk, true>(xs, x, x0, nx, k0, d, vec, tid);
    stage<T, A, kTile, kChunk, true>(ys, y, y0, ny, k0, d, vec, tid);
    if (tid < kChunk) ws[tid] = k0 + tid < d ? w[k0 + tid] : A(0);
    __syncthreads();
#pragma unroll 8
    for (int k = 0; k < kChunk; ++k) {
      A xv[4], yv[4];
      load4(xs + k * kLd + ty * 4, xv);
      load4(ys + k * kLd + tx * 4, yv);
      const A wk = ws[k];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = fma(wk, fabs(xv[a] - yv[b]), acc[a][b]);
    }
  }
}

// The k-th of the row blocks this CTA owns (k = 0, 1): b and nb - 1 - b, once when they coincide.
__device__ __forceinline__ int64_t owned_block(int64_t nb, int k) {
  const int64_t b = blockIdx.x;
  return k == 0 ? b : (nb - 1 - b != b ? nb - 1 - b : -1);
}

// Tiles [t0, t1) of the streamed side that hold pairs g_i < g_j for the own block at o0.
// Row side own (i): columns j > row_offset + o0. Column side own (j): rows i with row_offset + i < o0 + 63.
template <bool kOwnRows>
__device__ __forceinline__ void tile_range(const SiameseParams& p, int64_t o0, int64_t& t0, int64_t& t1) {
  if (kOwnRows) {
    t0 = (p.row_offset + o0 + 1) / kTile;
    t1 = (p.nc + kTile - 1) / kTile;
  } else {
    const int64_t jmax = (o0 + kTile < p.nc ? o0 + kTile : p.nc) - 1;
    const int64_t lim = jmax - p.row_offset > 0 ? jmax - p.row_offset : 0;
    const int64_t iend = lim < p.n ? lim : p.n;  // rows i < iend
    t0 = 0;
    t1 = (iend + kTile - 1) / kTile;
  }
}

// Two CTAs per SM (128 registers); double, a test-only path, gets the whole register file instead of spilling.
template <typename T>
constexpr int kMinBlocks = sizeof(T) == 8 ? 1 : 2;

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) siamese_fwd_kernel(const SiameseParams p) {
  using A = acc_t<T>;
  __shared__ __align__(16) A xs[kChunk * kLd];
  __shared__ __align__(16) A ys[kChunk * kLd];
  __shared__ A ws[kChunk];
  const T* h = static_cast<const T*>(p.h);
  const T* hc = static_cast<const T*>(p.hc);
  const A* w = static_cast<const A*>(p.weight);
  const A bias = *static_cast<const A*>(p.bias);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const bool vec = vec16_ok(h, p.d) && vec16_ok(hc, p.d);
  const int64_t nb = (p.n + kTile - 1) / kTile;
  for (int k = 0; k < 2; ++k) {
    const int64_t blk = owned_block(nb, k);
    if (blk < 0) break;
    const int64_t i0 = blk * kTile;
    int64_t gi[4], inst_i[4], proto_i[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int64_t i = i0 + ty * 4 + a;
      const bool ok = i < p.n;
      gi[a] = ok ? p.row_offset + i : INT64_MAX;  // padding rows pair with nothing
      inst_i[a] = ok ? p.inst[i] : 0;
      proto_i[a] = ok ? p.proto[i] : -1;
    }
    A loss[4][2] = {}, cnt[4][2] = {};
    int64_t t0, t1;
    tile_range<true>(p, i0, t0, t1);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * kTile;
      A dd[4][4];
      l1_tile<T, A>(dd, xs, ys, ws, h, i0, p.n, hc, j0, p.nc, w, p.d, vec, tid);
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int64_t j = j0 + tx * 4 + b;
        if (j >= p.nc) break;
        const int64_t inst_j = p.instc[j], proto_j = p.protoc[j];
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          if (!(gi[a] < j)) continue;
          const int y = siamese_label(inst_i[a], inst_j, proto_i[a], proto_j);
          const A l = bce_logits(dd[a][b] + bias, y);
          loss[a][0] += y ? A(0) : l;  // selects, not a run-time index: the arrays stay in registers
          loss[a][1] += y ? l : A(0);
          cnt[a][0] += y ? A(0) : A(1);
          cnt[a][1] += y ? A(1) : A(0);
        }
      }
    }
    A* out_loss = static_cast<A*>(p.loss);
    A* out_cnt = static_cast<A*>(p.count);
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int64_t i = i0 + ty * 4 + a;
#pragma unroll
      for (int y = 0; y < 2; ++y) {
        const A l = group_sum<16>(loss[a][y]), c = group_sum<16>(cnt[a][y]);
        if (tx == 0 && i < p.n) {
          out_loss[i * 2 + y] = l;
          out_cnt[i * 2 + y] = c;
        }
      }
    }
  }
}

template <typename T, bool kRowPass>
__global__ void __launch_bounds__(kThreads, kMinBlocks<T>) siamese_bwd_kernel(const SiameseParams p) {
  using A = acc_t<T>;
  extern __shared__ __align__(16) char smem_raw[];
  A* stage_x = reinterpret_cast<A*>(smem_raw);  // d sweep: kChunk × kLd (transposed); grad sweep: kTile × kLd
  A* stage_y = stage_x + kTile * kLd;
  A* gsm = stage_y + kTile * kLd;  // [streamed][own] G tile
  A* ws = gsm + kTile * kLd;       // kChunk
  const T* own = static_cast<const T*>(kRowPass ? p.h : p.hc);
  const T* str = static_cast<const T*>(kRowPass ? p.hc : p.h);
  const int64_t n_own = kRowPass ? p.n : p.nc, n_str = kRowPass ? p.nc : p.n;
  const A* w = static_cast<const A*>(p.weight);
  const A bias = *static_cast<const A*>(p.bias);
  const A* grad_loss = static_cast<const A*>(p.grad_loss);
  A* out = static_cast<A*>(kRowPass ? p.dh_acc : p.dhc_acc);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int og = tid % 16, kg = tid / 16;  // gradient sweep: own rows 4 og + a, features 4 kg + c
  const bool vec = vec16_ok(own, p.d) && vec16_ok(str, p.d);
  const int64_t nb = (n_own + kTile - 1) / kTile;
  A db_acc = A(0);
  for (int k = 0; k < 2; ++k) {
    const int64_t blk = owned_block(nb, k);
    if (blk < 0) break;
    const int64_t o0 = blk * kTile;
    // Own side labels (4 ty + a): row i (row pass) or column j (column pass).
    int64_t g_own[4], inst_own[4], proto_own[4];
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      const int64_t o = o0 + ty * 4 + a;
      const bool ok = o < n_own;
      g_own[a] = kRowPass ? (ok ? p.row_offset + o : INT64_MAX) : (ok ? o : INT64_MIN);
      inst_own[a] = ok ? (kRowPass ? p.inst[o] : p.instc[o]) : 0;
      proto_own[a] = ok ? (kRowPass ? p.proto[o] : p.protoc[o]) : -1;
    }
    int64_t t0, t1;
    tile_range<kRowPass>(p, o0, t0, t1);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s0 = t * kTile;
      A dd[4][4];
      l1_tile<T, A>(dd, stage_x, stage_y, ws, own, o0, n_own, str, s0, n_str, w, p.d, vec, tid);
      // G_ij into gsm[streamed][own]; rows i hold grad_loss.
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const int64_t s = s0 + tx * 4 + b;
        const bool sok = s < n_str;
        const int64_t g_s = kRowPass ? s : p.row_offset + s;
        const int64_t inst_s = sok ? (kRowPass ? p.instc[s] : p.inst[s]) : 0;
        const int64_t proto_s = sok ? (kRowPass ? p.protoc[s] : p.proto[s]) : -1;
        A gl_s[2] = {A(0), A(0)};
        if (!kRowPass && sok) gl_s[0] = grad_loss[s * 2], gl_s[1] = grad_loss[s * 2 + 1];
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          const int64_t o = o0 + ty * 4 + a;
          const bool pair = sok && (kRowPass ? g_own[a] < g_s : g_s < g_own[a]);
          A gv = A(0);
          if (pair) {
            const int y = siamese_label(inst_own[a], inst_s, proto_own[a], proto_s);
            const A gl = kRowPass ? grad_loss[o * 2 + y] : (y ? gl_s[1] : gl_s[0]);
            gv = gl * bce_logits_grad(dd[a][b] + bias, y);
          }
          gsm[(tx * 4 + b) * kLd + ty * 4 + a] = gv;
          if (kRowPass) db_acc += gv;
        }
      }
      // Gradient sweep over D: own rows 4 og + a, features k0 + 4 kg + c, summed over the 64 streamed rows.
      for (int64_t k0 = 0; k0 < p.d; k0 += kGradChunk) {
        __syncthreads();  // gsm complete; the staging buffers are free
        stage<T, A, kTile, kGradChunk, false>(stage_x, own, o0, n_own, k0, p.d, vec, tid);
        stage<T, A, kTile, kGradChunk, false>(stage_y, str, s0, n_str, k0, p.d, vec, tid);
        __syncthreads();
        A ov[4][4], acc[4][4], wacc[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          load4(stage_x + (og * 4 + a) * kLd + kg * 4, ov[a]);
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[a][c] = A(0);
          wacc[a] = A(0);
        }
#pragma unroll 2
        for (int s = 0; s < kTile; ++s) {
          A gv[4], yv[4];
          load4(gsm + s * kLd + og * 4, gv);
          load4(stage_y + s * kLd + kg * 4, yv);
#pragma unroll
          for (int a = 0; a < 4; ++a) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              const A diff = ov[a][c] - yv[c];
              acc[a][c] += diff > A(0) ? gv[a] : (diff < A(0) ? -gv[a] : A(0));
              if (kRowPass) wacc[c] = fma(gv[a], fabs(diff), wacc[c]);
            }
          }
        }
#pragma unroll
        for (int a = 0; a < 4; ++a) {
          const int64_t o = o0 + og * 4 + a;
          if (o >= n_own) continue;
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int64_t kk = k0 + kg * 4 + c;
            if (kk < p.d) out[o * p.d + kk] += acc[a][c];
          }
        }
        if (kRowPass) {
          A* dw_part = static_cast<A*>(p.dw_part) + static_cast<int64_t>(blockIdx.x) * p.d;
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const A v = group_sum<16>(wacc[c]);  // over og: the 16 lanes of a half-warp share kg
            const int64_t kk = k0 + kg * 4 + c;
            if (og == 0 && kk < p.d) dw_part[kk] += v;
          }
        }
      }
      __syncthreads();  // gsm and the staging buffers are rewritten by the next tile
    }
  }
  if (kRowPass) {  // CTA sum of G -> db_part[blockIdx.x]
    __shared__ A red[kThreads / 32];
    db_acc = group_sum<32>(db_acc);
    if (tid % 32 == 0) red[tid / 32] = db_acc;
    __syncthreads();
    if (tid == 0) {
      A s = A(0);
#pragma unroll
      for (int q = 0; q < kThreads / 32; ++q) s += red[q];
      static_cast<A*>(p.db_part)[blockIdx.x] = s;
    }
  }
}

// dst[r, k] = w_k · acc[r, k] in the input dtype (in place for float / double).
template <typename T>
__global__ void scale_by_weight_kernel(const acc_t<T>* acc, const acc_t<T>* w, T* dst, int64_t rows, int64_t d) {
  const int64_t total = rows * d;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[e] = from_acc<T>(acc[e] * w[e % d]);
}

// dweight[k] = Σ_c dw_part[c, k], dbias = Σ_c db_part[c], in CTA order (deterministic).
template <typename A>
__global__ void reduce_partials_kernel(const A* dw_part, const A* db_part, int64_t parts, int64_t d, A* dweight,
                                       A* dbias) {
  const int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (k < d) {
    A s = A(0);
    for (int64_t c = 0; c < parts; ++c) s += dw_part[c * d + k];
    dweight[k] = s;
  }
  if (k == 0) {
    A s = A(0);
    for (int64_t c = 0; c < parts; ++c) s += db_part[c];
    *dbias = s;
  }
}

template <typename A>
constexpr int bwd_smem_bytes() {
  return (3 * kTile * kLd + kChunk) * static_cast<int>(sizeof(A));
}

unsigned ctas_for(int64_t rows) {
  const int64_t nb = (rows + kTile - 1) / kTile;
  return static_cast<unsigned>((nb + 1) / 2);
}

}  // namespace

int64_t siamese_bwd_partials(const SiameseParams& p) { return std::max<int64_t>(1, ctas_for(p.n)); }

void siamese_fwd_launch(const SiameseParams& p, cudaStream_t stream) {
  if (p.n == 0) return;
  PROTOCLR_DTYPE_SWITCH(p.dtype, T, [&] {
    siamese_fwd_kernel<T><<<ctas_for(p.n), kThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void siamese_bwd_launch(const SiameseParams& p, cudaStream_t stream) {
  PROTOCLR_DTYPE_SWITCH(p.dtype, T, [&] {
    using A = acc_t<T>;
    constexpr int smem = bwd_smem_bytes<A>();
    if (p.n > 0 && p.nc > 0) {
      auto row_kernel = siamese_bwd_kernel<T, true>;
      auto col_kernel = siamese_bwd_kernel<T, false>;
      if (smem > 48 * 1024) {
        C10_CUDA_CHECK(cudaFuncSetAttribute(row_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        C10_CUDA_CHECK(cudaFuncSetAttribute(col_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      }
      row_kernel<<<ctas_for(p.n), kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      col_kernel<<<ctas_for(p.nc), kThreads, smem, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int threads = 256;
    for (int side = 0; side < 2; ++side) {
      const int64_t rows = side == 0 ? p.n : p.nc;
      if (rows == 0) continue;
      const int64_t total = rows * p.d;
      const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((total + threads - 1) / threads, 4096));
      scale_by_weight_kernel<T><<<blocks, threads, 0, stream>>>(
          static_cast<const A*>(side == 0 ? p.dh_acc : p.dhc_acc), static_cast<const A*>(p.weight),
          static_cast<T*>(side == 0 ? p.dh : p.dhc), rows, p.d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    reduce_partials_kernel<A><<<static_cast<unsigned>((p.d + threads - 1) / threads), threads, 0, stream>>>(
        static_cast<const A*>(p.dw_part), static_cast<const A*>(p.db_part), siamese_bwd_partials(p), p.d,
        static_cast<A*>(p.dweight), static_cast<A*>(p.dbias));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace protoclr
