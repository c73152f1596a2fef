// Argument checks shared by the CPU and CUDA ops. Python validates user input first (protoclr/ops/checks.py);
// these repeat the checks that guard memory safety, so a direct torch.ops call fails with a ValueError that
// names the argument instead of reading out of bounds.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <optional>
#include <string>

#include "protoclr/math.h"

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

// A label vector: int64 of shape (n_name,)=(x.size(0),), on x's device.
inline void check_labels(const char* fn, const at::Tensor& x, const at::Tensor& lab, const char* name,
                         const char* n_name) {
  PROTOCLR_CHECK(fn, lab.dim() == 1 && lab.size(0) == x.size(0), name, " must have shape (", n_name, ",)=(",
                 x.size(0), ",), got ", lab.sizes());
  PROTOCLR_CHECK(fn, lab.scalar_type() == at::kLong, name, " must be int64, got ", lab.scalar_type());
  PROTOCLR_CHECK(fn, lab.device() == x.device(), name, " must be on ", x.device(), " like the features, got ",
                 lab.device());
}

// The row/column inputs of the pairwise ops (csrc/ops.cpp): rows x (N, D) and columns xc (Nc, D) of one floating
// dtype and device, their int64 labels, row_offset >= 0. xn/xcn name x and xc in messages ("z"/"zc", "h"/"hc").
inline void check_rows_cols(const char* fn, const char* xn, const char* xcn, const at::Tensor& x,
                            const at::Tensor& xc, const at::Tensor& inst, const at::Tensor& instc,
                            const at::Tensor& proto, const at::Tensor& protoc, int64_t row_offset) {
  PROTOCLR_CHECK(fn, x.dim() == 2, xn, " must be a 2-D tensor, got shape ", x.sizes());
  PROTOCLR_CHECK(fn, xc.dim() == 2, xcn, " must be a 2-D tensor, got shape ", xc.sizes());
  PROTOCLR_CHECK(fn, at::isFloatingType(x.scalar_type()), xn, " must be a floating-point tensor, got ",
                 x.scalar_type());
  PROTOCLR_CHECK(fn, xc.scalar_type() == x.scalar_type(), xcn, " must have dtype ", x.scalar_type(), ", got ",
                 xc.scalar_type());
  PROTOCLR_CHECK(fn, x.size(1) >= 1, xn, " must have at least one feature column, got shape ", x.sizes());
  PROTOCLR_CHECK(fn, xc.size(1) == x.size(1), xcn, ".size(1) must be ", x.size(1), ", got ", xc.size(1));
  PROTOCLR_CHECK(fn, xc.device() == x.device(), xn, " and ", xcn, " must be on one device, got ", x.device(),
                 " and ", xc.device());
  check_labels(fn, x, inst, "inst", "N");
  check_labels(fn, x, proto, "proto", "N");
  check_labels(fn, xc, instc, "instc", "Nc");
  check_labels(fn, xc, protoc, "protoc", "Nc");
  PROTOCLR_CHECK(fn, row_offset >= 0, "row_offset must be >= 0, got ", row_offset);
}

// The siamese head: weight (Dh,), bias (1,), float32 or float64, on h's device.
inline void check_head(const char* fn, const at::Tensor& h, const at::Tensor& weight, const at::Tensor& bias) {
  PROTOCLR_CHECK(fn, weight.dim() == 1 && weight.size(0) == h.size(1), "weight must have shape (Dh,)=(", h.size(1),
                 ",), got ", weight.sizes());
  PROTOCLR_CHECK(fn, bias.dim() == 1 && bias.size(0) == 1, "bias must have shape (1,), got ", bias.sizes());
  for (const auto* t : {&weight, &bias}) {
    const char* name = t == &weight ? "weight" : "bias";
    PROTOCLR_CHECK(fn, t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, name,
                   " must be float32 or float64, got ", t->scalar_type());
    PROTOCLR_CHECK(fn, t->device() == h.device(), name, " must be on ", h.device(), ", got ", t->device());
  }
}

inline void check_tau(const char* fn, double tau) {
  PROTOCLR_CHECK(fn, tau > 0 && std::isfinite(tau), "tau must be a positive finite float, got ", tau);
}

// A per-row statistic or its gradient: floating, of `shape`, on x's device.
inline void check_stat(const char* fn, const at::Tensor& t, const char* name, at::IntArrayRef shape,
                       const at::Tensor& x) {
  PROTOCLR_CHECK(fn, t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  PROTOCLR_CHECK(fn, at::isFloatingType(t.scalar_type()), name, " must be a floating-point tensor, got ",
                 t.scalar_type());
  PROTOCLR_CHECK(fn, t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
}

// assign (SPEC 1.4): x (M, D) floating, prototypes (K >= 1, D) of x's dtype, optional bias (K,), one device.
inline void check_assign_inputs(const char* fn, const at::Tensor& x, const at::Tensor& prototypes,
                                const std::optional<at::Tensor>& bias_opt) {
  PROTOCLR_CHECK_DIM(fn, x, 2);
  PROTOCLR_CHECK_DIM(fn, prototypes, 2);
  PROTOCLR_CHECK(fn, at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ", x.scalar_type());
  PROTOCLR_CHECK_SIZE(fn, prototypes, 1, x.size(1));
  PROTOCLR_CHECK_DTYPE(fn, prototypes, x.scalar_type());
  PROTOCLR_CHECK(fn, prototypes.size(0) >= 1, "prototypes must hold at least one row");
  PROTOCLR_CHECK_SAME_DEVICE(fn, x, prototypes);
  if (bias_opt.has_value()) {
    const at::Tensor& bias = *bias_opt;  // named so messages say "bias"
    PROTOCLR_CHECK_DIM(fn, bias, 1);
    PROTOCLR_CHECK_SIZE(fn, bias, 0, prototypes.size(0));
    PROTOCLR_CHECK_SAME_DEVICE(fn, x, bias);
  }
}

inline int parse_fn_mode(const char* fn, c10::string_view fn_mode) {
  const std::string s(fn_mode.data(), fn_mode.size());
  const int mode = fn_mode_from_string(s.c_str());
  if (mode < 0) {
    std::string names;  // 'none', 'mask' or 'attract'
    for (int m = 0; m < kNumFnModes; ++m)
      names += std::string(m == 0 ? "'" : m + 1 == kNumFnModes ? " or '" : ", '") + kFnModeNames[m] + "'";
    PROTOCLR_CHECK(fn, false, "fn_mode must be ", names, ", got '", s, "'");
  }
  return mode;
}

// contrastive_fwd (csrc/ops.cpp): rows z / columns zc with their labels, tau and fn_mode. Returns the fn_mode.
inline int check_contrastive_inputs(const char* fn, const at::Tensor& z, const at::Tensor& zc, const at::Tensor& inst,
                                    const at::Tensor& instc, const at::Tensor& proto, const at::Tensor& protoc,
                                    int64_t row_offset, double tau, c10::string_view fn_mode) {
  check_rows_cols(fn, "z", "zc", z, zc, inst, instc, proto, protoc, row_offset);
  check_tau(fn, tau);
  return parse_fn_mode(fn, fn_mode);
}

// contrastive_bwd: the forward's inputs plus grad_lse (N,), grad_stats (N, 5) and lse (N,). Returns the fn_mode.
inline int check_contrastive_bwd_inputs(const char* fn, const at::Tensor& grad_lse, const at::Tensor& grad_stats,
                                        const at::Tensor& z, const at::Tensor& zc, const at::Tensor& inst,
                                        const at::Tensor& instc, const at::Tensor& proto, const at::Tensor& protoc,
                                        const at::Tensor& lse, int64_t row_offset, double tau,
                                        c10::string_view fn_mode) {
  const int mode = check_contrastive_inputs(fn, z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode);
  const int64_t N = z.size(0);
  check_stat(fn, grad_lse, "grad_lse", {N}, z);
  check_stat(fn, grad_stats, "grad_stats", {N, 5}, z);
  check_stat(fn, lse, "lse", {N}, z);
  return mode;
}

// `out` in the dtype and layout the fake implementations promise (empty_like(like)); no copy when it already is.
inline at::Tensor to_like(const at::Tensor& out, const at::Tensor& like) {
  if (out.scalar_type() == like.scalar_type() && like.is_contiguous() && out.sizes() == like.sizes()) return out;
  return at::empty_like(like).copy_(out.view(like.sizes()));
}

}  // namespace protoclr
