// AVX-512 tile kernels of the CPU 2:4 GEMM (driver: spmm_24.cpp). Compiled with function target attributes (the
// build has no per-file flags) and only called after cpuid says the CPU has the features.
//
// The idea: a weight row in the portable format is a stream of kept values plus 2 bits per value (the column of the
// value inside its group of 4). A chunk of kept values is multiplied with the activations gathered from exactly
// those columns, and the gather is one in-register two-source permute (vpermt2ps / vpermt2w) of an aligned chunk of
// the activation row, whose lane indices come straight from the packed codes:
//   value lane l of a chunk belongs to group l/2 of the chunk and sits at column 4*(l/2) + ((codes >> 2l) & 3),
// because the code of group t is i0 | i1 << 2 and two codes share a byte, low nibble first — so the chunk's code
// bits, read as one little-endian word, hold lane l's 2-bit position at bit 2l. Half the multiply-adds of the dense
// product, no decompression pass, and the weight is read once per activation row block.
//
//   fp32 lanes (float32 weights; float16 / bfloat16 weights widened on load): 16 values = 8 groups = 32 columns per
//     chunk, 32 code bits; vpermt2ps gathers from two zmm of x; one FMA.
//   16-bit lanes: 32 values = 16 groups = 64 columns per chunk, 64 code bits; vpermt2w gathers from two zmm of x.
//     bfloat16 (AVX512_BF16): vdpbf16ps multiplies the pair of a group (the two kept values are adjacent) and adds
//     both into one fp32 lane. int8 (x and values widened to int16): vpdpwssd (AVX512_VNNI) or vpmaddwd + vpaddd,
//     exact int32.
// Register tiles of NB weight rows x MB activation rows share each index vector and each activation load.
#include <immintrin.h>

// GCC 12 reports the deliberately undefined lanes inside its own AVX-512 intrinsics (_mm512_undefined_*) as
// uninitialised once they are inlined into target-attributed functions: a known false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <array>
#include <utility>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/spmm_24.h"

#define SK_AVX512_BASE "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c"
#define SK_AVX512 __attribute__((target(SK_AVX512_BASE)))
#define SK_AVX512_BF16 __attribute__((target(SK_AVX512_BASE ",avx512bf16")))
#define SK_AVX512_VNNI __attribute__((target(SK_AVX512_BASE ",avx512vnni")))

namespace sparsekern {
namespace cpu {
namespace spmm {
namespace {

// ------------------------------------------------------------------------------------------------- index vectors
// fp32 lanes: lane l -> 4*(l/2) + ((word >> 2l) & 3), word = 32 code bits of 8 groups.
SK_AVX512 inline __m512i idx32_from_codes(uint32_t word) {
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i w = _mm512_set1_epi32(static_cast<int>(word));
  // (shifted & 3) | base in one vpternlogd (imm 0xEA = (A & B) | C): base is a multiple of 4.
  return _mm512_ternarylogic_epi32(_mm512_srlv_epi32(w, shifts), _mm512_set1_epi32(3), base, 0xEA);
}

// 16-bit lanes: lane l (0..31) -> 4*(l/2) + ((word >> 2l) & 3), word = 64 code bits of 16 groups. Lane l needs the
// 16-bit slice l/8 of the word, shifted by 2*(l%8).
SK_AVX512 inline __m512i idx16_from_codes(uint64_t word) {
  const __m512i slice = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0,
                                         0, 0, 0, 0, 0, 0);
  const __m512i shifts = _mm512_set_epi16(14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4,
                                          2, 0, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i base = _mm512_set_epi16(60, 60, 56, 56, 52, 52, 48, 48, 44, 44, 40, 40, 36, 36, 32, 32, 28, 28, 24,
                                        24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
  const __m512i w = _mm512_permutexvar_epi16(slice, _mm512_set1_epi64(static_cast<long long>(word)));
  return _mm512_ternarylogic_epi32(_mm512_srlv_epi16(w, shifts), _mm512_set1_epi16(3), base, 0xEA);
}

// Code bits of `groups` (< chunk) groups starting at an even group g: whole bytes, the rest zero (code 0 = column 0
// of a zero-padded area of x, times a zero value).
inline __attribute__((always_inline)) uint64_t tail_code_bits(const uint8_t* crow, int64_t g, int64_t groups) {
  uint64_t word = 0;
  for (int64_t b = 0; b < (groups + 1) / 2; ++b) word |= static_cast<uint64_t>(crow[g / 2 + b]) << (8 * b);
  if (groups & 1) word &= (uint64_t{1} << (4 * groups)) - 1;  // drop the padding nibble
  return word;
}

// ------------------------------------------------------------------------------------------------- lane policies
// A policy describes one kernel flavour: value / activation element types, groups per chunk (kGroups; a chunk spans
// 4 * kGroups columns of x and 2 * kGroups values), how to load values, build indices, gather-and-accumulate, and
// reduce an accumulator to a scalar.

// fp32 lanes: 8 groups per chunk.
template <WType W>
struct F32Lanes;
struct F32Common {
  using xt = float;
  using vec = __m512;
  using word_t = uint32_t;
  using mask_t = __mmask16;
  using acc_t = float;
  static constexpr int kGroups = 8;
  SK_AVX512 static inline vec zero() { return _mm512_setzero_ps(); }
  SK_AVX512 static inline __m512i idx(word_t word) { return idx32_from_codes(word); }
  SK_AVX512 static inline vec step(vec s, __m512 w, const xt* x, __m512i idx) {
    return _mm512_fmadd_ps(w, _mm512_permutex2var_ps(_mm512_loadu_ps(x), idx, _mm512_loadu_ps(x + 16)), s);
  }
  SK_AVX512 static inline float reduce(vec s) { return _mm512_reduce_add_ps(s); }
};
template <>
struct F32Lanes<WType::kF32> : F32Common {
  using wt = float;
  using wvec = __m512;
  SK_AVX512 static inline wvec load(const wt* v, mask_t k) { return _mm512_maskz_loadu_ps(k, v); }
};
template <>
struct F32Lanes<WType::kF16> : F32Common {
  using wt = uint16_t;
  using wvec = __m512;
  SK_AVX512 static inline wvec load(const wt* v, mask_t k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, v)); }
};
template <>
struct F32Lanes<WType::kBF16> : F32Common {
  using wt = uint16_t;
  using wvec = __m512;
  SK_AVX512 static inline wvec load(const wt* v, mask_t k) {
    // bfloat16 -> float32 is a 16-bit left shift of the bits.
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, v)), 16));
  }
};

// 16-bit lanes: 16 groups per chunk; the two kept values of a group are adjacent lanes and are summed into one
// 32-bit lane by the pair dot products.
struct Pairs16Common {
  using xt = uint16_t;
  using word_t = uint64_t;
  using mask_t = __mmask32;
  static constexpr int kGroups = 16;
  SK_AVX512 static inline __m512i idx(word_t word) { return idx16_from_codes(word); }
  SK_AVX512 static inline __m512i gather(const xt* x, __m512i idx) {
    return _mm512_permutex2var_epi16(_mm512_loadu_si512(x), idx, _mm512_loadu_si512(x + 32));
  }
};
// bfloat16 x bfloat16 pairs -> fp32 (vdpbf16ps).
struct BF16Pairs : Pairs16Common {
  using wt = uint16_t;
  using vec = __m512;
  using wvec = __m512i;
  using acc_t = float;
  SK_AVX512_BF16 static inline vec zero() { return _mm512_setzero_ps(); }
  SK_AVX512_BF16 static inline wvec load(const wt* v, mask_t k) { return _mm512_maskz_loadu_epi16(k, v); }
  SK_AVX512_BF16 static inline vec step(vec s, wvec w, const xt* x, __m512i idx) {
    return _mm512_dpbf16_ps(s, (__m512bh)w, (__m512bh)gather(x, idx));
  }
  SK_AVX512_BF16 static inline float reduce(vec s) { return _mm512_reduce_add_ps(s); }
  // Row-pair kernels: 16 values of one row; a pre-gathered dot product; the sum of lanes 0-7 or 8-15.
  SK_AVX512_BF16 static inline vec load(const acc_t* p) { return _mm512_loadu_ps(p); }
  SK_AVX512_BF16 static inline void store(acc_t* p, vec v) { _mm512_storeu_ps(p, v); }
  SK_AVX512_BF16 static inline __m256i load_half(const wt* v, __mmask16 k) { return _mm256_maskz_loadu_epi16(k, v); }
  SK_AVX512_BF16 static inline vec dp(vec s, __m512i w, __m512i xg) { return _mm512_dpbf16_ps(s, (__m512bh)w, (__m512bh)xg); }
  SK_AVX512_BF16 static inline float reduce_half(vec s, __mmask16 half) {
    return _mm512_reduce_add_ps(_mm512_maskz_mov_ps(half, s));
  }
};
// int8 values (widened to int16) x int16 activations -> exact int32: vpdpwssd (VNNI) ...
struct I8PairsVnni : Pairs16Common {
  using wt = int8_t;
  using vec = __m512i;
  using wvec = __m512i;
  using acc_t = int32_t;
  SK_AVX512_VNNI static inline vec zero() { return _mm512_setzero_si512(); }
  SK_AVX512_VNNI static inline wvec load(const wt* v, mask_t k) {
    return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(k, v));
  }
  SK_AVX512_VNNI static inline vec step(vec s, wvec w, const xt* x, __m512i idx) {
    return _mm512_dpwssd_epi32(s, w, gather(x, idx));
  }
  SK_AVX512_VNNI static inline int32_t reduce(vec s) { return _mm512_reduce_add_epi32(s); }
  SK_AVX512_VNNI static inline vec load(const acc_t* p) { return _mm512_loadu_si512(p); }
  SK_AVX512_VNNI static inline void store(acc_t* p, vec v) { _mm512_storeu_si512(p, v); }
  SK_AVX512_VNNI static inline __m256i load_half(const wt* v, __mmask16 k) {
    return _mm256_cvtepi8_epi16(_mm_maskz_loadu_epi8(k, v));
  }
  SK_AVX512_VNNI static inline vec dp(vec s, __m512i w, __m512i xg) { return _mm512_dpwssd_epi32(s, w, xg); }
  SK_AVX512_VNNI static inline int32_t reduce_half(vec s, __mmask16 half) {
    return _mm512_reduce_add_epi32(_mm512_maskz_mov_epi32(half, s));
  }
};
// ... or vpmaddwd + vpaddd without VNNI.
struct I8Pairs : Pairs16Common {
  using wt = int8_t;
  using vec = __m512i;
  using wvec = __m512i;
  using acc_t = int32_t;
  SK_AVX512 static inline vec zero() { return _mm512_setzero_si512(); }
  SK_AVX512 static inline wvec load(const wt* v, mask_t k) { return _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(k, v)); }
  SK_AVX512 static inline vec step(vec s, wvec w, const xt* x, __m512i idx) {
    return _mm512_add_epi32(s, _mm512_madd_epi16(w, gather(x, idx)));
  }
  SK_AVX512 static inline int32_t reduce(vec s) { return _mm512_reduce_add_epi32(s); }
  SK_AVX512 static inline vec load(const acc_t* p) { return _mm512_loadu_si512(p); }
  SK_AVX512 static inline void store(acc_t* p, vec v) { _mm512_storeu_si512(p, v); }
  SK_AVX512 static inline __m256i load_half(const wt* v, __mmask16 k) {
    return _mm256_cvtepi8_epi16(_mm_maskz_loadu_epi8(k, v));
  }
  SK_AVX512 static inline vec dp(vec s, __m512i w, __m512i xg) { return _mm512_add_epi32(s, _mm512_madd_epi16(w, xg)); }
  SK_AVX512 static inline int32_t reduce_half(vec s, __mmask16 half) {
    return _mm512_reduce_add_epi32(_mm512_maskz_mov_epi32(half, s));
  }
};

// ------------------------------------------------------------------------------------------------- micro kernel
// The row pointers of a register tile: values and codes of weight rows n .. n + NB - 1, activation rows m .. m + MB - 1.
template <typename wt, typename xt, int NB, int MB>
inline __attribute__((always_inline)) void tile_rows(const Problem& p, int64_t n, int64_t m, const wt* (&v)[NB],
                                                     const uint8_t* (&c)[NB], const xt* (&x)[MB]) {
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i) {
    v[i] = static_cast<const wt*>(p.values) + (n + i) * (p.K / 2);
    c[i] = p.codes + (n + i) * p.code_stride;
  }
#pragma GCC unroll 8
  for (int j = 0; j < MB; ++j) x[j] = static_cast<const xt*>(p.x) + (m + j) * p.ldx;
}

// NB weight rows x MB activation rows over the whole K. One chunk step: per weight row build the index vector and
// load the values once, per activation row load x's chunk once (inside Ops::step) and feed all NB rows. Whole
// chunks run without masks; a last partial chunk uses masked value loads (masked lanes are 0 and their indices hit
// x's zero padding past K). The step is force-inlined so the NB x MB accumulators stay in registers.
#define SK_DEFINE_MICRO(NAME, ATTR)                                                                                 \
  template <class Ops, int NB, int MB>                                                                              \
  ATTR inline __attribute__((always_inline)) void NAME##_step(                                                      \
      const typename Ops::wt* const* v, const typename Ops::xt* const* x, typename Ops::vec (&s)[NB][MB], int64_t ch, \
      const typename Ops::word_t* words, typename Ops::mask_t k) {                                                  \
    __m512i idx[NB];                                                                                                \
    typename Ops::wvec w[NB];                                                                                       \
    _Pragma("GCC unroll 8")                                                                                         \
    for (int i = 0; i < NB; ++i) {                                                                                  \
      idx[i] = Ops::idx(words[i]);                                                                                  \
      w[i] = Ops::load(v[i] + 2 * Ops::kGroups * ch, k);                                                            \
    }                                                                                                               \
    _Pragma("GCC unroll 8")                                                                                         \
    for (int j = 0; j < MB; ++j) {                                                                                  \
      const typename Ops::xt* xc = x[j] + 4 * Ops::kGroups * ch;                                                    \
      _Pragma("GCC unroll 8")                                                                                       \
      for (int i = 0; i < NB; ++i) s[i][j] = Ops::step(s[i][j], w[i], xc, idx[i]);                                  \
    }                                                                                                               \
  }                                                                                                                 \
  template <class Ops, int NB, int MB>                                                                              \
  ATTR void NAME(const Problem& p, int64_t n, int64_t m, typename Ops::acc_t* acc, int64_t ld) {                    \
    using wt = typename Ops::wt;                                                                                    \
    using xt = typename Ops::xt;                                                                                    \
    using word_t = typename Ops::word_t;                                                                            \
    constexpr int kG = Ops::kGroups;                                                                                \
    const int64_t G = p.K / 4, full = G / kG, rem = G - kG * full, half_k = p.K / 2;                                \
    const wt* v[NB];                                                                                                \
    const uint8_t* c[NB];                                                                                           \
    const xt* x[MB];                                                                                                \
    tile_rows<wt, xt, NB, MB>(p, n, m, v, c, x);                                                                    \
    typename Ops::vec s[NB][MB];                                                                                    \
    _Pragma("GCC unroll 8")                                                                                         \
    for (int i = 0; i < NB; ++i)                                                                                    \
      _Pragma("GCC unroll 8")                                                                                       \
      for (int j = 0; j < MB; ++j) s[i][j] = Ops::zero();                                                           \
    const auto all = static_cast<typename Ops::mask_t>(~uint64_t{0});                                               \
    /* Last pass over these NB weight rows within the driver's 64-row activation tile: fetch the next NB rows      \
       (values, and codes every 8 chunks) one chunk at a time, so they stream in while this pass computes from      \
       cache instead of stalling the next block's first pass (the hardware prefetchers stop at every 4 KB page, and \
       a bf16 row of K = 4096 is one page). */                                                                      \
    const bool pf = m + MB >= std::min<int64_t>(p.M, (m / 64 + 1) * 64) && n + 2 * NB <= p.N;          \
    const int64_t pf_off = static_cast<int64_t>(NB) * half_k;                                                       \
    for (int64_t ch = 0; ch < full; ++ch) {                                                                         \
      word_t words[NB];                                                                                             \
      _Pragma("GCC unroll 8")                                                                                       \
      for (int i = 0; i < NB; ++i) std::memcpy(&words[i], c[i] + (kG / 2) * ch, sizeof(word_t));                    \
      if (pf) {                                                                                                     \
        _Pragma("GCC unroll 8")                                                                                     \
        for (int i = 0; i < NB; ++i) {                                                                              \
          _mm_prefetch(reinterpret_cast<const char*>(v[i] + pf_off + 2 * kG * ch), _MM_HINT_T0);                    \
          if ((ch & 7) == 0)                                                                                        \
            _mm_prefetch(reinterpret_cast<const char*>(c[i] + NB * p.code_stride + (kG / 2) * ch), _MM_HINT_T0);    \
        }                                                                                                           \
      }                                                                                                             \
      NAME##_step<Ops, NB, MB>(v, x, s, ch, words, all);                                                            \
    }                                                                                                               \
    if (rem > 0) {                                                                                                  \
      word_t words[NB];                                                                                             \
      _Pragma("GCC unroll 8")                                                                                       \
      for (int i = 0; i < NB; ++i) words[i] = static_cast<word_t>(tail_code_bits(c[i], kG * full, rem));            \
      NAME##_step<Ops, NB, MB>(v, x, s, full, words,                                                                \
                               static_cast<typename Ops::mask_t>((uint64_t{1} << (2 * rem)) - 1));                  \
    }                                                                                                               \
    _Pragma("GCC unroll 8")                                                                                         \
    for (int i = 0; i < NB; ++i)                                                                                    \
      _Pragma("GCC unroll 8")                                                                                       \
      for (int j = 0; j < MB; ++j) acc[j * ld + i] = Ops::reduce(s[i][j]);                                          \
  }

SK_DEFINE_MICRO(micro_base, SK_AVX512)
SK_DEFINE_MICRO(micro_bf16, SK_AVX512_BF16)
SK_DEFINE_MICRO(micro_vnni, SK_AVX512_VNNI)
#undef SK_DEFINE_MICRO

// ------------------------------------------------------------------------------------------------- row-pair kernels
// 16-bit lanes (bfloat16 pairs, int8 as int16 pairs), two weight rows per vector. A chunk is 8 groups = 32 columns of
// x = ONE zmm, so the gather is a one-source vpermw instead of the two-source vpermt2w above: on Zen 4 a vpermt2w +
// vdpbf16ps pair issues at ~1.95 cycles, a vpermw + vdpbf16ps pair at ~1.39 (tools/cpu_microbench.cpp), against the 2
// vdpbf16ps (2 cycles) of a dense GEMM for the same 32 kept products. 8 groups of one row fill only 16 of the 32 lanes,
// so lanes 0-15 take row A's 16 kept values and lanes 16-31 row B's, both gathered from the same x chunk:
//   lane l: row A + (l >= 16), group (l % 16) / 2, column 4 * ((l % 16) / 2) + ((word >> 2l) & 3),
// word = row A's 32 code bits | row B's << 32 (the same bit walk as idx16_from_codes, another base). One fp32 (or
// int32) accumulator lane sums a group's pair; lanes 0-7 belong to row A, 8-15 to row B.
// (A float32 version, vpermps + FMA with 8 kept values per row, was measured too: 1.0-1.4x dense but always behind the
// token-lane kernels, which need no permute at all for fp32; not kept.)
SK_AVX512 inline __m512i idx16_pair_from_codes(uint64_t word) {
  const __m512i slice = _mm512_set_epi16(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0,
                                         0, 0, 0, 0, 0, 0);
  const __m512i shifts = _mm512_set_epi16(14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4, 2, 0, 14, 12, 10, 8, 6, 4,
                                          2, 0, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i base = _mm512_set_epi16(28, 28, 24, 24, 20, 20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0, 28, 28, 24, 24, 20,
                                        20, 16, 16, 12, 12, 8, 8, 4, 4, 0, 0);
  const __m512i w = _mm512_permutexvar_epi16(slice, _mm512_set1_epi64(static_cast<long long>(word)));
  return _mm512_ternarylogic_epi32(_mm512_srlv_epi16(w, shifts), _mm512_set1_epi16(3), base, 0xEA);
}
// Lane policy of the row-pair kernels on top of the pair policies above: chunk width, code bits per row and chunk,
// the index builder, the join of two rows' half-vector values (the multiply-add is the pair policy's dp).
template <class Base>
struct Pair16 : Base {  // Base: BF16Pairs / I8PairsVnni / I8Pairs
  using xt = uint16_t;
  using half_t = __m256i;
  using hmask_t = __mmask16;
  static constexpr int kChunkCols = 32;
  static constexpr int32_t kOffset = 0;  // x is used as is
  static inline uint64_t code_bits(const uint8_t* c, int64_t ch) {
    uint32_t w;
    std::memcpy(&w, c + 4 * ch, 4);
    return w;
  }
  SK_AVX512 static inline __m512i idx_pair(uint64_t a, uint64_t b) { return idx16_pair_from_codes(a | b << 32); }
  SK_AVX512 static inline half_t zero_half() { return _mm256_setzero_si256(); }
  SK_AVX512 static inline __m512i join(half_t a, half_t b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
  }
  SK_AVX512 static inline __m512i load_x(const xt* x) { return _mm512_load_si512(x); }
  SK_AVX512 static inline __m512i gather(__m512i idx, __m512i x) { return _mm512_permutexvar_epi16(idx, x); }
};
// int8 x int8 by vpdpbusd (AVX512_VNNI with AVX512_VBMI for the byte permute): 4 products per 32-bit lane, i.e. two
// groups' kept pairs, so ONE instruction covers 32 kept values of each of two rows. A chunk is 16 groups = 64 columns
// of x = one zmm of bytes; lanes 0-7 hold row A's 32 kept values, lanes 8-15 row B's. vpdpbusd multiplies unsigned by
// signed bytes, so the driver stores x + 128 as uint8 (XType::kU8) and the kernel subtracts 128 * (sum of the row's
// kept values) at the end: exact in int32 while K * 255 * 128 < 2^31 (K < 65793; avx512_pair_kernel checks).
//   byte j of the index: row A + (j >= 32), group (j % 32) / 2, column 4 * ((j % 32) / 2) + ((row word >> 2 (j % 32)) & 3)
// (row word = the row's 64 code bits of the chunk), built by one vpmultishiftqb.
#define SK_AVX512_U8 __attribute__((target(SK_AVX512_BASE ",avx512vnni,avx512vbmi")))
SK_AVX512_U8 inline __m512i idx8_pair_from_codes(uint64_t a, uint64_t b) {
  alignas(64) static constexpr uint8_t kCtrl[64] = {
      0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
      44, 46, 48, 50, 52, 54, 56, 58, 60, 62, 0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22,
      24, 26, 28, 30, 32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
  alignas(64) static constexpr uint8_t kBase[64] = {
      0,  0,  4,  4,  8,  8,  12, 12, 16, 16, 20, 20, 24, 24, 28, 28, 32, 32, 36, 36, 40, 40,
      44, 44, 48, 48, 52, 52, 56, 56, 60, 60, 0,  0,  4,  4,  8,  8,  12, 12, 16, 16, 20, 20,
      24, 24, 28, 28, 32, 32, 36, 36, 40, 40, 44, 44, 48, 48, 52, 52, 56, 56, 60, 60};
  const __m512i words = _mm512_inserti64x4(_mm512_set1_epi64(static_cast<long long>(a)),
                                           _mm256_set1_epi64x(static_cast<long long>(b)), 1);
  const __m512i bits = _mm512_multishift_epi64_epi8(_mm512_load_si512(kCtrl), words);
  return _mm512_ternarylogic_epi32(bits, _mm512_set1_epi8(3), _mm512_load_si512(kBase), 0xEA);
}
struct PairU8 {
  using wt = int8_t;
  using xt = uint8_t;
  using vec = __m512i;
  using acc_t = int32_t;
  using half_t = __m256i;
  using hmask_t = __mmask32;
  static constexpr int kChunkCols = 64;
  static constexpr int32_t kOffset = 128;  // x is stored as x + 128
  static inline uint64_t code_bits(const uint8_t* c, int64_t ch) {
    uint64_t w;
    std::memcpy(&w, c + 8 * ch, 8);
    return w;
  }
  SK_AVX512_U8 static inline __m512i idx_pair(uint64_t a, uint64_t b) { return idx8_pair_from_codes(a, b); }
  SK_AVX512_U8 static inline half_t zero_half() { return _mm256_setzero_si256(); }
  SK_AVX512_U8 static inline half_t load_half(const wt* v, hmask_t k) { return _mm256_maskz_loadu_epi8(k, v); }
  SK_AVX512_U8 static inline __m512i join(half_t a, half_t b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
  }
  SK_AVX512_U8 static inline vec zero() { return _mm512_setzero_si512(); }
  SK_AVX512_U8 static inline vec load(const acc_t* p) { return _mm512_loadu_si512(p); }
  SK_AVX512_U8 static inline void store(acc_t* p, vec v) { _mm512_storeu_si512(p, v); }
  SK_AVX512_U8 static inline __m512i load_x(const xt* x) { return _mm512_load_si512(x); }
  SK_AVX512_U8 static inline __m512i gather(__m512i idx, __m512i x) { return _mm512_permutexvar_epi8(idx, x); }
  SK_AVX512_U8 static inline vec dp(vec s, __m512i w, __m512i xg) { return _mm512_dpbusd_epi32(s, xg, w); }
  SK_AVX512_U8 static inline int32_t reduce_half(vec s, __mmask16 half) {
    return _mm512_reduce_add_epi32(_mm512_maskz_mov_epi32(half, s));
  }
};

// Blocking (large M): the row-pair tile walks K in blocks of kPairCols columns. Per K block it first builds a panel
// per block of kNB2 weight rows: for each chunk and pair, the index vector and the value vector (the two rows' halves
// side by side), so the micro kernel's chunk step is loads + permute + multiply-add only (building the index in the
// loop put a GPR -> vector dependency chain on every chunk; and it is shared by all activation-row blocks). The panels
// of a thread's current weight rows are built once, at its first activation-row tile, and reused for the others. Then
// activation-row blocks outside weight-row blocks: a block's x rows come from the driver's K-blocked copy (constant
// row stride, Kernel::x_block) and stay in L1 while all the tile's weight rows pass over them. Partial sums park in the
// tile's buffer between K blocks.
constexpr int64_t kPairCols = 1024;
constexpr int kNB2 = 4, kMB2 = 8;  // register tile: 2 pairs x 8 activation rows = 16 accumulators
constexpr int kPairs = kNB2 / 2;

#define SK_DEFINE_PAIR_ROWS(NAME, ATTR)                                                                             \
  /* Panel of rows [n, n + nb) (nb <= kNB2; missing rows get zero values) for chunks [ch0, ch0 + nch), the last     \
     one partial when it is chunk `full` (K not a multiple of the chunk width). */                                  \
  template <class Ops>                                                                                              \
  ATTR void NAME##_panel(const Problem& p, int64_t n, int nb, int64_t ch0, int64_t nch, __m512i* panel) {           \
    using wt = typename Ops::wt;                                                                                    \
    constexpr int GC = Ops::kChunkCols / 4; /* groups per chunk */                                                  \
    const int64_t G = p.K / 4, full = G / GC, rem = G - GC * full, half_k = p.K / 2;                                \
    for (int64_t i = 0; i < nch; ++i) {                                                                             \
      const int64_t ch = ch0 + i;                                                                                   \
      const bool part = ch == full;                                                                                 \
      const uint64_t kbits = (part ? rem : GC) * 2; /* values in the chunk: 2 per group */                          \
      const auto k = static_cast<typename Ops::hmask_t>(kbits >= 64 ? ~uint64_t{0} : (uint64_t{1} << kbits) - 1);   \
      for (int q = 0; q < kPairs; ++q) {                                                                            \
        uint64_t word[2] = {0, 0};                                                                                  \
        typename Ops::half_t half[2] = {Ops::zero_half(), Ops::zero_half()};                                        \
        for (int h = 0; h < 2; ++h) {                                                                               \
          const int r = 2 * q + h;                                                                                  \
          if (r >= nb) break;                                                                                       \
          const uint8_t* c = p.codes + (n + r) * p.code_stride;                                                     \
          word[h] = part ? tail_code_bits(c, GC * full, rem) : Ops::code_bits(c, ch);                               \
          half[h] = Ops::load_half(static_cast<const wt*>(p.values) + (n + r) * half_k + 2 * GC * ch, k);           \
        }                                                                                                           \
        panel[(i * kPairs + q) * 2] = Ops::idx_pair(word[0], word[1]);                                              \
        panel[(i * kPairs + q) * 2 + 1] = Ops::join(half[0], half[1]);                                              \
      }                                                                                                             \
    }                                                                                                               \
  }                                                                                                                 \
  /* MB activation rows (xb, XS apart) x the panel's pairs over its nch chunks; writes rows [0, nb). park: this     \
     block's slot (pair q, row j at (q * kTileM + j) * 16 elements); first: start from zero, else from park; last:  \
     reduce into acc (minus Ops::kOffset x the row's value sum `vsum`), else park. */                               \
  template <class Ops, int MB>                                                                                      \
  ATTR void NAME(const void* panel_v, const typename Ops::xt* xb, int64_t nch, int nb, typename Ops::acc_t* park,   \
                 bool first, bool last, const int32_t* vsum, typename Ops::acc_t* acc, int64_t ld) {                \
    constexpr int64_t XS = kPairCols + Ops::kChunkCols;                                                             \
    const __m512i* panel = static_cast<const __m512i*>(panel_v);                                                    \
    typename Ops::vec s[kPairs][MB];                                                                                \
    _Pragma("GCC unroll 8")                                                                                         \
    for (int q = 0; q < kPairs; ++q)                                                                                \
      _Pragma("GCC unroll 8")                                                                                       \
      for (int j = 0; j < MB; ++j) s[q][j] = first ? Ops::zero() : Ops::load(park + (q * kTileM + j) * 16);         \
    for (int64_t i = 0; i < nch; ++i) {                                                                             \
      const __m512i* pc = panel + i * kPairs * 2;                                                                   \
      __m512i idx[kPairs], w[kPairs];                                                                               \
      _Pragma("GCC unroll 8")                                                                                       \
      for (int q = 0; q < kPairs; ++q) {                                                                            \
        idx[q] = _mm512_load_si512(pc + 2 * q);                                                                     \
        w[q] = _mm512_load_si512(pc + 2 * q + 1);                                                                   \
      }                                                                                                             \
      _Pragma("GCC unroll 8")                                                                                       \
      for (int j = 0; j < MB; ++j) {                                                                                \
        const auto xc = Ops::load_x(xb + j * XS + Ops::kChunkCols * i);                                             \
        _Pragma("GCC unroll 8")                                                                                     \
        for (int q = 0; q < kPairs; ++q) s[q][j] = Ops::dp(s[q][j], w[q], Ops::gather(idx[q], xc));                \
      }                                                                                                             \
    }                                                                                                               \
    _Pragma("GCC unroll 8")                                                                                         \
    for (int q = 0; q < kPairs; ++q)                                                                                \
      _Pragma("GCC unroll 8")                                                                                       \
      for (int j = 0; j < MB; ++j) {                                                                                \
        if (!last) {                                                                                                \
          Ops::store(park + (q * kTileM + j) * 16, s[q][j]);                                                        \
          continue;                                                                                                 \
        }                                                                                                           \
        if (2 * q < nb)                                                                                             \
          acc[j * ld + 2 * q] = Ops::reduce_half(s[q][j], static_cast<__mmask16>(0x00FF)) -                         \
                                (Ops::kOffset ? Ops::kOffset * vsum[2 * q] : 0);                                    \
        if (2 * q + 1 < nb)                                                                                         \
          acc[j * ld + 2 * q + 1] = Ops::reduce_half(s[q][j], static_cast<__mmask16>(0xFF00)) -                     \
                                    (Ops::kOffset ? Ops::kOffset * vsum[2 * q + 1] : 0);                            \
      }                                                                                                             \
  }                                                                                                                 \
  /* One driver tile [m0, m1) x [n0, n1) (at most kTileM x kTileN). */                                              \
  template <class Ops>                                                                                              \
  struct NAME##_tile {                                                                                              \
    using acc_t = typename Ops::acc_t;                                                                              \
    using xt = typename Ops::xt;                                                                                    \
    /* (the panel as void*: a vector type in a std::array element's signature draws -Wignored-attributes) */        \
    using MicroFn = void (*)(const void*, const xt*, int64_t, int, acc_t*, bool, bool, const int32_t*, acc_t*,      \
                             int64_t);                                                                              \
    static constexpr int64_t XS = kPairCols + Ops::kChunkCols; /* row stride of the driver's K-blocked x */         \
    static constexpr int64_t kKC = kPairCols / Ops::kChunkCols;        /* chunks per K block */                     \
    static constexpr int64_t kPanelVecs = (kKC + 1) * kPairs * 2;      /* one weight-row block's panel, in zmm */   \
    template <int... Is>                                                                                            \
    static constexpr std::array<MicroFn, sizeof...(Is)> make(std::integer_sequence<int, Is...>) {                   \
      return {&NAME<Ops, Is + 1>...};                                                                               \
    }                                                                                                               \
    static void run(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* accv, int64_t ld) {     \
      static constexpr std::array<MicroFn, kMB2> table = make(std::make_integer_sequence<int, kMB2>{});             \
      acc_t* acc = static_cast<acc_t*>(accv);                                                                       \
      alignas(64) acc_t park[kTileN / 2 * kTileM * 16];                                                             \
      const int64_t full = p.K / Ops::kChunkCols, parts = full * Ops::kChunkCols < p.K ? 1 : 0;                     \
      const int64_t nblk = std::max<int64_t>(1, (full + kKC - 1) / kKC);                                            \
      const int64_t blk_vecs = kTileN / kNB2 * kPanelVecs;                                                          \
      thread_local std::vector<char> panel_bytes; /* 64-byte aligned by hand below */                               \
      thread_local int32_t vsum[kTileN];           /* the rows' value sums, for Ops::kOffset */                     \
      if (m0 == 0 && static_cast<int64_t>(panel_bytes.size()) < (nblk * blk_vecs + 1) * 64)                         \
        panel_bytes.resize((nblk * blk_vecs + 1) * 64);                                                             \
      __m512i* const panels = reinterpret_cast<__m512i*>(                                                           \
          (reinterpret_cast<uintptr_t>(panel_bytes.data()) + 63) & ~static_cast<uintptr_t>(63));                    \
      if (m0 == 0) {                                                                                                \
        if (Ops::kOffset) {                                                                                         \
          for (int64_t n = n0; n < n1; ++n) {                                                                       \
            const typename Ops::wt* v = static_cast<const typename Ops::wt*>(p.values) + n * (p.K / 2);             \
            int32_t t = 0;                                                                                          \
            for (int64_t i = 0; i < p.K / 2; ++i) t += v[i];                                                        \
            vsum[n - n0] = t;                                                                                       \
          }                                                                                                         \
        }                                                                                                           \
        for (int64_t b = 0; b < nblk; ++b) {                                                                        \
          const int64_t ch0 = b * kKC, ch1 = std::min(full, ch0 + kKC);                                             \
          const int64_t nch = ch1 - ch0 + (b == nblk - 1 ? parts : 0);                                              \
          for (int64_t n = n0; n < n1; n += kNB2)                                                                   \
            NAME##_panel<Ops>(p, n, static_cast<int>(std::min<int64_t>(kNB2, n1 - n)), ch0, nch,                    \
                              panels + b * blk_vecs + (n - n0) / kNB2 * kPanelVecs);                                \
        }                                                                                                           \
      }                                                                                                             \
      const xt* x = static_cast<const xt*>(p.x);                                                                    \
      for (int64_t b = 0; b < nblk; ++b) {                                                                          \
        const int64_t ch0 = b * kKC, ch1 = std::min(full, ch0 + kKC);                                               \
        const bool first = b == 0, last = b == nblk - 1;                                                            \
        const int64_t nch = ch1 - ch0 + (last ? parts : 0);                                                         \
        const __m512i* panel = panels + b * blk_vecs;                                                               \
        for (int64_t m = m0; m < m1; m += kMB2) {                                                                   \
          const int mb = static_cast<int>(std::min<int64_t>(kMB2, m1 - m));                                         \
          const xt* xb = x + (b * p.M + m) * XS; /* the driver's K-blocked copy */                                  \
          for (int64_t n = n0; n < n1; n += kNB2) {                                                                 \
            table[mb - 1](panel + (n - n0) / kNB2 * kPanelVecs, xb, nch,                                            \
                          static_cast<int>(std::min<int64_t>(kNB2, n1 - n)),                                        \
                          park + ((n - n0) / 2 * kTileM + (m - m0)) * 16, first, last, vsum + (n - n0),             \
                          acc + (m - m0) * ld + (n - n0), ld);                                                      \
          }                                                                                                         \
        }                                                                                                           \
      }                                                                                                             \
    }                                                                                                               \
  };                                                                                                                \

SK_DEFINE_PAIR_ROWS(pair_rows_base, SK_AVX512)
SK_DEFINE_PAIR_ROWS(pair_rows_bf16, SK_AVX512_BF16)
SK_DEFINE_PAIR_ROWS(pair_rows_vnni, SK_AVX512_VNNI)
SK_DEFINE_PAIR_ROWS(pair_rows_u8, SK_AVX512_U8)
#undef SK_DEFINE_PAIR_ROWS

// Without blocking or panels (small M, driven by tile_loop like the row kernels): the index and the joined values are
// built in the chunk loop and shared by the MB activation rows of the register tile.
#define SK_DEFINE_PAIR_ROWS_SMALL(NAME, ATTR)                                                                       \
  /* One chunk: per pair the index (from the two rows' code words) and the joined values, then per activation row   \
     one x load shared by the pairs. part: the partial last chunk (masked values, zero codes). */                   \
  template <class Ops, int NB, int MB>                                                                              \
  ATTR inline __attribute__((always_inline)) void NAME##_step(                                                      \
      const typename Ops::wt* const* v, const uint8_t* const* c, const uint16_t* const* x,                          \
      typename Ops::vec (&s)[(NB + 1) / 2][MB], int64_t ch, bool part, int64_t full, int64_t rem) {                 \
    constexpr int P = (NB + 1) / 2;                                                                                 \
    const auto k = static_cast<__mmask16>(part ? (1u << (2 * rem)) - 1 : 0xFFFFu);                                  \
    __m512i idx[P], w[P];                                                                                           \
    _Pragma("GCC unroll 8")                                                                                         \
    for (int q = 0; q < P; ++q) {                                                                                   \
      const bool two = 2 * q + 1 < NB;                                                                              \
      const uint64_t a = part ? tail_code_bits(c[2 * q], 8 * full, rem) : Ops::code_bits(c[2 * q], ch);             \
      const uint64_t b = !two ? 0 : part ? tail_code_bits(c[2 * q + 1], 8 * full, rem)                              \
                                         : Ops::code_bits(c[2 * q + 1], ch);                                        \
      idx[q] = Ops::idx_pair(a, b);                                                                                   \
      w[q] = Ops::join(Ops::load_half(v[2 * q] + 16 * ch, k),                                                       \
                       two ? Ops::load_half(v[2 * q + 1] + 16 * ch, k) : Ops::zero_half());                         \
    }                                                                                                               \
    _Pragma("GCC unroll 8")                                                                                         \
    for (int j = 0; j < MB; ++j) {                                                                                  \
      const __m512i xc = _mm512_loadu_si512(x[j] + 32 * ch);                                                        \
      _Pragma("GCC unroll 8")                                                                                       \
      for (int q = 0; q < P; ++q) s[q][j] = Ops::dp(s[q][j], w[q], Ops::gather(idx[q], xc));                       \
    }                                                                                                               \
  }                                                                                                                 \
  template <class Ops, int NB, int MB>                                                                              \
  ATTR void NAME(const Problem& p, int64_t n, int64_t m, typename Ops::acc_t* acc, int64_t ld) {                    \
    using wt = typename Ops::wt;                                                                                    \
    constexpr int P = (NB + 1) / 2;                                                                                 \
    const int64_t G = p.K / 4, full = G / 8, rem = G - 8 * full, half_k = p.K / 2;                                  \
    const wt* v[NB];                                                                                                \
    const uint8_t* c[NB];                                                                                           \
    const uint16_t* x[MB];                                                                                          \
    tile_rows<wt, uint16_t, NB, MB>(p, n, m, v, c, x);                                                              \
    typename Ops::vec s[P][MB];                                                                                     \
    _Pragma("GCC unroll 8")                                                                                         \
    for (int q = 0; q < P; ++q)                                                                                     \
      _Pragma("GCC unroll 8")                                                                                       \
      for (int j = 0; j < MB; ++j) s[q][j] = Ops::zero();                                                           \
    /* Last pass over these rows within the driver's 64-row activation tile: prefetch the next NB rows' values (a   \
       line every 2 chunks) and codes (every 16), as the one-row kernels do. */                                     \
    const bool pf = m + MB >= std::min<int64_t>(p.M, (m / 64 + 1) * 64) && n + 2 * NB <= p.N;                       \
    const int64_t pf_off = static_cast<int64_t>(NB) * half_k;                                                       \
    for (int64_t ch = 0; ch < full; ++ch) {                                                                         \
      if (pf && (ch & 1) == 0) {                                                                                    \
        _Pragma("GCC unroll 8")                                                                                     \
        for (int i = 0; i < NB; ++i) {                                                                              \
          _mm_prefetch(reinterpret_cast<const char*>(v[i] + pf_off + 16 * ch), _MM_HINT_T0);                        \
          if ((ch & 15) == 0)                                                                                       \
            _mm_prefetch(reinterpret_cast<const char*>(c[i] + NB * p.code_stride + 4 * ch), _MM_HINT_T0);           \
        }                                                                                                           \
      }                                                                                                             \
      NAME##_step<Ops, NB, MB>(v, c, x, s, ch, false, full, rem);                                                   \
    }                                                                                                               \
    if (rem > 0) NAME##_step<Ops, NB, MB>(v, c, x, s, full, true, full, rem); /* x is zero-padded to 64 columns */  \
    _Pragma("GCC unroll 8")                                                                                         \
    for (int q = 0; q < P; ++q)                                                                                     \
      _Pragma("GCC unroll 8")                                                                                       \
      for (int j = 0; j < MB; ++j) {                                                                                \
        acc[j * ld + 2 * q] = Ops::reduce_half(s[q][j], static_cast<__mmask16>(0x00FF));                            \
        if (2 * q + 1 < NB) acc[j * ld + 2 * q + 1] = Ops::reduce_half(s[q][j], static_cast<__mmask16>(0xFF00));    \
      }                                                                                                             \
  }                                                                                                                 \

SK_DEFINE_PAIR_ROWS_SMALL(pair_small_bf16, SK_AVX512_BF16)
SK_DEFINE_PAIR_ROWS_SMALL(pair_small_vnni, SK_AVX512_VNNI)
#undef SK_DEFINE_PAIR_ROWS_SMALL

// ------------------------------------------------------------------------------------------------- tiles
// Register tile 4 weight rows x 4 activation rows: 16 accumulators + 4 index + 4 value + 2 activation registers fit
// the 32 zmm; edge tiles use the smaller instantiations (tile_loop in spmm_24.h).
//
// Where the time goes (measured on the 2-core AMD EPYC dev machine, Zen 4): the inner loop issues one permute and one
// multiply-add per chunk and activation row, plus ~3 index instructions per chunk and weight row. Decode (M <= 4) is
// bound by the weight stream, which is 53-56 % of the dense bytes (~15-19 GB/s reached): ~1.7x faster than F.linear
// in fp32; in bf16 3-5x against the F.linear we measured on the loaded machine, but only ~1.3-1.5x against the 4.5 ms
// quiet-machine figure of issue 10. From M ~ 8 on bf16 is bound by vector instruction issue, and 2 instructions per 32
// kept products is no better than a dense vdpbf16ps kernel's 1 per 32 dense products (tools/cpu_microbench.cpp: a
// vpermt2w + vdpbf16ps pair issues at ~1.95 cycles on Zen 4, one vdpbf16ps at 1). From M = 80 on the row-pair kernels
// below (one-source vpermw, ~1.39 cycles a pair, K-blocked) take over for bf16 and int8; fp32 goes to the token lanes.
// Tried and measured slower, so not kept: 2 x 8 register tiles, K-blocking with parked vector accumulators, caching
// the index vectors across activation-row blocks. Software prefetch of the next weight rows (in the last pass over
// the current ones) is kept: neutral to slightly positive. bf16 tiles of 3 x 6, 2 x 8 and 4 x 5 were measured against
// 4 x 4 with both threads (M = 1, 16, 64; 11008 x 4096 and 4096 x 11008): none better, 2 x 8 worse.
constexpr int kNB = 4, kMB = 4;

template <WType W>
struct F32Micro {
  template <int NB, int MB>
  struct At {
    static void run(const Problem& p, int64_t n, int64_t m, float* acc, int64_t ld) {
      micro_base<F32Lanes<W>, NB, MB>(p, n, m, acc, ld);
    }
  };
};
template <int NB, int MB>
struct BF16Micro {
  static void run(const Problem& p, int64_t n, int64_t m, float* acc, int64_t ld) {
    micro_bf16<BF16Pairs, NB, MB>(p, n, m, acc, ld);
  }
};
template <int NB, int MB>
struct I8VnniMicro {
  static void run(const Problem& p, int64_t n, int64_t m, int32_t* acc, int64_t ld) {
    micro_vnni<I8PairsVnni, NB, MB>(p, n, m, acc, ld);
  }
};
template <int NB, int MB>
struct BF16PairSmallMicro {
  static void run(const Problem& p, int64_t n, int64_t m, float* acc, int64_t ld) {
    pair_small_bf16<Pair16<BF16Pairs>, NB, MB>(p, n, m, acc, ld);
  }
};
template <int NB, int MB>
struct I8VnniPairSmallMicro {
  static void run(const Problem& p, int64_t n, int64_t m, int32_t* acc, int64_t ld) {
    pair_small_vnni<Pair16<I8PairsVnni>, NB, MB>(p, n, m, acc, ld);
  }
};
template <int NB, int MB>
struct I8Micro {
  static void run(const Problem& p, int64_t n, int64_t m, int32_t* acc, int64_t ld) {
    micro_base<I8Pairs, NB, MB>(p, n, m, acc, ld);
  }
};

}  // namespace

bool avx512_kernel(WType w, bool extensions, Kernel* out) {
  const CpuFeatures& f = cpu_features();
  if (!f.avx512) return false;
  const bool bf16 = extensions && f.avx512_bf16, vnni = extensions && f.avx512_vnni;
  switch (w) {
    case WType::kF32:
      *out = {XType::kF32, &tile_loop<float, F32Micro<WType::kF32>::At, kNB, kMB>, "avx512-f32"};
      return true;
    case WType::kF16:
      *out = {XType::kF32, &tile_loop<float, F32Micro<WType::kF16>::At, kNB, kMB>, "avx512-f16"};
      return true;
    case WType::kBF16:
      if (bf16) {
        *out = {XType::kBF16, &tile_loop<float, BF16Micro, kNB, kMB>, "avx512-bf16-dp"};
      } else {
        *out = {XType::kF32, &tile_loop<float, F32Micro<WType::kBF16>::At, kNB, kMB>, "avx512-bf16-f32"};
      }
      return true;
    case WType::kI8:
      if (vnni) {
        *out = {XType::kI16, &tile_loop<int32_t, I8VnniMicro, kNB, kMB>, "avx512-i8-vnni"};
      } else {
        *out = {XType::kI16, &tile_loop<int32_t, I8Micro, kNB, kMB>, "avx512-i8"};
      }
      return true;
  }
  return false;
}

// The M from which each family (and each of the rows family's two kernels) runs is the dispatch's choice, with the
// measurements behind it: dispatch.cpp (kDefaultThresholds).
bool avx512_row_pair_kernel(WType w, bool extensions, Kernel* out) {
  const CpuFeatures& f = cpu_features();
  if (!f.avx512 || !extensions) return false;
  if (w == WType::kBF16 && f.avx512_bf16) {
    *out = {XType::kBF16, &tile_loop<float, BF16PairSmallMicro, kNB2, kMB2>, "avx512-bf16-dp-pairs-unblocked"};
    return true;
  }
  if (w == WType::kI8 && f.avx512_vnni) {
    *out = {XType::kI16, &tile_loop<int32_t, I8VnniPairSmallMicro, kNB2, kMB2>, "avx512-i8-vnni-pairs-unblocked"};
    return true;
  }
  return false;
}

// vpdpbusd kernel: exact while every lane's int32 sum of (x + 128) * w stays in range: K * 255 * 128 < 2^31.
constexpr int64_t kU8MaxK = (int64_t{1} << 31) / (255 * 128) - 1;

bool avx512_pair_kernel(WType w, bool extensions, int64_t K, Kernel* out) {
  const CpuFeatures& f = cpu_features();
  if (!f.avx512) return false;
  if (w == WType::kBF16 && extensions && f.avx512_bf16) {
    *out = {XType::kBF16, &pair_rows_bf16_tile<Pair16<BF16Pairs>>::run, "avx512-bf16-dp-pairs", kPairCols};
    return true;
  }
  if (w == WType::kI8) {
    if (extensions && f.avx512_vnni && f.avx512_vbmi && K <= kU8MaxK) {
      *out = {XType::kU8, &pair_rows_u8_tile<PairU8>::run, "avx512-i8-vnni-u8-pairs", kPairCols, 64};
    } else if (extensions && f.avx512_vnni) {
      *out = {XType::kI16, &pair_rows_vnni_tile<Pair16<I8PairsVnni>>::run, "avx512-i8-vnni-pairs", kPairCols};
    } else {
      *out = {XType::kI16, &pair_rows_base_tile<Pair16<I8Pairs>>::run, "avx512-i8-pairs", kPairCols};
    }
    return true;
  }
  return false;  // float32 / float16 weights, and bfloat16 without AVX512_BF16: no row-pair kernel
}

}  // namespace spmm
}  // namespace cpu
}  // namespace sparsekern
