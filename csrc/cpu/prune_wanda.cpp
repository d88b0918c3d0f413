// Wanda on the CPU: one fused pass per row computes the metric |w| * sqrt(s_j), selects what to keep, and writes
// the pruned weight and the keep-mask. Rows are independent and split across threads (at::parallel_for).
//
//   N:M (m > 0):  in every aligned group of m along the row, keep the m - n largest metrics (core/nm.h
//                 select_keep_mask: ties keep the lower column), prune the n others.
//   unstructured: per row, prune the k = int(cols * sparsity) smallest metrics in stable ascending order (ties:
//                 the lower column is pruned first), as the reference's `torch.sort(stable=True)[:, :k]`.
// The reference's `use_variant` (alpha bisection on cumulative metric sums) is done in Python on top of this op's
// metric definition (python/sparsekern/prune/wanda.py); it is a whole-matrix search, not a per-row kernel.
//
// N:M is memory-bound (4096 x 4096 fp32: 64 MiB read, 80 MiB of fresh output written), so the N:M row kernels
// read each weight once from memory and write the outputs straight from registers: load, metric, select and the
// masked stores of weight and mask happen on the same vector, with no scratch row and no second pass.
// Selection in registers: the ranks of nm.h's rule (rank of j = number of group members ahead of it in keep order;
// i < j is ahead when s_i >= s_j, i > j when s_i > s_j; keep when rank < m - n) are counted by comparing the vector
// with its m - 1 rotations inside each group (a rotation by r puts s_{(j + r) mod m} in lane j).
//   AVX-512 (f+bw+vl+dq): m = 2, 4, 8, 16, 16 weights per step; comparisons give bit masks, and the masks drive
//                         the zeroing move of the weight and the 0/1 mask bytes directly.
//   AVX2 (+f16c):         m = 2, 4, 8, 8 weights per step; mask bytes from the sign bits through a 256-entry table.
//   scalar:               any m; the metric loop is compiler-vectorised, the selection per group through nm.h.
// The path is the best the CPU supports, or the one forced with SPARSEKERN_CPU_ISA=avx512|avx2|scalar (read once at
// load) or sparsekern._C.cpu_dispatch_set, so tests run every path on one machine: decided in cpu/dispatch.cpp
// (wanda_isa), with the CPU-feature probe the CPU sparse GEMM uses too. The vector paths are compiled with function
// target attributes, so the library still runs on a CPU with neither.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SK_WANDA_X86 1
// GCC 12 reports the deliberately undefined lanes inside its own AVX-512 intrinsics as uninitialised once they are
// inlined into target-attributed functions (a known false positive; spmm_24_avx512.cpp silences it too).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#else
#define SK_WANDA_X86 0
#endif
#include <vector>

#include "core/nm.h"
#include "core/prune.h"
#include "core/prune_checks.h"
#include "cpu/dispatch.h"

namespace sparsekern {
namespace {

static_assert(sizeof(bool) == 1, "the keep bytes are written into bool tensors");

using cpu::Isa;

// ------------------------------------------------------------------------------------------------- scalar pieces
// Metrics of one row into `metric` (float32). A separate, branch-free loop so the compiler vectorises it.
// Returns whether any metric is not finite (v - v is 0 only for finite v): NaN / Inf in w or act_scale, or an
// overflowing product. The op refuses such input (after the pass, so the check costs no extra read of w).
template <typename T>
inline bool row_metric(const T* w, const float* sqrt_scale, float* metric, int64_t cols) {
  int bad = 0;
  for (int64_t j = 0; j < cols; ++j) {
    const float v = core::wanda_metric(static_cast<float>(w[j]), sqrt_scale[j]);
    metric[j] = v;
    bad |= !(v - v == 0.f);
  }
  return bad != 0;
}

// out = keep ? w : +0, on the bit patterns: branch-free (a 50 % unpredictable branch per weight costs more than
// the rest of the kernel) and vectorisable; +0 exactly, as the reference's W[mask] = 0.
template <typename T>
inline void row_apply_keep(const T* w, const uint8_t* keep, T* out, int64_t cols) {
  using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;
  static_assert(sizeof(Bits) == sizeof(T), "weight type of unexpected size");
  const Bits* wb = reinterpret_cast<const Bits*>(w);
  Bits* ob = reinterpret_cast<Bits*>(out);
  for (int64_t j = 0; j < cols; ++j) ob[j] = wb[j] & static_cast<Bits>(Bits(0) - static_cast<Bits>(keep[j]));
}

// Keep bits of one group of m finite metrics by nm.h's rule (the branch-free forms for m = 4 and 8).
inline uint32_t group_keep_bits(const float* metric, int n, int m) {
  if (m == 4) return core::select_keep_mask_m4(metric[0], metric[1], metric[2], metric[3], n);
  if (m == 8) return core::select_keep_mask_finite<8>(metric, n);
  return core::select_keep_mask(metric, n, m);
}

// The groups of columns [j0, j1) of one row, one group at a time (the vector paths' tails). Returns "not finite".
template <typename T>
inline bool groups_nm_scalar(const T* w, const float* sqrt_scale, T* out, uint8_t* keep, int64_t j0, int64_t j1,
                             int n, int m) {
  bool bad = false;
  for (int64_t g0 = j0; g0 < j1; g0 += m) {
    float metric[core::kMaxGroup];
    bad |= row_metric(w + g0, sqrt_scale + g0, metric, m);
    const uint32_t bits = group_keep_bits(metric, n, m);
    for (int k = 0; k < m; ++k) keep[g0 + k] = (bits >> k) & 1u;
    row_apply_keep(w + g0, keep + g0, out + g0, m);
  }
  return bad;
}

// Scalar N:M row (any m): the vectorisable metric loop into a scratch row, the selection per group, the masked copy.
template <typename T>
bool row_nm_scalar(const T* w, const float* sqrt_scale, T* out, uint8_t* keep, int64_t cols, int n, int m,
                   float* metric) {
  const bool bad = row_metric(w, sqrt_scale, metric, cols);
  if (bad) return true;  // the op fails; what the row would hold does not matter
  for (int64_t g0 = 0; g0 < cols; g0 += m) {
    const uint32_t bits = group_keep_bits(metric + g0, n, m);
    for (int k = 0; k < m; ++k) keep[g0 + k] = (bits >> k) & 1u;
  }
  row_apply_keep(w, keep, out, cols);
  return false;
}

// Unstructured selection of one row: the k smallest (metric, column) keys are pruned. nth_element on unique
// 64-bit keys is O(cols) and reproduces the stable sort's tie order exactly (the metrics are never -0 here: see
// sqrt_scale in wanda_prune_cpu).
inline void row_keep_unstructured(const float* metric, int64_t cols, int64_t k, uint64_t* keys, uint8_t* keep) {
  if (k == 0) {
    std::fill(keep, keep + cols, uint8_t{1});
    return;
  }
  for (int64_t j = 0; j < cols; ++j) keys[j] = core::stable_score_key(metric[j], static_cast<uint32_t>(j));
  std::nth_element(keys, keys + (k - 1), keys + cols);
  const uint64_t last_pruned = keys[k - 1];
  for (int64_t j = 0; j < cols; ++j) {
    keep[j] = core::stable_score_key(metric[j], static_cast<uint32_t>(j)) > last_pruned;
  }
}

// Rotation inside groups of M lanes: lane l reads lane (l & ~(M - 1)) | ((l + R) & (M - 1)).
constexpr int rot_src(int l, int M, int R) { return (l & ~(M - 1)) | ((l + R) & (M - 1)); }
// Lanes whose rotated partner i = (j + R) mod M has the lower column (j mod M + R >= M): there a tie (s_i == s_j)
// puts i ahead of j, so ">=" counts; elsewhere i is the higher column and only ">" counts.
constexpr uint32_t lower_partner_lanes(int lanes, int M, int R) {
  uint32_t bits = 0;
  for (int l = 0; l < lanes; ++l) bits |= static_cast<uint32_t>((l % M) + R >= M) << l;
  return bits;
}
// vpermilps immediate of the rotation inside each 128-bit lane (M = 2 or 4).
constexpr int rot_imm(int M, int R) {
  return rot_src(0, M, R) | (rot_src(1, M, R) << 2) | (rot_src(2, M, R) << 4) | (rot_src(3, M, R) << 6);
}

#if SK_WANDA_X86
// ------------------------------------------------------------------------------------------------- AVX-512
#define SK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

// 16 weights as float32 (exact for fp16 / bf16) and their raw bits (for the masked copy), masked lanes read as 0.
template <typename T>
struct V512;
template <>
struct V512<float> {
  using Raw = __m512;
  SK_AVX512 static Raw load(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
  SK_AVX512 static __m512 to_float(Raw r) { return r; }
  SK_AVX512 static void store_kept(float* p, __mmask16 valid, __mmask16 keep, Raw r) {
    _mm512_mask_storeu_ps(p, valid, _mm512_maskz_mov_ps(keep, r));
  }
};
template <>
struct V512<c10::Half> {
  using Raw = __m256i;
  SK_AVX512 static Raw load(const c10::Half* p, __mmask16 k) { return _mm256_maskz_loadu_epi16(k, p); }
  SK_AVX512 static __m512 to_float(Raw r) { return _mm512_cvtph_ps(r); }
  SK_AVX512 static void store_kept(c10::Half* p, __mmask16 valid, __mmask16 keep, Raw r) {
    _mm256_mask_storeu_epi16(p, valid, _mm256_maskz_mov_epi16(keep, r));
  }
};
template <>
struct V512<c10::BFloat16> {
  using Raw = __m256i;
  SK_AVX512 static Raw load(const c10::BFloat16* p, __mmask16 k) { return _mm256_maskz_loadu_epi16(k, p); }
  SK_AVX512 static __m512 to_float(Raw r) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(r), 16));
  }
  SK_AVX512 static void store_kept(c10::BFloat16* p, __mmask16 valid, __mmask16 keep, Raw r) {
    _mm256_mask_storeu_epi16(p, valid, _mm256_maskz_mov_epi16(keep, r));
  }
};

template <int M, int R>
SK_AVX512 inline __m512 rotate512(__m512 s) {
  if constexpr (M <= 4) {
    return _mm512_permute_ps(s, rot_imm(M, R));  // in-lane: cheaper than a full permute
  } else {
    const __m512i idx = _mm512_setr_epi32(rot_src(0, M, R), rot_src(1, M, R), rot_src(2, M, R), rot_src(3, M, R),
                                          rot_src(4, M, R), rot_src(5, M, R), rot_src(6, M, R), rot_src(7, M, R),
                                          rot_src(8, M, R), rot_src(9, M, R), rot_src(10, M, R), rot_src(11, M, R),
                                          rot_src(12, M, R), rot_src(13, M, R), rot_src(14, M, R), rot_src(15, M, R));
    return _mm512_permutexvar_ps(idx, s);
  }
}

// Bit mask of the lanes where the partner at rotation R is ahead in keep order.
template <int M, int R>
SK_AVX512 inline __mmask16 ahead512(__m512 s) {
  constexpr __mmask16 lower = static_cast<__mmask16>(lower_partner_lanes(16, M, R));
  const __m512 p = rotate512<M, R>(s);
  return _mm512_mask_cmp_ps_mask(lower, p, s, _CMP_GE_OQ) |
         _mm512_mask_cmp_ps_mask(static_cast<__mmask16>(~lower), p, s, _CMP_GT_OQ);
}

template <int M, int... R>
SK_AVX512 inline __m512i ranks512(__m512 s, std::integer_sequence<int, R...>) {
  const __m512i one = _mm512_set1_epi32(1);
  __m512i rank = _mm512_setzero_si512();
  ((rank = _mm512_mask_add_epi32(rank, ahead512<M, R + 1>(s), rank, one)), ...);
  return rank;
}

// Keep bits of 16 finite metrics (16 / M whole groups). K = m - n when it is a template constant (m = 4: the
// boolean form below), 0 when it comes at run time in keep_count.
template <int M, int K>
SK_AVX512 inline __mmask16 keep512(__m512 s, __m512i keep_count) {
  if constexpr (K > 0) {
    static_assert(M == 4, "the boolean form is written for groups of four");
    // "rank < K" from the three "ahead" masks: fewer than K of them set.
    const uint32_t a = ahead512<4, 1>(s), b = ahead512<4, 2>(s), c = ahead512<4, 3>(s);
    const uint32_t bits = K == 2 ? ~((a & b) | (a & c) | (b & c)) : (K == 1 ? ~(a | b | c) : ~(a & b & c));
    return static_cast<__mmask16>(bits);
  } else {
    return _mm512_cmplt_epi32_mask(ranks512<M>(s, std::make_integer_sequence<int, M - 1>{}), keep_count);
  }
}

template <typename T, int M, int K>
SK_AVX512 bool row_nm_avx512_loop(const T* w, const float* sqrt_scale, T* out, uint8_t* keep, int64_t cols, int n) {
  using V = V512<T>;
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512i keep_count = _mm512_set1_epi32(M - n);
  const __m128i one = _mm_set1_epi8(1);
  __mmask16 bad = 0;
  for (int64_t j = 0; j < cols; j += 16) {
    // Whole groups only: cols is a multiple of M and M divides 16, so a partial last step masks whole groups.
    const __mmask16 valid = cols - j >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (cols - j)) - 1);
    const typename V::Raw raw = V::load(w + j, valid);
    // |w| * sqrt(s) rounded once in float32, exactly core::wanda_metric (no FMA: a single product).
    const __m512 metric = _mm512_mul_ps(_mm512_and_ps(V::to_float(raw), abs_mask),
                                        _mm512_maskz_loadu_ps(valid, sqrt_scale + j));
    bad |= _mm512_fpclass_ps_mask(metric, 0x99);  // QNaN | +Inf | -Inf | SNaN
    const __mmask16 k = keep512<M, K>(metric, keep_count);
    V::store_kept(out + j, valid, k, raw);
    _mm_mask_storeu_epi8(keep + j, valid, _mm_maskz_mov_epi8(k, one));
  }
  return bad != 0;
}

template <typename T, int M>
SK_AVX512 bool row_nm_avx512(const T* w, const float* sqrt_scale, T* out, uint8_t* keep, int64_t cols, int n) {
  if constexpr (M == 4) {
    switch (4 - n) {
      case 1: return row_nm_avx512_loop<T, 4, 1>(w, sqrt_scale, out, keep, cols, n);
      case 2: return row_nm_avx512_loop<T, 4, 2>(w, sqrt_scale, out, keep, cols, n);
      default: return row_nm_avx512_loop<T, 4, 3>(w, sqrt_scale, out, keep, cols, n);
    }
  } else {
    return row_nm_avx512_loop<T, M, 0>(w, sqrt_scale, out, keep, cols, n);
  }
}

// ------------------------------------------------------------------------------------------------- AVX2
#define SK_AVX2 __attribute__((target("avx2,f16c")))

template <typename T>
struct V256;
template <>
struct V256<float> {
  using Raw = __m256;
  SK_AVX2 static Raw load(const float* p) { return _mm256_loadu_ps(p); }
  SK_AVX2 static __m256 to_float(Raw r) { return r; }
  SK_AVX2 static void store_kept(float* p, __m256 keep, Raw r) { _mm256_storeu_ps(p, _mm256_and_ps(r, keep)); }
};
template <typename T>
struct V256Half16 {  // 16-bit weights: 8 raw values in an xmm; the keep lanes narrowed to 16 bits for the AND
  using Raw = __m128i;
  SK_AVX2 static Raw load(const T* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }
  SK_AVX2 static void store_kept(T* p, __m256 keep, Raw r) {
    const __m256i k = _mm256_castps_si256(keep);
    const __m128i k16 = _mm_packs_epi32(_mm256_castsi256_si128(k), _mm256_extracti128_si256(k, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_and_si128(r, k16));
  }
};
template <>
struct V256<c10::Half> : V256Half16<c10::Half> {
  SK_AVX2 static __m256 to_float(Raw r) { return _mm256_cvtph_ps(r); }
};
template <>
struct V256<c10::BFloat16> : V256Half16<c10::BFloat16> {
  SK_AVX2 static __m256 to_float(Raw r) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(r), 16));
  }
};

// Byte b of entry x is bit b of x: eight 0/1 mask bytes from a movemask in one load.
constexpr std::array<uint64_t, 256> make_byte_table() {
  std::array<uint64_t, 256> t{};
  for (int x = 0; x < 256; ++x) {
    uint64_t v = 0;
    for (int b = 0; b < 8; ++b) v |= static_cast<uint64_t>((x >> b) & 1) << (8 * b);
    t[x] = v;
  }
  return t;
}
constexpr std::array<uint64_t, 256> kMaskBytes = make_byte_table();

template <int M, int R>
SK_AVX2 inline __m256 rotate256(__m256 s) {
  if constexpr (M <= 4) {
    return _mm256_permute_ps(s, rot_imm(M, R));
  } else {
    return _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(rot_src(0, M, R), rot_src(1, M, R), rot_src(2, M, R),
                                                          rot_src(3, M, R), rot_src(4, M, R), rot_src(5, M, R),
                                                          rot_src(6, M, R), rot_src(7, M, R)));
  }
}

// rank - 1 for every lane whose partner at rotation R is ahead (comparisons give -1 = true).
template <int M, int R>
SK_AVX2 inline __m256i count_ahead256(__m256i rank, __m256 s) {
  const __m256 p = rotate256<M, R>(s);
  const __m256 ahead = _mm256_blend_ps(_mm256_cmp_ps(p, s, _CMP_GT_OQ), _mm256_cmp_ps(p, s, _CMP_GE_OQ),
                                       static_cast<int>(lower_partner_lanes(8, M, R)));
  return _mm256_add_epi32(rank, _mm256_castps_si256(ahead));
}

template <int M, int... R>
SK_AVX2 inline __m256 keep256(__m256 s, __m256i neg_keep_count, std::integer_sequence<int, R...>) {
  __m256i neg_rank = _mm256_setzero_si256();
  ((neg_rank = count_ahead256<M, R + 1>(neg_rank, s)), ...);
  // keep when rank < keep, i.e. -rank > -keep.
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(neg_rank, neg_keep_count));
}

template <typename T, int M>
SK_AVX2 bool row_nm_avx2(const T* w, const float* sqrt_scale, T* out, uint8_t* keep, int64_t cols, int n) {
  using V = V256<T>;
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i neg_keep_count = _mm256_set1_epi32(-(M - n));
  __m256 bad = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8) {
    const typename V::Raw raw = V::load(w + j);
    const __m256 metric = _mm256_mul_ps(_mm256_and_ps(V::to_float(raw), abs_mask), _mm256_loadu_ps(sqrt_scale + j));
    // metric - metric is 0 exactly for finite metrics, NaN otherwise (unordered compare with 0).
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_sub_ps(metric, metric), _mm256_setzero_ps(), _CMP_NEQ_UQ));
    const __m256 k = keep256<M>(metric, neg_keep_count, std::make_integer_sequence<int, M - 1>{});
    V::store_kept(out + j, k, raw);
    const uint64_t bytes = kMaskBytes[_mm256_movemask_ps(k)];
    std::memcpy(keep + j, &bytes, sizeof(bytes));
  }
  bool any_bad = _mm256_movemask_ps(bad) != 0;
  if (j < cols) any_bad |= groups_nm_scalar(w, sqrt_scale, out, keep, j, cols, n, M);  // the last < 8 columns
  return any_bad;
}
#endif  // SK_WANDA_X86

// ------------------------------------------------------------------------------------------------- driver
template <typename T>
using RowNm = bool (*)(const T*, const float*, T*, uint8_t*, int64_t, int);

// The vector row kernel for (isa, m), or nullptr where only the scalar path handles m.
template <typename T>
RowNm<T> vector_row_nm(Isa isa, int m) {
#if SK_WANDA_X86
  if (isa == Isa::kAvx512) {
    switch (m) {
      case 2: return &row_nm_avx512<T, 2>;
      case 4: return &row_nm_avx512<T, 4>;
      case 8: return &row_nm_avx512<T, 8>;
      case 16: return &row_nm_avx512<T, 16>;
      default: break;
    }
  }
  if (isa >= Isa::kAvx2) {
    switch (m) {
      case 2: return &row_nm_avx2<T, 2>;
      case 4: return &row_nm_avx2<T, 4>;
      case 8: return &row_nm_avx2<T, 8>;
      default: break;
    }
  }
#else
  (void)isa;
  (void)m;
#endif
  return nullptr;
}

// Fresh outputs of a large layer (64 MiB + 16 MiB at 4096 x 4096 fp32) are new anonymous pages, and faulting them
// in 4 KiB at a time costs as much as the pruning itself. Where the kernel leaves transparent huge pages to
// madvise, ask for them on the 2 MiB-aligned interior before the first write (a hint: failure changes nothing).
// SPARSEKERN_NO_HUGEPAGE_HINT=1 (read once at load; cpu/dispatch.h) turns the hint off (where direct compaction
// stalls cost more than it saves).
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

template <typename T>
int64_t wanda_kernel(Isa isa, const T* w, const float* sqrt_scale, T* out, bool* keep_mask, int64_t rows,
                     int64_t cols, int n, int m, int64_t k) {
  std::atomic<int64_t> first_bad_row{rows};
  const RowNm<T> vector_row = m > 0 ? vector_row_nm<T>(isa, m) : nullptr;
  // ~32k elements per task keeps the per-task overhead small next to the work.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    // Scratch rows only for the paths that need them (the vector N:M kernels work from registers).
    std::vector<float> metric(vector_row ? 0 : cols);
    std::vector<uint64_t> keys(m > 0 ? 0 : cols);
    for (int64_t r = r0; r < r1; ++r) {
      const T* wr = w + r * cols;
      T* outr = out + r * cols;
      // bool is one byte holding 0 / 1: the keep bytes are written straight into the mask row.
      uint8_t* keep = reinterpret_cast<uint8_t*>(keep_mask + r * cols);
      bool bad;
      if (vector_row) {
        bad = vector_row(wr, sqrt_scale, outr, keep, cols, n);
      } else if (m > 0) {
        bad = row_nm_scalar(wr, sqrt_scale, outr, keep, cols, n, m, metric.data());
      } else {
        bad = row_metric(wr, sqrt_scale, metric.data(), cols);
        if (!bad) {
          row_keep_unstructured(metric.data(), cols, k, keys.data(), keep);
          row_apply_keep(wr, keep, outr, cols);
        }
      }
      if (bad) {
        int64_t seen = first_bad_row.load();
        while (r < seen && !first_bad_row.compare_exchange_weak(seen, r)) {
        }
      }
    }
  });
  return first_bad_row.load();
}

std::tuple<at::Tensor, at::Tensor> wanda_prune_cpu(const at::Tensor& w, const at::Tensor& act_scale, int64_t n,
                                                   int64_t m, double sparsity) {
  core::check_wanda_args(w, act_scale);
  const int64_t rows = w.size(0), cols = w.size(1);
  int64_t k = 0;
  if (m > 0) {
    core::check_wanda_nm(cols, n, m);
  } else {
    TORCH_CHECK(m == 0, "wanda_prune: m must be 0 (unstructured) or the N:M group size, got ", m);
    TORCH_CHECK(sparsity >= 0.0 && sparsity < 1.0, "wanda_prune: sparsity must be in [0, 1), got ", sparsity);
    TORCH_CHECK(cols < (int64_t{1} << 32), "wanda_prune: in_features must be < 2^32");
    k = static_cast<int64_t>(static_cast<double>(cols) * sparsity);  // Python's int(cols * sparsity)
  }
  const cpu::DispatchSettings& ds = cpu::dispatch_settings();
  const Isa isa = cpu::wanda_isa(ds);
  auto wc = w.contiguous();
  // sqrt once per column, by torch (correctly rounded, as the reference's torch.sqrt). abs_ turns sqrt(-0) = -0 (an
  // act_scale of -0) into +0 and changes nothing else (NaN stays NaN): a -0 metric ties with +0 in the reference's
  // sort and in every comparison here, but its bits would order it above +inf in the unstructured path's keys.
  auto sqrt_scale = act_scale.sqrt().abs_().contiguous();
  auto out = at::empty_like(wc, at::MemoryFormat::Contiguous);
  auto keep_mask = at::empty({rows, cols}, wc.options().dtype(at::kBool));
  if (ds.huge_page_hint) {
    advise_huge_pages(out.data_ptr(), out.nbytes());
    advise_huge_pages(keep_mask.data_ptr(), keep_mask.nbytes());
  }
  int64_t bad_row = rows;
  const int ni = static_cast<int>(n), mi = static_cast<int>(m);
  switch (wc.scalar_type()) {  // check_wanda_args allows these three
    case at::kFloat:
      bad_row = wanda_kernel<float>(isa, wc.const_data_ptr<float>(), sqrt_scale.const_data_ptr<float>(),
                                    out.data_ptr<float>(), keep_mask.data_ptr<bool>(), rows, cols, ni, mi, k);
      break;
    case at::kHalf:
      bad_row = wanda_kernel<c10::Half>(isa, wc.const_data_ptr<c10::Half>(), sqrt_scale.const_data_ptr<float>(),
                                        out.data_ptr<c10::Half>(), keep_mask.data_ptr<bool>(), rows, cols, ni, mi, k);
      break;
    default:
      bad_row = wanda_kernel<c10::BFloat16>(isa, wc.const_data_ptr<c10::BFloat16>(),
                                            sqrt_scale.const_data_ptr<float>(), out.data_ptr<c10::BFloat16>(),
                                            keep_mask.data_ptr<bool>(), rows, cols, ni, mi, k);
      break;
  }
  TORCH_CHECK(bad_row == rows, "wanda_prune: w contains NaN or Inf (or |w| * sqrt(act_scale) overflows), first in row ",
              bad_row, "; pruning needs finite scores");
  return {out, keep_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("wanda_prune", &wanda_prune_cpu); }

}  // namespace sparsekern
