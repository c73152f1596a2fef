// SPEC 1.1 on the GPU, forward: lse_i = logsumexp_{j in Den(i)} c_ij / tau and
// stats_i = [Σ_P c, |P|, Σ_F c, |F|, Σ_A c] with c_ij = z_i · zc_j (csrc/ops.cpp). Backward: contrastive_bwd.cu.
//
// Design (flash-attention forward without the P·V product). A CTA owns 128 rows (8 warps × 16) staged once
// in shared memory and streams the columns in tiles of 64 through a two-stage cp.async pipeline (column
// labels staged beside them). Each warp computes its 16 × 64 similarity tile on the tensor cores
// (mma.sync m16n8k16 bf16/fp16, or 3xTF32 m16n8k8 for fp32; fp32 accumulators), then applies the membership
// masks in registers: per-row running max (base-2, log2(e)/tau folded into one multiply) and rescaled sum
// for the log-sum-exp, and the five statistics. The four lanes sharing a row agree on the running max each
// tile (two shuffles) so that their partial sums only meet once, at the end. No N × Nc buffer exists;
// outputs are O(N). double inputs, and D > 128, take the SIMT kernel (exact FMAs, any D; 16-bit inputs with
// D > 128 run it on float32 copies). Membership counts and sums use predicated adds: selects feeding adds made
// ptxas stage five values per element and spill.
#include "contrastive_common.cuh"

namespace protoclr {
namespace cuda {
namespace contrastive {
namespace {

constexpr int kFwdThreads = 256;  // 8 warps × 16 rows: the masking epilogue, not the MMA, bounds the time,
                                  // and one m-fragment per warp keeps it spill-free at 128 registers

template <typename T, int DB>
constexpr int fwd_smem_bytes() {
  return (kOwnRows + 2 * kCols) * Geom<T, DB>::kRowBytes + 2 * 2 * kCols * static_cast<int>(sizeof(int64_t));
}

template <typename T, int DB, bool kMask>
__global__ void __launch_bounds__(kFwdThreads, 2) contrastive_fwd_mma_kernel(const ContrastiveParams p) {
  using G = Geom<T, DB>;
  constexpr int MF = 1, NF = kCols / 8, R = 2 * MF;  // R rows per thread
  extern __shared__ __align__(16) char smem[];
  char* s_rows = smem;
  char* s_cols = s_rows + kOwnRows * G::kRowBytes;
  int64_t* s_lab = reinterpret_cast<int64_t*>(s_cols + 2 * kCols * G::kRowBytes);  // [stage][inst|proto][kCols]

  const T* z = static_cast<const T*>(p.z);
  const T* zc = static_cast<const T*>(p.zc);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tq = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kOwnRows;
  const bool vec = vec16_ok(z, p.d) && vec16_ok(zc, p.d);
  const float scale_log2 = static_cast<float>(1.4426950408889634 / p.tau);

  load_tile<T, DB, kOwnRows, kFwdThreads>(s_rows, z, row0, p.n, p.d, vec, tid);
  auto load_stage = [&](int64_t t) {
    const int st = static_cast<int>(t & 1);
    const int64_t n0 = t * kCols;
    load_tile<T, DB, kCols, kFwdThreads>(s_cols + st * kCols * G::kRowBytes, zc, n0, p.nc, p.d, vec, tid);
    if (tid < kCols) {
      const int64_t j = n0 + tid;
      const bool ok = j < p.nc;
      s_lab[st * 2 * kCols + tid] = ok ? p.instc[j] : 0;
      s_lab[st * 2 * kCols + kCols + tid] = ok ? p.protoc[j] : -1;  // never equals a proto_i >= 0
    }
  };
  load_stage(0);
  cp_async_commit();

  // Row r = 2 mf + h of this thread is local row 16 MF warp + 16 mf + 8 h + g (the C-fragment rows).
  int64_t inst_i[R], proto_i[R];
  bool fok[R];
  float m[R], s[R], sum_p[R], sum_f[R], sum_a[R];
  int cnt_p[R], cnt_f[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t i = row0 + warp * 16 * MF + (r >> 1) * 16 + (r & 1) * 8 + g;
    const bool ok = i < p.n;
    inst_i[r] = ok ? p.inst[i] : 0;
    proto_i[r] = ok ? p.proto[i] : -1;
    fok[r] = proto_i[r] >= 0;
    m[r] = -INFINITY;
    s[r] = sum_p[r] = sum_f[r] = sum_a[r] = 0.f;
    cnt_p[r] = cnt_f[r] = 0;
  }

  const int64_t ntiles = (p.nc + kCols - 1) / kCols;
  for (int64_t t = 0; t < ntiles; ++t) {
    if (t + 1 < ntiles) {
      load_stage(t + 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int st = static_cast<int>(t & 1);
    float acc[MF][NF][4];
#pragma unroll
    for (int mf = 0; mf < MF; ++mf)
#pragma unroll
      for (int nf = 0; nf < NF; ++nf)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mf][nf][q] = 0.f;
    gemm_xyt<T, DB, MF, NF>(acc, s_rows + warp * 16 * MF * G::kRowBytes, s_cols + st * kCols * G::kRowBytes,
                            lane);

    const int64_t n0 = t * kCols;
    const int nvalid = static_cast<int>(min(static_cast<int64_t>(kCols), p.nc - n0));
    int diag[R];  // local column of the row itself (j with gj == gi), or -1
    const int64_t diag0 = p.row_offset + row0 + warp * 16 * MF + g - n0;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t dd = diag0 + (r >> 1) * 16 + (r & 1) * 8;
      diag[r] = (dd >= 0 && dd < kCols) ? static_cast<int>(dd) : -1;
    }
    const int64_t* lab_inst = s_lab + st * 2 * kCols;
    const int64_t* lab_proto = lab_inst + kCols;
    float rmax[R];
#pragma unroll
    for (int r = 0; r < R; ++r) rmax[r] = -INFINITY;
    // Column-outer: each column's labels are read from shared memory once for the thread's R rows.
#pragma unroll
    for (int nf = 0; nf < NF; ++nf) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = nf * 8 + 2 * tq + e;
        const int64_t inst_j = lab_inst[col], proto_j = lab_proto[col];
        const bool valid = col < nvalid;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          float& c = acc[r >> 1][nf][(r & 1) * 2 + e];
          const bool same = inst_j == inst_i[r];
          const bool in_a = valid && col != diag[r];
          const bool in_p = in_a && same;
          const bool in_f = fok[r] && !same && proto_j == proto_i[r];
          const bool den = kMask ? (in_a && !in_f) : in_a;
          // predicated adds (not selects feeding adds): keeps ptxas from staging 5 values per element
          if (in_a) sum_a[r] += c;
          if (in_p) {
            sum_p[r] += c;
            cnt_p[r] += 1;
          }
          if (in_f) {
            sum_f[r] += c;
            cnt_f[r] += 1;
          }
          const float v = den ? c * scale_log2 : -INFINITY;
          rmax[r] = fmaxf(rmax[r], v);
          c = v;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float mnew = fmaxf(m[r], group_max<4>(rmax[r]));
      if (mnew == -INFINITY) continue;  // Den(i) has had no column yet: (m, s) stays (-inf, 0)
      float add = 0.f;
#pragma unroll
      for (int nf = 0; nf < NF; ++nf)
#pragma unroll
        for (int e = 0; e < 2; ++e) add += fast_exp2(acc[r >> 1][nf][(r & 1) * 2 + e] - mnew);
      s[r] = s[r] * fast_exp2(m[r] - mnew) + add;
      m[r] = mnew;
    }
    __syncthreads();  // the next iteration's prefetch overwrites this stage
  }

  float* lse = static_cast<float*>(p.lse);
  float* stats = static_cast<float*>(p.stats);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float sr = group_sum<4>(s[r]);
    const float v[5] = {group_sum<4>(sum_p[r]), static_cast<float>(group_sum<4>(cnt_p[r])), group_sum<4>(sum_f[r]),
                        static_cast<float>(group_sum<4>(cnt_f[r])), group_sum<4>(sum_a[r])};
    const int64_t i = row0 + warp * 16 * MF + (r >> 1) * 16 + (r & 1) * 8 + g;
    if (tq == 0 && i < p.n) {
      lse[i] = sr > 0.f ? (m[r] + log2f(sr)) * kLn2 : -INFINITY;
#pragma unroll
      for (int k = 0; k < 5; ++k) stats[i * 5 + k] = v[k];
    }
  }
}

// SIMT forward (float / double inputs, any D): same statistics with exact FMAs and libm exp/log.
template <typename A, bool kMask>
__global__ void __launch_bounds__(256, 1) contrastive_fwd_simt_kernel(const ContrastiveParams p) {
  __shared__ A xs[kSimtChunk * kSimtLd];
  __shared__ A ys[kSimtChunk * kSimtLd];
  const A* z = static_cast<const A*>(p.z);
  const A* zc = static_cast<const A*>(p.zc);
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kSimtTile;
  const A inv_tau = static_cast<A>(1.0 / p.tau);

  int64_t gi[4], inst_i[4], proto_i[4];
  OnlineLse<A> st[4];
  A acc_s[4][5];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int64_t i = row0 + ty + 16 * a;
    const bool ok = i < p.n;
    gi[a] = p.row_offset + i;
    inst_i[a] = ok ? p.inst[i] : 0;
    proto_i[a] = ok ? p.proto[i] : -1;
    st[a] = online_lse_init<A>();
#pragma unroll
    for (int k = 0; k < 5; ++k) acc_s[a][k] = A(0);
  }
  for (int64_t n0 = 0; n0 < p.nc; n0 += kSimtTile) {
    A c[4][4];
    simt_gemm(c, xs, ys, z, row0, p.n, zc, n0, p.nc, p.d, tid);
    int64_t inst_j[4], proto_j[4], gj[4];
    bool valid[4];
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      gj[b] = n0 + tx + 16 * b;
      valid[b] = gj[b] < p.nc;
      inst_j[b] = valid[b] ? p.instc[gj[b]] : 0;
      proto_j[b] = valid[b] ? p.protoc[gj[b]] : 0;
    }
#pragma unroll
    for (int a = 0; a < 4; ++a) {
      A x[4], mx = neg_inf<A>();
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const bool in_a = valid[b] && in_all(gi[a], gj[b]);
        const bool in_p = valid[b] && in_pos(gi[a], gj[b], inst_i[a], inst_j[b]);
        const bool in_f = valid[b] && in_false_neg(inst_i[a], inst_j[b], proto_i[a], proto_j[b]);
        const bool den = kMask ? (in_a && !in_f) : in_a;
        acc_s[a][0] += in_p ? c[a][b] : A(0);
        acc_s[a][1] += in_p ? A(1) : A(0);
        acc_s[a][2] += in_f ? c[a][b] : A(0);
        acc_s[a][3] += in_f ? A(1) : A(0);
        acc_s[a][4] += in_a ? c[a][b] : A(0);
        x[b] = den ? c[a][b] * inv_tau : neg_inf<A>();
        mx = x[b] > mx ? x[b] : mx;
      }
      if (mx > neg_inf<A>()) {
        A sum = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) sum += pc_exp(x[b] - mx);
        online_lse_merge(st[a], mx, sum);
      }
    }
  }
  A* lse = static_cast<A*>(p.lse);
  A* stats = static_cast<A*>(p.stats);
#pragma unroll
  for (int a = 0; a < 4; ++a) {
#pragma unroll
    for (int msk = 8; msk >= 1; msk >>= 1) {
      OnlineLse<A> o{shfl_xor(st[a].m, msk), shfl_xor(st[a].s, msk)};
      online_lse_merge(st[a], o);
#pragma unroll
      for (int k = 0; k < 5; ++k) acc_s[a][k] += shfl_xor(acc_s[a][k], msk);
    }
    const int64_t i = row0 + ty + 16 * a;
    if (tx == 0 && i < p.n) {
      lse[i] = online_lse_finish(st[a]);
#pragma unroll
      for (int k = 0; k < 5; ++k) stats[i * 5 + k] = acc_s[a][k];
    }
  }
}

template <typename T, int DB>
void launch_fwd_mma(const ContrastiveParams& p, cudaStream_t stream) {
  constexpr int smem = fwd_smem_bytes<T, DB>();
  const dim3 grid(static_cast<unsigned>((p.n + kOwnRows - 1) / kOwnRows));
  PROTOCLR_BOOL_SWITCH(p.mask, kMask, [&] {
    auto kernel = contrastive_fwd_mma_kernel<T, DB, kMask>;
    set_smem(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<grid, kFwdThreads, smem, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename A>
void launch_fwd_simt(const ContrastiveParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((p.n + kSimtTile - 1) / kSimtTile));
  PROTOCLR_BOOL_SWITCH(p.mask, kMask, [&] {
    contrastive_fwd_simt_kernel<A, kMask><<<grid, 256, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace contrastive

bool contrastive_uses_mma(DType dtype, int64_t d) { return dtype != DType::kDouble && d <= 128; }

void contrastive_fwd_launch(const ContrastiveParams& p, cudaStream_t stream) {
  using namespace contrastive;
  if (p.n == 0 || p.nc == 0) return;  // the host fills the empty-set results
  if (!contrastive_uses_mma(p.dtype, p.d)) {
    if (p.dtype == DType::kDouble)
      launch_fwd_simt<double>(p, stream);
    else
      launch_fwd_simt<float>(p, stream);  // the host passes float32 copies of 16-bit inputs
    return;
  }
  switch (p.dtype) {
    case DType::kHalf:
      return p.d <= 64 ? launch_fwd_mma<__half, 64>(p, stream) : launch_fwd_mma<__half, 128>(p, stream);
    case DType::kBFloat16:
      return p.d <= 64 ? launch_fwd_mma<__nv_bfloat16, 64>(p, stream)
                       : launch_fwd_mma<__nv_bfloat16, 128>(p, stream);
    default:
      return p.d <= 64 ? launch_fwd_mma<float, 64>(p, stream) : launch_fwd_mma<float, 128>(p, stream);
  }
}

}  // namespace cuda
}  // namespace protoclr
