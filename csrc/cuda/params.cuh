// Host/device interface of the CUDA ops (flash-attention's flash.h split): csrc/cuda/ops_cuda.cu validates
// the tensors, takes the device guard and the current stream, fills one of these plain structs and calls a
// launcher; the kernels in assign.cu / contrastive.cu / siamese.cu never see an at::Tensor.
//
// Conventions: every tensor is contiguous; feature pointers have the element type `dtype`; statistics,
// scores and gradients of the statistics have the accumulator type (double for kDouble, float otherwise);
// sizes and offsets are int64_t.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "protoclr/cuda_utils.cuh"

namespace protoclr {
namespace cuda {

// SPEC 1.4: idx_m = argmax_k x_m·c_k + bias_k (lowest k on ties, NaN never wins), score_m the maximum.
struct AssignParams {
  const void* x;          // (M, D) dtype
  const void* c;          // (K, D) dtype
  const void* bias;       // (K,) accumulator type, or nullptr
  int64_t* idx;           // (M,)
  void* score;            // (M,) accumulator type
  int64_t m, k, d;
  DType dtype;
};

// SPEC 1.1 building block (csrc/ops.cpp, contrastive_fwd / contrastive_bwd).
struct ContrastiveParams {
  const void* z;          // (N, D) rows
  const void* zc;         // (Nc, D) columns
  const int64_t* inst;    // (N,)
  const int64_t* instc;   // (Nc,)
  const int64_t* proto;   // (N,)
  const int64_t* protoc;  // (Nc,)
  int64_t n, nc, d, row_offset;
  double tau;
  bool mask;              // fn_mode == "mask" (Den = A \ F); "none" and "attract" share the kernels
  DType dtype;
  // forward outputs (accumulator type)
  void* lse;              // (N,)
  void* stats;            // (N, 5)
  // backward inputs (accumulator type) and outputs (dtype)
  const void* grad_lse;   // (N,)
  const void* grad_stats; // (N, 5)
  const void* lse_in;     // (N,)
  void* dz;               // (N, D)   zero-initialised by the host on the SIMT path
  void* dzc;              // (Nc, D)  zero-initialised by the host on the SIMT path
  float* g_scale;         // fp16 only: one float of scratch for the backward's G scaling (else nullptr)
};

// SPEC 1.2 dense building block (csrc/ops.cpp, siamese_fwd / siamese_bwd).
struct SiameseParams {
  const void* h;          // (N, D)
  const void* hc;         // (Nc, D)
  const int64_t* inst;
  const int64_t* instc;
  const int64_t* proto;
  const int64_t* protoc;
  const void* weight;     // (D,) accumulator type
  const void* bias;       // (1,) accumulator type (read on the device: no host sync)
  int64_t n, nc, d, row_offset;
  DType dtype;
  // forward outputs (accumulator type)
  void* loss;             // (N, 2)
  void* count;            // (N, 2)
  // backward
  const void* grad_loss;  // (N, 2) accumulator type
  void* dh_acc;           // (N, D) accumulator type, zero-initialised (the dh output itself for float/double)
  void* dhc_acc;          // (Nc, D) accumulator type, zero-initialised
  void* dh;               // (N, D) dtype (== dh_acc for float/double)
  void* dhc;              // (Nc, D) dtype
  void* dw_part;          // (siamese_bwd_partials(p), D) accumulator type, zero-initialised
  void* db_part;          // (siamese_bwd_partials(p),) accumulator type, zero-initialised
  void* dweight;          // (D,) accumulator type
  void* dbias;            // (1,) accumulator type
};

void assign_launch(const AssignParams& p, cudaStream_t stream);

// True when the forward/backward run on the tensor cores for these sizes (otherwise the SIMT kernels, which
// take float or double only: the host then passes float32 copies of 16-bit inputs and zeroed outputs).
bool contrastive_uses_mma(DType dtype, int64_t d);
void contrastive_fwd_launch(const ContrastiveParams& p, cudaStream_t stream);
void contrastive_bwd_launch(const ContrastiveParams& p, cudaStream_t stream);

// Rows of the deterministic per-CTA partial sums of dweight / dbias.
int64_t siamese_bwd_partials(const SiameseParams& p);
void siamese_fwd_launch(const SiameseParams& p, cudaStream_t stream);
void siamese_bwd_launch(const SiameseParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace protoclr
