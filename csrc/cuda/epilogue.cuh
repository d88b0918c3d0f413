// The epilogue's device helpers shared by linear_postop (core_ops.cu) and the decode kernel (spmm_24_skinny.cu):
// the activation and the float -> output dtype conversion, so both paths round and saturate alike.
#pragma once

#include <cstdint>

#include "cuda/core_ops.h"

namespace sparsekern {
namespace cuda {

__device__ __forceinline__ float apply_activation(float v, int act) {
  if (act == static_cast<int>(Activation::kRelu)) return v > 0.f ? v : 0.f;
  if (act == static_cast<int>(Activation::kGelu)) return 0.5f * v * (1.f + erff(v * 0.70710678118654752440f));
  return v;
}

// Float result to the output dtype: a plain conversion for float outputs; integer outputs round half to even and
// saturate (the CPU spmm_24's rule for int8 outputs).
template <typename T>
__device__ __forceinline__ T to_output(float v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ int32_t to_output<int32_t>(float v) {
  const float r = rintf(v);
  if (!(r > -2147483648.f)) return r != r ? 0 : INT32_MIN;
  return r >= 2147483648.f ? INT32_MAX : static_cast<int32_t>(r);
}
template <>
__device__ __forceinline__ int8_t to_output<int8_t>(float v) {
  const float r = rintf(v);
  return r != r ? int8_t(0) : static_cast<int8_t>(fminf(fmaxf(r, -128.f), 127.f));
}

}  // namespace cuda
}  // namespace sparsekern
