// Argument checks shared by the CPU and CUDA ops. Python validates user input first (protoclr/ops/checks.py);
// these repeat the checks that guard memory safety, so a direct torch.ops call fails with a ValueError that
// names the argument instead of reading out of bounds.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#define PROTOCLR_CHECK(fn, cond, ...) TORCH_CHECK_VALUE(cond, fn, ": ", __VA_ARGS__)

#define PROTOCLR_CHECK_DIM(fn, t, d) \
  PROTOCLR_CHECK(fn, (t).dim() == (d), #t " must be a ", d, "-D tensor, got shape ", (t).sizes())

#define PROTOCLR_CHECK_CONTIGUOUS(fn, t) PROTOCLR_CHECK(fn, (t).is_contiguous(), #t " must be contiguous")

#define PROTOCLR_CHECK_DTYPE(fn, t, dt) \
  PROTOCLR_CHECK(fn, (t).scalar_type() == (dt), #t " must have dtype ", dt, ", got ", (t).scalar_type())

#define PROTOCLR_CHECK_SAME_DEVICE(fn, a, b) \
  PROTOCLR_CHECK(fn, (a).device() == (b).device(), #a " and " #b " must be on one device, got ", (a).device(), \
                 " and ", (b).device())

#define PROTOCLR_CHECK_SIZE(fn, t, d, n) \
  PROTOCLR_CHECK(fn, (t).size(d) == (n), #t ".size(", d, ") must be ", n, ", got ", (t).size(d))

namespace protoclr {

// dtype of scores, log-sum-exps and statistics: float32, or float64 for float64 inputs.
inline at::ScalarType stat_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace protoclr
