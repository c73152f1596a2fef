// The one TORCH_LIBRARY block: every protoclr op schema. Implementations register per device in
// csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu; fake (meta) implementations and autograd live in
// protoclr/ops/backend_ext.py. Semantics: protoclr/ops/backend_reference.py (the executable SPEC).
//
// Row/column form: rows are this process's anchors, columns the (possibly all-gathered) batch.
// Row r has global index row_offset + r; column c has global index c. Single process: zc is z, row_offset 0.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing protoclr._C runs the static registrations below; the module itself exports nothing.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(protoclr, m) {
  // SPEC 1.4. idx (M,) int64 = argmax_k x_m·c_k + bias_k (lowest k on ties); score (M,) the max, float32
  // (float64 for float64 x).
  m.def("assign(Tensor x, Tensor prototypes, Tensor? bias) -> (Tensor idx, Tensor score)");
  // One Lloyd pass of k-means (CPU only): idx and score as assign, sums (K, D) float64 = sum of the rows x_m with
  // idx_m = k, counts (K,) int64.
  m.def(
      "kmeans_step(Tensor x, Tensor prototypes, Tensor? bias) -> (Tensor idx, Tensor score, Tensor sums, "
      "Tensor counts)");
  // SPEC 1.1 building block. With c_ij = z_i·zc_j, P(i) = {j: g_j != g_i, inst_j = inst_i},
  // F(i) = {j: inst_j != inst_i, proto_i >= 0, protoc_j = proto_i}, A(i) = {j: g_j != g_i},
  // Den(i) = A(i) \ F(i) when fn_mode == "mask", else A(i):
  //   lse (N,)    = logsumexp_{j in Den(i)} c_ij / tau   (-inf when Den(i) is empty)
  //   stats (N,5) = [sum_P c, |P|, sum_F c, |F|, sum_A c]
  m.def(
      "contrastive_fwd(Tensor z, Tensor zc, Tensor inst, Tensor instc, Tensor proto, Tensor protoc, "
      "int row_offset, float tau, str fn_mode) -> (Tensor lse, Tensor stats)");
  // Gradients of sum(grad_lse * lse) + sum(grad_stats * stats) (count columns carry no gradient). When zc is z
  // itself (one tensor, same labels, row_offset 0) only dz + dzc, the gradient w.r.t. that tensor, is defined:
  // a backend may return all of it in dz and zeros in dzc (the CPU's symmetric kernel does).
  m.def(
      "contrastive_bwd(Tensor grad_lse, Tensor grad_stats, Tensor z, Tensor zc, Tensor inst, Tensor instc, "
      "Tensor proto, Tensor protoc, Tensor lse, int row_offset, float tau, str fn_mode) -> (Tensor dz, Tensor dzc)");
  // SPEC 1.2 building block, dense pairs g_i < g_j. d_ij = sum_k w_k |h_ik - hc_jk| + b,
  // y_ij = inst_i == instc_j or proto_i == protoc_j >= 0, l_ij = softplus(d_ij) - y_ij d_ij:
  //   loss (N,2)  = [sum over j with y_ij = 0 of l_ij, same for y_ij = 1]
  //   count (N,2) = number of those pairs
  m.def(
      "siamese_fwd(Tensor h, Tensor hc, Tensor inst, Tensor instc, Tensor proto, Tensor protoc, Tensor weight, "
      "Tensor bias, int row_offset) -> (Tensor loss, Tensor count)");
  // Gradients of sum(grad_loss * loss).
  m.def(
      "siamese_bwd(Tensor grad_loss, Tensor h, Tensor hc, Tensor inst, Tensor instc, Tensor proto, "
      "Tensor protoc, Tensor weight, Tensor bias, int row_offset) -> (Tensor dh, Tensor dhc, Tensor dweight, "
      "Tensor dbias)");
}
