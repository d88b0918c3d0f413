// cuSPARSELt's shape rule, written once: device-free (no CUDA or cuSPARSELt header), so the CPU build exports it to
// Python too (sparsekern._C.cslt_structured_multiple) and the Python side asks it instead of repeating the numbers.
// The checks in csrc/cusparselt/cslt.cpp use these functions.
#pragma once

#include <cstdint>

namespace sparsekern {
namespace core {

// The multiple of n and k (rows and columns of the structured operand W [n, k]) that cuSPARSELt requires, by element
// size in bytes: 32 for 1-byte types (int8, float8_e4m3fn), 16 for 2-byte ones (float16, bfloat16); 0 for any other
// size (cuSPARSELt has no structured operand of that size).
constexpr int64_t cslt_structured_multiple(int64_t element_size_bytes) {
  return element_size_bytes == 1 ? 32 : element_size_bytes == 2 ? 16 : 0;
}

// The multiple the dense operand's rows (M) are padded to: 16 for 1-byte types, 8 for 2-byte ones; 0 otherwise.
constexpr int64_t cslt_dense_multiple(int64_t element_size_bytes) {
  return element_size_bytes == 1 ? 16 : element_size_bytes == 2 ? 8 : 0;
}

static_assert(cslt_structured_multiple(1) == 32 && cslt_structured_multiple(2) == 16 &&
              cslt_structured_multiple(4) == 0, "cuSPARSELt's structured-operand multiples");

}  // namespace core
}  // namespace sparsekern
