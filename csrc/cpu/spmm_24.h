// Internal interface between the CPU 2:4 GEMM driver (spmm_24.cpp) and its ISA-specific tile kernels
// (spmm_24_avx512.cpp, spmm_24_avx2.cpp). Not part of the public C++ API.
//
// The driver validates arguments, prepares the activations once per call (converted to the kernel's input type,
// contiguous, rows zero-padded to a multiple of kXPad columns so a kernel may read whole chunks past K without a
// tail case on x), splits the output into tiles over threads and applies the fused epilogue. A tile kernel only
// computes raw dot products acc[m][n] = sum_k x[m, k] * W[n, k] from the portable format.
#pragma once

#include <cstdint>

namespace sparsekern {
namespace cpu {
namespace spmm {

// Prepared activation rows are zero-padded to a multiple of this many columns (the widest kernel chunk).
constexpr int64_t kXPad = 64;

enum class Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

// Dtype of the compressed weight values ([N, K/2], contiguous).
enum class WType { kF32, kF16, kBF16, kI8 };

// Dtype of the prepared activations ([M, ldx], contiguous, zero-padded): chosen by the kernel (x_type_for).
enum class XType { kF32, kBF16, kI16, kI32 };

struct Problem {
  int64_t M = 0, N = 0, K = 0;  // K is a multiple of 4
  WType wtype = WType::kF32;
  const void* values = nullptr;  // [N, K/2]
  const uint8_t* codes = nullptr;  // [N, code_stride] packed 4-bit codes, nm.h layout
  int64_t code_stride = 0;
  XType xtype = XType::kF32;
  const void* x = nullptr;  // [M, ldx]
  int64_t ldx = 0;
};

// Fills acc[(m - m0) * ld_acc + (n - n0)] for m in [m0, m1), n in [n0, n1) with the raw dot products: float for
// floating weights, int32 (exact) for int8 weights.
using TileFn = void (*)(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* acc, int64_t ld_acc);

struct Kernel {
  XType xtype;
  TileFn tile;
  const char* name;  // for error messages / debugging
};

// Each returns false when the running CPU lacks the ISA (the kernel is then not callable).
bool avx512_kernel(WType w, Kernel* out);
bool avx2_kernel(WType w, Kernel* out);

}  // namespace spmm
}  // namespace cpu
}  // namespace sparsekern
