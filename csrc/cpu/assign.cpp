// SPEC 1.4 on the CPU: idx_m = argmax_k x_m·c_k + bias_k (lowest k on ties), score_m the max.
// Tiled over (row block, centroid block): each thread computes its kRowBlock × kColBlock score tile with BLAS
// (at::mm_out on from_blob views, single-threaded inside at::parallel_for), adds the bias and scans it in k
// order with a strict >, so the lowest index wins ties and NaN never wins. Inputs are converted once to the
// accumulator type (no copy for contiguous float32/float64). Extra memory: one tile per thread, never M×K.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <vector>

#include "protoclr/checks.h"

namespace protoclr {
namespace {

constexpr int64_t kRowBlock = 64;
constexpr int64_t kColBlock = 256;

// tile[M×N] (row-major, leading dimension N) = A[M×K] · B[N×K]^T.
template <typename T>
void gemm_abt(int64_t M, int64_t N, int64_t K, const T* A, const T* B, T* tile) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor a = at::from_blob(const_cast<T*>(A), {M, K}, opts);
  at::Tensor b = at::from_blob(const_cast<T*>(B), {N, K}, opts);
  at::Tensor c = at::from_blob(tile, {M, N}, opts);
  at::mm_out(c, a, b.t());
}

template <typename acc_t>
void assign_kernel(const acc_t* x, const acc_t* c, const acc_t* bias, int64_t M, int64_t K, int64_t D, int64_t* idx,
                   acc_t* score) {
  const int64_t row_blocks = (M + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, row_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(kRowBlock * kColBlock);
    acc_t best[kRowBlock];
    int64_t best_k[kRowBlock];
    for (int64_t rb = begin; rb < end; ++rb) {
      const int64_t r0 = rb * kRowBlock, nr = std::min(kRowBlock, M - r0);
      for (int64_t r = 0; r < nr; ++r) {
        best[r] = -std::numeric_limits<acc_t>::infinity();
        best_k[r] = 0;
      }
      for (int64_t k0 = 0; k0 < K; k0 += kColBlock) {
        const int64_t nk = std::min(kColBlock, K - k0);
        gemm_abt<acc_t>(nr, nk, D, x + r0 * D, c + k0 * D, tile.data());
        for (int64_t r = 0; r < nr; ++r) {
          const acc_t* s = tile.data() + r * nk;
          for (int64_t k = 0; k < nk; ++k) {
            const acc_t v = bias ? s[k] + bias[k0 + k] : s[k];
            // strict > keeps the lowest index on ties; NaN never wins
            if (v > best[r]) {
              best[r] = v;
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
  check_assign_inputs(fn, x, prototypes, bias);
  const auto acc_type = stat_dtype(x.scalar_type());
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->to(acc_type).contiguous();
  }
  const auto xc = x.to(acc_type).contiguous(), cc = prototypes.to(acc_type).contiguous();
  const int64_t M = x.size(0), K = prototypes.size(0), D = x.size(1);
  auto idx = at::empty({M}, x.options().dtype(at::kLong));
  auto score = at::empty({M}, x.options().dtype(acc_type));
  AT_DISPATCH_FLOATING_TYPES(acc_type, "assign_cpu", [&] {
    const scalar_t* bp = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    assign_kernel<scalar_t>(xc.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(), bp, M, K, D, idx.data_ptr<int64_t>(),
                            score.data_ptr<scalar_t>());
  });
  return {idx, score};
}

}  // namespace

TORCH_LIBRARY_IMPL(protoclr, CPU, m) { m.impl("assign", &assign_cpu); }

}  // namespace protoclr
