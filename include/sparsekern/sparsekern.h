// sparsekern C++ API for libtorch programs.
//
// Link libsparsekern (CMake target sparsekern::sparsekern); the library registers the torch ops
// (torch.ops.sparsekern.*) when it is loaded, and these functions call them through the dispatcher, so the CPU or
// CUDA kernel is chosen by the tensors' device exactly as from Python.
//
// GPU ops. A library configured with the CUDA toolkit present (CMake option SPARSEKERN_CUDA=AUTO finds it, ON
// requires it) also holds the CUDA kernels of the same ops the wheel has, for the archs in TORCH_CUDA_ARCH_LIST:
//   prune_nm, is_nm, compress_24, decompress_24, spmm_24   CPU and CUDA (CUDA tensors in, CUDA tensors out);
//   cslt_compress, cslt_linear                              CUDA only: cuSPARSELt, compute capability 8.0 or newer;
//   the pruning engine (hessian_update_, act_scale_update_, wanda_prune, sparsegpt_prune_block_) and
//   quantize_per_token have CPU and CUDA kernels too and are called by name through the dispatcher
//   (c10::Dispatcher::singleton().findSchemaOrThrow("sparsekern::wanda_prune", "")), with the schemas in
//   csrc/registration.cpp.
// A CPU-only library keeps every op's schema: calling one with CUDA tensors throws the dispatcher's error naming the
// op and the CUDA backend ("Could not run 'sparsekern::...' with arguments from the 'CUDA' backend"); rebuild the
// library with the toolkit present (-DSPARSEKERN_CUDA=ON says what is missing).
// The library links libtorch_cuda, cudart and libcusparseLt (found through its rpath) in that case, so a program
// uses the same libtorch (a CUDA build) as the library was built against.
//
// Conventions: W is [N, K] (out_features x in_features); N:M groups run along K; "n:m" prunes n of every m.
#pragma once

#include <ATen/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>

namespace sparsekern {

// Keep the (m - n) largest |w| (or scores) per aligned group of m along the last dim.
// Returns (pruned weight, bool mask of kept entries).
std::tuple<at::Tensor, at::Tensor> prune_nm(const at::Tensor& w, int64_t n = 2, int64_t m = 4,
                                            const std::optional<at::Tensor>& scores = std::nullopt);

// True when every aligned group of m along the last dim holds at most (m - n) non-zeros.
bool is_nm(const at::Tensor& w, int64_t n = 2, int64_t m = 4);

// Portable 2:4 format v1: (values [rows, cols/2], codes uint8 [rows, ceil(cols/8)]). Throws if w is not 2:4.
std::tuple<at::Tensor, at::Tensor> compress_24(const at::Tensor& w);
at::Tensor decompress_24(const at::Tensor& values, const at::Tensor& codes, int64_t cols);

// y = act(alpha * (x @ W^T) + bias) with W in the portable format; x is [..., K].
at::Tensor spmm_24(const at::Tensor& x, const at::Tensor& values, const at::Tensor& codes,
                   const std::optional<at::Tensor>& bias = std::nullopt,
                   const std::optional<at::Tensor>& alpha = std::nullopt, const std::string& activation = "none");

// cuSPARSELt (CUDA only, sm80+). Compress a 2:4 weight w [n, k] (float16, bfloat16, int8 or float8_e4m3fn, a CUDA
// tensor, row-major) into cuSPARSELt's opaque uint8 buffer for the device's arch. Throws if w is not 2:4.
at::Tensor cslt_compress(const at::Tensor& w);

// y = act(alpha * (x @ W^T) + bias) with W [n, k] given as the cslt_compress buffer; x is [..., k] of W's dtype on
// the same device. The output dtype is x's for float16/bfloat16, int32 for int8 and float32 for float8 inputs
// unless out_dtype says otherwise (see docs/cusparselt.md for the combinations). Uses the algorithm found by a
// cuSPARSELt search for this shape if one was recorded in this process, else cuSPARSELt's default.
at::Tensor cslt_linear(const at::Tensor& x, const at::Tensor& compressed, int64_t n, int64_t k,
                       const std::optional<at::Tensor>& bias = std::nullopt,
                       const std::optional<at::Tensor>& alpha = std::nullopt, const std::string& activation = "none",
                       std::optional<at::ScalarType> out_dtype = std::nullopt);

}  // namespace sparsekern
