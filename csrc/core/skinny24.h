// The small-M ("skinny", decode) 2:4 GEMM on the portable format: the device-free part shared by the CUDA kernel
// (csrc/cuda/spmm_24_skinny.cu) and its CPU emulation (csrc/cpu/skinny24_emulate.cpp), so that the decoding, the
// partition of the work and the order of every floating-point operation are tested on every CPU run.
//
// y[m, n] = sum_k x[m, k] W[n, k] for M <= kSkinnyMaxM, W in the portable format (docs/format.md): values [N, K/2]
// (each group's two kept weights, lower position first) and codes [N, ceil(K/8)] (4-bit code per group of 4: kept
// positions i0 | i1 << 2; two groups per byte, the even group in the low nibble).
//
// Work partition (what the kernel does and the emulation replays):
//   * one warp per output row n; 8 rows (warps) per thread block;
//   * K is cut into "steps" of 1024 columns; lane l of the warp owns columns [32 l, 32 l + 32) of each step: a
//     "unit" of 8 groups = 16 values (one or two 128-bit loads) + 4 code bytes (one 32-bit load);
//   * split-K: the steps are divided into `ksplit` contiguous ranges (skinny_plan), one per blockIdx.y, so a narrow
//     N still fills the GPU; each range's row sums are added in range order afterwards;
//   * per lane, per unit, per code byte, per kept value in column order: acc[m] = fma(value, x[m][col], acc[m])
//     (fp32; exact int32 multiply-add for int8);
//   * the 32 lanes' sums are combined by an xor butterfly (offsets 16, 8, 4, 2, 1), identical on every lane.
#pragma once

#include <cmath>
#include <cstdint>

#include "core/nm.h"

namespace sparsekern {
namespace core {

constexpr int kSkinnyMaxM = 16;         // the kernel serves M = 1..16 (spmm_24 on CUDA uses it up to here)
constexpr int kSkinnyWarp = 32;
constexpr int kSkinnyUnitGroups = 8;    // groups of 4 columns per lane per step
constexpr int kSkinnyUnitCols = 32;     // columns per lane per step
constexpr int kSkinnyStepCols = 1024;   // columns per warp per step (32 lanes x 32)
constexpr int kSkinnyRowsPerBlock = 8;  // warps (= output rows) per thread block
constexpr int kSkinnyMaxSplit = 8;

// The kept columns of the two groups one code byte describes, as offsets within its 8 columns (group 2b: 0..3,
// group 2b+1: 4..7), in the order of the values: cols[0..1] the even group's i0 < i1, cols[2..3] the odd group's.
SK_HOST_DEVICE void decode_code_byte(uint8_t byte, int cols[4]) {
  cols[0] = byte & 0x3;
  cols[1] = (byte >> 2) & 0x3;
  cols[2] = 4 + ((byte >> 4) & 0x3);
  cols[3] = 4 + ((byte >> 6) & 0x3);
}

// fp32 multiply-add with one rounding on both devices (the CUDA kernel and its CPU emulation agree bit for bit).
SK_HOST_DEVICE float skinny_fma(float a, float b, float c) {
#ifdef __CUDA_ARCH__
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

SK_HOST_DEVICE void skinny_madd(float& acc, float v, float x) { acc = skinny_fma(v, x, acc); }
SK_HOST_DEVICE void skinny_madd(int32_t& acc, int32_t v, int32_t x) { acc += v * x; }

// One lane's unit: groups [0, ngroups) (ngroups <= 8; fewer only in a K tail that is not a multiple of 32) of the
// 32 columns starting at the unit's first column. vals: the unit's values (2 per group, as stored); code_bytes: its
// code bytes (group 2b and 2b+1 in byte b); xval(m, col): x[m][unit's first column + col] as Acc. Adds to acc[m]
// for m < MT in the fixed order described at the top.
template <int MT, typename Acc, typename V, typename XVal>
SK_HOST_DEVICE void skinny_unit(Acc (&acc)[MT], const V* vals, const uint8_t* code_bytes, int ngroups, XVal xval) {
  // Fixed trip counts with predicates (not loops bounded by ngroups): every index is a compile-time constant, so
  // the CUDA compiler keeps vals / code_bytes in registers instead of local memory.
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int b = 0; b < kSkinnyUnitGroups / 2; ++b) {
    if (2 * b >= ngroups) break;
    int cols[4];
    decode_code_byte(code_bytes[b], cols);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
    for (int j = 0; j < 4; ++j) {
      if (j >= 2 && 2 * b + 1 >= ngroups) break;  // the odd group exists only below ngroups
      const Acc v = static_cast<Acc>(vals[4 * b + j]);
      const int col = 8 * b + cols[j];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
      for (int m = 0; m < MT; ++m) skinny_madd(acc[m], v, xval(m, col));
    }
  }
}

// The split of K into contiguous step ranges: ksplit ranges of steps_per_split steps (the last may be shorter).
struct SkinnyPlan {
  int ksplit;
  int64_t steps_per_split;
};

// Doubles the split while the grid (row blocks x splits) is under two blocks per SM and every range keeps at least
// two steps, up to kSkinnyMaxSplit; then drops empty ranges.
SK_HOST_DEVICE SkinnyPlan skinny_plan(int64_t N, int64_t K, int sm_count) {
  const int64_t row_blocks = (N + kSkinnyRowsPerBlock - 1) / kSkinnyRowsPerBlock;
  const int64_t steps = (K + kSkinnyStepCols - 1) / kSkinnyStepCols;
  int ksplit = 1;
  while (ksplit < kSkinnyMaxSplit && row_blocks * ksplit < 2 * static_cast<int64_t>(sm_count) &&
         steps >= 4 * static_cast<int64_t>(ksplit)) {
    ksplit *= 2;
  }
  SkinnyPlan p;
  p.steps_per_split = (steps + ksplit - 1) / ksplit;
  p.ksplit = static_cast<int>(steps == 0 ? 1 : (steps + p.steps_per_split - 1) / p.steps_per_split);
  return p;
}

// The xor butterfly of the 32 lanes' sums as lane 0 ends it (every lane ends with the same value): the CPU side of
// `for (off = 16; off; off /= 2) v += __shfl_xor_sync(~0u, v, off)`.
template <typename Acc>
SK_HOST_DEVICE Acc skinny_butterfly(Acc (&lanes)[kSkinnyWarp]) {
  for (int off = kSkinnyWarp / 2; off > 0; off /= 2) {
    Acc next[kSkinnyWarp];
    for (int l = 0; l < kSkinnyWarp; ++l) next[l] = lanes[l] + lanes[l ^ off];
    for (int l = 0; l < kSkinnyWarp; ++l) lanes[l] = next[l];
  }
  return lanes[0];
}

}  // namespace core
}  // namespace sparsekern
