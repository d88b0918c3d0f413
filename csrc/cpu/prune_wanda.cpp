// Wanda on the CPU: one fused pass per row computes the metric |w| * sqrt(s_j), selects what to keep, and writes
// the pruned weight and the keep-mask. Rows are independent and split across threads (at::parallel_for).
//
//   N:M (m > 0):  in every aligned group of m along the row, keep the m - n largest metrics (core/nm.h
//                 select_keep_mask: ties keep the lower column), prune the n others.
//   unstructured: per row, prune the k = int(cols * sparsity) smallest metrics in stable ascending order (ties:
//                 the lower column is pruned first), as the reference's `torch.sort(stable=True)[:, :k]`.
// The reference's `use_variant` (alpha bisection on cumulative metric sums) is done in Python on top of this op's
// metric definition (python/sparsekern/prune/wanda.py); it is a whole-matrix search, not a per-row kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <type_traits>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
#include <immintrin.h>
#endif
#include <vector>

#include "core/nm.h"
#include "core/prune.h"
#include "core/prune_checks.h"

namespace sparsekern {
namespace {

static_assert(sizeof(bool) == 1, "the keep bytes are written into bool tensors");

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

#if defined(__SSE2__)
// Keep bytes (0/1) of four groups of four (metric[0..16)): the rank formulas of core::select_keep_mask_m4 on
// four groups at once. Transposing puts position j of the four groups in one register, so the six comparisons
// and the rank sums are plain vector ops.
inline void keep_m4_x4_sse(const float* metric, int keep, uint8_t* out) {
  __m128 a = _mm_loadu_ps(metric), b = _mm_loadu_ps(metric + 4), c = _mm_loadu_ps(metric + 8),
         d = _mm_loadu_ps(metric + 12);
  _MM_TRANSPOSE4_PS(a, b, c, d);  // a = s0 of groups 0..3, b = s1, c = s2, d = s3
  // Comparison masks are -1 where true, so "- c_ij" is "+ m_ij".
  const __m128i m01 = _mm_castps_si128(_mm_cmpge_ps(a, b)), m02 = _mm_castps_si128(_mm_cmpge_ps(a, c)),
                m03 = _mm_castps_si128(_mm_cmpge_ps(a, d)), m12 = _mm_castps_si128(_mm_cmpge_ps(b, c)),
                m13 = _mm_castps_si128(_mm_cmpge_ps(b, d)), m23 = _mm_castps_si128(_mm_cmpge_ps(c, d));
  const __m128i k = _mm_set1_epi32(keep);
  const __m128i r0 = _mm_add_epi32(_mm_set1_epi32(3), _mm_add_epi32(m01, _mm_add_epi32(m02, m03)));
  const __m128i r1 = _mm_add_epi32(_mm_sub_epi32(_mm_set1_epi32(2), m01), _mm_add_epi32(m12, m13));
  const __m128i r2 = _mm_add_epi32(_mm_sub_epi32(_mm_sub_epi32(_mm_set1_epi32(1), m02), m12), m23);
  const __m128i r3 = _mm_sub_epi32(_mm_sub_epi32(_mm_sub_epi32(_mm_setzero_si128(), m03), m13), m23);
  __m128 k0 = _mm_castsi128_ps(_mm_cmplt_epi32(r0, k)), k1 = _mm_castsi128_ps(_mm_cmplt_epi32(r1, k)),
         k2 = _mm_castsi128_ps(_mm_cmplt_epi32(r2, k)), k3 = _mm_castsi128_ps(_mm_cmplt_epi32(r3, k));
  _MM_TRANSPOSE4_PS(k0, k1, k2, k3);  // back to memory order: k0 = the four positions of group 0
  const __m128i lo = _mm_packs_epi32(_mm_castps_si128(k0), _mm_castps_si128(k1));
  const __m128i hi = _mm_packs_epi32(_mm_castps_si128(k2), _mm_castps_si128(k3));
  const __m128i bytes = _mm_and_si128(_mm_packs_epi16(lo, hi), _mm_set1_epi8(1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(out), bytes);
}
#endif

// Keep bytes of one row for m = 4 (finite metrics: rows with NaN / Inf are refused before this).
inline void row_keep_m4(const float* metric, int64_t cols, int n, uint8_t* keep) {
  int64_t j = 0;
#if defined(__SSE2__)
  for (; j + 16 <= cols; j += 16) keep_m4_x4_sse(metric + j, 4 - n, keep + j);
#endif
  for (; j < cols; j += 4) {
    const uint32_t bits = core::select_keep_mask_m4(metric[j], metric[j + 1], metric[j + 2], metric[j + 3], n);
    for (int k = 0; k < 4; ++k) keep[j + k] = (bits >> k) & 1u;
  }
}

// Keep bytes of one row, any m <= kMaxGroup, nm.h's rule (m = 8 unrolled: the scores are finite here).
inline void row_keep_nm(const float* metric, int64_t cols, int n, int m, uint8_t* keep) {
  for (int64_t g0 = 0; g0 < cols; g0 += m) {
    const uint32_t bits = m == 8 ? core::select_keep_mask_finite<8>(metric + g0, n)
                                 : core::select_keep_mask(metric + g0, n, m);
    for (int k = 0; k < m; ++k) keep[g0 + k] = (bits >> k) & 1u;
  }
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

// Unstructured selection of one row: the k smallest (metric, column) keys are pruned. nth_element on unique
// 64-bit keys is O(cols) and reproduces the stable sort's tie order exactly.
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

// Fresh outputs of a large layer (64 MiB + 16 MiB at 4096 x 4096 fp32) are new anonymous pages, and faulting them
// in 4 KiB at a time costs as much as the pruning itself. Where the kernel leaves transparent huge pages to
// madvise, ask for them on the 2 MiB-aligned interior before the first write (a hint: failure changes nothing).
// SPARSEKERN_NO_HUGEPAGE_HINT=1 turns the hint off (where direct compaction stalls cost more than it saves).
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool disabled = [] {
    const char* v = std::getenv("SPARSEKERN_NO_HUGEPAGE_HINT");
    return v != nullptr && v[0] != '\0' && v[0] != '0';
  }();
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (disabled || bytes < 2 * kHuge) return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

template <typename T>
int64_t wanda_kernel(const T* w, const float* sqrt_scale, T* out, bool* keep_mask, int64_t rows, int64_t cols,
                     int n, int m, int64_t k) {
  std::atomic<int64_t> first_bad_row{rows};
  // ~32k elements per task keeps the per-task overhead small next to the work.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    std::vector<float> metric(cols);
    std::vector<uint64_t> keys(m > 0 ? 0 : cols);
    for (int64_t r = r0; r < r1; ++r) {
      const T* wr = w + r * cols;
      T* outr = out + r * cols;
      bool* mr = keep_mask + r * cols;
      if (row_metric(wr, sqrt_scale, metric.data(), cols)) {
        int64_t seen = first_bad_row.load();
        while (r < seen && !first_bad_row.compare_exchange_weak(seen, r)) {
        }
        continue;
      }
      // bool is one byte holding 0 / 1: the keep bytes are written straight into the mask row.
      uint8_t* keep = reinterpret_cast<uint8_t*>(mr);
      if (m == 4) {
        row_keep_m4(metric.data(), cols, n, keep);
      } else if (m > 0) {
        row_keep_nm(metric.data(), cols, n, m, keep);
      } else {
        row_keep_unstructured(metric.data(), cols, k, keys.data(), keep);
      }
      row_apply_keep(wr, keep, outr, cols);
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
  auto wc = w.contiguous();
  // sqrt once per column, by torch (correctly rounded, as the reference's torch.sqrt).
  auto sqrt_scale = act_scale.sqrt().contiguous();
  auto out = at::empty_like(wc, at::MemoryFormat::Contiguous);
  auto keep_mask = at::empty({rows, cols}, wc.options().dtype(at::kBool));
  advise_huge_pages(out.data_ptr(), out.nbytes());
  advise_huge_pages(keep_mask.data_ptr(), keep_mask.nbytes());
  int64_t bad_row = rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "wanda_prune", [&] {
    bad_row = wanda_kernel<scalar_t>(wc.const_data_ptr<scalar_t>(), sqrt_scale.const_data_ptr<float>(),
                           out.data_ptr<scalar_t>(), keep_mask.data_ptr<bool>(), rows, cols, static_cast<int>(n),
                           static_cast<int>(m), k);
  });
  TORCH_CHECK(bad_row == rows, "wanda_prune: w contains NaN or Inf (or |w| * sqrt(act_scale) overflows), first in row ",
              bad_row, "; pruning needs finite scores");
  return {out, keep_mask};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("wanda_prune", &wanda_prune_cpu); }

}  // namespace sparsekern
