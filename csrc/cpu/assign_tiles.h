// The CPU nearest-prototype search (SPEC 1.4), shared by `assign` (assign.cpp) and the fused k-means step
// (kmeans.cpp): one place for the argmax logic. Include after simd.h.
//
// A range of rows is processed in kRowBlock × kColBlock score tiles: BLAS computes the tile (at::mm_out on
// from_blob views, single-threaded inside at::parallel_for), the bias is added and each row is scanned in
// kLanes independent running maxima (GCC vector extensions: one zmm of float on AVX-512). Each lane keeps its
// first maximum (strict >) and the lanes merge with the lowest index on ties, so the result is that of a
// sequential scan in k order: the lowest k attaining the maximum; NaN never wins. Extra memory: one tile.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "protoclr/checks.h"

namespace protoclr {
namespace assign_tiles {

// 256 × 512 float tiles (512 KiB) fit a core's L2 and amortise BLAS's packing of the prototypes over 256 rows.
constexpr int64_t kRowBlock = 256;
constexpr int64_t kColBlock = 512;
constexpr int kLanes = 16;

// tile[M×N] (row-major, leading dimension N) = A[M×K] · B[N×K]^T.
template <typename T>
void gemm_abt(int64_t M, int64_t N, int64_t K, const T* A, const T* B, T* tile) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, opts);
  at::Tensor b = at::from_blob(const_cast<T*>(B), {N, K}, opts);
  at::Tensor c = at::from_blob(tile, {M, N}, opts);
  at::mm_out(c, a, b.t());
}

// Merges row r's argmax of tile[r, :nk] + bias[:nk] (columns k0 + k) into best[r], best_k[r] with a strict >.
template <typename T>
PROTOCLR_ALWAYS_INLINE inline void argmax_tile(const T* tile, int64_t nr, int64_t nk, const T* bias, int64_t k0,
                                               T* best, int64_t* best_k) {
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef T VT __attribute__((vector_size(kLanes * sizeof(T))));
  typedef I VI __attribute__((vector_size(kLanes * sizeof(T))));
  VI lane;
  for (int l = 0; l < kLanes; ++l) lane[l] = l;
  for (int64_t r = 0; r < nr; ++r) {
    const T* s = tile + r * nk;
    VT lv = VT{} - std::numeric_limits<T>::infinity();
    VI li = VI{};
    int64_t k = 0;
    for (; k + kLanes <= nk; k += kLanes) {
      VT v, b;
      std::memcpy(&v, s + k, sizeof(VT));
      std::memcpy(&b, bias + k, sizeof(VT));
      v += b;
      const VI gt = v > lv;
      lv = gt ? v : lv;
      li = gt ? lane + static_cast<I>(k) : li;
    }
    T bv = lv[0];
    I bi = li[0];
    for (int l = 1; l < kLanes; ++l) {
      if (lv[l] > bv || (lv[l] == bv && li[l] < bi)) {
        bv = lv[l];
        bi = li[l];
      }
    }
    for (; k < nk; ++k) {
      const T v = s[k] + bias[k];
      if (v > bv) {
        bv = v;
        bi = static_cast<I>(k);
      }
    }
    if (bv > best[r]) {
      best[r] = bv;
      best_k[r] = k0 + bi;
    }
  }
}

// float entry point compiled per ISA (PROTOCLR_CPU_CLONES); double (tests) uses the template directly.
PROTOCLR_CPU_CLONES static void argmax_tile_f32(const float* tile, int64_t nr, int64_t nk, const float* bias,
                                                int64_t k0, float* best, int64_t* best_k) {
  argmax_tile<float>(tile, nr, nk, bias, k0, best, best_k);
}
inline void argmax_tile_dispatch(const float* tile, int64_t nr, int64_t nk, const float* bias, int64_t k0,
                                 float* best, int64_t* best_k) {
  argmax_tile_f32(tile, nr, nk, bias, k0, best, best_k);
}
inline void argmax_tile_dispatch(const double* tile, int64_t nr, int64_t nk, const double* bias, int64_t k0,
                                 double* best, int64_t* best_k) {
  argmax_tile<double>(tile, nr, nk, bias, k0, best, best_k);
}

// idx/score of rows [r_begin, r_end) of x (M×D) against c (K×D) with bias (K,) (never null), one row block at a
// time on the calling thread; after each block, epilogue(r0, nr) sees its rows' final idx[r0 : r0 + nr].
template <typename T, typename Epilogue>
void assign_rows(const T* x, const T* c, const T* bias, int64_t r_begin, int64_t r_end, int64_t K, int64_t D,
                 int64_t* idx, T* score, Epilogue&& epilogue) {
  std::vector<T> tile(kRowBlock * std::min(kColBlock, K));
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kRowBlock) {
    const int64_t nr = std::min(kRowBlock, r_end - r0);
    T* best = score + r0;
    int64_t* best_k = idx + r0;
    std::fill(best, best + nr, -std::numeric_limits<T>::infinity());
    std::fill(best_k, best_k + nr, int64_t{0});
    for (int64_t k0 = 0; k0 < K; k0 += kColBlock) {
      const int64_t nk = std::min(kColBlock, K - k0);
      gemm_abt<T>(nr, nk, D, x + r0 * D, c + k0 * D, tile.data());
      argmax_tile_dispatch(tile.data(), nr, nk, bias + k0, k0, best, best_k);
    }
    epilogue(r0, nr);
  }
}

// The checked inputs of one assign pass in the accumulator type, and its outputs (idx, score) allocated: the
// host side shared by `assign` and `kmeans_step`.
struct Pass {
  at::ScalarType acc_type;
  at::Tensor xc, cc, b, idx, score;
  int64_t M, K, D, row_blocks;
};

inline Pass prepare(const char* fn, const at::Tensor& x, const at::Tensor& prototypes,
                    const std::optional<at::Tensor>& bias) {
  check_assign_inputs(fn, x, prototypes, bias);
  Pass p;
  p.acc_type = stat_dtype(x.scalar_type());
  p.xc = x.to(p.acc_type).contiguous();
  p.cc = prototypes.to(p.acc_type).contiguous();
  p.M = x.size(0), p.K = prototypes.size(0), p.D = x.size(1);
  p.b = bias.has_value() ? bias->to(p.acc_type).contiguous() : at::zeros({p.K}, p.xc.options());
  p.idx = at::empty({p.M}, x.options().dtype(at::kLong));
  p.score = at::empty({p.M}, x.options().dtype(p.acc_type));
  p.row_blocks = (p.M + kRowBlock - 1) / kRowBlock;
  return p;
}

}  // namespace assign_tiles
}  // namespace protoclr
