// Pieces shared by the contrastive forward (contrastive.cu) and backward (contrastive_bwd.cu) kernels:
// tile geometry, global -> shared staging and the similarity GEMM on the tensor cores (SPEC 1.1).
#pragma once

#include <c10/cuda/CUDAException.h>

#include "params.cuh"
#include "protoclr/math.h"

namespace protoclr {
namespace cuda {
namespace contrastive {

// Tensor-core path: tiles of kCols streamed rows; the owner tile is 128 rows (8 warps × 16 rows; two CTAs per
// SM in the forward, so that one CTA's MMAs overlap the other's masking epilogue). The feature dimension is
// zero-padded to DB = 64 or 128 elements and held whole in shared memory, so every similarity tile is one
// pass over D; larger D uses the SIMT kernels.
constexpr int kCols = 64;
constexpr int kOwnRows = 128;

template <typename T, int DB>
struct Geom {
  static_assert(DB * sizeof(T) % 32 == 0, "DB must fill whole 32-byte k-steps");
  static constexpr int kSteps = DB * static_cast<int>(sizeof(T)) / 32;  // k16 steps (16-bit) or k8 (fp32)
  // +16 bytes: the 8 row addresses of one ldmatrix (and the tf32 scalar reads) land in distinct banks.
  static constexpr int kRowBytes = kSteps * 32 + 16;
  static constexpr int kChunks = DB * static_cast<int>(sizeof(T)) / 16;  // 16-byte chunks per row
  static constexpr int kElemsPerChunk = 16 / static_cast<int>(sizeof(T));
};

template <typename T>
__device__ __forceinline__ bool vec16_ok(const T* ptr, int64_t d) {
  return d % (16 / static_cast<int64_t>(sizeof(T))) == 0 && (reinterpret_cast<uintptr_t>(ptr) & 15) == 0;
}

// Rows [r0, r0 + ROWS) of a row-major (rows, d) matrix into padded shared rows of Geom::kRowBytes, zero-filled
// past `rows` and past d (up to DB). 16-byte cp.async when rows are 16-byte aligned, else scalar copies. The
// caller commits / waits for the cp.async group and synchronises.
template <typename T, int DB, int ROWS, int NT>
__device__ __forceinline__ void load_tile(char* s, const T* g, int64_t r0, int64_t rows, int64_t d, bool vec,
                                          int tid) {
  using G = Geom<T, DB>;
  if (vec) {
#pragma unroll 4
    for (int e = tid; e < ROWS * G::kChunks; e += NT) {
      const int r = e / G::kChunks, ch = e % G::kChunks;
      const int64_t gr = r0 + r, gk = static_cast<int64_t>(ch) * G::kElemsPerChunk;
      const bool ok = gr < rows && gk < d;
      cp_async_16(s + r * G::kRowBytes + ch * 16, ok ? static_cast<const void*>(g + gr * d + gk) : g, ok ? 16 : 0);
    }
  } else {
    for (int e = tid; e < ROWS * DB; e += NT) {
      const int r = e / DB, k = e % DB;
      const int64_t gr = r0 + r;
      *reinterpret_cast<T*>(s + r * G::kRowBytes + k * static_cast<int>(sizeof(T))) =
          (gr < rows && k < d) ? g[gr * d + k] : from_acc<T>(0.f);
    }
  }
}

// Register fragments of one 32-byte k-step (see Mma in cuda_utils.cuh); for float they carry the 3xTF32 split.
template <typename T>
struct BFrag {
  uint32_t x[2];
  __device__ __forceinline__ void set(uint32_t b0, uint32_t b1) {
    x[0] = b0;
    x[1] = b1;
  }
  __device__ __forceinline__ void mma(float (&c)[4], const typename Mma<T>::AFrag& a) const {
    Mma<T>::run(c, a, x[0], x[1]);
  }
};
template <>
struct BFrag<float> {
  uint32_t hi[2], lo[2];
  __device__ __forceinline__ void set(uint32_t b0, uint32_t b1) {
    split_tf32(b0, hi[0], lo[0]);
    split_tf32(b1, hi[1], lo[1]);
  }
  __device__ __forceinline__ void mma(float (&c)[4], const Mma<float>::AFrag& a) const {
    mma_1688_tf32(c, a.lo, hi[0], hi[1]);
    mma_1688_tf32(c, a.hi, lo[0], lo[1]);
    mma_1688_tf32(c, a.hi, hi[0], hi[1]);
  }
};

// One warp: acc[mf][nf] += X[16 mf + (0..15)] · Y[8 nf + (0..7)]^T over the padded width DB, X and Y in
// padded shared rows (sx: the warp's first row). ldmatrix fragment addressing (lane l):
//   A (x4): row l % 16, byte (l / 16) * 16 of the k-step -> a0..a3 of m16n8k16 (or m16n8k8 tf32 words);
//   B (x4): row 16 np + l % 8 + 8 (l / 16), byte ((l / 8) % 2) * 16 -> (b0, b1) of n-frags 2np and 2np + 1.
template <typename T, int DB, int MF, int NF>
__device__ __forceinline__ void gemm_xyt(float (&acc)[MF][NF][4], const char* sx, const char* sy, int lane) {
  using G = Geom<T, DB>;
#pragma unroll
  for (int ks = 0; ks < G::kSteps; ++ks) {
    typename Mma<T>::AFrag a[MF];
#pragma unroll
    for (int mf = 0; mf < MF; ++mf) {
      uint32_t raw[4];
      ldmatrix_x4(raw, sx + (mf * 16 + (lane & 15)) * G::kRowBytes + ks * 32 + (lane >> 4) * 16);
      Mma<T>::prep_a(raw, a[mf]);
    }
#pragma unroll
    for (int np = 0; np < NF / 2; ++np) {
      uint32_t raw[4];
      ldmatrix_x4(raw, sy + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * G::kRowBytes + ks * 32 +
                           ((lane >> 3) & 1) * 16);
      BFrag<T> b0, b1;
      b0.set(raw[0], raw[1]);
      b1.set(raw[2], raw[3]);
#pragma unroll
      for (int mf = 0; mf < MF; ++mf) {
        b0.mma(acc[mf][2 * np], a[mf]);
        b1.mma(acc[mf][2 * np + 1], a[mf]);
      }
    }
  }
}

// SIMT path (float / double, or D > 128): 64 × 64 tiles, 256 threads, thread (ty, tx) = (tid / 16, tid % 16)
// holds own rows ty + 16 a and streamed rows tx + 16 b (a, b < 4); D is walked in chunks of kSimtChunk staged
// transposed in shared memory.
constexpr int kSimtTile = 64;
constexpr int kSimtChunk = 16;
constexpr int kSimtLd = kSimtTile + 1;

template <typename A>
__device__ __forceinline__ void simt_stage(A* s, const A* g, int64_t r0, int64_t rows, int64_t k0, int64_t d,
                                           int tid) {
#pragma unroll
  for (int q = 0; q < kSimtTile * kSimtChunk / 256; ++q) {
    const int e = tid + q * 256;
    const int r = e / kSimtChunk, k = e % kSimtChunk;
    const int64_t gr = r0 + r, gk = k0 + k;
    s[k * kSimtLd + r] = (gr < rows && gk < d) ? g[gr * d + gk] : A(0);
  }
}

// acc[a][b] = x[x0 + ty + 16a] · y[y0 + tx + 16b] (exact fp32 / fp64 FMAs).
template <typename A>
__device__ __forceinline__ void simt_gemm(A (&acc)[4][4], A* xs, A* ys, const A* x, int64_t x0, int64_t nx,
                                          const A* y, int64_t y0, int64_t ny, int64_t d, int tid) {
  const int ty = tid / 16, tx = tid % 16;
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) acc[a][b] = A(0);
  for (int64_t k0 = 0; k0 < d; k0 += kSimtChunk) {
    __syncthreads();
    simt_stage(xs, x, x0, nx, k0, d, tid);
    simt_stage(ys, y, y0, ny, k0, d, tid);
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kSimtChunk; ++k) {
      A xv[4], yv[4];
#pragma unroll
      for (int a = 0; a < 4; ++a) xv[a] = xs[k * kSimtLd + ty + 16 * a];
#pragma unroll
      for (int b = 0; b < 4; ++b) yv[b] = ys[k * kSimtLd + tx + 16 * b];
#pragma unroll
      for (int a = 0; a < 4; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) acc[a][b] = fma(xv[a], yv[b], acc[a][b]);
    }
  }
}

inline void set_smem(const void* kernel, int bytes) {
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

}  // namespace contrastive
}  // namespace cuda
}  // namespace protoclr
