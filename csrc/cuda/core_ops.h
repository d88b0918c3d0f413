// CUDA-side helpers of the core ops (csrc/cuda/core_ops.cu) that other CUDA-build sources call directly,
// without going through the dispatcher: the cuSPARSELt wrapper (csrc/cusparselt/) uses them to refuse a weight
// that is not 2:4 before compressing it, and to finish what cuSPARSELt's epilogue cannot do.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace sparsekern {
namespace cuda {

// Linear index (row * groups_per_row + group) of the first aligned group of m along the last dim of `w` (CUDA,
// viewed as [rows, cols]) that holds more than (m - n) non-zeros, or -1 when w is N:M. Synchronises the stream
// (the answer is needed on the host).
int64_t first_nm_violation(const at::Tensor& w, int64_t n, int64_t m);

// decompress_24 without validating the codes: no host synchronisation (CUDA-graph capturable). For spmm_24, whose
// codes come from a validated Sparse24Weight; an invalid code gives a zero group.
at::Tensor decompress_24_trusted(const at::Tensor& values, const at::Tensor& codes, int64_t cols);

// Activation applied after the affine part of a linear layer.
enum class Activation : int { kNone = 0, kRelu = 1, kGelu = 2 };

// Parse "none" | "relu" | "gelu"; throws naming `op` and the accepted values otherwise.
Activation parse_activation(const std::string& s, const char* op);

// The post-op of cslt_linear for what cuSPARSELt's epilogue cannot express (a per-token row_scale), or does not
// support for a configuration:
//   out[t, c] = act(row_scale[t] * alpha[c] * in[t, c] + bias[c])      for t < out.size(0), c < out.size(1)
// in:        CUDA [>= M, N] row-major with leading dimension N (may be longer than out: padded rows are ignored);
//            float16 / bfloat16 / int32 / float32. May alias `out` (in-place) when the dtypes match.
// out:       CUDA [M, N] contiguous, float16 / bfloat16 / float32, or int32 / int8 (rounded half to even, saturated).
// row_scale: optional float32 [M]; alpha: optional float32 [N]; bias: optional [N], float32 or out's (float) dtype.
// Runs on the current stream, allocates nothing (CUDA-graph capturable).
void linear_postop(const at::Tensor& in, at::Tensor& out, const std::optional<at::Tensor>& row_scale,
                   const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& bias,
                   Activation act);

}  // namespace cuda
}  // namespace sparsekern
