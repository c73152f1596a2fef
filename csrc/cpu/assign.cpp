// SPEC 1.4 on the CPU: idx_m = argmax_k x_m·c_k + bias_k (lowest k on ties), score_m the max. The tiled
// search is assign_tiles.h's (shared with the fused k-means step); row blocks run in parallel. Inputs are
// converted once to the accumulator type (no copy for contiguous float32/float64).
#include "simd.h"  // first: its build settings apply to the loops below

#include "assign_tiles.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "protoclr/checks.h"

namespace protoclr {
namespace {

std::tuple<at::Tensor, at::Tensor> assign_cpu(const at::Tensor& x, const at::Tensor& prototypes,
                                              const std::optional<at::Tensor>& bias) {
  auto p = assign_tiles::prepare("assign", x, prototypes, bias);
  const int64_t M = p.M, K = p.K, D = p.D;
  AT_DISPATCH_FLOATING_TYPES(p.acc_type, "assign_cpu", [&] {
    const scalar_t *xp = p.xc.data_ptr<scalar_t>(), *cp = p.cc.data_ptr<scalar_t>(), *bp = p.b.data_ptr<scalar_t>();
    int64_t* ip = p.idx.data_ptr<int64_t>();
    scalar_t* sp = p.score.data_ptr<scalar_t>();
    at::parallel_for(0, p.row_blocks, 1, [&](int64_t begin, int64_t end) {
      const int64_t r_end = std::min(end * assign_tiles::kRowBlock, M);
      assign_tiles::assign_rows<scalar_t>(xp, cp, bp, begin * assign_tiles::kRowBlock, r_end, K, D, ip, sp,
                                          [](int64_t, int64_t) {});
    });
  });
  return {p.idx, p.score};
}

}  // namespace

TORCH_LIBRARY_IMPL(protoclr, CPU, m) { m.impl("assign", &assign_cpu); }

}  // namespace protoclr
