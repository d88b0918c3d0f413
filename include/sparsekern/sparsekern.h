// sparsekern C++ API for libtorch programs.
//
// Link libsparsekern (CMake target sparsekern::sparsekern); the library registers the torch ops
// (torch.ops.sparsekern.*) when it is loaded, and these functions call them through the dispatcher, so the CPU or
// CUDA kernel is chosen by the tensors' device exactly as from Python.
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

}  // namespace sparsekern
