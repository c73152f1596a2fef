// The CUDA implementations of the protoclr ops (schemas and semantics: csrc/ops.cpp). This file does all the
// host work, as flash-attention's flash_api.cpp: argument checks (the same ValueErrors as csrc/cpu, naming the
// argument), the device guard, contiguous copies and dtype conversions, output allocation, then fills a
// params struct (params.cuh) and calls a launcher on the current stream. It is the only CUDA translation unit
// that includes ATen; the kernels live in assign.cu, contrastive.cu, contrastive_bwd.cu and siamese.cu.
// Host code only: nvcc's device pass skips the ATen headers entirely (minutes of CI compile time saved).
#ifndef __CUDA_ARCH__

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>

#include "params.cuh"
#include "protoclr/checks.h"
#include "protoclr/math.h"

namespace protoclr {
namespace {

cuda::DType device_dtype(const char* fn, const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kHalf:
      return cuda::DType::kHalf;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    case at::kFloat:
      return cuda::DType::kFloat;
    case at::kDouble:
      return cuda::DType::kDouble;
    default:
      PROTOCLR_CHECK(fn, false, name, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  }
  return cuda::DType::kFloat;  // unreachable
}

// What only the CUDA kernels need beyond checks.h: a CUDA tensor of a supported dtype.
void check_cuda_rows(const char* fn, const at::Tensor& x, const char* xn) {
  PROTOCLR_CHECK(fn, x.is_cuda(), xn, " must be a CUDA tensor, got ", x.device());
  device_dtype(fn, x, xn);
}

// check_rows_cols (checks.h) plus check_cuda_rows.
void check_pair_inputs(const char* fn, const char* xn, const char* xcn, const at::Tensor& x, const at::Tensor& xc,
                       const at::Tensor& inst, const at::Tensor& instc, const at::Tensor& proto,
                       const at::Tensor& protoc, int64_t row_offset) {
  check_rows_cols(fn, xn, xcn, x, xc, inst, instc, proto, protoc, row_offset);
  check_cuda_rows(fn, x, xn);
}

// ------------------------------------------------------------------------------------------- assign

std::tuple<at::Tensor, at::Tensor> assign_cuda(const at::Tensor& x, const at::Tensor& prototypes,
                                               const std::optional<at::Tensor>& bias) {
  constexpr const char* fn = "assign";
  check_assign_inputs(fn, x, prototypes, bias);
  const cuda::DType dtype = device_dtype(fn, x, "x");
  const auto acc = stat_dtype(x.scalar_type());
  at::Tensor b;
  if (bias.has_value()) {
    b = bias->to(acc).contiguous();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous(), cc = prototypes.contiguous();
  const int64_t M = x.size(0);
  auto idx = at::empty({M}, x.options().dtype(at::kLong));
  auto score = at::empty({M}, x.options().dtype(acc));
  cuda::AssignParams p{};
  p.x = xc.data_ptr();
  p.c = cc.data_ptr();
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.idx = idx.data_ptr<int64_t>();
  p.score = score.data_ptr();
  p.m = M;
  p.k = prototypes.size(0);
  p.d = x.size(1);
  p.dtype = dtype;
  cuda::assign_launch(p, at::cuda::getCurrentCUDAStream());
  return {idx, score};
}

// ------------------------------------------------------------------------------------- contrastive

struct ContrastiveInputs {
  at::Tensor z, zc, inst, instc, proto, protoc;
  cuda::DType dtype;
};

// Contiguous inputs in the dtype the kernels take: the tensor-core path takes fp16/bf16/fp32, the SIMT path
// (double, or D > 128) float/double, so 16-bit inputs with D > 128 run on float32 copies.
ContrastiveInputs prepare_contrastive(const at::Tensor& z, const at::Tensor& zc, const at::Tensor& inst,
                                      const at::Tensor& instc, const at::Tensor& proto, const at::Tensor& protoc) {
  ContrastiveInputs in;
  in.dtype = device_dtype("contrastive", z, "z");
  in.z = z.contiguous();
  in.zc = zc.is_same(z) ? in.z : zc.contiguous();
  const bool half = in.dtype == cuda::DType::kHalf || in.dtype == cuda::DType::kBFloat16;
  if (half && !cuda::contrastive_uses_mma(in.dtype, z.size(1))) {
    in.z = in.z.to(at::kFloat);
    in.zc = zc.is_same(z) ? in.z : in.zc.to(at::kFloat);
    in.dtype = cuda::DType::kFloat;
  }
  in.inst = inst.contiguous();
  in.instc = instc.contiguous();
  in.proto = proto.contiguous();
  in.protoc = protoc.contiguous();
  return in;
}

cuda::ContrastiveParams contrastive_params(const ContrastiveInputs& in, int64_t row_offset, double tau,
                                           int fn_mode) {
  cuda::ContrastiveParams p{};
  p.z = in.z.data_ptr();
  p.zc = in.zc.data_ptr();
  p.inst = in.inst.data_ptr<int64_t>();
  p.instc = in.instc.data_ptr<int64_t>();
  p.proto = in.proto.data_ptr<int64_t>();
  p.protoc = in.protoc.data_ptr<int64_t>();
  p.n = in.z.size(0);
  p.nc = in.zc.size(0);
  p.d = in.z.size(1);
  p.row_offset = row_offset;
  p.tau = tau;
  p.mask = fn_mode == kFnMask;
  p.dtype = in.dtype;
  return p;
}

std::tuple<at::Tensor, at::Tensor> contrastive_fwd_cuda(const at::Tensor& z, const at::Tensor& zc,
                                                        const at::Tensor& inst, const at::Tensor& instc,
                                                        const at::Tensor& proto, const at::Tensor& protoc,
                                                        int64_t row_offset, double tau, c10::string_view fn_mode) {
  constexpr const char* fn = "contrastive_fwd";
  const int mode = check_contrastive_inputs(fn, z, zc, inst, instc, proto, protoc, row_offset, tau, fn_mode);
  check_cuda_rows(fn, z, "z");
  const c10::cuda::CUDAGuard guard(z.device());
  const auto acc = stat_dtype(z.scalar_type());
  const int64_t N = z.size(0), Nc = zc.size(0);
  auto lse = at::empty({N}, z.options().dtype(acc));
  auto stats = at::empty({N, 5}, z.options().dtype(acc));
  if (N == 0) return {lse, stats};
  if (Nc == 0) {  // every set is empty
    lse.fill_(-std::numeric_limits<double>::infinity());
    stats.zero_();
    return {lse, stats};
  }
  const auto in = prepare_contrastive(z, zc, inst, instc, proto, protoc);
  auto p = contrastive_params(in, row_offset, tau, mode);
  p.lse = lse.data_ptr();
  p.stats = stats.data_ptr();
  cuda::contrastive_fwd_launch(p, at::cuda::getCurrentCUDAStream());
  return {lse, stats};
}

std::tuple<at::Tensor, at::Tensor> contrastive_bwd_cuda(const at::Tensor& grad_lse, const at::Tensor& grad_stats,
                                                        const at::Tensor& z, const at::Tensor& zc,
                                                        const at::Tensor& inst, const at::Tensor& instc,
                                                        const at::Tensor& proto, const at::Tensor& protoc,
                                                        const at::Tensor& lse, int64_t row_offset, double tau,
                                                        c10::string_view fn_mode) {
  constexpr const char* fn = "contrastive_bwd";
  const int mode = check_contrastive_bwd_inputs(fn, grad_lse, grad_stats, z, zc, inst, instc, proto, protoc, lse,
                                                row_offset, tau, fn_mode);
  check_cuda_rows(fn, z, "z");
  const int64_t N = z.size(0), Nc = zc.size(0), D = z.size(1);
  const c10::cuda::CUDAGuard guard(z.device());
  if (N == 0 || Nc == 0) return {at::zeros_like(z), at::zeros_like(zc)};
  const auto acc = stat_dtype(z.scalar_type());
  const auto gl = grad_lse.to(acc).contiguous(), gs = grad_stats.to(acc).contiguous();
  const auto lse_a = lse.to(acc).contiguous();
  const auto in = prepare_contrastive(z, zc, inst, instc, proto, protoc);
  auto p = contrastive_params(in, row_offset, tau, mode);
  p.grad_lse = gl.data_ptr();
  p.grad_stats = gs.data_ptr();
  p.lse_in = lse_a.data_ptr();
  at::Tensor dz, dzc, g_scale;
  if (cuda::contrastive_uses_mma(in.dtype, D)) {  // every element is written once by its owning CTA
    dz = at::empty({N, D}, in.z.options());
    dzc = at::empty({Nc, D}, in.zc.options());
    if (in.dtype == cuda::DType::kHalf) {
      g_scale = at::empty({1}, z.options().dtype(at::kFloat));
      p.g_scale = g_scale.data_ptr<float>();
    }
  } else {  // read-modify-write accumulation in the kernels' dtype (float / double)
    dz = at::zeros({N, D}, in.z.options());
    dzc = at::zeros({Nc, D}, in.zc.options());
  }
  p.dz = dz.data_ptr();
  p.dzc = dzc.data_ptr();
  cuda::contrastive_bwd_launch(p, at::cuda::getCurrentCUDAStream());
  return {to_like(dz, z), to_like(dzc, zc)};
}


struct SiameseInputs {
  at::Tensor h, hc, inst, instc, proto, protoc, weight, bias;
};

SiameseInputs prepare_siamese(const at::Tensor& h, const at::Tensor& hc, const at::Tensor& inst,
                              const at::Tensor& instc, const at::Tensor& proto, const at::Tensor& protoc,
                              const at::Tensor& weight, const at::Tensor& bias) {
  const auto acc = stat_dtype(h.scalar_type());
  SiameseInputs in;
  in.h = h.contiguous();
  in.hc = hc.is_same(h) ? in.h : hc.contiguous();
  in.inst = inst.contiguous();
  in.instc = instc.contiguous();
  in.proto = proto.contiguous();
  in.protoc = protoc.contiguous();
  in.weight = weight.to(acc).contiguous();
  in.bias = bias.to(acc).contiguous();
  return in;
}

cuda::SiameseParams siamese_params(const SiameseInputs& in, int64_t row_offset) {
  cuda::SiameseParams p{};
  p.h = in.h.data_ptr();
  p.hc = in.hc.data_ptr();
  p.inst = in.inst.data_ptr<int64_t>();
  p.instc = in.instc.data_ptr<int64_t>();
  p.proto = in.proto.data_ptr<int64_t>();
  p.protoc = in.protoc.data_ptr<int64_t>();
  p.weight = in.weight.data_ptr();
  p.bias = in.bias.data_ptr();
  p.n = in.h.size(0);
  p.nc = in.hc.size(0);
  p.d = in.h.size(1);
  p.row_offset = row_offset;
  p.dtype = device_dtype("siamese", in.h, "h");
  return p;
}

std::tuple<at::Tensor, at::Tensor> siamese_fwd_cuda(const at::Tensor& h, const at::Tensor& hc,
                                                    const at::Tensor& inst, const at::Tensor& instc,
                                                    const at::Tensor& proto, const at::Tensor& protoc,
                                                    const at::Tensor& weight, const at::Tensor& bias,
                                                    int64_t row_offset) {
  constexpr const char* fn = "siamese_fwd";
  check_pair_inputs(fn, "h", "hc", h, hc, inst, instc, proto, protoc, row_offset);
  check_head(fn, h, weight, bias);
  const c10::cuda::CUDAGuard guard(h.device());
  const auto acc = stat_dtype(h.scalar_type());
  const int64_t N = h.size(0);
  auto loss = at::zeros({N, 2}, h.options().dtype(acc));
  auto count = at::zeros({N, 2}, h.options().dtype(acc));
  if (N == 0 || hc.size(0) == 0) return {loss, count};
  const auto in = prepare_siamese(h, hc, inst, instc, proto, protoc, weight, bias);
  auto p = siamese_params(in, row_offset);
  p.loss = loss.data_ptr();
  p.count = count.data_ptr();
  cuda::siamese_fwd_launch(p, at::cuda::getCurrentCUDAStream());
  return {loss, count};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> siamese_bwd_cuda(
    const at::Tensor& grad_loss, const at::Tensor& h, const at::Tensor& hc, const at::Tensor& inst,
    const at::Tensor& instc, const at::Tensor& proto, const at::Tensor& protoc, const at::Tensor& weight,
    const at::Tensor& bias, int64_t row_offset) {
  constexpr const char* fn = "siamese_bwd";
  check_pair_inputs(fn, "h", "hc", h, hc, inst, instc, proto, protoc, row_offset);
  check_head(fn, h, weight, bias);
  const int64_t N = h.size(0), Nc = hc.size(0), D = h.size(1);
  check_stat(fn, grad_loss, "grad_loss", {N, 2}, h);
  const c10::cuda::CUDAGuard guard(h.device());
  const auto acc = stat_dtype(h.scalar_type());
  const auto in = prepare_siamese(h, hc, inst, instc, proto, protoc, weight, bias);
  const auto gl = grad_loss.to(acc).contiguous();
  auto p = siamese_params(in, row_offset);
  p.grad_loss = gl.data_ptr();
  const auto acc_opts = h.options().dtype(acc);
  const bool same = h.scalar_type() == acc;  // float / double: accumulate in the outputs themselves
  auto dh_acc = at::zeros({N, D}, acc_opts), dhc_acc = at::zeros({Nc, D}, acc_opts);
  auto dh = same ? dh_acc : at::empty({N, D}, h.options());
  auto dhc = same ? dhc_acc : at::empty({Nc, D}, hc.options());
  auto dw_part = at::zeros({cuda::siamese_bwd_partials(p), D}, acc_opts);
  auto db_part = at::zeros({cuda::siamese_bwd_partials(p)}, acc_opts);
  auto dweight = at::empty({D}, acc_opts), dbias = at::empty({1}, acc_opts);
  p.dh_acc = dh_acc.data_ptr();
  p.dhc_acc = dhc_acc.data_ptr();
  p.dh = dh.data_ptr();
  p.dhc = dhc.data_ptr();
  p.dw_part = dw_part.data_ptr();
  p.db_part = db_part.data_ptr();
  p.dweight = dweight.data_ptr();
  p.dbias = dbias.data_ptr();
  cuda::siamese_bwd_launch(p, at::cuda::getCurrentCUDAStream());
  return {to_like(dh, h), to_like(dhc, hc), at::empty_like(weight).copy_(dweight), at::empty_like(bias).copy_(dbias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(protoclr, CUDA, m) {
  m.impl("assign", &assign_cuda);
  m.impl("contrastive_fwd", &contrastive_fwd_cuda);
  m.impl("contrastive_bwd", &contrastive_bwd_cuda);
  m.impl("siamese_fwd", &siamese_fwd_cuda);
  m.impl("siamese_bwd", &siamese_bwd_cuda);
}

}  // namespace protoclr

#endif  // __CUDA_ARCH__
