// SPEC 1.4 on the GPU: idx_m = argmax_k x_m·c_k + bias_k (lowest k on ties, NaN never wins), score_m the max.
//
// Design. One CTA (256 threads) owns kRows rows and walks the centroids in tiles of kCols; a tile of scores
// is a register tile (4 rows × 4 centroids per thread) accumulated over D in chunks of kChunk staged in
// shared memory in the accumulator type (fp32, or fp64 for double inputs), so products and sums are exact
// fp32 FMAs for every input dtype (no tensor cores: TF32 would break the fp32 tolerance, and the E-step is
// 2·M·K·D FLOPs, small next to the losses). Each thread keeps a running (best value, best index) per row over
// its centroids in increasing k (strict > keeps the lowest index and lets no NaN win); the 16 threads that
// share a row merge with the same rule. Extra memory: none (no M×K buffer).
#include <c10/cuda/CUDAException.h>

#include "params.cuh"

namespace protoclr {
namespace cuda {
namespace {

constexpr int kRows = 64;
constexpr int kCols = 64;
constexpr int kChunk = 16;
constexpr int kThreads = 256;
constexpr int kPad = 4;  // keeps 16-byte alignment of the 4-wide reads and spreads the transposed stores

// Stages rows [r0, r0 + 64) × [k0, k0 + 16) of a (rows, d) matrix, transposed, into s[k][r] (zero-filled).
template <typename T, typename A>
__device__ __forceinline__ void stage_t(A (*s)[kRows + kPad], const T* g, int64_t r0, int64_t rows, int64_t k0,
                                        int64_t d, int tid) {
#pragma unroll
  for (int q = 0; q < kRows * kChunk / kThreads; ++q) {
    const int e = tid + q * kThreads;
    const int r = e / kChunk, k = e % kChunk;  // consecutive threads read consecutive k of one row
    const int64_t gr = r0 + r, gk = k0 + k;
    s[k][r] = (gr < rows && gk < d) ? static_cast<A>(to_acc(g[gr * d + gk])) : A(0);
  }
}

template <typename T, bool kHasBias>
__global__ void __launch_bounds__(kThreads) assign_kernel(const AssignParams p) {
  using A = acc_t<T>;
  __shared__ __align__(16) A xs[kChunk][kRows + kPad];
  __shared__ __align__(16) A cs[kChunk][kCols + kPad];
  const T* x = static_cast<const T*>(p.x);
  const T* c = static_cast<const T*>(p.c);
  const A* bias = static_cast<const A*>(p.bias);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRows;

  A best[4];
  int64_t best_k[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    best[a] = -static_cast<A>(INFINITY);
    best_k[a] = 0;  // as the CPU kernel: all scores NaN or -inf give index 0
  }
  for (int64_t k0 = 0; k0 < p.k; k0 += kCols) {
    A acc[4][4] = {};
    for (int64_t d0 = 0; d0 < p.d; d0 += kChunk) {
      __syncthreads();
      stage_t<T, A>(xs, x, r0, p.m, d0, p.d, tid);
      stage_t<T, A>(cs, c, k0, p.k, d0, p.d, tid);
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kChunk; ++kk) {
        A xa[4], cb[4];
#pragma unroll
        for (int a = 0; a < 4; ++a) xa[a] = xs[kk][ty * 4 + a];
#pragma unroll
        for (int b = 0; b < 4; ++b) cb[b] = cs[kk][tx * 4 + b];
#pragma unroll
        for (int a = 0; a < 4; ++a)
#pragma unroll
          for (int b = 0; b < 4; ++b) acc[a][b] = fma(xa[a], cb[b], acc[a][b]);
      }
    }
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      const int64_t kb = k0 + tx * 4 + b;
      if (kb >= p.k) break;
      const A bk = kHasBias ? bias[kb] : A(0);
#pragma unroll
      for (int a = 0; a < 4; ++a) {
        const A v = acc[a][b] + bk;
        if (v > best[a]) {  // strict: lowest k on ties; NaN never wins
          best[a] = v;
          best_k[a] = kb;
        }
      }
    }
  }
  // Merge over the 16 threads of a row group (lanes tx = 0..15 of one half-warp).
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    A v = best[a];
    int64_t k = best_k[a];
#pragma unroll
    for (int m = 8; m >= 1; m >>= 1) {
      const A ov = shfl_xor(v, m);
      const int64_t ok = shfl_xor(k, m);
      // a -inf best is the initial state (k = 0), so ties at -inf also resolve to the lowest index
      if (ov > v || (ov == v && ok < k)) {
        v = ov;
        k = ok;
      }
    }
    const int64_t r = r0 + ty * 4 + a;
    if (tx == 0 && r < p.m) {
      p.idx[r] = k;
      static_cast<A*>(p.score)[r] = v;
    }
  }
}

}  // namespace

void assign_launch(const AssignParams& p, cudaStream_t stream) {
  if (p.m == 0) return;
  const dim3 grid(static_cast<unsigned>((p.m + kRows - 1) / kRows));
  PROTOCLR_DTYPE_SWITCH(p.dtype, T, [&] {
    PROTOCLR_BOOL_SWITCH(p.bias != nullptr, kHasBias, [&] {
      assign_kernel<T, kHasBias><<<grid, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace cuda
}  // namespace protoclr
