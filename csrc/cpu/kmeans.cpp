// One Lloyd pass of k-means on the CPU (protoclr.cluster.kmeans): the E-step of `assign` (assign_tiles.h, the
// same argmax) and, fused into it, the M-step statistics: per-cluster row sums and counts. Each row block is
// added to its clusters' sums right after its argmax, while it is still in cache, so an iteration reads the
// rows once.
//
// Rows are split into one contiguous part per thread; a part adds its rows in order into its own float64 sums
// (float32 rows are widened in registers), and the parts' sums are added in part order: deterministic for a
// given thread count, and as exact as float64 sums of the rows. Extra memory per thread: one assign tile and
// (K, D) float64 sums.
#include "simd.h"  // first: its build settings apply to the loops below

#include "assign_tiles.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "protoclr/checks.h"

namespace protoclr {
namespace {

template <typename T>
PROTOCLR_ALWAYS_INLINE inline void add_rows(double* sums, const T* x, const int64_t* idx, int64_t nr, int64_t D) {
  for (int64_t r = 0; r < nr; ++r) {
    double* dst = sums + idx[r] * D;
    const T* src = x + r * D;
    for (int64_t d = 0; d < D; ++d) dst[d] += static_cast<double>(src[d]);
  }
}

PROTOCLR_CPU_CLONES void add_rows_f32(double* sums, const float* x, const int64_t* idx, int64_t nr, int64_t D) {
  add_rows<float>(sums, x, idx, nr, D);
}
void add_rows_dispatch(double* sums, const float* x, const int64_t* idx, int64_t nr, int64_t D) {
  add_rows_f32(sums, x, idx, nr, D);
}
void add_rows_dispatch(double* sums, const double* x, const int64_t* idx, int64_t nr, int64_t D) {
  add_rows<double>(sums, x, idx, nr, D);
}

template <typename T>
void kmeans_step_kernel(const T* x, const T* c, const T* bias, int64_t M, int64_t K, int64_t D, int64_t* idx,
                        T* score, double* part_sums, int64_t* part_counts, int64_t parts) {
  const int64_t row_blocks = (M + assign_tiles::kRowBlock - 1) / assign_tiles::kRowBlock;
  at::parallel_for(0, parts, 1, [&](int64_t p_begin, int64_t p_end) {
    for (int64_t p = p_begin; p < p_end; ++p) {
      double* sums = part_sums + p * K * D;
      int64_t* counts = part_counts + p * K;
      const int64_t r_begin = std::min(M, (row_blocks * p / parts) * assign_tiles::kRowBlock);
      const int64_t r_end = std::min(M, (row_blocks * (p + 1) / parts) * assign_tiles::kRowBlock);
      assign_tiles::assign_rows<T>(x, c, bias, r_begin, r_end, K, D, idx, score, [&](int64_t r0, int64_t nr) {
        for (int64_t r = r0; r < r0 + nr; ++r) ++counts[idx[r]];
        add_rows_dispatch(sums, x + r0 * D, idx + r0, nr, D);
      });
    }
  });
}

// idx (M,) and score (M,) as `assign`; sums (K, D) float64 = Σ_{m: idx_m = k} x_m; counts (K,) int64.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_step_cpu(const at::Tensor& x,
                                                                          const at::Tensor& prototypes,
                                                                          const std::optional<at::Tensor>& bias) {
  auto p = assign_tiles::prepare("kmeans_step", x, prototypes, bias);
  const int64_t M = p.M, K = p.K, D = p.D;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), p.row_blocks));
  auto part_sums = at::zeros({parts, K, D}, x.options().dtype(at::kDouble));
  auto part_counts = at::zeros({parts, K}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(p.acc_type, "kmeans_step_cpu", [&] {
    kmeans_step_kernel<scalar_t>(p.xc.data_ptr<scalar_t>(), p.cc.data_ptr<scalar_t>(), p.b.data_ptr<scalar_t>(), M,
                                 K, D, p.idx.data_ptr<int64_t>(), p.score.data_ptr<scalar_t>(),
                                 part_sums.data_ptr<double>(), part_counts.data_ptr<int64_t>(), parts);
  });
  at::Tensor sums = part_sums[0];
  for (int64_t part = 1; part < parts; ++part) sums.add_(part_sums[part]);  // in part order: deterministic
  return {p.idx, p.score, sums, part_counts.sum(0)};
}

}  // namespace

TORCH_LIBRARY_IMPL(protoclr, CPU, m) { m.impl("kmeans_step", &kmeans_step_cpu); }

}  // namespace protoclr
