// CPU kernels of the core N:M / 2:4 ops: prune_nm, nm_violation, compress_24, decompress_24, quantize_per_token.
// (The CPU 2:4 GEMM spmm_24 lives in spmm_24*.cpp.)
//
// Every selection / code rule comes from csrc/core/nm.h, which the CUDA kernels include too, so both devices agree
// bit for bit. All kernels are threaded with at::parallel_for over rows (or groups) and written as simple
// fixed-trip-count inner loops the compiler unrolls and vectorises; errors found inside a parallel region are
// recorded (first position, by an atomic min over the linear index) and raised after it, so the message names the
// first offending position in row-major order no matter how the work was split.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>

#include <immintrin.h>

// GCC 12's AVX-512 intrinsic headers trip -Wmaybe-uninitialized on their own masked-load temporaries (as in
// spmm_24_tokens_avx512.cpp).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "core/messages.h"
#include "core/nm.h"
#include "cpu/dispatch.h"

namespace sparsekern {
namespace cpu {
namespace {

using at::Tensor;
constexpr int64_t kNone = std::numeric_limits<int64_t>::max();

// Lower `slot` to v if v is smaller (first offending position in row-major order).
void atomic_min(std::atomic<int64_t>& slot, int64_t v) {
  int64_t cur = slot.load(std::memory_order_relaxed);
  while (v < cur && !slot.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

using core::index_string;  // csrc/core/messages.h

void check_same_device(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name, const char* op) {
  TORCH_CHECK(a.device() == b.device(), "sparsekern.", op, ": ", b_name, " is on ", b.device(), " but ", a_name,
              " is on ", a.device(), "; all tensors must be on the same device");
}

bool is_prunable_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// ------------------------------------------------------------------------------------------------- prune_nm
// One group of M (compile-time for the common 2:4 and 4:8 so the O(M^2) rank count unrolls; M = 0 means runtime m).
template <int MC, typename scalar_t, typename score_t, typename acc_t>
void prune_groups(const scalar_t* w, const score_t* scores, scalar_t* out, bool* mask, int64_t g0, int64_t g1,
                  int n, int m_rt, std::atomic<int64_t>& nan_w, std::atomic<int64_t>& nan_s) {
  const int m = MC > 0 ? MC : m_rt;
  acc_t s[core::kMaxGroup];
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * m;
    bool bad = false;
    for (int j = 0; j < m; ++j) {
      const acc_t wj = static_cast<acc_t>(w[base + j]);
      if (wj != wj) {
        atomic_min(nan_w, base + j);
        bad = true;
      }
      if (scores != nullptr) {
        s[j] = static_cast<acc_t>(scores[base + j]);
        if (s[j] != s[j]) {
          atomic_min(nan_s, base + j);
          bad = true;
        }
      } else {
        s[j] = std::abs(wj);
      }
    }
    if (bad) continue;  // the op raises after the parallel region; the output is discarded
    const uint32_t keep = core::select_keep_mask_t<acc_t>(s, n, m);
    for (int j = 0; j < m; ++j) {
      const bool k = (keep >> j) & 1u;
      mask[base + j] = k;
      out[base + j] = k ? w[base + j] : scalar_t(0);
    }
  }
}

// 2:4 without NaN: blocks of groups go through a structure-of-arrays pass (scores, then branch-free keep masks from
// core::keep_mask_24, then the outputs) that the compiler vectorises; a block holding a NaN is redone by the generic
// path, which records the NaN's position for the error.
template <typename scalar_t, typename score_t, typename acc_t>
void prune_groups_24(const scalar_t* w, const score_t* scores, scalar_t* out, bool* mask, int64_t g0, int64_t g1,
                     std::atomic<int64_t>& nan_w, std::atomic<int64_t>& nan_s) {
  constexpr int64_t kBlock = 256;
  acc_t s[4][kBlock];
  uint8_t keep[kBlock];
  for (int64_t b = g0; b < g1; b += kBlock) {
    const int64_t cnt = std::min(kBlock, g1 - b);
    const scalar_t* wb = w + 4 * b;
    bool nan = false;
    for (int64_t t = 0; t < cnt; ++t) {
      for (int j = 0; j < 4; ++j) {
        const acc_t wj = static_cast<acc_t>(wb[4 * t + j]);
        const acc_t sj = scores != nullptr ? static_cast<acc_t>(scores[4 * (b + t) + j]) : std::abs(wj);
        nan |= (wj != wj) | (sj != sj);
        s[j][t] = sj;
      }
    }
    if (nan) {
      prune_groups<4, scalar_t, score_t, acc_t>(w, scores, out, mask, b, b + cnt, 2, 4, nan_w, nan_s);
      continue;
    }
    for (int64_t t = 0; t < cnt; ++t) keep[t] = static_cast<uint8_t>(core::keep_mask_24(s[0][t], s[1][t], s[2][t], s[3][t]));
    scalar_t* ob = out + 4 * b;
    bool* mb = mask + 4 * b;
    for (int64_t t = 0; t < cnt; ++t) {
      for (int j = 0; j < 4; ++j) {
        const bool k = (keep[t] >> j) & 1;
        mb[4 * t + j] = k;
        ob[4 * t + j] = k ? wb[4 * t + j] : scalar_t(0);
      }
    }
  }
}

std::tuple<Tensor, Tensor> prune_nm_cpu(const Tensor& w, int64_t n, int64_t m, const std::optional<Tensor>& scores) {
  TORCH_CHECK(m >= 1 && m <= core::kMaxGroup, "sparsekern.prune_nm: m must be in [1, ", core::kMaxGroup,
              "] (got m=", m, ")");
  TORCH_CHECK(n >= 0 && n <= m, "sparsekern.prune_nm: n (the number pruned per group) must satisfy 0 <= n <= m (got n=",
              n, ", m=", m, ")");
  TORCH_CHECK(w.dim() >= 1, "sparsekern.prune_nm: w must have at least one dimension (groups run along the last)");
  TORCH_CHECK(is_prunable_dtype(w.scalar_type()), "sparsekern.prune_nm: w has unsupported dtype ", w.scalar_type(),
              "; supported: float32, float64, float16, bfloat16");
  const int64_t K = w.size(-1);
  TORCH_CHECK(K % m == 0, "sparsekern.prune_nm: the last dimension of w (", K, ") must be a multiple of m=", m,
              " (N:M groups run along the last dimension, aligned at column 0)");
  Tensor sc;
  if (scores.has_value()) {
    check_same_device(w, "w", *scores, "scores", "prune_nm");
    TORCH_CHECK(scores->sizes() == w.sizes(), "sparsekern.prune_nm: scores must have w's shape ", w.sizes(),
                " (got ", scores->sizes(), ")");
    TORCH_CHECK(is_prunable_dtype(scores->scalar_type()), "sparsekern.prune_nm: scores has unsupported dtype ",
                scores->scalar_type(), "; supported: float32, float64, float16, bfloat16");
    sc = scores->contiguous();
  }
  const Tensor wc = w.contiguous();
  Tensor out = at::empty_like(wc);
  Tensor mask = at::empty(wc.sizes(), wc.options().dtype(at::kBool));
  const int64_t groups = wc.numel() / m;
  std::atomic<int64_t> nan_w{kNone}, nan_s{kNone};
  // Scores are compared in float64 when either input is float64 (no ties the caller does not see), else float32
  // (exact for float32/16-bit inputs).
  const bool use_double = wc.scalar_type() == at::kDouble || (sc.defined() && sc.scalar_type() == at::kDouble);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "prune_nm", [&] {
    using w_t = scalar_t;
    auto run = [&](auto score_tag, auto acc_tag) {
      using score_t = decltype(score_tag);
      using acc_t = decltype(acc_tag);
      const w_t* wp = wc.data_ptr<w_t>();
      const score_t* sp = sc.defined() ? sc.data_ptr<score_t>() : nullptr;
      w_t* op = out.data_ptr<w_t>();
      bool* mp = mask.data_ptr<bool>();
      at::parallel_for(0, groups, 4096, [&](int64_t g0, int64_t g1) {
        if (m == 4 && n == 2) {
          prune_groups_24<w_t, score_t, acc_t>(wp, sp, op, mp, g0, g1, nan_w, nan_s);
        } else if (m == 4) {
          prune_groups<4, w_t, score_t, acc_t>(wp, sp, op, mp, g0, g1, n, 4, nan_w, nan_s);
        } else if (m == 8) {
          prune_groups<8, w_t, score_t, acc_t>(wp, sp, op, mp, g0, g1, n, 8, nan_w, nan_s);
        } else {
          prune_groups<0, w_t, score_t, acc_t>(wp, sp, op, mp, g0, g1, n, m, nan_w, nan_s);
        }
      });
    };
    auto with_acc = [&](auto score_tag) {
      if (use_double) {
        run(score_tag, double{});
      } else {
        run(score_tag, float{});
      }
    };
    if (!sc.defined()) {
      with_acc(w_t{});  // unused score type
    } else {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, sc.scalar_type(), "prune_nm_scores",
                                      [&] { with_acc(scalar_t{}); });
    }
  });
  TORCH_CHECK(nan_w.load() == kNone, "sparsekern.prune_nm: w holds NaN at index ", index_string(wc.sizes(), nan_w.load()),
              "; NaN weights cannot be ranked (Inf is allowed and counts as the largest magnitude). Fix the weight "
              "or pass finite scores for it");
  TORCH_CHECK(nan_s.load() == kNone, "sparsekern.prune_nm: scores holds NaN at index ",
              index_string(wc.sizes(), nan_s.load()), "; scores must not be NaN (Inf is allowed)");
  return {out.view(w.sizes()), mask.view(w.sizes())};
}

// ------------------------------------------------------------------------------------------------- nm_violation
// First group (row-major) of `w` viewed as [rows, K] with more than (m - n) non-zeros; -1 when none. NaN counts as
// non-zero, -0.0 as zero.
template <typename scalar_t>
int64_t first_violation(const scalar_t* w, int64_t groups, int m, int keep) {
  std::atomic<int64_t> first{kNone};
  at::parallel_for(0, groups, 8192, [&](int64_t g0, int64_t g1) {
    // Blocks of groups so a thread can stop once an earlier violation is known.
    constexpr int64_t kBlock = 1024;
    for (int64_t b = g0; b < g1; b += kBlock) {
      if (first.load(std::memory_order_relaxed) < b) return;
      const int64_t e = std::min(g1, b + kBlock);
      for (int64_t g = b; g < e; ++g) {
        const scalar_t* p = w + g * m;
        int cnt = 0;
        for (int j = 0; j < m; ++j) cnt += core::is_nonzero(p[j]);
        if (cnt > keep) {
          atomic_min(first, g);
          return;
        }
      }
    }
  });
  return first.load() == kNone ? -1 : first.load();
}

int64_t first_violation_any(const Tensor& wc, int64_t m, int64_t n) {
  const int64_t groups = wc.numel() / m;
  int64_t g = -1;
  AT_DISPATCH_V2(
      wc.scalar_type(), "nm_violation",
      AT_WRAP([&] { g = first_violation<scalar_t>(wc.data_ptr<scalar_t>(), groups, (int)m, (int)(m - n)); }),
      AT_EXPAND(AT_ALL_TYPES), at::kHalf, at::kBFloat16, at::kBool, AT_EXPAND(AT_FLOAT8_TYPES));
  return g;
}

Tensor nm_violation_cpu(const Tensor& w, int64_t n, int64_t m) {
  TORCH_CHECK(m >= 1 && m <= core::kMaxGroup, "sparsekern.nm_violation: m must be in [1, ", core::kMaxGroup,
              "] (got m=", m, ")");
  TORCH_CHECK(n >= 0 && n <= m, "sparsekern.nm_violation: n must satisfy 0 <= n <= m (got n=", n, ", m=", m, ")");
  TORCH_CHECK(w.dim() >= 1, "sparsekern.nm_violation: w must have at least one dimension");
  const int64_t K = w.size(-1);
  TORCH_CHECK(K % m == 0, "sparsekern.nm_violation: the last dimension of w (", K, ") must be a multiple of m=", m,
              " (N:M groups run along the last dimension, aligned at column 0)");
  Tensor out = at::full({2}, -1, w.options().dtype(at::kLong));
  if (w.numel() == 0) return out;
  const int64_t g = first_violation_any(w.contiguous(), m, n);
  if (g >= 0) {
    const int64_t gpr = K / m;
    out[0] = g / gpr;
    out[1] = g % gpr;
  }
  return out;
}

// ------------------------------------------------------------------------------------------------- compress_24
bool is_24_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16 || t == at::kChar ||
         t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2;
}
const char* kDtypes24 = "float32, float64, float16, bfloat16, int8, float8_e4m3fn, float8_e5m2";

std::tuple<Tensor, Tensor> compress_24_cpu(const Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "sparsekern.compress_24: w must be 2-D [rows, cols] (got ", w.dim(), " dims)");
  TORCH_CHECK(is_24_dtype(w.scalar_type()), "sparsekern.compress_24: w has unsupported dtype ", w.scalar_type(),
              "; supported: ", kDtypes24);
  const int64_t R = w.size(0), C = w.size(1);
  TORCH_CHECK(C % 4 == 0, "sparsekern.compress_24: the number of columns of w (", C,
              ") must be a multiple of 4 (2:4 groups run along the columns)");
  const Tensor wc = w.contiguous();
  const int64_t G = C / 4, cb = core::code_bytes_per_row(C);
  Tensor values = at::empty({R, C / 2}, wc.options());
  Tensor codes = at::empty({R, cb}, wc.options().dtype(at::kByte));
  std::atomic<int64_t> bad{kNone};
  AT_DISPATCH_V2(
      wc.scalar_type(), "compress_24", AT_WRAP([&] {
        const scalar_t* wp = wc.data_ptr<scalar_t>();
        scalar_t* vp = values.data_ptr<scalar_t>();
        uint8_t* cp = codes.data_ptr<uint8_t>();
        at::parallel_for(0, R, std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* src = wp + r * C;
            scalar_t* dst = vp + r * (C / 2);
            uint8_t* crow = cp + r * cb;
            std::memset(crow, 0, cb);  // the padding nibble of an odd group count stays 0
            for (int64_t g = 0; g < G; ++g) {
              const scalar_t* p = src + 4 * g;
              const uint32_t nz = core::is_nonzero(p[0]) | (core::is_nonzero(p[1]) << 1) |
                                  (core::is_nonzero(p[2]) << 2) | (core::is_nonzero(p[3]) << 3);
              const uint8_t code = core::code_from_nonzero_mask(nz);
              if (code == 0xFF) {
                atomic_min(bad, r * G + g);
                dst[2 * g] = dst[2 * g + 1] = scalar_t(0);
                continue;
              }
              dst[2 * g] = p[core::code_index0(code)];
              dst[2 * g + 1] = p[core::code_index1(code)];
              crow[g >> 1] |= (g & 1) ? static_cast<uint8_t>(code << 4) : code;
            }
          }
        });
      }),
      at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kChar, at::kFloat8_e4m3fn, at::kFloat8_e5m2);
  if (bad.load() != kNone) {
    const int64_t r = bad.load() / G, g = bad.load() % G;
    const int64_t nnz = wc.select(0, r).narrow(0, 4 * g, 4).ne(0).sum().item<int64_t>();
    TORCH_CHECK(false, "sparsekern.compress_24: w is not 2:4 sparse: row ", r, ", group ", g, " (columns ", 4 * g,
                "..", 4 * g + 3, ") holds ", nnz,
                " non-zeros, at most 2 are allowed per group of 4. Prune it first: prune_nm(w, 2, 4)");
  }
  return {values, codes};
}

// ------------------------------------------------------------------------------------------------- decompress_24
// Dtype-agnostic: values are copied as raw bits (U = an unsigned integer of the element's size), so one kernel per
// element size serves every dtype, bit-exactly. Per-code tables are built once from the rules of csrc/core/nm.h
// (code_index0/1, code_is_valid).
struct Decode24Tables {
  uint8_t i0[16], i1[16];     // kept positions of each 4-bit code
  uint8_t valid16[16];        // 1 when the code is valid
  uint8_t valid256[256];      // 1 when both nibbles of a code byte are valid
  Decode24Tables() {
    for (int c = 0; c < 16; ++c) {
      const uint8_t code = static_cast<uint8_t>(c);
      i0[c] = static_cast<uint8_t>(core::code_index0(code));
      i1[c] = static_cast<uint8_t>(core::code_index1(code));
      valid16[c] = core::code_is_valid(code) ? 1 : 0;
    }
    for (int b = 0; b < 256; ++b) valid256[b] = valid16[b & 0xF] & valid16[b >> 4];
  }
};
const Decode24Tables kDecode24;

// Writes all four outputs d[0..3] of one group from its two kept values s[0..1], without branches. Invalid codes
// (reported separately) still give in-bounds writes; the op raises and discards the output then.
template <typename U>
inline void decode_group_24(uint8_t c, const U* s, U* d) {
  if constexpr (sizeof(U) <= 2) {
    // The group's four outputs are one 32- or 64-bit word: each kept value shifted into its lane.
    using W = std::conditional_t<sizeof(U) == 1, uint32_t, uint64_t>;
    constexpr int kBits = 8 * sizeof(U);
    const W w = (static_cast<W>(s[0]) << (kBits * kDecode24.i0[c])) |
                (static_cast<W>(s[1]) << (kBits * kDecode24.i1[c]));
    std::memcpy(d, &w, sizeof(W));
  } else {
    // 4- and 8-byte elements: zero the group, then place its two kept values (measured faster here than a
    // mask-select over the four outputs).
    const U v0 = s[0], v1 = s[1];
    d[0] = 0;
    d[1] = 0;
    d[2] = 0;
    d[3] = 0;
    d[kDecode24.i0[c]] = v0;
    d[kDecode24.i1[c]] = v1;
  }
}

// One row: values src [2G], codes crow [ceil(G/2)], output dst [4G]. Returns the first invalid group, or -1.
template <typename U>
int64_t decompress_row_24(const U* src, const uint8_t* crow, U* dst, int64_t G) {
  const int64_t B = G / 2;  // full code bytes (two groups each); an odd G has one more group in a low nibble
  uint8_t ok = 1;
  for (int64_t b = 0; b < B; ++b) ok &= kDecode24.valid256[crow[b]];
  if (G & 1) ok &= kDecode24.valid16[crow[B] & 0xF];
  int64_t bad = -1;
  if (!ok) {
    for (int64_t g = 0; g < G; ++g) {
      if (!kDecode24.valid16[core::code_of_group(crow, g)]) {
        bad = g;
        break;
      }
    }
  }
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t byte = crow[b];
    decode_group_24<U>(byte & 0xF, src + 4 * b, dst + 8 * b);
    decode_group_24<U>(byte >> 4, src + 4 * b + 2, dst + 8 * b + 4);
  }
  if (G & 1) decode_group_24<U>(crow[B] & 0xF, src + 4 * B, dst + 8 * B);
  return bad;
}

template <typename U>
void decompress_rows_24(const void* values, const uint8_t* codes, void* out, int64_t R, int64_t cols,
                        std::atomic<int64_t>& bad) {
  const int64_t G = cols / 4, cb = core::code_bytes_per_row(cols);
  const U* vp = static_cast<const U*>(values);
  U* op = static_cast<U*>(out);
  at::parallel_for(0, R, std::max<int64_t>(1, 65536 / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t g = decompress_row_24<U>(vp + r * (cols / 2), codes + r * cb, op + r * cols, G);
      if (g >= 0) atomic_min(bad, r * G + g);
    }
  });
}

Tensor decompress_24_cpu(const Tensor& values, const Tensor& codes, int64_t cols) {
  check_same_device(values, "values", codes, "codes", "decompress_24");
  TORCH_CHECK(values.dim() == 2, "sparsekern.decompress_24: values must be 2-D [rows, cols/2] (got ", values.dim(),
              " dims)");
  TORCH_CHECK(codes.dim() == 2, "sparsekern.decompress_24: codes must be 2-D [rows, ceil(cols/8)] (got ", codes.dim(),
              " dims)");
  TORCH_CHECK(codes.scalar_type() == at::kByte, "sparsekern.decompress_24: codes must be uint8 (got ",
              codes.scalar_type(), ")");
  TORCH_CHECK(is_24_dtype(values.scalar_type()), "sparsekern.decompress_24: values has unsupported dtype ",
              values.scalar_type(), "; supported: ", kDtypes24);
  TORCH_CHECK(cols >= 0 && cols % 4 == 0, "sparsekern.decompress_24: cols (", cols,
              ") must be a non-negative multiple of 4 (2:4 groups run along the columns)");
  const int64_t R = values.size(0), G = cols / 4, cb = core::code_bytes_per_row(cols);
  TORCH_CHECK(values.size(1) == cols / 2, "sparsekern.decompress_24: values must be [rows, cols/2] = [", R, ", ",
              cols / 2, "] for cols=", cols, " (got ", values.sizes(), ")");
  TORCH_CHECK(codes.size(0) == R && codes.size(1) == cb, "sparsekern.decompress_24: codes must be [rows, ceil(cols/8)] = [",
              R, ", ", cb, "] to match values ", values.sizes(), " and cols=", cols, " (got ", codes.sizes(), ")");
  const Tensor vc = values.contiguous(), cc = codes.contiguous();
  Tensor out = at::empty({R, cols}, vc.options());
  std::atomic<int64_t> bad{kNone};
  const void* vp = vc.data_ptr();
  const uint8_t* cp = cc.data_ptr<uint8_t>();
  void* op = out.data_ptr();
  switch (vc.element_size()) {
    case 1: decompress_rows_24<uint8_t>(vp, cp, op, R, cols, bad); break;
    case 2: decompress_rows_24<uint16_t>(vp, cp, op, R, cols, bad); break;
    case 4: decompress_rows_24<uint32_t>(vp, cp, op, R, cols, bad); break;
    case 8: decompress_rows_24<uint64_t>(vp, cp, op, R, cols, bad); break;
    default: TORCH_CHECK(false, "sparsekern.decompress_24: unexpected element size ", vc.element_size());
  }
  if (bad.load() != kNone) {
    const int64_t r = bad.load() / G, g = bad.load() % G;
    const int code = core::code_of_group(cc.data_ptr<uint8_t>() + r * cb, g);
    TORCH_CHECK(false, "sparsekern.decompress_24: codes row ", r, ", group ", g, " holds ", code,
                ", which is not a valid 2:4 pattern code: a code is i0 | (i1 << 2) with kept positions i0 < i1 in "
                "0..3 (valid codes: 4, 8, 12, 9, 13, 14)");
  }
  return out;
}

// ------------------------------------------------------------------------------------------------- quantize_per_token
// x ~= q * scale[:, None], scale = max(amax(|x[m]|) / qmax, 2^-149) (1 for an all-zero row so q = 0 exactly),
// q = round_half_even(x / scale) clamped to [-127, 127] (int8) or x / scale clamped to +-448 and rounded to nearest
// even by the float8_e4m3fn conversion. The division (not a multiply by 1/scale) keeps q identical to the plain
// PyTorch formula the tests use.
// AVX-512 row of the int8 case (float32 / bfloat16 input; the same numbers as the portable loop below: amax by max
// of |x|, scale by the same expression, x / s by a true division, round half to even by vrndscaleps in its
// round-to-nearest mode, saturation after clamping to +-127). Why: the portable loop is scalar (a float max
// reduction does not vectorise without fast-math) and cost more than the int8 GEMM it feeds (issue 18). Returns
// false when the row holds Inf / NaN (scale and q are then not written).
#define SK_Q512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
template <typename in_t>
SK_Q512 inline __m512 load16(const in_t* p, __mmask16 k) {
  if constexpr (std::is_same_v<in_t, float>) {
    return _mm512_maskz_loadu_ps(k, p);
  } else {  // bfloat16: the high half of a float
    const __m256i h = _mm256_maskz_loadu_epi16(k, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <typename in_t>
SK_Q512 bool quantize_row_i8_avx512(const in_t* xr, int8_t* qr, int64_t K, float qmax, float* scale_out) {
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512 fmax = _mm512_set1_ps(std::numeric_limits<float>::max());
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 finite = 0xFFFF;
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    const __m512 a = _mm512_and_ps(load16(xr + k, m), abs_mask);
    finite &= _mm512_cmp_ps_mask(a, fmax, _CMP_LE_OQ) | static_cast<__mmask16>(~m);  // false for Inf and NaN
    vmax = _mm512_max_ps(vmax, a);
  }
  if (finite != 0xFFFF) return false;
  const float amax = _mm512_reduce_max_ps(vmax);
  const float s = amax > 0.f ? std::max(amax / qmax, std::numeric_limits<float>::denorm_min()) : 1.f;
  *scale_out = s;
  const __m512 vs = _mm512_set1_ps(s), hi = _mm512_set1_ps(qmax), lo = _mm512_set1_ps(-qmax);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
    __m512 v = _mm512_div_ps(load16(xr + k, m), vs);
    v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_mask_storeu_epi8(qr + k, m, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  return true;
}

// Whether quantize_per_token may take the AVX-512 rows: the CPU has them and no lower ISA is forced (SPARSEKERN_CPU_ISA
// / cpu_dispatch_set, the one home of those choices: dispatch.h).
bool quantize_avx512_allowed() {
  const DispatchSettings& s = dispatch_settings();
  return cpu_features().avx512 && s.isa_env_problem == DispatchSettings::EnvProblem::kNone &&
         (s.isa == IsaSetting::kAuto || s.isa == IsaSetting::kAvx512 || s.isa == IsaSetting::kAvx512Base);
}

template <typename in_t, typename q_t>
void quantize_rows(const in_t* x, q_t* q, float* scale, int64_t M, int64_t K, float qmax,
                   std::atomic<int64_t>& bad_row) {
  constexpr bool kVec = std::is_same_v<q_t, int8_t> &&
                        (std::is_same_v<in_t, float> || std::is_same_v<in_t, c10::BFloat16>);
  const bool vec = kVec && quantize_avx512_allowed();
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if constexpr (kVec) {
        if (vec) {
          if (!quantize_row_i8_avx512(x + m * K, q + m * K, K, qmax, scale + m)) {
            atomic_min(bad_row, m);
            scale[m] = 1.f;
          }
          continue;
        }
      }
      const in_t* xr = x + m * K;
      float amax = 0.f;
      bool finite = true;
      for (int64_t k = 0; k < K; ++k) {
        const float a = std::abs(static_cast<float>(xr[k]));
        amax = a > amax ? a : amax;
        finite &= a <= std::numeric_limits<float>::max();  // false for Inf and NaN
      }
      if (!finite) {
        atomic_min(bad_row, m);
        scale[m] = 1.f;
        continue;
      }
      // The smallest positive float as a floor: amax / qmax underflows to 0 for a denormal amax (x = [1e-45, 0, ...]
      // gave scale 0 and q = [448, nan, ...]); with the floor every x / s is finite and within +-qmax.
      const float s = amax > 0.f ? std::max(amax / qmax, std::numeric_limits<float>::denorm_min()) : 1.f;
      scale[m] = s;
      q_t* qr = q + m * K;
      for (int64_t k = 0; k < K; ++k) {
        float v = static_cast<float>(xr[k]) / s;
        v = std::min(std::max(v, -qmax), qmax);
        if constexpr (std::is_same_v<q_t, int8_t>) {
          // Round half to even by the 1.5 * 2^23 trick (exact for |v| <= 127 under IEEE round-to-nearest-even, the
          // same result as std::nearbyint): plain adds the compiler vectorises, where the libm call per element
          // made this op cost more than the int8 GEMM it feeds (2048 x 576 bf16: 4.35 ms, issue 18).
          constexpr float kMagic = 12582912.f;
          qr[k] = static_cast<int8_t>((v + kMagic) - kMagic);
        } else {
          qr[k] = static_cast<q_t>(v);
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> quantize_per_token_cpu(const Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK(x.dim() == 2, "sparsekern.quantize_per_token: x must be 2-D [M, K] (got ", x.dim(), " dims)");
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kHalf || xt == at::kBFloat16,
              "sparsekern.quantize_per_token: x has unsupported dtype ", xt,
              "; supported: float32, float16, bfloat16");
  TORCH_CHECK(dtype == at::kChar || dtype == at::kFloat8_e4m3fn, "sparsekern.quantize_per_token: dtype must be int8 or "
              "float8_e4m3fn (got ", dtype, ")");
  const Tensor xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  Tensor q = at::empty({M, K}, xc.options().dtype(dtype));
  Tensor scale = at::empty({M}, xc.options().dtype(at::kFloat));
  std::atomic<int64_t> bad{kNone};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xt, "quantize_per_token", [&] {
    if (dtype == at::kChar) {
      quantize_rows<scalar_t, int8_t>(xc.data_ptr<scalar_t>(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), M, K,
                                      127.f, bad);
    } else {
      quantize_rows<scalar_t, c10::Float8_e4m3fn>(xc.data_ptr<scalar_t>(), q.data_ptr<c10::Float8_e4m3fn>(),
                                                  scale.data_ptr<float>(), M, K, 448.f, bad);
    }
  });
  TORCH_CHECK(bad.load() == kNone, "sparsekern.quantize_per_token: row ", bad.load(),
              " of x holds Inf or NaN; per-token quantisation needs finite activations");
  return {q, scale};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("prune_nm", &prune_nm_cpu);
  m.impl("nm_violation", &nm_violation_cpu);
  m.impl("compress_24", &compress_24_cpu);
  m.impl("decompress_24", &decompress_24_cpu);
  m.impl("quantize_per_token", &quantize_per_token_cpu);
}

}  // namespace cpu
}  // namespace sparsekern
