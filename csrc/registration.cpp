// Every sparsekern op's schema, in one always-compiled file.
//
// Kernels are registered per dispatch key in their device's files (TORCH_LIBRARY_IMPL(sparsekern, CPU|CUDA, m)
// in csrc/cpu/ and csrc/cuda/, csrc/cusparselt/). Fake (meta) kernels live next to the typed Python wrappers in
// python/sparsekern/ops/. An op whose kernel was not compiled for a device keeps its schema here, and calling it
// there raises the dispatcher's "no kernel for CUDA" error, which the Python wrapper turns into a sentence.
//
// Shapes use W = [N, K] (out_features x in_features), x = [M, K], groups along K.
#include <torch/library.h>

TORCH_LIBRARY(sparsekern, m) {
  // ---------------------------------------------------------------- core N:M / 2:4 (issue: core ops)
  // Keep the (m - n) largest |w| (or `scores`) of every aligned group of m along the last dim.
  // Returns (pruned w, bool mask of kept entries).
  m.def("prune_nm(Tensor w, int n, int m, Tensor? scores=None) -> (Tensor, Tensor)");
  // int64 tensor [2]: (row, group) of the first group (row-major order) holding more than m - n non-zeros,
  // or (-1, -1) when w is N:M.
  m.def("nm_violation(Tensor w, int n, int m) -> Tensor");
  // Portable 2:4 format, version 1: values [rows, cols/2] (w's dtype) and codes uint8 [rows, ceil(cols/8)].
  m.def("compress_24(Tensor w) -> (Tensor, Tensor)");
  m.def("decompress_24(Tensor values, Tensor codes, int cols) -> Tensor");
  // y[M, N] = act(row_scale[:, None] * alpha[None, :] * (x @ W^T) + bias), W given in the portable format.
  // x 2-D [M, K]; int8 x with int8 values accumulates in int32. activation: "none" | "relu" | "gelu".
  m.def(
      "spmm_24(Tensor x, Tensor values, Tensor codes, Tensor? bias=None, Tensor? alpha=None, "
      "Tensor? row_scale=None, str activation=\"none\", ScalarType? out_dtype=None) -> Tensor");
  // Tests only: the CPU emulation of the CUDA small-M kernel (csrc/core/skinny24.h): raw sums [M, N] (float32, or
  // int32 for int8) with the kernel's partition and order of operations for a GPU of `sm_count` SMs.
  m.def("_spmm_24_skinny_emulate(Tensor x, Tensor values, Tensor codes, int sm_count) -> Tensor");
  // Symmetric per-row (per-token) quantisation of x [M, K] to int8 or float8_e4m3fn.
  // Returns (q [M, K], scale float32 [M]) with x ~= q * scale[:, None].
  m.def("quantize_per_token(Tensor x, ScalarType dtype) -> (Tensor, Tensor)");

  // ---------------------------------------------------------------- cuSPARSELt (CUDA only)
  // Compress a 2:4 weight [n, k] (fp16/bf16/int8/fp8, CUDA) to cuSPARSELt's opaque buffer (uint8).
  m.def("cslt_compress(Tensor w) -> Tensor");
  // Same semantics as spmm_24, on the cuSPARSELt buffer of a weight [n, k] of x's dtype.
  // alg_id < 0: the cached search result for this shape if any, else cuSPARSELt's default.
  m.def(
      "cslt_linear(Tensor x, Tensor compressed, int n, int k, Tensor? bias=None, Tensor? alpha=None, "
      "Tensor? row_scale=None, str activation=\"none\", ScalarType? out_dtype=None, int alg_id=-1, "
      "int split_k=1) -> Tensor");

  // ---------------------------------------------------------------- pruning engine (issue: pruning)
  // Calibration statistics, updated in place the way the references do (ALGORITHMS.md):
  //   stat *= nsamples / (nsamples + batch); stat += ... / (nsamples + batch).
  m.def("hessian_update_(Tensor(a!) H, Tensor x, int nsamples, int batch) -> ()");
  m.def("act_scale_update_(Tensor(a!) s, Tensor x, int nsamples, int batch) -> ()");
  // Wanda: score |w| * sqrt(act_scale); N:M when m > 0, else per-row unstructured at `sparsity`.
  // Returns (pruned w, bool keep mask: True = kept). Refuses NaN / Inf scores.
  m.def("wanda_prune(Tensor w, Tensor act_scale, int n, int m, float sparsity) -> (Tensor, Tensor)");
  // SparseGPT column-block OBS update, in place on w1 [rows, bs]; hinv1 [bs, bs] upper Cholesky factor block.
  // Returns (err [rows, bs], loss [rows] = sum (w - q)^2 / d^2 / 2, keep mask bool [rows, bs]: True = kept).
  // prune_mask (True = prune) is the unstructured mode (n = m = 0); qscale / qzero [rows] + maxq: joint quantisation
  // (maxq = 2^bits - 1: min-max grid scale * (clamp(round(w / scale) + zero, 0, maxq) - zero); maxq = -1: fp8 e4m3
  // grid scale * e4m3(clamp(w / scale, -448, 448)), qzero given but ignored).
  m.def(
      "sparsegpt_prune_block_(Tensor(a!) w1, Tensor hinv1, int n, int m, Tensor? prune_mask, "
      "Tensor? qscale, Tensor? qzero, int maxq) -> (Tensor, Tensor, Tensor)");
}
