// Device-free pieces of the pruning engine (Wanda, SparseGPT), shared by csrc/cpu/prune_*.cpp and
// csrc/cuda/prune_*.cu so that the CPU and the GPU compute the same floats in the same order.
//
// The formulas follow ../shared/ALGORITHMS.md (the reference implementations' exact arithmetic):
//   * Wanda metric           |w| * sqrt(s_j)                     (float32, sqrt(s) precomputed once per column)
//   * SparseGPT N:M score    w^2 / d^2 with d = diag(Hinv1)       (float32, as `W1**2 / diag**2` in PyTorch)
//   * min-max quantiser      scale * (clamp(round(w / scale) + zero, 0, maxq) - zero), round half to even
//   * fp8 e4m3 quantiser     scale * e4m3(clamp(w / scale, -448, 448)), e4m3 = round to nearest even onto the
//                            float8_e4m3fn values (torch's `.to(torch.float8_e4m3fn)`)
// N:M selection itself is csrc/core/nm.h's select_keep_mask (keep the m - n largest; ties keep the lower index).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/nm.h"

namespace sparsekern {
namespace core {

// Wanda score of one weight, with sqrt(act_scale[j]) given. float(|w|) is exact for fp16/bf16/fp32 weights, so the
// product is rounded once, exactly as PyTorch's `W.abs() * s.sqrt()` after type promotion to float32.
SK_HOST_DEVICE float wanda_metric(float w, float sqrt_scale) { return fabsf(w) * sqrt_scale; }

// SparseGPT's OBS saliency of pruning w given d = Hinv1[i, i]: (w*w) / (d*d) (the reference evaluates
// `W1 ** 2 / diag ** 2` elementwise; x ** 2 is x * x in PyTorch, so the rounding is the same).
template <typename T>
SK_HOST_DEVICE T obs_score(T w, T d) {
  return (w * w) / (d * d);
}

// Round half to even (torch.round). rint honours the default rounding mode, which is to-nearest-even.
SK_HOST_DEVICE float round_half_even(float x) { return rintf(x); }
SK_HOST_DEVICE double round_half_even(double x) { return rint(x); }

// a * b rounded on its own: on the GPU nvcc contracts a product followed by an add / sub into one FMA (one rounding
// instead of two), which the CPU build (no -mfma) and PyTorch's reference do not; __fmul_rn / __dmul_rn are never
// contracted. Use it where a product feeds an add so both devices round the same way.
SK_HOST_DEVICE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
SK_HOST_DEVICE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// Asymmetric min-max quantise-dequantise of one value with a per-row (scale, zero); maxq = 2^bits - 1.
// Matches SparseGPT/GPTQ's `quantize`: q = clamp(round(x / scale) + zero, 0, maxq); return scale * (q - zero).
// The product goes through mul_rn: callers subtract the result (w - q), which nvcc would otherwise fuse.
template <typename T>
SK_HOST_DEVICE T quantize_minmax(T x, T scale, T zero, T maxq) {
  T q = round_half_even(x / scale) + zero;
  q = q < T(0) ? T(0) : (q > maxq ? maxq : q);
  return mul_rn(scale, q - zero);
}

// Round a float to the nearest float8_e4m3fn value, ties to even, returned as a float: bit for bit what PyTorch's
// `x.to(torch.float8_e4m3fn).float()` gives for a float32 x (c10's fp8e4m3fn_from_fp32_value). e4m3fn: 4 exponent
// bits (bias 7), 3 mantissa bits, no infinities, largest finite 448, smallest normal 2^-6, subnormals k * 2^-9.
//   |x| >= 2^-6: keep 3 mantissa bits of the float32, RNE by bit arithmetic (a carry into the exponent is the
//                correct round-up to the next binade);
//   |x| <  2^-6: the nearest multiple of 2^-9 (RNE): rint(|x| * 512) / 512, both scalings exact;
//   saturation as c10: a finite value rounding above 448 (or |x| >= 480, or an infinity) gives +-448, NaN gives NaN.
// The sign is carried through, so -0 and negative values that round to zero give -0, as the cast does.
// Callers quantising onto the deployed grid clamp to [-448, 448] first (quantize_e4m3), where every rule agrees.
SK_HOST_DEVICE float round_e4m3(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  const uint32_t sign = bits & 0x80000000u;
  const uint32_t mag = bits ^ sign;
  uint32_t out;
  if (mag > 0x7F800000u) {
    return x;  // NaN
  } else if (mag >= 0x43F00000u) {  // >= 480.0f (torch's fp8_max), or inf: saturate
    out = 0x43E00000u;              // 448.0f
  } else if (mag < 0x3C800000u) {   // < 2^-6: e4m3 subnormal range, multiples of 2^-9
    float a;
    memcpy(&a, &mag, sizeof(a));
    const float r = rintf(a * 512.0f) * (1.0f / 512.0f);
    memcpy(&out, &r, sizeof(out));
  } else {
    out = mag + 0x7FFFFu + ((mag >> 20) & 1u);  // RNE at bit 20 (23 - 3 mantissa bits dropped)
    out &= 0xFFF00000u;
    if (out > 0x43E00000u) out = 0x43E00000u;  // rounded past 448 (c10 saturates the NaN pattern to 448)
  }
  out |= sign;
  float r;
  memcpy(&r, &out, sizeof(r));
  return r;
}

// The same rounding of a double, directly (one rounding; torch's cast of a float64 tensor goes through float32
// first, which can differ in rare double-rounding ties). Used by the float64 SparseGPT path only.
SK_HOST_DEVICE double round_e4m3(double x) {
  uint64_t bits;
  memcpy(&bits, &x, sizeof(bits));
  const uint64_t sign = bits & 0x8000000000000000ull;
  const uint64_t mag = bits ^ sign;
  uint64_t out;
  if (mag > 0x7FF0000000000000ull) {
    return x;  // NaN
  } else if (mag >= 0x407E000000000000ull) {  // >= 480.0
    out = 0x407C000000000000ull;                // 448.0
  } else if (mag < 0x3F90000000000000ull) {   // < 2^-6
    double a;
    memcpy(&a, &mag, sizeof(a));
    const double r = rint(a * 512.0) * (1.0 / 512.0);
    memcpy(&out, &r, sizeof(out));
  } else {
    const uint64_t drop = 52 - 3;
    out = mag + ((1ull << (drop - 1)) - 1) + ((mag >> drop) & 1ull);
    out &= ~((1ull << drop) - 1);
    if (out > 0x407C000000000000ull) out = 0x407C000000000000ull;
  }
  out |= sign;
  double r;
  memcpy(&r, &out, sizeof(r));
  return r;
}

// Symmetric fp8 e4m3 quantise-dequantise of one value with a per-row scale (sparsekern.quant's fp8 weight grid):
// scale * e4m3(clamp(x / scale, -448, 448)). The product goes through mul_rn, as in quantize_minmax.
template <typename T>
SK_HOST_DEVICE T quantize_e4m3(T x, T scale) {
  T r = x / scale;
  r = r < T(-448) ? T(-448) : (r > T(448) ? T(448) : r);
  return mul_rn(scale, round_e4m3(r));
}

// select_keep_mask(s, n, 4) for NaN-free scores, branch-free: six comparisons instead of nm.h's twelve
// NaN-aware ones (the hot path of 2:4 / 1:4 / 3:4 selection). The rank of j counts the entries kept before it:
// i < j wins ties (s_i >= s_j), i > j must be strictly larger. Same result as nm.h for every non-NaN input
// (tests/test_prune_wanda.py checks all tie patterns of small integers against the rule).
SK_HOST_DEVICE uint32_t select_keep_mask_m4(float s0, float s1, float s2, float s3, int n) {
  const int c01 = s0 >= s1, c02 = s0 >= s2, c03 = s0 >= s3, c12 = s1 >= s2, c13 = s1 >= s3, c23 = s2 >= s3;
  const int keep = 4 - n;
  const int r0 = 3 - c01 - c02 - c03;
  const int r1 = c01 + 2 - c12 - c13;
  const int r2 = c02 + c12 + 1 - c23;
  const int r3 = c03 + c13 + c23;
  return static_cast<uint32_t>((r0 < keep) | ((r1 < keep) << 1) | ((r2 < keep) << 2) | ((r3 < keep) << 3));
}

// N:M keep-mask of m scores: the m = 4 fast path when no score is NaN, else nm.h's general rule.
SK_HOST_DEVICE uint32_t select_keep_mask_fast(const float* s, int n, int m) {
  if (m == 4 && s[0] == s[0] && s[1] == s[1] && s[2] == s[2] && s[3] == s[3]) {
    return select_keep_mask_m4(s[0], s[1], s[2], s[3], n);
  }
  return select_keep_mask(s, n, m);
}

// select_keep_mask(s, n, M) for finite scores with M known at compile time: the same rank counting without
// nm.h's NaN branches, so the M^2 comparisons unroll into straight-line code (the 4:8 path of the Wanda kernel).
template <int M>
SK_HOST_DEVICE uint32_t select_keep_mask_finite(const float* s, int n) {
  const int keep = M - n;
  uint32_t mask = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int j = 0; j < M; ++j) {
    int rank = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int i = 0; i < M; ++i) {
      rank += i < j ? (s[i] >= s[j]) : (i > j ? (s[i] > s[j]) : 0);
    }
    mask |= static_cast<uint32_t>(rank < keep) << j;
  }
  return mask;
}

// Sort key of a non-negative float score and its column for "stable ascending order": the IEEE bits of a
// non-negative float are ordered like the floats, and the column in the low half breaks ties towards the lower
// column (the reference's stable sort). NaN bits sort above +inf, so a NaN score is never among the pruned.
SK_HOST_DEVICE uint64_t stable_score_key(float score, uint32_t col) {
  uint32_t bits;
  memcpy(&bits, &score, sizeof(bits));
  return (static_cast<uint64_t>(bits) << 32) | col;
}

}  // namespace core
}  // namespace sparsekern
