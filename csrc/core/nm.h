// Device-free N:M sparsity logic shared by the CPU and CUDA kernels.
//
// Conventions (the whole project uses them; docs/format.md is the long form):
//   * A weight W is [rows, cols]; N:M groups run along cols (the GEMM reduction dim), aligned at column 0.
//   * "N:M" means: in every group of M consecutive weights, N are pruned (zeroed); M - N are kept.
//   * Selection keeps the M - N largest scores of a group. Ties are broken by position: among equal scores the
//     lower column index is kept (equivalently: the higher index is pruned first). NaN scores compare as the
//     largest, so a NaN weight is never silently pruned away (the Python layer rejects NaN input before pruning).
//   * 2:4 pattern code: a group of 4 keeps exactly two positions i0 < i1; its 4-bit code is i0 | (i1 << 2).
//     Two codes share a byte: group 2b in the low nibble, group 2b+1 in the high nibble.
//     A group with fewer than two non-zeros fills the kept slots with the lowest zero positions, so every code
//     names two distinct positions and decompress(compress(w)) == w exactly.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SK_HOST_DEVICE inline
#endif

namespace sparsekern {
namespace core {

// Largest M supported by the N:M kernels (masks are held in a 32-bit word per group).
constexpr int kMaxGroup = 32;

// a is "greater" than b for keep-selection: NaN is greatest; ties keep the lower index.
SK_HOST_DEVICE bool keep_before(float a, int ia, float b, int ib) {
  const bool an = a != a, bn = b != b;
  if (an || bn) return an && (!bn || ia < ib);
  return a > b || (a == b && ia < ib);
}

// Returns a bitmask (bit j = position j kept) of the (m - n) largest of scores[0..m).
// O(m^2) rank counting: branch-free enough for the GPU and fast for m <= 8 on the CPU.
SK_HOST_DEVICE uint32_t select_keep_mask(const float* scores, int n, int m) {
  const int keep = m - n;
  uint32_t mask = 0;
  for (int j = 0; j < m; ++j) {
    int rank = 0;  // number of entries that come before j in keep order
    for (int i = 0; i < m; ++i) {
      if (i != j && keep_before(scores[i], i, scores[j], j)) ++rank;
    }
    if (rank < keep) mask |= (1u << j);
  }
  return mask;
}

// Same selection for scores of any real type T (float, double): used where converting to float could create ties
// the caller's reference does not have (float64 weights / scores). Identical rules to select_keep_mask.
template <typename T>
SK_HOST_DEVICE bool keep_before_t(T a, int ia, T b, int ib) {
  const bool an = a != a, bn = b != b;
  if (an || bn) return an && (!bn || ia < ib);
  return a > b || (a == b && ia < ib);
}

template <typename T>
SK_HOST_DEVICE uint32_t select_keep_mask_t(const T* scores, int n, int m) {
  const int keep = m - n;
  uint32_t mask = 0;
  for (int j = 0; j < m; ++j) {
    int rank = 0;
    for (int i = 0; i < m; ++i) {
      if (i != j && keep_before_t<T>(scores[i], i, scores[j], j)) ++rank;
    }
    if (rank < keep) mask |= (1u << j);
  }
  return mask;
}

// Branch-free 2:4 keep mask (bit j set = keep position j) for NaN-free scores: the same rule as
// select_keep_mask(s, 2, 4) (two largest; among equal scores the lower index is kept), from six comparisons and no
// data-dependent branch, so loops over many groups vectorise. For i < j, i comes before j exactly when s_i >= s_j.
template <typename T>
SK_HOST_DEVICE uint32_t keep_mask_24(T s0, T s1, T s2, T s3) {
  const int c01 = s0 >= s1, c02 = s0 >= s2, c03 = s0 >= s3, c12 = s1 >= s2, c13 = s1 >= s3, c23 = s2 >= s3;
  // ahead_j = number of positions ahead of j in keep order; j is kept when fewer than two are.
  const int ahead0 = 3 - c01 - c02 - c03;
  const int ahead1 = c01 + 2 - c12 - c13;
  const int ahead2 = c02 + c12 + 1 - c23;
  const int ahead3 = c03 + c13 + c23;
  return static_cast<uint32_t>((ahead0 < 2) | ((ahead1 < 2) << 1) | ((ahead2 < 2) << 2) | ((ahead3 < 2) << 3));
}

// 2:4 specialisation: kept positions (i0 < i1) of the two largest of four scores.
SK_HOST_DEVICE uint8_t select_keep_24_code(float s0, float s1, float s2, float s3) {
  const float s[4] = {s0, s1, s2, s3};
  const uint32_t mask = select_keep_mask(s, 2, 4);
  int idx[2] = {0, 0};
  int c = 0;
  for (int j = 0; j < 4; ++j) {
    if (mask & (1u << j)) idx[c++] = j;
  }
  return static_cast<uint8_t>(idx[0] | (idx[1] << 2));
}

// Code for a group that is already 2:4 given its non-zero bitmask (bit j set = w[j] != 0, at most two bits set).
// Fills missing slots with the lowest zero positions. Returns 0xFF when more than two bits are set.
SK_HOST_DEVICE uint8_t code_from_nonzero_mask(uint32_t nz) {
  int cnt = 0;
  for (int j = 0; j < 4; ++j) cnt += (nz >> j) & 1u;
  if (cnt > 2) return 0xFF;
  uint32_t kept = nz;
  for (int j = 0; j < 4 && cnt < 2; ++j) {
    if (!(kept & (1u << j))) {
      kept |= (1u << j);
      ++cnt;
    }
  }
  int idx[2] = {0, 0};
  int c = 0;
  for (int j = 0; j < 4; ++j) {
    if (kept & (1u << j)) idx[c++] = j;
  }
  return static_cast<uint8_t>(idx[0] | (idx[1] << 2));
}

// "Non-zero" as the pattern rules mean it, identical on both devices: -0.0 is zero, NaN is non-zero, and a value is
// tested in its own type (a float64 1e-300 is non-zero; converting to float first made it zero, so a group with three
// such values passed the 2:4 check). Half / bfloat16 / float8 / int8 convert to float exactly.
template <typename T>
SK_HOST_DEVICE bool is_nonzero(T v) {
  if constexpr (sizeof(T) == 8) {
    return static_cast<double>(v) != 0.0;
  } else {
    return static_cast<float>(v) != 0.f;
  }
}

SK_HOST_DEVICE int code_index0(uint8_t code) { return code & 0x3; }
SK_HOST_DEVICE int code_index1(uint8_t code) { return (code >> 2) & 0x3; }

// A code is valid when it names two distinct positions in increasing order.
SK_HOST_DEVICE bool code_is_valid(uint8_t code) {
  return (code & 0xF0) == 0 && code_index0(code) < code_index1(code);
}

// Nibble of group g from a packed code row.
SK_HOST_DEVICE uint8_t code_of_group(const uint8_t* code_row, int64_t g) {
  const uint8_t byte = code_row[g >> 1];
  return (g & 1) ? static_cast<uint8_t>(byte >> 4) : static_cast<uint8_t>(byte & 0xF);
}

// Number of code bytes per row for `cols` input features (cols must be a multiple of 4).
SK_HOST_DEVICE int64_t code_bytes_per_row(int64_t cols) { return (cols / 4 + 1) / 2; }

}  // namespace core
}  // namespace sparsekern
