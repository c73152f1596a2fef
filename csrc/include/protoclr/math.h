// Scalar math shared by the CPU (csrc/cpu) and CUDA (csrc/cuda) kernels: pair membership of SPEC 1.1/1.2,
// the online (running-max) log-sum-exp, and numerically stable softplus / sigmoid. Every function is
// PROTOCLR_HOST_DEVICE, header-only and templated on the accumulator type (float, or double for float64).
//
// Names are a stable interface: the CUDA kernels include this header too. Add, do not rename.
//
// Notation (csrc/ops.cpp): row i has global index gi = row_offset + i, column j has global index gj = j.
//   A(i) = {j : gj != gi}                                       (all others)
//   P(i) = {j : gj != gi, inst_j == inst_i}                      (positives: other views of the image)
//   F(i) = {j : inst_j != inst_i, proto_i >= 0, proto_j == proto_i}  (false negatives)
//   Den(i) = A(i) \ F(i) for fn_mode "mask", else A(i)
//   y_ij = inst_i == inst_j || proto_i == proto_j >= 0          (siamese target)
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define PROTOCLR_HOST_DEVICE __host__ __device__
#else
#define PROTOCLR_HOST_DEVICE
#endif
#define PROTOCLR_INLINE PROTOCLR_HOST_DEVICE inline

namespace protoclr {

// fn_mode of SPEC 1.1 as an integer (template parameter in kernels), and its name: the one C++ definition,
// in the order of protoclr/ops/checks.py's FN_MODES. Parse with fn_mode_from_string (host).
enum FnMode : int { kFnNone = 0, kFnMask = 1, kFnAttract = 2, kNumFnModes = 3 };
constexpr const char* kFnModeNames[kNumFnModes] = {"none", "mask", "attract"};

// -1 for an unknown string; the caller raises the ValueError naming fn_mode.
inline int fn_mode_from_string(const char* s) {
  for (int m = 0; m < kNumFnModes; ++m)
    if (strcmp(s, kFnModeNames[m]) == 0) return m;
  return -1;
}

// ------------------------------------------------------------------------------------ scalar helpers
// Overloads instead of std:: so the same spelling compiles in host code and in CUDA device code.
PROTOCLR_INLINE float pc_exp(float x) { return expf(x); }
PROTOCLR_INLINE double pc_exp(double x) { return exp(x); }
PROTOCLR_INLINE float pc_log(float x) { return logf(x); }
PROTOCLR_INLINE double pc_log(double x) { return log(x); }
PROTOCLR_INLINE float pc_log1p(float x) { return log1pf(x); }
PROTOCLR_INLINE double pc_log1p(double x) { return log1p(x); }
PROTOCLR_INLINE float pc_abs(float x) { return fabsf(x); }
PROTOCLR_INLINE double pc_abs(double x) { return fabs(x); }

template <typename T>
PROTOCLR_INLINE T neg_inf() {
  return -static_cast<T>(INFINITY);
}

// sign with sign(0) = 0 (SPEC 1.2); NaN maps to 0 as well.
template <typename T>
PROTOCLR_INLINE T sign0(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

// --------------------------------------------------------------------------------- pair membership
// Bitwise & and | instead of && and ||: same values, no branches, so the loops that call these vectorise
// (CPU) and do not diverge (GPU).
PROTOCLR_INLINE bool in_all(int64_t gi, int64_t gj) { return gi != gj; }

PROTOCLR_INLINE bool in_pos(int64_t gi, int64_t gj, int64_t inst_i, int64_t inst_j) {
  return (gi != gj) & (inst_i == inst_j);
}

// F(i); gi != gj is implied by inst_j != inst_i.
PROTOCLR_INLINE bool in_false_neg(int64_t inst_i, int64_t inst_j, int64_t proto_i, int64_t proto_j) {
  return (inst_i != inst_j) & (proto_i >= 0) & (proto_j == proto_i);
}

// Den(i) given the A(i) and F(i) memberships.
PROTOCLR_INLINE bool in_den(int fn_mode, bool is_all, bool is_false_neg) {
  return is_all & !((fn_mode == kFnMask) & is_false_neg);
}

// Siamese target y_ij in {0, 1} (SPEC 1.2).
PROTOCLR_INLINE int siamese_label(int64_t inst_i, int64_t inst_j, int64_t proto_i, int64_t proto_j) {
  return (inst_i == inst_j) | ((proto_i >= 0) & (proto_i == proto_j));
}

// -------------------------------------------------------------------------- online log-sum-exp
// State (m, s) represents logsumexp = m + log(s): m the running max, s = sum exp(x - m). The empty set is
// (-inf, 0). Updates never evaluate exp(-inf - -inf).
template <typename T>
struct OnlineLse {
  T m;
  T s;
};

template <typename T>
PROTOCLR_INLINE OnlineLse<T> online_lse_init() {
  return OnlineLse<T>{neg_inf<T>(), T(0)};
}

// Adds one value x (may be -inf, which is a no-op).
template <typename T>
PROTOCLR_INLINE void online_lse_update(OnlineLse<T>& st, T x) {
  if (x > st.m) {
    st.s = st.s * pc_exp(st.m - x) + T(1);  // st.m == -inf gives s * 0 + 1 (s is 0 then)
    st.m = x;
  } else if (x > neg_inf<T>()) {
    st.s += pc_exp(x - st.m);
  }
}

// Adds a block already reduced to (block_max, block_sum = sum exp(x - block_max)).
template <typename T>
PROTOCLR_INLINE void online_lse_merge(OnlineLse<T>& st, T block_max, T block_sum) {
  if (block_sum <= T(0)) return;
  if (block_max > st.m) {
    st.s = st.s * pc_exp(st.m - block_max) + block_sum;
    st.m = block_max;
  } else {
    st.s += block_sum * pc_exp(block_max - st.m);
  }
}

template <typename T>
PROTOCLR_INLINE void online_lse_merge(OnlineLse<T>& st, const OnlineLse<T>& other) {
  online_lse_merge(st, other.m, other.s);
}

// m + log(s); -inf for the empty set.
template <typename T>
PROTOCLR_INLINE T online_lse_finish(const OnlineLse<T>& st) {
  return st.s > T(0) ? st.m + pc_log(st.s) : neg_inf<T>();
}

// Softmax weight exp(x - lse) of a member of the set; 0 when lse is -inf (empty set, nothing to weigh),
// so a row with no denominator never produces exp(-inf - -inf) = NaN.
template <typename T>
PROTOCLR_INLINE T softmax_weight(T x, T lse) {
  return lse > neg_inf<T>() ? pc_exp(x - lse) : T(0);
}

// ---------------------------------------------------------------------------------- BCE helpers
// softplus(x) = log(1 + e^x) = max(x, 0) + log1p(e^-|x|), exact for every finite x.
template <typename T>
PROTOCLR_INLINE T softplus_stable(T x) {
  return (x > T(0) ? x : T(0)) + pc_log1p(pc_exp(-pc_abs(x)));
}

// sigmoid(x) without overflow for either sign.
template <typename T>
PROTOCLR_INLINE T sigmoid_stable(T x) {
  if (x >= T(0)) return T(1) / (T(1) + pc_exp(-x));
  const T e = pc_exp(x);
  return e / (T(1) + e);
}

// Per-pair BCE-with-logits loss softplus(d) - y d and its derivative sigmoid(d) - y (SPEC 1.2).
template <typename T>
PROTOCLR_INLINE T bce_logits(T d, int y) {
  return softplus_stable(d) - (y ? d : T(0));
}

template <typename T>
PROTOCLR_INLINE T bce_logits_grad(T d, int y) {
  return sigmoid_stable(d) - T(y);
}

}  // namespace protoclr
