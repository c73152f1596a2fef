// SPEC 1.4 on the CPU: idx_m = argmax_k x_m·c_k + bias_k (lowest k on ties), score_m the max.
// Tiled over (row block, centroid block); each thread converts its tiles to the accumulator type once,
// so the dot products are contiguous SIMD loops. Extra memory: per-thread tiles, never M×K.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "protoclr/checks.h"

namespace protoclr {
namespace {

constexpr int64_t kRowBlock = 16;
constexpr int64_t kColBlock = 128;

template <typename scalar_t, typename acc_t>
void assign_kernel(const scalar_t* x, const scalar_t* c, const acc_t* bias, int64_t M, int64_t K, int64_t D,
                   int64_t* idx, acc_t* score) {
  const int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xt(kRowBlock * D), ct(kColBlock * D);
    for (int64_t rb = begin; rb < end; ++rb) {
      const int64_t r0 = rb * kRowBlock, nr = std::min(kRowBlock, M - r0);
      for (int64_t r = 0; r < nr * D; ++r) xt[r] = static_cast<acc_t>(x[r0 * D + r]);
      acc_t best[kRowBlock];
      int64_t best_k[kRowBlock];
      for (int64_t r = 0; r < nr; ++r) {
        best[r] = -std::numeric_limits<acc_t>::infinity();
        best_k[r] = 0;
      }
      for (int64_t k0 = 0; k0 < K; k0 += kColBlock) {
        const int64_t nk = std::min(kColBlock, K - k0);
        for (int64_t e = 0; e < nk * D; ++e) ct[e] = static_cast<acc_t>(c[k0 * D + e]);
        for (int64_t r = 0; r < nr; ++r) {
          const acc_t* xr = xt.data() + r * D;
          for (int64_t k = 0; k < nk; ++k) {
            const acc_t* ck = ct.data() + k * D;
            acc_t dot = 0;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += xr[d] * ck[d];
            if (bias) dot += bias[k0 + k];
            // strict > keeps the lowest index on ties; NaN never wins
            if (dot > best[r]) {
              best[r] = dot;
              best_k[r] = k0 + k;
            }
          }
        }
      }
      for (int64_t r = 0; r < nr; ++r) {
        idx[r0 + r] = best_k[r];
        score[r0 + r] = best[r];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> assign_cpu(const at::Tensor& x, const at::Tensor& prototypes,
                                              const std::optional<at::Tensor>& bias) {
  constexpr const char* fn = "assign";
  PROTOCLR_CHECK_DIM(fn, x, 2);
  PROTOCLR_CHECK_DIM(fn, prototypes, 2);
  PROTOCLR_CHECK_SIZE(fn, prototypes, 1, x.size(1));
  PROTOCLR_CHECK_DTYPE(fn, prototypes, x.scalar_type());
  PROTOCLR_CHECK(fn, prototypes.size(0) >= 1, "prototypes must hold at least one row");
  const auto acc_type = stat_dtype(x.scalar_type());
  at::Tensor b;
  if (bias.has_value()) {
    PROTOCLR_CHECK_DIM(fn, *bias, 1);
    PROTOCLR_CHECK_SIZE(fn, *bias, 0, prototypes.size(0));
    b = bias->to(acc_type).contiguous();
  }
  const auto xc = x.contiguous(), cc = prototypes.contiguous();
  const int64_t M = x.size(0), K = prototypes.size(0), D = x.size(1);
  auto idx = at::empty({M}, x.options().dtype(at::kLong));
  auto score = at::empty({M}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "assign_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    assign_kernel<scalar_t, acc_t>(xc.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(),
                                   b.defined() ? b.data_ptr<acc_t>() : nullptr, M, K, D, idx.data_ptr<int64_t>(),
                                   score.data_ptr<acc_t>());
  });
  return {idx, score};
}

}  // namespace

TORCH_LIBRARY_IMPL(protoclr, CPU, m) { m.impl("assign", &assign_cpu); }

}  // namespace protoclr
