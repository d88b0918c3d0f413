// The small-M (decode) 2:4 GEMM on CUDA (spmm_24_skinny.cu), called by spmm_24's CUDA kernel for M <= 16.
#pragma once

#include <ATen/core/Tensor.h>

#include "cuda/core_ops.h"

namespace sparsekern {
namespace cuda {

// Whether spmm_24_skinny takes x: 2-D [M, K] with 1 <= M <= 16 (core::kSkinnyMaxM), float16 / bfloat16 / int8.
bool skinny24_supports(const at::Tensor& x);

// y[M, N] = act(row_scale[:, None] * alpha[None, :] * (x @ W^T) + bias) in `out_dtype`, W = (values, codes) in the
// portable format; alpha / bias / row_scale: float32 contiguous on x's device, or undefined. Shapes and dtypes are
// the caller's checks (spmm_24_cuda); the codes are trusted (no host synchronisation: CUDA-graph capturable).
at::Tensor spmm_24_skinny(const at::Tensor& x, const at::Tensor& values, const at::Tensor& codes,
                          const at::Tensor& alpha, const at::Tensor& bias, const at::Tensor& row_scale,
                          Activation act, at::ScalarType out_dtype);

}  // namespace cuda
}  // namespace sparsekern
