// SPEC 1.2 on the CPU: siamese_fwd / siamese_bwd, dense pairs g_i < g_j (schemas in csrc/ops.cpp).
//
// Design. h, hc, weight and bias are converted once to the accumulator type (float, double for float64).
// The logit d_ij = Σ_k w_k |h_ik − hc_jk| + b has no GEMM form, so the kernels are contiguous SIMD loops over
// the feature dimension, four columns at a time (one load of h_i and w per four pairs).
//  - Forward: at::parallel_for over row blocks. Row i only sees columns j > g_i (a triangle), so blocks are
//    handed out front/back interleaved (0, last, 1, last-1, ...): the static split of at::parallel_for then
//    gives every thread the same number of pairs. Per-row sums are accumulated in double.
//  - Backward recomputes d_ij. Row strips of kBwdRows are walked in order; inside a strip at::parallel_for
//    runs over column blocks, so dhc rows are written by one thread each (no race, no per-thread Nc × Dh
//    copy); dh for the strip, dw and db are per-thread partials reduced in thread order. The common factor
//    w ⊙ of dh and dhc is applied once at the end.
// The float row kernels are built per ISA (AVX-512, AVX2, baseline) and picked at load time.
// Extra memory: threads × (kBwdRows + 1) × Dh, plus Nc × Dh accumulators when h is not float32/float64.
// Measured (2-core Zen 4, 1 thread, N = 1024, Dh = 512, fp32): fwd ~24 ms, fwd+bwd ~84 ms.
#include "simd.h"  // first: its build settings apply to everything below

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "protoclr/checks.h"
#include "protoclr/math.h"

namespace protoclr {
namespace {

constexpr int64_t kFwdRows = 16;
constexpr int64_t kBwdRows = 32;
constexpr int64_t kCols = 64;

struct Labels {
  const int64_t* inst;
  const int64_t* instc;
  const int64_t* proto;
  const int64_t* protoc;
};

// d[q] = Σ_k w_k |a_k − b_q,k| for the four rows b_q (no bias).
template <typename T>
PROTOCLR_ALWAYS_INLINE inline void l1_dist4(const T* a, const T* b0, const T* b1, const T* b2, const T* b3, const T* w,
                                             int64_t D, T* d) {
  T d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#pragma omp simd reduction(+ : d0, d1, d2, d3)
  for (int64_t k = 0; k < D; ++k) {
    const T ak = a[k], wk = w[k];
    d0 += wk * pc_abs(ak - b0[k]);
    d1 += wk * pc_abs(ak - b1[k]);
    d2 += wk * pc_abs(ak - b2[k]);
    d3 += wk * pc_abs(ak - b3[k]);
  }
  d[0] = d0;
  d[1] = d1;
  d[2] = d2;
  d[3] = d3;
}

template <typename T>
PROTOCLR_ALWAYS_INLINE inline T l1_dist(const T* a, const T* b, const T* w, int64_t D) {
  T d = 0;
#pragma omp simd reduction(+ : d)
  for (int64_t k = 0; k < D; ++k) d += w[k] * pc_abs(a[k] - b[k]);
  return d;
}

// d_ij − b for columns [j0, j1) of row a into out[0 .. j1 − j0).
template <typename T>
PROTOCLR_ALWAYS_INLINE inline void l1_dist_row(const T* a, const T* hc, const T* w, int64_t D, int64_t j0, int64_t j1,
                                                T* out) {
  int64_t j = j0;
  for (; j + 4 <= j1; j += 4)
    l1_dist4(a, hc + j * D, hc + (j + 1) * D, hc + (j + 2) * D, hc + (j + 3) * D, w, D, out + (j - j0));
  for (; j < j1; ++j) out[j - j0] = l1_dist(a, hc + j * D, w, D);
}

// First column paired with global row gi (pairs need g_j > g_i), clamped to [0, Nc].
inline int64_t first_col(int64_t gi, int64_t Nc) { return std::min(std::max<int64_t>(gi + 1, 0), Nc); }

// One row's forward: Σ l_ij and pair counts by y over columns [j0, Nc), in kCols chunks (d scratch).
template <typename T>
PROTOCLR_ALWAYS_INLINE inline void fwd_row(const T* hi, const T* hc, const T* w, T b, int64_t D, int64_t j0,
                                            int64_t Nc, int64_t inst_i, int64_t proto_i, const int64_t* instc,
                                            const int64_t* protoc, T* d, double* ls, int64_t* cnt) {
  for (; j0 < Nc; j0 += kCols) {
    const int64_t j1 = std::min(Nc, j0 + kCols);
    l1_dist_row(hi, hc, w, D, j0, j1, d);
    for (int64_t j = j0; j < j1; ++j) {
      const int y = siamese_label(inst_i, instc[j], proto_i, protoc[j]);
      ls[y] += bce_logits(d[j - j0] + b, y);
      cnt[y] += 1;
    }
  }
}

// One row's backward over columns [j0, j1): dhi += Σ_j G_ij sign(h_i − hc_j), dhc_j −= G_ij sign(h_i − hc_j),
// dw_row += Σ_j G_ij |h_i − hc_j|; returns Σ_j G_ij. d is kCols scratch, j1 − j0 <= kCols.
template <typename T>
PROTOCLR_ALWAYS_INLINE inline T bwd_row(const T* hi, const T* hc, const T* w, T b, int64_t D, int64_t j0, int64_t j1,
                                         int64_t inst_i, int64_t proto_i, const int64_t* instc, const int64_t* protoc,
                                         const T* gl_i, T* d, T* dhi, T* dhc, T* dw_row) {
  l1_dist_row(hi, hc, w, D, j0, j1, d);
  T db = 0;
  for (int64_t j = j0; j < j1; ++j) {
    const int y = siamese_label(inst_i, instc[j], proto_i, protoc[j]);
    const T g = gl_i[y] * bce_logits_grad(d[j - j0] + b, y);
    if (g == T(0)) continue;
    db += g;
    const T* hj = hc + j * D;
    T* dhj = dhc + j * D;
#pragma omp simd
    for (int64_t k = 0; k < D; ++k) {
      const T diff = hi[k] - hj[k];
      const T gs = g * sign0(diff);
      dhi[k] += gs;
      dhj[k] -= gs;
      dw_row[k] += g * pc_abs(diff);
    }
  }
  return db;
}

// float entry points, compiled per ISA (PROTOCLR_CPU_CLONES); double (tests) uses the templates directly.
PROTOCLR_CPU_CLONES void fwd_row_f32(const float* hi, const float* hc, const float* w, float b, int64_t D, int64_t j0,
                                     int64_t Nc, int64_t inst_i, int64_t proto_i, const int64_t* instc,
                                     const int64_t* protoc, float* d, double* ls, int64_t* cnt) {
  fwd_row<float>(hi, hc, w, b, D, j0, Nc, inst_i, proto_i, instc, protoc, d, ls, cnt);
}

PROTOCLR_CPU_CLONES float bwd_row_f32(const float* hi, const float* hc, const float* w, float b, int64_t D, int64_t j0,
                                      int64_t j1, int64_t inst_i, int64_t proto_i, const int64_t* instc,
                                      const int64_t* protoc, const float* gl_i, float* d, float* dhi, float* dhc,
                                      float* dw_row) {
  return bwd_row<float>(hi, hc, w, b, D, j0, j1, inst_i, proto_i, instc, protoc, gl_i, d, dhi, dhc, dw_row);
}

template <typename T>
void fwd_row_any(const T* hi, const T* hc, const T* w, T b, int64_t D, int64_t j0, int64_t Nc, int64_t inst_i,
                 int64_t proto_i, const int64_t* instc, const int64_t* protoc, T* d, double* ls, int64_t* cnt) {
  if constexpr (std::is_same_v<T, float>)
    fwd_row_f32(hi, hc, w, b, D, j0, Nc, inst_i, proto_i, instc, protoc, d, ls, cnt);
  else
    fwd_row<T>(hi, hc, w, b, D, j0, Nc, inst_i, proto_i, instc, protoc, d, ls, cnt);
}

template <typename T>
T bwd_row_any(const T* hi, const T* hc, const T* w, T b, int64_t D, int64_t j0, int64_t j1, int64_t inst_i,
              int64_t proto_i, const int64_t* instc, const int64_t* protoc, const T* gl_i, T* d, T* dhi, T* dhc,
              T* dw_row) {
  if constexpr (std::is_same_v<T, float>)
    return bwd_row_f32(hi, hc, w, b, D, j0, j1, inst_i, proto_i, instc, protoc, gl_i, d, dhi, dhc, dw_row);
  else
    return bwd_row<T>(hi, hc, w, b, D, j0, j1, inst_i, proto_i, instc, protoc, gl_i, d, dhi, dhc, dw_row);
}

template <typename T>
void siamese_fwd_kernel(const T* h, const T* hc, Labels lab, const T* w, T b, int64_t N, int64_t Nc, int64_t D,
                        int64_t row_offset, T* loss, T* count) {
  const int64_t blocks = (N + kFwdRows - 1) / kFwdRows;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> d(kCols);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t rb = t % 2 == 0 ? t / 2 : blocks - 1 - t / 2;
      const int64_t r0 = rb * kFwdRows, nr = std::min(kFwdRows, N - r0);
      for (int64_t i = r0; i < r0 + nr; ++i) {
        double ls[2] = {0, 0};
        int64_t cnt[2] = {0, 0};
        fwd_row_any<T>(h + i * D, hc, w, b, D, first_col(row_offset + i, Nc), Nc, lab.inst[i], lab.proto[i],
                       lab.instc, lab.protoc, d.data(), ls, cnt);
        for (int q = 0; q < 2; ++q) {
          loss[i * 2 + q] = static_cast<T>(ls[q]);
          count[i * 2 + q] = static_cast<T>(cnt[q]);
        }
      }
    }
  });
}

// SPEC 1.2 backward. loss_i,y = Σ_{j: g_j > g_i, y_ij = y} l_ij with l_ij = softplus(d_ij) − y_ij d_ij and
// d_ij = Σ_k w_k |h_ik − hc_jk| + b. For L = Σ_i,y gl_i,y loss_i,y, with ∂l/∂d = σ(d) − y:
//   G_ij = gl_{i, y_ij} (σ(d_ij) − y_ij)
//   dh_i = Σ_j G_ij w ⊙ sign(h_i − hc_j),   dhc_j = −Σ_i G_ij w ⊙ sign(h_i − hc_j)   (sign(0) = 0)
//   dw = Σ_ij G_ij |h_i − hc_j|,            db = Σ_ij G_ij
// dh and dhc are accumulated without the common factor w ⊙, applied once at the end.
template <typename T>
void siamese_bwd_kernel(const T* gloss, const T* h, const T* hc, Labels lab, const T* w, T b, int64_t N, int64_t Nc,
                        int64_t D, int64_t row_offset, T* dh, T* dhc, double* dw, double* db) {
  const int64_t threads = at::get_num_threads();
  std::vector<T> dh_part(threads * kBwdRows * D);
  std::vector<double> dw_part(threads * D, 0.0), db_part(threads, 0.0);
  std::vector<char> used(threads);
  std::fill(dhc, dhc + Nc * D, T(0));
  for (int64_t r0 = 0; r0 < N; r0 += kBwdRows) {
    const int64_t nr = std::min(kBwdRows, N - r0);
    const int64_t jlo = first_col(row_offset + r0, Nc);
    const int64_t blocks = (Nc - jlo + kCols - 1) / kCols;
    std::fill(used.begin(), used.end(), 0);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      TORCH_INTERNAL_ASSERT(tid >= 0 && tid < threads);
      T* dhp = dh_part.data() + tid * kBwdRows * D;
      double* dwp = dw_part.data() + tid * D;
      std::fill(dhp, dhp + nr * D, T(0));
      used[tid] = 1;
      std::vector<T> d(kCols), dw_row(D);
      double db_acc = 0;
      for (int64_t cb = begin; cb < end; ++cb) {
        const int64_t c0 = jlo + cb * kCols, c1 = std::min(Nc, c0 + kCols);
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t i = r0 + r;
          const int64_t j0 = std::max(c0, first_col(row_offset + i, Nc));
          if (j0 >= c1) continue;
          // dw over one (row, column block) in T, then into the per-thread double total
          std::fill(dw_row.begin(), dw_row.end(), T(0));
          db_acc += bwd_row_any<T>(h + i * D, hc, w, b, D, j0, c1, lab.inst[i], lab.proto[i], lab.instc, lab.protoc,
                                   gloss + i * 2, d.data(), dhp + r * D, dhc, dw_row.data());
          for (int64_t k = 0; k < D; ++k) dwp[k] += dw_row[k];
        }
      }
      db_part[tid] += db_acc;
    });
    T* out = dh + r0 * D;
    std::fill(out, out + nr * D, T(0));
    for (int64_t t = 0; t < threads; ++t) {  // thread order: deterministic for a given thread count
      if (!used[t]) continue;
      const T* p = dh_part.data() + t * kBwdRows * D;
#pragma omp simd
      for (int64_t e = 0; e < nr * D; ++e) out[e] += p[e];
    }
  }
  // the common factor w ⊙ of dh and dhc
  at::parallel_for(0, N + Nc, 256, [&](int64_t begin, int64_t end) {
    for (int64_t q = begin; q < end; ++q) {
      T* row = q < N ? dh + q * D : dhc + (q - N) * D;
#pragma omp simd
      for (int64_t k = 0; k < D; ++k) row[k] *= w[k];
    }
  });
  for (int64_t k = 0; k < D; ++k) dw[k] = 0;
  *db = 0;
  for (int64_t t = 0; t < threads; ++t) {
    for (int64_t k = 0; k < D; ++k) dw[k] += dw_part[t * D + k];
    *db += db_part[t];
  }
}

// ------------------------------------------------------------------------------------------- host side

void check_inputs(const char* fn, const at::Tensor& h, const at::Tensor& hc, const at::Tensor& inst,
                  const at::Tensor& instc, const at::Tensor& proto, const at::Tensor& protoc,
                  const at::Tensor& weight, const at::Tensor& bias, int64_t row_offset) {
  check_rows_cols(fn, "h", "hc", h, hc, inst, instc, proto, protoc, row_offset);
  check_head(fn, h, weight, bias);
}

struct Prepared {
  at::Tensor h, hc, inst, instc, proto, protoc, weight, bias;
  Labels labels() const {
    return {inst.data_ptr<int64_t>(), instc.data_ptr<int64_t>(), proto.data_ptr<int64_t>(),
            protoc.data_ptr<int64_t>()};
  }
};

Prepared prepare(const at::Tensor& h, const at::Tensor& hc, const at::Tensor& inst, const at::Tensor& instc,
                 const at::Tensor& proto, const at::Tensor& protoc, const at::Tensor& weight, const at::Tensor& bias) {
  const auto acc = stat_dtype(h.scalar_type());
  Prepared p;
  p.h = h.to(acc).contiguous();
  p.hc = hc.is_same(h) ? p.h : hc.to(acc).contiguous();
  p.inst = inst.contiguous();
  p.instc = instc.contiguous();
  p.proto = proto.contiguous();
  p.protoc = protoc.contiguous();
  p.weight = weight.to(acc).contiguous();
  p.bias = bias.to(acc).contiguous();
  return p;
}

std::tuple<at::Tensor, at::Tensor> siamese_fwd_cpu(const at::Tensor& h, const at::Tensor& hc, const at::Tensor& inst,
                                                   const at::Tensor& instc, const at::Tensor& proto,
                                                   const at::Tensor& protoc, const at::Tensor& weight,
                                                   const at::Tensor& bias, int64_t row_offset) {
  constexpr const char* fn = "siamese_fwd";
  check_inputs(fn, h, hc, inst, instc, proto, protoc, weight, bias, row_offset);
  const auto acc = stat_dtype(h.scalar_type());
  const int64_t N = h.size(0), Nc = hc.size(0), D = h.size(1);
  auto loss = at::empty({N, 2}, h.options().dtype(acc));
  auto count = at::empty({N, 2}, h.options().dtype(acc));
  const auto p = prepare(h, hc, inst, instc, proto, protoc, weight, bias);
  AT_DISPATCH_FLOATING_TYPES(acc, "siamese_fwd_cpu", [&] {
    siamese_fwd_kernel<scalar_t>(p.h.data_ptr<scalar_t>(), p.hc.data_ptr<scalar_t>(), p.labels(),
                                 p.weight.data_ptr<scalar_t>(), p.bias.data_ptr<scalar_t>()[0], N, Nc, D, row_offset,
                                 loss.data_ptr<scalar_t>(), count.data_ptr<scalar_t>());
  });
  return {loss, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siamese_bwd_cpu(
    const at::Tensor& grad_loss, const at::Tensor& h, const at::Tensor& hc, const at::Tensor& inst,
    const at::Tensor& instc, const at::Tensor& proto, const at::Tensor& protoc, const at::Tensor& weight,
    const at::Tensor& bias, int64_t row_offset) {
  constexpr const char* fn = "siamese_bwd";
  check_inputs(fn, h, hc, inst, instc, proto, protoc, weight, bias, row_offset);
  const int64_t N = h.size(0), Nc = hc.size(0), D = h.size(1);
  check_stat(fn, grad_loss, "grad_loss", {N, 2}, h);
  const auto acc = stat_dtype(h.scalar_type());
  const auto p = prepare(h, hc, inst, instc, proto, protoc, weight, bias);
  const auto gl = grad_loss.to(acc).contiguous();
  auto dh_acc = at::empty({N, D}, h.options().dtype(acc));
  auto dhc_acc = at::empty({Nc, D}, h.options().dtype(acc));
  auto dw64 = at::empty({D}, h.options().dtype(at::kDouble));
  auto db64 = at::empty({1}, h.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(acc, "siamese_bwd_cpu", [&] {
    siamese_bwd_kernel<scalar_t>(gl.data_ptr<scalar_t>(), p.h.data_ptr<scalar_t>(), p.hc.data_ptr<scalar_t>(),
                                 p.labels(), p.weight.data_ptr<scalar_t>(), p.bias.data_ptr<scalar_t>()[0], N, Nc, D,
                                 row_offset, dh_acc.data_ptr<scalar_t>(), dhc_acc.data_ptr<scalar_t>(),
                                 dw64.data_ptr<double>(), db64.data_ptr<double>());
  });
  return {to_like(dh_acc, h), to_like(dhc_acc, hc), at::empty_like(weight).copy_(dw64),
          at::empty_like(bias).copy_(db64)};
}

}  // namespace

TORCH_LIBRARY_IMPL(protoclr, CPU, m) {
  m.impl("siamese_fwd", &siamese_fwd_cpu);
  m.impl("siamese_bwd", &siamese_bwd_cpu);
}

}  // namespace protoclr
