// Device-only helpers of the CUDA ops (csrc/cuda): compile-time switches in the style of flash-attention's
// static_switch.h, element conversions, warp reductions, and thin wrappers over the sm_80+ PTX the kernels
// use (cp.async, ldmatrix, mma.sync). Kernel translation units include only this header, <cuda_runtime.h>,
// the fp16/bf16 headers and protoclr/math.h: ATen stays in csrc/cuda/ops_cuda.cu, so the kernel files
// compile quickly.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace protoclr {
namespace cuda {

// Element type of the feature tensors, filled in by the host from at::ScalarType.
enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

}  // namespace cuda
}  // namespace protoclr

// Runtime flag -> compile-time constant: PROTOCLR_BOOL_SWITCH(p.mask, kMask, [&] { run<kMask>(p); });
#define PROTOCLR_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                       \
    if (COND) {                               \
      constexpr static bool NAME = true;      \
      return __VA_ARGS__();                   \
    } else {                                  \
      constexpr static bool NAME = false;     \
      return __VA_ARGS__();                   \
    }                                         \
  }()

// Runtime DType -> element type T (device types __half / __nv_bfloat16 / float / double).
#define PROTOCLR_DTYPE_SWITCH(DT, T, ...)                           \
  [&] {                                                             \
    switch (DT) {                                                   \
      case ::protoclr::cuda::DType::kHalf: {                        \
        using T = __half;                                           \
        return __VA_ARGS__();                                       \
      }                                                             \
      case ::protoclr::cuda::DType::kBFloat16: {                    \
        using T = __nv_bfloat16;                                    \
        return __VA_ARGS__();                                       \
      }                                                             \
      case ::protoclr::cuda::DType::kFloat: {                       \
        using T = float;                                            \
        return __VA_ARGS__();                                       \
      }                                                             \
      default: {                                                    \
        using T = double;                                           \
        return __VA_ARGS__();                                       \
      }                                                             \
    }                                                               \
  }()

namespace protoclr {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ------------------------------------------------------------------------------------ conversions
// Accumulator type: double for double inputs, float otherwise (SPEC §3: fp32 accumulation).
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> x);
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}

// Two fp32 values as one 32-bit mma operand register of T (the lower k index in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// -------------------------------------------------------------------------------- warp reductions
template <typename A>
__device__ __forceinline__ A shfl_xor(A v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

// Sum over the `width` consecutive lanes of an aligned lane group (width a power of two <= 32).
template <int WIDTH, typename A>
__device__ __forceinline__ A group_sum(A v) {
#pragma unroll
  for (int m = WIDTH / 2; m >= 1; m >>= 1) v += shfl_xor(v, m);
  return v;
}

template <int WIDTH>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int m = WIDTH / 2; m >= 1; m >>= 1) v = fmaxf(v, shfl_xor(v, m));
  return v;
}

// 2^x, MUFU.EX2 (relative error ~2^-22; -inf -> +0, no NaN for finite or -inf input).
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ------------------------------------------------------------------------------- memory helpers
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; bytes past src_bytes (0 or 16) are zero-filled. src must be a valid
// address even when src_bytes is 0.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// 32-bit shared load kept in program order with the surrounding mma.sync (both volatile asm), so the
// compiler does not hoist a whole tile of operands into registers ahead of their use.
__device__ __forceinline__ uint32_t lds32(const void* p) {
  uint32_t v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(smem_addr(p)));
  return v;
}

// Four 8x8 b16 matrices (lanes 8q..8q+7 give the row addresses of matrix q).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// ------------------------------------------------------------------------------ tensor-core MMA
// D += A·B with fp32 accumulators on one m16n8 tile. Fragment layouts (PTX ISA, mma.m16n8k16 / m16n8k8):
// g = lane / 4, t = lane % 4; C: c0,c1 = (row g, cols 2t, 2t+1), c2,c3 = (row g+8, same cols).
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                          __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_1688_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t to_tf32(uint32_t bits) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(__uint_as_float(bits)));
  return r;
}

// 3xTF32 split of an fp32 operand: x ≈ hi + lo with both parts exact in tf32 (≈ fp32 accuracy products).
__device__ __forceinline__ void split_tf32(uint32_t x, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(x);
  lo = to_tf32(__float_as_uint(__uint_as_float(x) - __uint_as_float(hi)));
}

// A operand of one k-step of 32 bytes per row for element type T: m16n8k16 for 16-bit types; for float the
// hi/lo parts of three m16n8k8 tf32 MMAs (3xTF32: hi·hi + hi·lo + lo·hi), so that fp32 inputs keep ~fp32
// accuracy on the tensor cores.
template <typename T>
struct Mma {
  // A fragment of one k-step in the form consumed by `run` (for float: hi and lo parts).
  struct AFrag {
    uint32_t x[4];
  };
  __device__ __forceinline__ static void prep_a(const uint32_t (&raw)[4], AFrag& f) {
#pragma unroll
    for (int q = 0; q < 4; ++q) f.x[q] = raw[q];
  }
  __device__ __forceinline__ static void run(float (&c)[4], const AFrag& a, uint32_t b0, uint32_t b1) {
    mma_16816(c, a.x, b0, b1, T());
  }
};

template <>
struct Mma<float> {
  struct AFrag {
    uint32_t hi[4], lo[4];
  };
  __device__ __forceinline__ static void prep_a(const uint32_t (&raw)[4], AFrag& f) {
#pragma unroll
    for (int q = 0; q < 4; ++q) split_tf32(raw[q], f.hi[q], f.lo[q]);
  }
  // (the B side and the three MMAs: BFrag<float> in csrc/cuda/contrastive_common.cuh)
};

}  // namespace cuda
}  // namespace protoclr
