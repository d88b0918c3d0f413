// Host-only helpers for error messages, shared by the CPU and CUDA kernels (never compiled for the device).
#pragma once

#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

namespace sparsekern {
namespace core {

// "(i, j, k)": the multi-index of a linear (row-major) index into a tensor of the given sizes.
inline std::string index_string(c10::IntArrayRef sizes, int64_t linear) {
  std::vector<int64_t> idx(sizes.size());
  for (int64_t d = static_cast<int64_t>(sizes.size()) - 1; d >= 0; --d) {
    idx[d] = linear % sizes[d];
    linear /= sizes[d];
  }
  std::ostringstream os;
  os << "(";
  for (size_t d = 0; d < idx.size(); ++d) os << (d ? ", " : "") << idx[d];
  os << ")";
  return os.str();
}

}  // namespace core
}  // namespace sparsekern
