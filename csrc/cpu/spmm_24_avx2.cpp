// AVX2 tile kernels of the CPU 2:4 GEMM (driver: spmm_24.cpp), for CPUs without AVX-512. Same scheme as
// spmm_24_avx512.cpp (read its header comment): a chunk of kept values times the activations gathered from their
// columns by an in-register permute whose indices come from the packed codes.
//
// AVX2 has no two-source permute, so a chunk is 8 values = 4 groups = 16 columns (two ymm of x): both halves are
// permuted with vpermps (which uses the low 3 index bits) and blended on index bit 3.
//   float32 / float16 / bfloat16 weights: widened to fp32 on load, one FMA per chunk (fp32 activations).
//   int8: values and activations widened to int32, vpmulld + vpaddd (exact int32).
#include <immintrin.h>

// GCC 12 reports the deliberately undefined lanes inside its own AVX-512 intrinsics (_mm512_undefined_*) as
// uninitialised once they are inlined into target-attributed functions: a known false positive.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// std::conditional_t<.., __m256i, __m256> drops the vector types' alignment attributes in the alias; harmless here
// (the vectors are locals, never laid out in memory through the alias).
#pragma GCC diagnostic ignored "-Wignored-attributes"

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cpu/spmm_24.h"

#define SK_AVX2 __attribute__((target("avx2,fma,f16c")))

namespace sparsekern {
namespace cpu {
namespace spmm {
namespace {

// Lane l -> 4*(l/2) + ((word >> 2l) & 3), word = 16 code bits of 4 groups; values 0..15.
SK_AVX2 inline __m256i idx_from_codes(uint32_t word) {
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12);
  const __m256i w = _mm256_set1_epi32(static_cast<int>(word));
  return _mm256_add_epi32(_mm256_and_si256(_mm256_srlv_epi32(w, shifts), _mm256_set1_epi32(3)), base);
}

// Gather 8 lanes from the 16 values (lo, hi) at idx: permute both halves, pick by bit 3 (moved to the sign bit).
SK_AVX2 inline __m256 gather16_ps(__m256 lo, __m256 hi, __m256i idx, __m256 pick_hi) {
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), pick_hi);
}

SK_AVX2 inline float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

SK_AVX2 inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// 8 weight values of a chunk as fp32 / int32 lanes.
template <WType W>
struct Lanes;
template <>
struct Lanes<WType::kF32> {
  using wt = float;
  SK_AVX2 static inline __m256 load(const wt* v) { return _mm256_loadu_ps(v); }
};
template <>
struct Lanes<WType::kF16> {
  using wt = uint16_t;
  SK_AVX2 static inline __m256 load(const wt* v) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  }
};
template <>
struct Lanes<WType::kBF16> {
  using wt = uint16_t;
  SK_AVX2 static inline __m256 load(const wt* v) {
    const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  }
};
template <>
struct Lanes<WType::kI8> {
  using wt = int8_t;
  SK_AVX2 static inline __m256i load(const wt* v) {
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v)));
  }
};

// Code bits of the `groups` (< 4) tail groups starting at group g (even), the padding nibble dropped.
inline uint32_t tail_code_bits(const uint8_t* crow, int64_t g, int64_t groups) {
  uint32_t word = 0;
  std::memcpy(&word, crow + g / 2, static_cast<size_t>((groups + 1) / 2));
  if (groups & 1) word &= (1u << (4 * groups)) - 1;
  return word;
}

template <WType W, int NB, int MB>
SK_AVX2 void micro(const Problem& p, int64_t n, int64_t m,
                   std::conditional_t<W == WType::kI8, int32_t, float>* acc, int64_t ld) {
  using L = Lanes<W>;
  using wt = typename L::wt;
  constexpr bool kInt = W == WType::kI8;
  using xt = std::conditional_t<kInt, int32_t, float>;
  using vec = std::conditional_t<kInt, __m256i, __m256>;
  const int64_t G = p.K / 4, full = G / 4, half_k = p.K / 2, rem = G - 4 * full;
  const wt* v[NB];
  const uint8_t* c[NB];
  const xt* x[MB];
  for (int i = 0; i < NB; ++i) {
    v[i] = static_cast<const wt*>(p.values) + (n + i) * half_k;
    c[i] = p.codes + (n + i) * p.code_stride;
  }
  for (int j = 0; j < MB; ++j) x[j] = static_cast<const xt*>(p.x) + (m + j) * p.ldx;
  vec s[NB][MB];
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) {
      if constexpr (kInt) {
        s[i][j] = _mm256_setzero_si256();
      } else {
        s[i][j] = _mm256_setzero_ps();
      }
    }
  const int64_t chunks = full + (rem > 0);
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const bool tail = ch == full;
    __m256i idx[NB];
    __m256 pick[NB];
    vec w[NB];
    for (int i = 0; i < NB; ++i) {
      uint32_t word = 0;
      const wt* vp = v[i] + 8 * ch;
      wt padded[8];
      if (tail) {
        // Zero-padded copy of the last values: padded lanes multiply x's zero padding past K.
        word = tail_code_bits(c[i], 4 * full, rem);
        std::memset(padded, 0, sizeof(padded));
        std::memcpy(padded, vp, static_cast<size_t>(2 * rem) * sizeof(wt));
        vp = padded;
      } else {
        std::memcpy(&word, c[i] + 2 * ch, 2);
      }
      idx[i] = idx_from_codes(word);
      pick[i] = _mm256_castsi256_ps(_mm256_slli_epi32(idx[i], 28));
      w[i] = L::load(vp);
    }
    for (int j = 0; j < MB; ++j) {
      if constexpr (kInt) {
        const __m256 lo = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[j] + 16 * ch)));
        const __m256 hi =
            _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[j] + 16 * ch + 8)));
        for (int i = 0; i < NB; ++i) {
          const __m256i g = _mm256_castps_si256(gather16_ps(lo, hi, idx[i], pick[i]));
          s[i][j] = _mm256_add_epi32(s[i][j], _mm256_mullo_epi32(w[i], g));
        }
      } else {
        const __m256 lo = _mm256_loadu_ps(x[j] + 16 * ch), hi = _mm256_loadu_ps(x[j] + 16 * ch + 8);
        for (int i = 0; i < NB; ++i) s[i][j] = _mm256_fmadd_ps(w[i], gather16_ps(lo, hi, idx[i], pick[i]), s[i][j]);
      }
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < MB; ++j) {
      if constexpr (kInt) {
        acc[j * ld + i] = hsum_epi32(s[i][j]);
      } else {
        acc[j * ld + i] = hsum_ps(s[i][j]);
      }
    }
}

// 2 x 2 register tile: 4 accumulators + 2 x (index, blend mask, values) + 2 activation halves + temporaries fit
// the 16 ymm registers.
constexpr int kNB = 2, kMB = 2;

template <WType W>
struct Micro {
  template <int NB, int MB>
  struct At {
    static void run(const Problem& p, int64_t n, int64_t m, std::conditional_t<W == WType::kI8, int32_t, float>* acc,
                    int64_t ld) {
      micro<W, NB, MB>(p, n, m, acc, ld);
    }
  };
};

}  // namespace

bool avx2_kernel(WType w, Kernel* out) {
  if (!cpu_features().avx2) return false;
  switch (w) {
    case WType::kF32:
      *out = {XType::kF32, &tile_loop<float, Micro<WType::kF32>::At, kNB, kMB>, "avx2-f32"};
      return true;
    case WType::kF16:
      *out = {XType::kF32, &tile_loop<float, Micro<WType::kF16>::At, kNB, kMB>, "avx2-f16"};
      return true;
    case WType::kBF16:
      *out = {XType::kF32, &tile_loop<float, Micro<WType::kBF16>::At, kNB, kMB>, "avx2-bf16"};
      return true;
    case WType::kI8:
      *out = {XType::kI32, &tile_loop<int32_t, Micro<WType::kI8>::At, kNB, kMB>, "avx2-i8"};
      return true;
  }
  return false;
}

}  // namespace spmm
}  // namespace cpu
}  // namespace sparsekern
