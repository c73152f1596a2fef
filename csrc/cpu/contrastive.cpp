// SPEC 1.1 on the CPU: contrastive_fwd / contrastive_bwd (schemas and semantics in csrc/ops.cpp).
//
// Design. Inputs are converted once to the accumulator type (float, double for float64; a no-op for
// contiguous float32/float64), so every inner loop runs on contiguous acc_t rows.
//  - Similarity tiles c = z[rows] · zc[cols]^T come from BLAS (at::mm_out on from_blob views of per-thread
//    tiles, i.e. MKL/OpenBLAS); inside at::parallel_for BLAS runs single-threaded, which is what we want.
//  - Forward: at::parallel_for over row blocks of kFwdRows; each thread walks all column blocks, keeps a
//    running-max log-sum-exp per row (math.h online_lse_merge of per-tile (max, sum)) and the five per-row
//    statistics (double across tiles). Nothing but a kFwdRows × kMaxCols tile per thread is materialised.
//  - Symmetric forward (zc is z, row_offset 0; symmetric_form): S and the masks are symmetric, so only the
//    tiles (I, J >= I) are computed, each giving its rows' and its columns' statistics (half the GEMM work);
//    the columns' log-sum-exps are merged per thread (online (max, sum) pairs), then across threads.
//    PROTOCLR_CPU_SYMMETRIC=0 keeps the general kernels, which the DDP split always uses.
//  - Symmetric backward (same condition): one pass over the tiles (I, J >= I) with M = G + G^T, the whole
//    gradient with respect to z in dz and zeros in dzc (contract in csrc/ops.cpp).
//  - Backward recomputes the tiles. It walks row strips of kBwdRows in order and, inside a strip, runs
//    at::parallel_for over column blocks: the dzc rows of different column blocks are disjoint (no race, no
//    per-thread Nc × D copy), and dz for the strip is accumulated per thread (kBwdRows × D) and reduced in
//    thread order at the end of the strip. Per tile: G (in place over c), dz += G · zc_blk, dzc_blk += G^T · z.
//  - The membership test, exp and stats run in branch-free `#pragma omp simd` loops; float uses a polynomial
//    exp that vectorises (libm's expf is a scalar call). The float tile loops are built per ISA (AVX-512,
//    AVX2, baseline) and picked at load time; double (tests, gradcheck) uses the same templates.
// Extra memory: threads × (tile + kBwdRows × D) plus an Nc × D accumulator when zc is not float32/float64; the
// symmetric forward adds (threads + 1) × N × 48 bytes (float) of per-row states.
// Speed: bench/results/kernels_cpu.jsonl (`make bench`).
#include "simd.h"  // first: its build settings apply to everything below

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "protoclr/checks.h"
#include "protoclr/math.h"

namespace protoclr {
namespace {

constexpr int64_t kFwdRows = 64;   // forward row block
constexpr int64_t kBwdRows = 128;  // backward row strip
constexpr int64_t kMaxCols = 256;  // column block (smaller when there are few columns, to feed every thread)
constexpr int64_t kSymMax = 256;   // largest square tile of the symmetric kernels

// Row-major C[M×N] = op(A)[M×K] · op(B)[K×N] (+ C when accumulate), on raw buffers with leading dimensions.
// at::mm_out / at::addmm_out on from_blob views reach MKL/OpenBLAS (the transposes are strides, not copies);
// inside at::parallel_for they run single-threaded. The tiles here make the dispatch cost ~1-5% of the GEMM.
template <typename T>
void gemm_rm(bool a_trans, bool b_trans, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B,
             int64_t ldb, bool accumulate, T* C, int64_t ldc) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    // stored row-major as (rows, cols) unless trans, in which case stored as (cols, rows)
    auto t = trans ? at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, opts).t()
                   : at::from_blob(const_cast<T*>(p), {rows, cols}, {ld, 1}, opts);
    return t;
  };
  at::Tensor a = view(A, M, K, lda, a_trans), b = view(B, K, N, ldb, b_trans);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (accumulate) {
    at::addmm_out(c, c, a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

// out[0, count) += each thread's part (parts + t * stride, for the threads t that ran), in thread order:
// deterministic for a given thread count.
template <typename T>
void add_thread_parts(T* out, int64_t count, const T* parts, int64_t stride, const std::vector<char>& used) {
  for (size_t t = 0; t < used.size(); ++t) {
    if (!used[t]) continue;
    const T* p = parts + t * stride;
#pragma omp simd
    for (int64_t e = 0; e < count; ++e) out[e] += p[e];
  }
}

// exp for softmax weights. float: Cephes range reduction + degree-6 polynomial (≤ 2 ulp on [-80, 88]),
// branch-free so it vectorises; arguments below -80 (masked -inf included) give exp(-80) ~ 1.8e-35, which
// vanishes against a row sum >= 1 and in G, and keeps every result normal (denormals are slow). Arguments
// above 88 give exp(88), finite. double: libm (tests only).
inline float vexp(float x) {
  x = x < -80.0f ? -80.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float p2;
  std::memcpy(&p2, &bits, sizeof(p2));
  return y * p2;
}
inline double vexp(double x) { return pc_exp(x); }

int64_t col_block(int64_t Nc) {
  // at least ~2 blocks per thread in the backward's column-parallel loop, 32..kMaxCols, a multiple of 16
  const int64_t want = (Nc + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  const int64_t rounded = (want + 15) / 16 * 16;
  return std::max<int64_t>(32, std::min<int64_t>(kMaxCols, rounded));
}

struct Labels {
  const int64_t* inst;
  const int64_t* instc;
  const int64_t* proto;
  const int64_t* protoc;
};

// The pair (global row gi, global column gj) in SPEC 1.1's sets: A(i) (all), P(i), F(i) and Den(i), as 0 / 1.
// int, not bool: with bool members GCC 12 no longer vectorises the tile loops below (2.3-2.6x slower kernels).
struct Pair {
  int all, pos, fneg, den;
};

template <bool kMask>
PROTOCLR_ALWAYS_INLINE inline Pair classify(int64_t gi, int64_t gj, int64_t inst_i, int64_t inst_j, int64_t proto_i,
                                            int64_t proto_j) {
  const bool all = in_all(gi, gj), fneg = in_false_neg(inst_i, inst_j, proto_i, proto_j);
  return {all, in_pos(gi, gj, inst_i, inst_j), fneg, in_den(kMask ? kFnMask : kFnNone, all, fneg)};
}

// Forward work on one tile: tile[r * nc + j] = c_ij for rows r0 + r and columns c0 + j. Adds each row's
// statistics to acc[r] and merges the tile's log-sum-exp into st[r]. Overwrites the tile with the masked,
// scaled logits (-inf outside Den). All labels are loaded unconditionally so the loops if-convert.
// kCols (the symmetric forward's off-diagonal tiles): the same pairs seen from the columns, whose masks are the
// rows' (every membership test is symmetric when rows and columns are one set), summed over the tile's rows
// into col[k * nc + j] (k < 5: the five statistics; k = 5: the running max of the masked logits).
template <typename T, bool kMask, bool kCols = false>
PROTOCLR_ALWAYS_INLINE inline void fwd_tile(T* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0, int64_t row_offset,
                                             Labels lab, T inv_tau, OnlineLse<T>* st, double (*acc)[5],
                                             T* col = nullptr) {
  const int64_t* instc = lab.instc + c0;
  const int64_t* protoc = lab.protoc + c0;
  for (int64_t r = 0; r < nr; ++r) {
    T* c = tile + r * nc;
    const int64_t i = r0 + r, gi = row_offset + i, inst_i = lab.inst[i], proto_i = lab.proto[i];
    T sp = 0, np = 0, sf = 0, nf = 0, sa = 0, mx = neg_inf<T>();
#pragma omp simd reduction(+ : sp, np, sf, nf, sa) reduction(max : mx)
    for (int64_t j = 0; j < nc; ++j) {
      const auto [all, pos, fneg, den] = classify<kMask>(gi, c0 + j, inst_i, instc[j], proto_i, protoc[j]);
      const T v = c[j];
      const T x = v * inv_tau;
      sp += pos ? v : T(0);
      np += pos ? T(1) : T(0);
      sf += fneg ? v : T(0);
      nf += fneg ? T(1) : T(0);
      sa += all ? v : T(0);
      const T xm = den ? x : neg_inf<T>();
      mx = xm > mx ? xm : mx;
      c[j] = xm;
      if constexpr (kCols) {
        col[j] += pos ? v : T(0);
        col[nc + j] += pos ? T(1) : T(0);
        col[2 * nc + j] += fneg ? v : T(0);
        col[3 * nc + j] += fneg ? T(1) : T(0);
        col[4 * nc + j] += all ? v : T(0);
        col[5 * nc + j] = xm > col[5 * nc + j] ? xm : col[5 * nc + j];
      }
    }
    acc[r][0] += sp;
    acc[r][1] += np;
    acc[r][2] += sf;
    acc[r][3] += nf;
    acc[r][4] += sa;
    if (!(mx > neg_inf<T>())) continue;  // Den(i) has no column in this tile
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < nc; ++j) s += vexp(c[j] - mx);
    online_lse_merge(st[r], mx, s);
  }
}

// The column side of a symmetric forward tile after fwd_tile<..., kCols>: folds the tile's column statistics
// into cacc[j] and merges its column log-sum-exps (a second exp pass, against the column maxima) into cst[j].
// Reuses col[0..nc) as the column sums once the statistics are folded.
template <typename T>
PROTOCLR_ALWAYS_INLINE inline void fwd_tile_cols(const T* tile, int64_t nr, int64_t nc, T* col, OnlineLse<T>* cst,
                                                  double (*cacc)[5]) {
  for (int64_t j = 0; j < nc; ++j)
    for (int k = 0; k < 5; ++k) cacc[j][k] += col[k * nc + j];
  T* s = col;
  const T* mx = col + 5 * nc;
  std::fill(s, s + nc, T(0));
  for (int64_t r = 0; r < nr; ++r) {
    const T* x = tile + r * nc;
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) s[j] += vexp(x[j] - mx[j]);  // NaN where mx is -inf: not merged below
  }
  for (int64_t j = 0; j < nc; ++j)
    if (mx[j] > neg_inf<T>()) online_lse_merge(cst[j], mx[j], s[j]);
}

// An off-diagonal tile (I, J), I < J, of the symmetric forward: the rows' statistics as fwd_tile, and the
// columns' into cst / cacc (indexed from column c0). col: 6 * nc scratch.
template <typename T, bool kMask>
PROTOCLR_ALWAYS_INLINE inline void fwd_tile_sym(T* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0, Labels lab,
                                                 T inv_tau, OnlineLse<T>* st, double (*acc)[5], T* col,
                                                 OnlineLse<T>* cst, double (*cacc)[5]) {
  std::fill(col, col + 5 * nc, T(0));
  std::fill(col + 5 * nc, col + 6 * nc, neg_inf<T>());
  fwd_tile<T, kMask, true>(tile, nr, nc, r0, c0, 0, lab, inv_tau, st, acc, col);
  fwd_tile_cols(tile, nr, nc, col, cst, cacc);
}

// SPEC 1.1 backward. The forward outputs are lse_i = logsumexp_{j in Den(i)} c_ij / tau and
// stats_i = [Σ_P c, |P|, Σ_F c, |F|, Σ_A c] with c_ij = z_i · zc_j. For L = Σ_i gl_i lse_i + Σ_i gs_i · stats_i:
//   ∂L/∂c_ij = G_ij = [j ∈ Den(i)] gl_i exp(c_ij / tau − lse_i) / tau
//                   + [j ∈ P(i)] gs_i0 + [j ∈ F(i)] gs_i2 + [j ∈ A(i)] gs_i4     (counts have no gradient)
//   dz_i = Σ_j G_ij zc_j,   dzc_j = Σ_i G_ij z_i.
// A row whose lse is -inf has an empty Den(i): its softmax term is 0 (never exp(-inf - -inf)).
// bwd_tile turns a tile of c into the tile of G in place.
//
// Row i's softmax weight is scale_i * exp(c_ij / tau - shift_i): softmax_weight's guard hoisted out of the
// loops, no softmax term for an empty (or non-finite) lse or a zero grad_lse (shift = +inf: the weight is
// exp(-inf) = 0, never 0 * inf).
template <typename T>
struct SoftmaxCoef {
  T scale, shift;
};

template <typename T>
PROTOCLR_ALWAYS_INLINE inline SoftmaxCoef<T> softmax_coef(T gl, T lse, T inv_tau) {
  const bool softmax = gl != T(0) && lse > neg_inf<T>() && lse < -neg_inf<T>();
  return {softmax ? gl * inv_tau : T(0), softmax ? lse : -neg_inf<T>()};
}

template <typename T, bool kMask>
PROTOCLR_ALWAYS_INLINE inline void bwd_tile(T* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0, int64_t row_offset,
                                             Labels lab, T inv_tau, const T* gl, const T* gs, const T* lse) {
  const int64_t* instc = lab.instc + c0;
  const int64_t* protoc = lab.protoc + c0;
  for (int64_t r = 0; r < nr; ++r) {
    T* c = tile + r * nc;
    const int64_t i = r0 + r, gi = row_offset + i, inst_i = lab.inst[i], proto_i = lab.proto[i];
    const T gs0 = gs[i * 5 + 0], gs2 = gs[i * 5 + 2], gs4 = gs[i * 5 + 4];
    const auto [scale, shift] = softmax_coef(gl[i], lse[i], inv_tau);
    // x = c / tau rounded exactly as in fwd_tile, in a loop of its own: fused into c * inv_tau - lse (an FMA)
    // the product would be exact while lse was summed from rounded products, and that mismatch, up to half
    // an ulp of 1/tau, scales every softmax weight (rel. error ~6e-8/tau; NaN near tau = 1e-20).
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) c[j] *= inv_tau;
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) {
      const auto [all, pos, fneg, den] = classify<kMask>(gi, c0 + j, inst_i, instc[j], proto_i, protoc[j]);
      const T e = scale * vexp(c[j] - shift);
      c[j] = (den ? e : T(0)) + (pos ? gs0 : T(0)) + (fneg ? gs2 : T(0)) + (all ? gs4 : T(0));
    }
  }
}

// Per-row inputs of the symmetric backward, one value per row of the batch: softmax_coef and grad_stats' P, F and
// A entries.
template <typename T>
struct RowGrad {
  const T *scale, *shift, *gs0, *gs2, *gs4;
};

// An off-diagonal tile (I, J), I < J, of the symmetric backward, in place: M_ij = G_ij + G_ji, the weight of
// the pair in both rows' gradients (dz_i += M_ij z_j, dz_j += M_ij z_i). G_ji is row j's G at c_ji = c_ij; the
// membership tests are symmetric. x = c / tau rounded in a loop of its own, as in bwd_tile.
template <typename T, bool kMask>
PROTOCLR_ALWAYS_INLINE inline void bwd_tile_sym(T* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0, Labels lab,
                                                 T inv_tau, RowGrad<T> g) {
  const int64_t* instc = lab.instc + c0;
  const int64_t* protoc = lab.protoc + c0;
  const T *scale_c = g.scale + c0, *shift_c = g.shift + c0;
  const T *gs0_c = g.gs0 + c0, *gs2_c = g.gs2 + c0, *gs4_c = g.gs4 + c0;
  for (int64_t r = 0; r < nr; ++r) {
    T* c = tile + r * nc;
    const int64_t i = r0 + r, inst_i = lab.inst[i], proto_i = lab.proto[i];
    const T scale = g.scale[i], shift = g.shift[i], gs0 = g.gs0[i], gs2 = g.gs2[i], gs4 = g.gs4[i];
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) c[j] *= inv_tau;
#pragma omp simd
    for (int64_t j = 0; j < nc; ++j) {
      const auto [all, pos, fneg, den] = classify<kMask>(i, c0 + j, inst_i, instc[j], proto_i, protoc[j]);
      const T e = scale * vexp(c[j] - shift) + scale_c[j] * vexp(c[j] - shift_c[j]);
      c[j] = (den ? e : T(0)) + (pos ? gs0 + gs0_c[j] : T(0)) + (fneg ? gs2 + gs2_c[j] : T(0)) +
             (all ? gs4 + gs4_c[j] : T(0));
    }
  }
}

// float entry points, compiled per ISA (see PROTOCLR_CPU_CLONES); double (tests) uses the templates directly.
PROTOCLR_CPU_CLONES void fwd_tile_f32(bool mask, float* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0,
                                      int64_t row_offset, Labels lab, float inv_tau, OnlineLse<float>* st,
                                      double (*acc)[5]) {
  if (mask)
    fwd_tile<float, true>(tile, nr, nc, r0, c0, row_offset, lab, inv_tau, st, acc);
  else
    fwd_tile<float, false>(tile, nr, nc, r0, c0, row_offset, lab, inv_tau, st, acc);
}

PROTOCLR_CPU_CLONES void fwd_tile_sym_f32(bool mask, float* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0,
                                          Labels lab, float inv_tau, OnlineLse<float>* st, double (*acc)[5],
                                          float* col, OnlineLse<float>* cst, double (*cacc)[5]) {
  if (mask)
    fwd_tile_sym<float, true>(tile, nr, nc, r0, c0, lab, inv_tau, st, acc, col, cst, cacc);
  else
    fwd_tile_sym<float, false>(tile, nr, nc, r0, c0, lab, inv_tau, st, acc, col, cst, cacc);
}

PROTOCLR_CPU_CLONES void bwd_tile_f32(bool mask, float* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0,
                                      int64_t row_offset, Labels lab, float inv_tau, const float* gl, const float* gs,
                                      const float* lse) {
  if (mask)
    bwd_tile<float, true>(tile, nr, nc, r0, c0, row_offset, lab, inv_tau, gl, gs, lse);
  else
    bwd_tile<float, false>(tile, nr, nc, r0, c0, row_offset, lab, inv_tau, gl, gs, lse);
}

PROTOCLR_CPU_CLONES void bwd_tile_sym_f32(bool mask, float* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0,
                                          Labels lab, float inv_tau, RowGrad<float> g) {
  if (mask)
    bwd_tile_sym<float, true>(tile, nr, nc, r0, c0, lab, inv_tau, g);
  else
    bwd_tile_sym<float, false>(tile, nr, nc, r0, c0, lab, inv_tau, g);
}

template <typename T, bool kMask>
void fwd_tile_any(T* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0, int64_t row_offset, Labels lab, T inv_tau,
                  OnlineLse<T>* st, double (*acc)[5]) {
  if constexpr (std::is_same_v<T, float>)
    fwd_tile_f32(kMask, tile, nr, nc, r0, c0, row_offset, lab, inv_tau, st, acc);
  else
    fwd_tile<T, kMask>(tile, nr, nc, r0, c0, row_offset, lab, inv_tau, st, acc);
}

template <typename T, bool kMask>
void fwd_tile_sym_any(T* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0, Labels lab, T inv_tau,
                      OnlineLse<T>* st, double (*acc)[5], T* col, OnlineLse<T>* cst, double (*cacc)[5]) {
  if constexpr (std::is_same_v<T, float>)
    fwd_tile_sym_f32(kMask, tile, nr, nc, r0, c0, lab, inv_tau, st, acc, col, cst, cacc);
  else
    fwd_tile_sym<T, kMask>(tile, nr, nc, r0, c0, lab, inv_tau, st, acc, col, cst, cacc);
}

template <typename T, bool kMask>
void bwd_tile_any(T* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0, int64_t row_offset, Labels lab, T inv_tau,
                  const T* gl, const T* gs, const T* lse) {
  if constexpr (std::is_same_v<T, float>)
    bwd_tile_f32(kMask, tile, nr, nc, r0, c0, row_offset, lab, inv_tau, gl, gs, lse);
  else
    bwd_tile<T, kMask>(tile, nr, nc, r0, c0, row_offset, lab, inv_tau, gl, gs, lse);
}

template <typename T, bool kMask>
void contrastive_fwd_kernel(const T* z, const T* zc, Labels lab, int64_t N, int64_t Nc, int64_t D, int64_t row_offset,
                            T inv_tau, T* lse, T* stats) {
  const int64_t bc = col_block(Nc);
  const int64_t row_blocks = (N + kFwdRows - 1) / kFwdRows;
  at::parallel_for(0, row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tile(kFwdRows * bc);
    OnlineLse<T> st[kFwdRows];
    double acc[kFwdRows][5];
    for (int64_t rb = begin; rb < end; ++rb) {
      const int64_t r0 = rb * kFwdRows, nr = std::min(kFwdRows, N - r0);
      for (int64_t r = 0; r < nr; ++r) {
        st[r] = online_lse_init<T>();
        for (int k = 0; k < 5; ++k) acc[r][k] = 0;
      }
      for (int64_t c0 = 0; c0 < Nc; c0 += bc) {
        const int64_t nc = std::min(bc, Nc - c0);
        gemm_rm<T>(false, true, nr, nc, D, z + r0 * D, D, zc + c0 * D, D, false, tile.data(), nc);
        fwd_tile_any<T, kMask>(tile.data(), nr, nc, r0, c0, row_offset, lab, inv_tau, st, acc);
      }
      for (int64_t r = 0; r < nr; ++r) {
        lse[r0 + r] = online_lse_finish(st[r]);
        for (int k = 0; k < 5; ++k) stats[(r0 + r) * 5 + k] = static_cast<T>(acc[r][k]);
      }
    }
  });
}

template <typename T, bool kMask>
void bwd_tile_sym_any(T* tile, int64_t nr, int64_t nc, int64_t r0, int64_t c0, Labels lab, T inv_tau, RowGrad<T> g) {
  if constexpr (std::is_same_v<T, float>)
    bwd_tile_sym_f32(kMask, tile, nr, nc, r0, c0, lab, inv_tau, g);
  else
    bwd_tile_sym<T, kMask>(tile, nr, nc, r0, c0, lab, inv_tau, g);
}

// Blocks of the symmetric kernels: square tiles, at least ~4 row strips per thread (the strips shrink from nb
// tiles to 1 along the triangle), 32..kSymMax, a multiple of 16.
int64_t sym_block(int64_t N) {
  const int64_t want = (N + 8 * at::get_num_threads() - 1) / (8 * at::get_num_threads());
  return std::max<int64_t>(32, std::min<int64_t>(kSymMax, (want + 15) / 16 * 16));
}

// Forward when rows and columns are one set (zc is z): S and every mask are symmetric, so only the tiles
// (I, J >= I) are computed, each once. One at::parallel_for (a single barrier) over work units, unit p being
// the row strips p and nb - 1 - p: nb + 1 tiles each, so the static split balances the triangle. A strip belongs
// to one thread, which writes its rows' side (row_st / row_acc) directly; the column side of its off-diagonal
// tiles goes to the thread's own col_st / col_acc (every row can be a column of any thread's tiles): online
// (max, sum) pairs and sums, merged per row in thread order at the end (deterministic for a given thread count).
// Diagonal tiles take the row form only (they hold both c_ij and c_ji). Extra memory: (threads + 1) × N ×
// (OnlineLse + 5 doubles), 48 bytes per row for float, + threads × (b² + 6b) T; tiles from at::empty (aligned,
// so the backward's identical BLAS calls reproduce the forward's c bit for bit).
template <typename T, bool kMask>
void contrastive_fwd_sym_kernel(const T* z, Labels lab, int64_t N, int64_t D, T inv_tau, T* lse, T* stats) {
  const int64_t b = sym_block(N), nb = (N + b - 1) / b;
  const int64_t threads = at::get_num_threads();
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor tiles = at::empty({threads, b * b}, opts), cols = at::empty({threads, 6 * b}, opts);
  std::vector<OnlineLse<T>> row_st(N, online_lse_init<T>()), col_st(threads * N, online_lse_init<T>());
  std::vector<double> row_acc(N * 5, 0.0), col_acc(threads * N * 5, 0.0);
  auto as5 = [](double* p) { return reinterpret_cast<double (*)[5]>(p); };
  std::vector<char> used(threads);
  at::parallel_for(0, (nb + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    const int64_t tid = at::get_thread_num();
    TORCH_INTERNAL_ASSERT(tid >= 0 && tid < threads);
    used[tid] = 1;
    T* tile = tiles.data_ptr<T>() + tid * b * b;
    T* col = cols.data_ptr<T>() + tid * 6 * b;
    OnlineLse<T>* cst = col_st.data() + tid * N;
    double* cacc = col_acc.data() + tid * N * 5;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t strips[2] = {p, nb - 1 - p};
      for (int u = 0; u < (strips[0] == strips[1] ? 1 : 2); ++u) {  // one strip: the middle one of an odd nb
        const int64_t I = strips[u];
        const int64_t r0 = I * b, nr = std::min(b, N - r0);
        OnlineLse<T>* st = row_st.data() + r0;
        double(*acc)[5] = as5(row_acc.data() + r0 * 5);
        for (int64_t J = I; J < nb; ++J) {
          const int64_t c0 = J * b, nc = std::min(b, N - c0);
          gemm_rm<T>(false, true, nr, nc, D, z + r0 * D, D, z + c0 * D, D, false, tile, nc);
          if (J == I)
            fwd_tile_any<T, kMask>(tile, nr, nc, r0, c0, 0, lab, inv_tau, st, acc);
          else
            fwd_tile_sym_any<T, kMask>(tile, nr, nc, r0, c0, lab, inv_tau, st, acc, col, cst + c0, as5(cacc + c0 * 5));
        }
      }
    }
  });
  for (int64_t i = 0; i < N; ++i) {
    OnlineLse<T> s = row_st[i];
    double a[5];
    for (int k = 0; k < 5; ++k) a[k] = row_acc[i * 5 + k];
    for (int64_t t = 0; t < threads; ++t) {  // thread order: deterministic for a given thread count
      if (!used[t]) continue;
      online_lse_merge(s, col_st[t * N + i]);
      for (int k = 0; k < 5; ++k) a[k] += col_acc[(t * N + i) * 5 + k];
    }
    lse[i] = online_lse_finish(s);
    for (int k = 0; k < 5; ++k) stats[i * 5 + k] = static_cast<T>(a[k]);
  }
}

template <typename T, bool kMask>
void contrastive_bwd_kernel(const T* gl, const T* gs, const T* z, const T* zc, Labels lab, const T* lse, int64_t N,
                            int64_t Nc, int64_t D, int64_t row_offset, T inv_tau, T* dz, T* dzc) {
  const int64_t bc = col_block(Nc);
  const int64_t col_blocks = (Nc + bc - 1) / bc;
  const int64_t threads = at::get_num_threads();
  std::vector<T> tiles(threads * kBwdRows * bc);
  std::vector<T> dz_part(threads * kBwdRows * D);
  std::vector<char> used(threads);
  std::fill(dzc, dzc + Nc * D, T(0));
  for (int64_t r0 = 0; r0 < N; r0 += kBwdRows) {
    const int64_t nr = std::min(kBwdRows, N - r0);
    std::fill(used.begin(), used.end(), 0);
    at::parallel_for(0, col_blocks, 1, [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      TORCH_INTERNAL_ASSERT(tid >= 0 && tid < threads);
      T* tile = tiles.data() + tid * kBwdRows * bc;
      T* dzp = dz_part.data() + tid * kBwdRows * D;
      std::fill(dzp, dzp + nr * D, T(0));
      used[tid] = 1;
      for (int64_t cb = begin; cb < end; ++cb) {
        const int64_t c0 = cb * bc, nc = std::min(bc, Nc - c0);
        gemm_rm<T>(false, true, nr, nc, D, z + r0 * D, D, zc + c0 * D, D, false, tile, nc);
        bwd_tile_any<T, kMask>(tile, nr, nc, r0, c0, row_offset, lab, inv_tau, gl, gs, lse);
        gemm_rm<T>(false, false, nr, D, nc, tile, nc, zc + c0 * D, D, true, dzp, D);
        gemm_rm<T>(true, false, nc, D, nr, tile, nc, z + r0 * D, D, true, dzc + c0 * D, D);
      }
    });
    std::fill(dz + r0 * D, dz + (r0 + nr) * D, T(0));
    add_thread_parts(dz + r0 * D, nr * D, dz_part.data(), kBwdRows * D, used);
  }
}

// Backward when rows and columns are one set (zc is z): the gradient with respect to that one tensor,
// d_i = Σ_j (G_ij + G_ji) z_j, in a single pass over the tiles (I, J >= I), each computed once (the forward's
// tiles, bit for bit: same blocks, same BLAS calls). Row strips I run in order; inside a strip, at::parallel_for
// over the column blocks J >= I. Off-diagonal: M = G_IJ + G_JI^T, row side d_I += M z_J into the thread's strip
// accumulator (reduced in thread order after the strip), column side d_J += M^T z_I straight into block J, which
// no other thread of the strip touches. Diagonal tiles: G in row form (they hold both c_ij and c_ji, each
// rounded as the forward used it), d_I += G z_I + G^T z_I. Extra memory: 5N T (RowGrad) + threads × (b² + b·D) T.
template <typename T, bool kMask>
void contrastive_bwd_sym_kernel(const T* gl, const T* gs, const T* z, Labels lab, const T* lse, int64_t N, int64_t D,
                                T inv_tau, T* dz) {
  const int64_t b = sym_block(N), nb = (N + b - 1) / b;
  const int64_t threads = at::get_num_threads();
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor tiles = at::empty({threads, b * b}, opts), dz_part = at::empty({threads, b * D}, opts);
  std::vector<T> rows(5 * N);
  T *scale = rows.data(), *shift = scale + N, *gs0 = shift + N, *gs2 = gs0 + N, *gs4 = gs2 + N;
  for (int64_t i = 0; i < N; ++i) {
    const auto coef = softmax_coef(gl[i], lse[i], inv_tau);
    scale[i] = coef.scale;
    shift[i] = coef.shift;
    gs0[i] = gs[i * 5 + 0];
    gs2[i] = gs[i * 5 + 2];
    gs4[i] = gs[i * 5 + 4];
  }
  const RowGrad<T> g{scale, shift, gs0, gs2, gs4};
  std::vector<char> used(threads);
  std::fill(dz, dz + N * D, T(0));
  for (int64_t I = 0; I < nb; ++I) {
    const int64_t r0 = I * b, nr = std::min(b, N - r0);
    std::fill(used.begin(), used.end(), 0);
    at::parallel_for(I, nb, 1, [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      TORCH_INTERNAL_ASSERT(tid >= 0 && tid < threads);
      T* tile = tiles.data_ptr<T>() + tid * b * b;
      T* dzp = dz_part.data_ptr<T>() + tid * b * D;
      std::fill(dzp, dzp + nr * D, T(0));
      used[tid] = 1;
      for (int64_t J = begin; J < end; ++J) {
        const int64_t c0 = J * b, nc = std::min(b, N - c0);
        gemm_rm<T>(false, true, nr, nc, D, z + r0 * D, D, z + c0 * D, D, false, tile, nc);
        if (J == I) {
          bwd_tile_any<T, kMask>(tile, nr, nc, r0, c0, 0, lab, inv_tau, gl, gs, lse);
          gemm_rm<T>(false, false, nr, D, nc, tile, nc, z + c0 * D, D, true, dzp, D);
          gemm_rm<T>(true, false, nc, D, nr, tile, nc, z + r0 * D, D, true, dzp, D);
        } else {
          bwd_tile_sym_any<T, kMask>(tile, nr, nc, r0, c0, lab, inv_tau, g);
          gemm_rm<T>(false, false, nr, D, nc, tile, nc, z + c0 * D, D, true, dzp, D);
          gemm_rm<T>(true, false, nc, D, nr, tile, nc, z + r0 * D, D, true, dz + c0 * D, D);
        }
      }
    });
    // dz's strip already holds the column sides of the tiles (K < I, I)
    add_thread_parts(dz + r0 * D, nr * D, dz_part.data_ptr<T>(), b * D, used);
  }
}

// ------------------------------------------------------------------------------------------- host side

// Rows and columns are one set, so S and every mask are symmetric and the symmetric kernels apply: the
// single-process form (zc is z itself, same labels, row_offset 0). Not the DDP split (rows local, columns
// gathered, row_offset > 0) nor a zc that merely equals z. PROTOCLR_CPU_SYMMETRIC=0 selects the general
// row/column kernels anyway (benchmarks against them, debugging).
bool symmetric_form(const at::Tensor& z, const at::Tensor& zc, const at::Tensor& inst, const at::Tensor& instc,
                    const at::Tensor& proto, const at::Tensor& protoc, int64_t row_offset) {
  const char* env = std::getenv("PROTOCLR_CPU_SYMMETRIC");
  if (env != nullptr && std::string(env) == "0") return false;
  auto same = [](const at::Tensor& a, const at::Tensor& b) {
    return a.data_ptr() == b.data_ptr() && a.sizes() == b.sizes() && a.strides() == b.strides();
  };
  return row_offset == 0 && same(z, zc) && (same(inst, instc) || at::equal(inst, instc)) &&
         (same(proto, protoc) || at::equal(proto, protoc));
}

// The acc_t copies of z and zc (no copy when already contiguous acc_t; one conversion when zc is z).
std::pair<at::Tensor, at::Tensor> as_acc(const at::Tensor& z, const at::Tensor& zc) {
  const auto acc = stat_dtype(z.scalar_type());
  at::Tensor za = z.to(acc).contiguous();
  at::Tensor zca = zc.is_same(z) ? za : zc.to(acc).contiguous();
  return {za, zca};
}

std::tuple<at::Tensor, at::Tensor> contrastive_fwd_cpu(const at::Tensor& z, const at::Tensor& zc,
                                                       const at::Tensor& inst, const at::Tensor& instc,
                                                       const at::Tensor& proto, const at::Tensor& protoc,
                                                       int64_t row_offset, double tau, c10::string_view fn_mode) {
  constexpr const char* fn = "contrastive_fwd";
  const int mode = check_contrastive_inputs(fn, z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode);
  const auto acc = stat_dtype(z.scalar_type());
  const int64_t N = z.size(0), Nc = zc.size(0), D = z.size(1);
  auto lse = at::empty({N}, z.options().dtype(acc));
  auto stats = at::empty({N, 5}, z.options().dtype(acc));
  auto [za, zca] = as_acc(z, zc);
  const auto inst_c = inst.contiguous(), instc_c = instc.contiguous();
  const auto proto_c = proto.contiguous(), protoc_c = protoc.contiguous();
  const Labels lab{inst_c.data_ptr<int64_t>(), instc_c.data_ptr<int64_t>(), proto_c.data_ptr<int64_t>(),
                   protoc_c.data_ptr<int64_t>()};
  const bool sym = symmetric_form(z, zc, inst, instc, proto, protoc, row_offset);
  AT_DISPATCH_FLOATING_TYPES(acc, "contrastive_fwd_cpu", [&] {
    const auto inv_tau = static_cast<scalar_t>(1.0 / tau);
    if (sym) {
      auto run = mode == kFnMask ? contrastive_fwd_sym_kernel<scalar_t, true>
                                 : contrastive_fwd_sym_kernel<scalar_t, false>;
      run(za.data_ptr<scalar_t>(), lab, N, D, inv_tau, lse.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>());
      return;
    }
    auto run = mode == kFnMask ? contrastive_fwd_kernel<scalar_t, true> : contrastive_fwd_kernel<scalar_t, false>;
    run(za.data_ptr<scalar_t>(), zca.data_ptr<scalar_t>(), lab, N, Nc, D, row_offset, inv_tau,
        lse.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>());
  });
  return {lse, stats};
}

std::tuple<at::Tensor, at::Tensor> contrastive_bwd_cpu(const at::Tensor& grad_lse, const at::Tensor& grad_stats,
                                                       const at::Tensor& z, const at::Tensor& zc,
                                                       const at::Tensor& inst, const at::Tensor& instc,
                                                       const at::Tensor& proto, const at::Tensor& protoc,
                                                       const at::Tensor& lse, int64_t row_offset, double tau,
                                                       c10::string_view fn_mode) {
  constexpr const char* fn = "contrastive_bwd";
  const int mode = check_contrastive_bwd_inputs(fn, grad_lse, grad_stats, z, zc, inst, instc, proto, protoc, lse,
                                                row_offset, tau, fn_mode);
  const int64_t N = z.size(0), Nc = zc.size(0), D = z.size(1);
  const auto acc = stat_dtype(z.scalar_type());
  auto [za, zca] = as_acc(z, zc);
  const auto gl = grad_lse.to(acc).contiguous(), gs = grad_stats.to(acc).contiguous();
  const auto lse_a = lse.to(acc).contiguous();
  const auto inst_c = inst.contiguous(), instc_c = instc.contiguous();
  const auto proto_c = proto.contiguous(), protoc_c = protoc.contiguous();
  const Labels lab{inst_c.data_ptr<int64_t>(), instc_c.data_ptr<int64_t>(), proto_c.data_ptr<int64_t>(),
                   protoc_c.data_ptr<int64_t>()};
  auto dz_acc = at::empty({N, D}, z.options().dtype(acc));
  if (symmetric_form(z, zc, inst, instc, proto, protoc, row_offset)) {  // the whole gradient in dz (csrc/ops.cpp)
    AT_DISPATCH_FLOATING_TYPES(acc, "contrastive_bwd_cpu", [&] {
      const auto inv_tau = static_cast<scalar_t>(1.0 / tau);
      auto run = mode == kFnMask ? contrastive_bwd_sym_kernel<scalar_t, true>
                                 : contrastive_bwd_sym_kernel<scalar_t, false>;
      run(gl.data_ptr<scalar_t>(), gs.data_ptr<scalar_t>(), za.data_ptr<scalar_t>(), lab, lse_a.data_ptr<scalar_t>(),
          N, D, inv_tau, dz_acc.data_ptr<scalar_t>());
    });
    return {to_like(dz_acc, z), at::zeros_like(zc)};
  }
  auto dzc_acc = at::empty({Nc, D}, z.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, "contrastive_bwd_cpu", [&] {
    const auto inv_tau = static_cast<scalar_t>(1.0 / tau);
    auto run = mode == kFnMask ? contrastive_bwd_kernel<scalar_t, true> : contrastive_bwd_kernel<scalar_t, false>;
    run(gl.data_ptr<scalar_t>(), gs.data_ptr<scalar_t>(), za.data_ptr<scalar_t>(), zca.data_ptr<scalar_t>(), lab,
        lse_a.data_ptr<scalar_t>(), N, Nc, D, row_offset, inv_tau, dz_acc.data_ptr<scalar_t>(),
        dzc_acc.data_ptr<scalar_t>());
  });
  return {to_like(dz_acc, z), to_like(dzc_acc, zc)};
}

}  // namespace

TORCH_LIBRARY_IMPL(protoclr, CPU, m) {
  m.impl("contrastive_fwd", &contrastive_fwd_cpu);
  m.impl("contrastive_bwd", &contrastive_bwd_cpu);
}

}  // namespace protoclr
