// CPU kernel of spmm_24: y[M, N] = act(row_scale[:, None] * alpha[None, :] * (x @ W^T) + bias), with W [N, K] given
// in the portable 2:4 format (values [N, K/2], codes uint8 [N, ceil(K/8)], csrc/core/nm.h, docs/format.md).
//
// This file holds the driver: argument checks, activation preparation, threading and the fused epilogue, plus the
// portable scalar tile kernel. The vectorised tile kernels live in spmm_24_avx512.cpp, spmm_24_tokens_avx512.cpp and
// spmm_24_avx2.cpp (compiled with function target attributes). Which kernel runs (ISA, kernel family, the crossover
// thresholds, the slab size) is decided in dispatch.cpp, from a settings snapshot read once per call (dispatch.h:
// SPARSEKERN_CPU_ISA / SPARSEKERN_CPU_SPMM_LAYOUT are read once at load, and sparsekern._C.cpu_dispatch_set changes
// them; forcing an ISA the CPU lacks is an error, never a silent fallback).
//
// Dtypes: x and values both float32, both bfloat16, both float16 (fp32 accumulation), or both int8 (exact int32
// accumulation). out_dtype defaults to x's dtype (int32 for int8); allowed: float32/float16/bfloat16 for floating
// inputs, and additionally int32/int8 for int8 inputs. The epilogue runs in fp32 on the accumulator; int outputs
// are rounded half-to-even and saturated, except int32 with no epilogue at all, which is the exact accumulator.
#include "cpu/spmm_24.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "core/nm.h"

namespace sparsekern {
namespace cpu {
namespace spmm {

namespace {

using at::Tensor;

enum class Act { kNone, kRelu, kGelu };

// ------------------------------------------------------------------------------------------------- scalar kernel
// Portable reference-speed path (and the fallback on CPUs without AVX2): per output, two multiply-adds per group.
template <typename wt, typename xt, typename acct>
void scalar_tile_impl(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, acct* acc, int64_t ld) {
  const wt* vals = static_cast<const wt*>(p.values);
  const xt* xs = static_cast<const xt*>(p.x);
  const int64_t G = p.K / 4;
  for (int64_t n = n0; n < n1; ++n) {
    const wt* v = vals + n * (p.K / 2);
    const uint8_t* c = p.codes + n * p.code_stride;
    for (int64_t m = m0; m < m1; ++m) {
      const xt* x = xs + m * p.ldx;
      acct s = 0;
      for (int64_t g = 0; g < G; ++g) {
        const uint8_t code = core::code_of_group(c, g);
        s += static_cast<acct>(v[2 * g]) * static_cast<acct>(x[4 * g + core::code_index0(code)]) +
             static_cast<acct>(v[2 * g + 1]) * static_cast<acct>(x[4 * g + core::code_index1(code)]);
      }
      acc[(m - m0) * ld + (n - n0)] = s;
    }
  }
}

template <typename wt>
void scalar_tile_f(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* acc, int64_t ld) {
  scalar_tile_impl<wt, float, float>(p, m0, m1, n0, n1, static_cast<float*>(acc), ld);
}
void scalar_tile_i8(const Problem& p, int64_t m0, int64_t m1, int64_t n0, int64_t n1, void* acc, int64_t ld) {
  scalar_tile_impl<int8_t, int32_t, int32_t>(p, m0, m1, n0, n1, static_cast<int32_t*>(acc), ld);
}

}  // namespace

Kernel scalar_kernel(WType w) {
  switch (w) {
    case WType::kF32:
      return {XType::kF32, &scalar_tile_f<float>, "scalar-f32"};
    case WType::kF16:
      return {XType::kF32, &scalar_tile_f<c10::Half>, "scalar-f16"};
    case WType::kBF16:
      return {XType::kF32, &scalar_tile_f<c10::BFloat16>, "scalar-bf16"};
    case WType::kI8:
      return {XType::kI32, &scalar_tile_i8, "scalar-i8"};
  }
  TORCH_CHECK(false, "unreachable");
}

namespace {

// ------------------------------------------------------------------------------------------------- epilogue
// erf by the rational approximation Eigen uses for float (x clamped to [-4, 4]; |error| < 5e-7, checked against
// torch.erf in float64): plain arithmetic, so the loop below vectorises, unlike std::erf.
inline float erf_fast(float x) {
  x = std::min(std::max(x, -4.f), 4.f);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  p = p * x;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return p / q;
}

struct Epilogue {
  const float* alpha = nullptr;      // [N] or null
  const float* bias = nullptr;       // [N] or null
  const float* row_scale = nullptr;  // [M] or null
  Act act = Act::kNone;
  bool any() const { return alpha || bias || row_scale || act != Act::kNone; }
};

// y[j] = act(rs * alpha[n0 + j] * a[j] + bias[n0 + j]) for j < cnt, in place on fp32.
void apply_epilogue(float* a, int64_t cnt, int64_t n0, float rs, const Epilogue& e) {
  if (e.alpha) {
    for (int64_t j = 0; j < cnt; ++j) a[j] *= rs * e.alpha[n0 + j];
  } else if (rs != 1.f) {
    for (int64_t j = 0; j < cnt; ++j) a[j] *= rs;
  }
  if (e.bias) {
    for (int64_t j = 0; j < cnt; ++j) a[j] += e.bias[n0 + j];
  }
  if (e.act == Act::kRelu) {
    for (int64_t j = 0; j < cnt; ++j) a[j] = a[j] > 0.f ? a[j] : 0.f;
  } else if (e.act == Act::kGelu) {
    for (int64_t j = 0; j < cnt; ++j) a[j] = 0.5f * a[j] * (1.f + erf_fast(a[j] * 0.70710678118654752f));
  }
}

template <typename out_t>
void store_row(const float* a, int64_t cnt, out_t* y) {
  if constexpr (std::is_same_v<out_t, int8_t> || std::is_same_v<out_t, int32_t>) {
    const float lo = std::is_same_v<out_t, int8_t> ? -128.f : -2147483648.f;
    const float hi = std::is_same_v<out_t, int8_t> ? 127.f : 2147483520.f;  // largest float below 2^31
    for (int64_t j = 0; j < cnt; ++j) {
      const float v = a[j] != a[j] ? 0.f : std::min(std::max(std::nearbyint(a[j]), lo), hi);
      y[j] = static_cast<out_t>(v);
    }
  } else {
    for (int64_t j = 0; j < cnt; ++j) y[j] = static_cast<out_t>(a[j]);
  }
}

// ------------------------------------------------------------------------------------------------- driver
WType wtype_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return WType::kF32;
    case at::kHalf:
      return WType::kF16;
    case at::kBFloat16:
      return WType::kBF16;
    case at::kChar:
      return WType::kI8;
    default:
      TORCH_CHECK(false, "sparsekern.spmm_24: x has unsupported dtype ", t,
                  "; supported: float32, float16, bfloat16 (fp32 accumulation) and int8 (int32 accumulation)");
  }
}

at::ScalarType xtype_dtype(XType t) {
  switch (t) {
    case XType::kF32:
      return at::kFloat;
    case XType::kBF16:
      return at::kBFloat16;
    case XType::kI16:
      return at::kShort;
    case XType::kI32:
      return at::kInt;
    case XType::kU8:
      return at::kChar;  // filled with int8 x, then the sign bit flipped in place (x + 128 as uint8 bits)
    case XType::kI8:
      return at::kChar;
  }
  TORCH_CHECK(false, "unreachable");
}

Tensor epilogue_vector(const std::optional<Tensor>& t, const char* name, int64_t len, const char* len_name,
                       const Tensor& x) {
  if (!t.has_value()) return Tensor();
  TORCH_CHECK(t->device() == x.device(), "sparsekern.spmm_24: ", name, " is on ", t->device(), " but x is on ",
              x.device(), "; all tensors must be on the same device");
  TORCH_CHECK(t->dim() == 1 && t->size(0) == len, "sparsekern.spmm_24: ", name, " must be 1-D [", len_name,
              "] = [", len, "] (got ", t->sizes(), ")");
  TORCH_CHECK(at::isFloatingType(t->scalar_type()), "sparsekern.spmm_24: ", name,
              " must be a floating dtype (got ", t->scalar_type(), ")");
  return t->to(at::kFloat).contiguous();
}

// Per-call work buffers (prepared activations, token table), reused by the calling thread across calls when they are
// large. Why: a fresh multi-megabyte allocation is a fresh mmap whose pages fault in again on every call, and on the
// development VM that costs ~0.5 ms per MB (an 11 MB fp32 table for M = 256, K = 11008: ~5 ms of a ~100 ms call,
// measured with torch.empty(...).fill_ against a reused buffer). Buffers above kScratchMax are not kept, so a thread
// retains at most 2 x 64 MB; small ones come from malloc's free lists anyway.
constexpr int64_t kScratchMin = int64_t{1} << 20, kScratchMax = int64_t{64} << 20;

Tensor scratch(int slot, at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes < kScratchMin || bytes > kScratchMax) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  thread_local Tensor bufs[2];
  Tensor& b = bufs[slot];
  if (!b.defined() || b.numel() < bytes) b = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  return b.narrow(0, 0, bytes).view(dtype).view(sizes);
}

// One call with the settings snapshot `ds` (read once by spmm_24_cpu, so all slabs of a call see the same settings).
Tensor spmm_24_run(const DispatchSettings& ds, const Tensor& x, const Tensor& values, const Tensor& codes,
                   const std::optional<Tensor>& bias, const std::optional<Tensor>& alpha,
                   const std::optional<Tensor>& row_scale, c10::string_view activation,
                   std::optional<at::ScalarType> out_dtype, const Tensor& out_into = Tensor()) {
  TORCH_CHECK(values.device() == x.device(), "sparsekern.spmm_24: values is on ", values.device(), " but x is on ",
              x.device(), "; all tensors must be on the same device");
  TORCH_CHECK(codes.device() == x.device(), "sparsekern.spmm_24: codes is on ", codes.device(), " but x is on ",
              x.device(), "; all tensors must be on the same device");
  TORCH_CHECK(x.dim() == 2, "sparsekern.spmm_24: x must be 2-D [M, K] (got ", x.dim(),
              " dims; the Python wrapper sparse_linear flattens leading dims)");
  TORCH_CHECK(values.dim() == 2, "sparsekern.spmm_24: values must be 2-D [N, K/2] (got ", values.dim(), " dims)");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte,
              "sparsekern.spmm_24: codes must be a 2-D uint8 tensor [N, ceil(K/8)] (got ", codes.scalar_type(), " ",
              codes.sizes(), ")");
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  TORCH_CHECK(K % 4 == 0, "sparsekern.spmm_24: K = x.size(1) (", K,
              ") must be a multiple of 4 (2:4 groups run along K)");
  TORCH_CHECK(values.size(1) == K / 2, "sparsekern.spmm_24: values must be [N, K/2] with K = x.size(1) = ", K,
              ", i.e. [", N, ", ", K / 2, "] (got ", values.sizes(), ")");
  const int64_t cb = core::code_bytes_per_row(K);
  TORCH_CHECK(codes.size(0) == N && codes.size(1) == cb, "sparsekern.spmm_24: codes must be [N, ceil(K/8)] = [", N,
              ", ", cb, "] to match values ", values.sizes(), " (got ", codes.sizes(), ")");
  const WType wt = wtype_of(x.scalar_type());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "sparsekern.spmm_24: values dtype ", values.scalar_type(),
              " must equal x dtype ", x.scalar_type(), " (float32/float16/bfloat16 pairs, or int8 with int8)");
  const bool is_int = wt == WType::kI8;
  const at::ScalarType od = out_dtype.value_or(is_int ? at::kInt : x.scalar_type());
  const bool od_float = od == at::kFloat || od == at::kHalf || od == at::kBFloat16;
  TORCH_CHECK(od_float || (is_int && (od == at::kInt || od == at::kChar)), "sparsekern.spmm_24: out_dtype ", od,
              " is not supported for ", x.scalar_type(),
              " inputs; use float32, float16 or bfloat16", is_int ? " (or int32 / int8 for int8 inputs)" : "");
  Epilogue ep;
  if (activation == "relu") {
    ep.act = Act::kRelu;
  } else if (activation == "gelu") {
    ep.act = Act::kGelu;
  } else {
    TORCH_CHECK(activation == "none", "sparsekern.spmm_24: activation must be \"none\", \"relu\" or \"gelu\" (got \"",
                std::string(activation), "\")");
  }
  const Tensor alpha_f = epilogue_vector(alpha, "alpha", N, "N", x);
  const Tensor bias_f = epilogue_vector(bias, "bias", N, "N", x);
  const Tensor rs_f = epilogue_vector(row_scale, "row_scale", M, "M", x);
  ep.alpha = alpha_f.defined() ? alpha_f.data_ptr<float>() : nullptr;
  ep.bias = bias_f.defined() ? bias_f.data_ptr<float>() : nullptr;
  ep.row_scale = rs_f.defined() ? rs_f.data_ptr<float>() : nullptr;

  // out_into: a slab's rows of the whole call's output (contiguous [M, N] of dtype od), written in place.
  Tensor out = out_into.defined() ? out_into : at::empty({M, N}, x.options().dtype(od));
  if (M == 0 || N == 0) return out;
  if (K == 0) {
    // Empty reduction: the epilogue of a zero accumulator.
    Tensor z = at::zeros({M, N}, x.options().dtype(at::kFloat));
    if (ep.alpha) z.mul_(alpha_f);
    if (ep.bias) z.add_(bias_f);
    if (ep.act == Act::kRelu) z.relu_();
    if (ep.act == Act::kGelu) z = at::gelu(z);
    out.copy_(is_int && !od_float ? z.round() : z);
    return out;
  }

  // Large M: slabs of slab_rows activation rows (default 256; amx_slab_rows where the AMX family runs), one after
  // another, so that a slab's x stays in cache while the whole weight passes over it (why and the measurements:
  // dispatch.cpp, kDefaultThresholds).
  const int64_t slab = slab_rows_for(M, K, wt, ds);
  if (M > slab) {
    for (int64_t s0 = 0; s0 < M; s0 += slab) {
      const int64_t len = std::min(slab, M - s0);
      const std::optional<Tensor> rs = row_scale.has_value() ? std::optional<Tensor>(row_scale->narrow(0, s0, len))
                                                             : std::nullopt;
      spmm_24_run(ds, x.narrow(0, s0, len), values, codes, bias, alpha, rs, activation, out_dtype,
                  out.narrow(0, s0, len));  // rows of a contiguous [M, N]: contiguous, written in place
    }
    return out;
  }

  const Plan plan = plan_call(M, K, wt, ds);
  const TokenKernel& tk = plan.tokens;
  const bool tokens = plan.family == Family::kTokens;
  const bool amx = plan.family == Family::kAmx;
  const Kernel kern = tokens ? Kernel{tk.xtype, tk.tile, tk.name} : plan.kernel;
  const Tensor vc = values.contiguous(), cc = codes.contiguous();
  // Activations once per call: the kernel's input type, contiguous, zero-padded to whole chunks (row kernels) or
  // to whole blocks of 16 rows (token lanes, which then build their table from these rows).
  // AMX: no row-major copy; its tile table is built from x directly (below).
  const int64_t ldx = tokens ? K : (K + kXPad - 1) / kXPad * kXPad;
  const int64_t Mp = tokens ? (M + kTokenBlock - 1) / kTokenBlock * kTokenBlock : M;
  Tensor xp = amx ? Tensor() : scratch(0, {Mp, ldx}, xtype_dtype(kern.xtype));
  if (!amx) {
    if (ldx > K) xp.narrow(1, K, ldx - K).zero_();
    if (Mp > M) xp.narrow(0, M, Mp - M).zero_();
    xp.narrow(0, 0, M).narrow(1, 0, K).copy_(x);
    if (kern.xtype == XType::kU8) xp.bitwise_xor_(-128);  // x + 128 as uint8 bits (the padding becomes x = 0 too)
  }
  Tensor table;
  // AMX (x in the kernel's dtype: bfloat16 / int8 = x's own): the A tiles are read from x itself where its rows are
  // whole chunks (K a multiple of 32 bf16 / 64 int8) at a stride that spreads the 32 rows of two tiles over the L1
  // sets (not a multiple of 2 KB: at 4 KB all 16 rows of a tile share one set of 12 ways; at 3 KB 8 rows a set), the
  // last M % 16 rows from a zero-padded 16-row copy; else from a table [chunk b][row m][64 bytes] (m < M rounded up
  // to 16, zero past K and M), every tile one contiguous KB, built by plain memcpy (see the InferenceMode note below).
  // Why not always the table: the copy cost ~20 % of the call where N is small next to M (192 x 576, M = 2048: ~190 us
  // of ~730, 1 thread).
  const int64_t amx_rows = (M + 15) / 16 * 16;
  const Tensor xc = amx ? x.contiguous() : Tensor();
  Tensor x_tail;
  const bool amx_direct = amx && K % kern.x_chunk == 0 && K * xc.element_size() % 2048 != 0;
  if (amx_direct && amx_rows > M) {
    const int64_t m16 = M / 16 * 16;
    x_tail = at::zeros({16, K}, xc.options());
    x_tail.narrow(0, 0, M - m16).copy_(xc.narrow(0, m16, M - m16));
  }
  if (amx && !amx_direct) {
    const int64_t cols = kern.x_chunk, esize = xc.element_size(), nch = (K + cols - 1) / cols;
    table = scratch(1, {nch, amx_rows, cols}, xc.scalar_type());
    const char* xsrc = static_cast<const char*>(xc.data_ptr());
    char* tdst = static_cast<char*>(table.data_ptr());
    TORCH_CHECK(cols * esize == 64, "sparsekern.spmm_24: internal error: AMX chunks must be 64 bytes");
    // Chunks outer, rows inner: sequential writes, constant-stride reads (rows inner was 2x slower: 18+ write
    // streams 64 KB apart).
    const int64_t full = K * esize / 64;  // whole 64-byte pieces of a row (inlined copies)
    at::parallel_for(0, amx_rows / 16, 1, [&](int64_t g0, int64_t g1) {
      const int64_t m0 = g0 * 16, m1 = g1 * 16, mv = std::min(m1, M);
      for (int64_t b = 0; b < nch; ++b) {
        char* d = tdst + (b * amx_rows) * 64;
        const char* src = xsrc + b * 64;
        if (b < full) {
          for (int64_t m = m0; m < mv; ++m) std::memcpy(d + m * 64, src + m * K * esize, 64);
        } else {
          const int64_t w = K * esize - b * 64;  // < 64
          for (int64_t m = m0; m < mv; ++m) {
            std::memcpy(d + m * 64, src + m * K * esize, w);
            std::memset(d + m * 64 + w, 0, 64 - w);
          }
        }
        if (mv < m1) std::memset(d + mv * 64, 0, (m1 - mv) * 64);
      }
    });
  }
  const int64_t xs = kern.x_block + kern.x_chunk;
  if (!tokens && kern.x_block > 0) {  // K-blocked copy for the kernel (spmm_24.h)
    const int64_t nblk = x_blocks(K, kern.x_block, kern.x_chunk);
    table = scratch(1, {nblk, M, xs}, xp.scalar_type());
    // Plain memcpy, not tensor ops: the worker threads of at::parallel_for do not inherit the caller's InferenceMode,
    // and an in-place tensor op there on buffers made under torch.inference_mode() raised "Inplace update to
    // inference tensor outside InferenceMode" (found by `bench generate`, int8 prefill; tests/test_inference_mode.py).
    const int64_t esize = xp.element_size();
    const char* xsrc = static_cast<const char*>(xp.data_ptr());
    char* tdst = static_cast<char*>(table.data_ptr());
    at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
      for (int64_t b = 0; b < nblk; ++b) {
        const int64_t c0 = b * kern.x_block, n = std::min(xs, ldx - c0);
        for (int64_t m = m0; m < m1; ++m) {
          char* dst = tdst + ((b * M + m) * xs) * esize;
          std::memcpy(dst, xsrc + (m * ldx + c0) * esize, n * esize);
          if (n < xs) std::memset(dst + n * esize, 0, (xs - n) * esize);
        }
      }
    });
  }
  if (tokens) {
    table = scratch(1, {token_table_bytes(tk.table, M, K)}, at::kByte);
    at::parallel_for(0, token_tiles(M), 1, [&](int64_t j0, int64_t j1) {
      build_token_table(tk.table, xp.data_ptr(), ldx, M, K, table.data_ptr(), j0, j1);
    });
  }

  Problem p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.wtype = wt;
  p.values = vc.data_ptr();
  p.codes = cc.data_ptr<uint8_t>();
  p.code_stride = cb;
  p.xtype = kern.xtype;
  p.x = amx_direct ? xc.data_ptr() : tokens || amx || kern.x_block > 0 ? table.data_ptr() : xp.data_ptr();
  // Row kernels: the row stride of x (token lanes address their table by its layout, spmm_24.h; AMX: the fields
  // below).
  p.ldx = tokens || amx ? 0 : kern.x_block > 0 ? xs : ldx;
  if (amx) {
    p.x_row_bytes = amx_direct ? K * xc.element_size() : 64;
    p.x_chunk_bytes = amx_direct ? 64 : amx_rows * 64;
    if (x_tail.defined()) {
      p.x_tail = x_tail.data_ptr();
      p.x_tail_m = M / 16 * 16;
    }
  }

  // Output tiles: NT weight rows x MT activation rows. Threads split N (each weight row is streamed by one thread);
  // for M > MT the tile loops over row blocks of x while its NT weight rows stay in cache.
  // Contract with the tile kernels: one thread runs all of an n-tile's row blocks, in order from m0 = 0 (the row-pair
  // kernels build their per-n-tile panels at m0 = 0 and reuse them for the later blocks).
  // Work is handed out dynamically: each thread takes the next n-tile from a shared counter until none is left,
  // instead of one static slab of tiles per thread. Why: on a shared machine a thread that loses its core for a
  // while (another process) would otherwise hold back the whole call while the others wait at the barrier; with
  // dynamic tiles the others take its share (measured: `sparsekern bench generate --contend`, docs/benchmarks.md).
  // The AMX family takes wider n-tiles where N allows (amx_tile_n, spmm_24.h).
  const int64_t NT = amx ? amx_tile_n(N, at::get_num_threads()) : kTileN, MT = kTileM;
  const int64_t n_tiles = (N + NT - 1) / NT;
  const bool exact_int = is_int && od == at::kInt && !ep.any();
  void* const out_ptr = out.data_ptr();  // once: data_ptr<T>() checks the dtype and storage on every call
  // The kernel's fused epilogue + store where it covers the output and epilogue (AMX: float32 / bfloat16 out with
  // none / relu, or the exact int32 accumulator; spmm_24.h FusedOut).
  FusedOut fo;
  const bool fused = kern.tile_fused != nullptr && ep.act != Act::kGelu &&
                     (exact_int || od == at::kFloat || od == at::kBFloat16);
  if (fused) {
    fo.type = exact_int ? FusedOut::Type::kI32Raw : od == at::kFloat ? FusedOut::Type::kF32 : FusedOut::Type::kBF16;
    fo.out = out_ptr;
    fo.ldo = N;
    fo.alpha = ep.alpha;
    fo.bias = ep.bias;
    fo.row_scale = ep.row_scale;
    fo.relu = ep.act == Act::kRelu;
  }
  std::atomic<int64_t> next_tile{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_tiles));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    std::vector<float> accf(fused ? 0 : MT * NT);
    std::vector<int32_t> acci(is_int && !fused ? MT * NT : 0);
    for (int64_t t = next_tile.fetch_add(1, std::memory_order_relaxed); t < n_tiles;
         t = next_tile.fetch_add(1, std::memory_order_relaxed)) {
      const int64_t n0 = t * NT, n1 = std::min(N, n0 + NT), nc = n1 - n0;
      for (int64_t m0 = 0; m0 < M; m0 += MT) {
        const int64_t m1 = std::min(M, m0 + MT);
        if (fused) {
          kern.tile_fused(p, m0, m1, n0, n1, fo);
          continue;
        }
        kern.tile(p, m0, m1, n0, n1, is_int ? static_cast<void*>(acci.data()) : accf.data(), NT);
        for (int64_t m = m0; m < m1; ++m) {
          float* a = accf.data() + (m - m0) * NT;
          if (exact_int) {
            std::memcpy(static_cast<int32_t*>(out_ptr) + m * N + n0, acci.data() + (m - m0) * NT, nc * sizeof(int32_t));
            continue;
          }
          if (is_int) {
            for (int64_t j = 0; j < nc; ++j) a[j] = static_cast<float>(acci[(m - m0) * NT + j]);
          }
          apply_epilogue(a, nc, n0, ep.row_scale ? ep.row_scale[m] : 1.f, ep);
          switch (od) {
            case at::kFloat:
              store_row(a, nc, static_cast<float*>(out_ptr) + m * N + n0);
              break;
            case at::kHalf:
              store_row(a, nc, static_cast<c10::Half*>(out_ptr) + m * N + n0);
              break;
            case at::kBFloat16:
              if (kern.store_bf16 != nullptr) {
                kern.store_bf16(a, nc, static_cast<c10::BFloat16*>(out_ptr) + m * N + n0);
              } else {
                store_row(a, nc, static_cast<c10::BFloat16*>(out_ptr) + m * N + n0);
              }
              break;
            case at::kInt:
              store_row(a, nc, static_cast<int32_t*>(out_ptr) + m * N + n0);
              break;
            case at::kChar:
              store_row(a, nc, static_cast<int8_t*>(out_ptr) + m * N + n0);
              break;
            default:
              break;
          }
        }
      }
    }
    if (kern.finish != nullptr) kern.finish();
  });
  return out;
}

Tensor spmm_24_cpu(const Tensor& x, const Tensor& values, const Tensor& codes, const std::optional<Tensor>& bias,
                   const std::optional<Tensor>& alpha, const std::optional<Tensor>& row_scale,
                   c10::string_view activation, std::optional<at::ScalarType> out_dtype) {
  return spmm_24_run(dispatch_settings(), x, values, codes, bias, alpha, row_scale, activation, out_dtype);
}

}  // namespace
}  // namespace spmm

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("spmm_24", &spmm::spmm_24_cpu); }

}  // namespace cpu
}  // namespace sparsekern
