// CUDA kernels of the core N:M / 2:4 ops (schemas in csrc/registration.cpp, CPU twins in csrc/cpu/core_ops.cpp):
// prune_nm (general N:M, incl. 4:8), nm_violation, compress_24 / decompress_24 (portable format v1),
// quantize_per_token (int8, float8_e4m3fn), and the post-op kernel cslt_linear uses for what cuSPARSELt's epilogue
// cannot do (per-token row_scale).
//
// Every selection / encoding decision goes through csrc/core/nm.h (SK_HOST_DEVICE), the same functions the CPU
// kernels call, so masks and codes are bit-identical on both devices by construction.
//
// Errors found on the device (a non-2:4 group, an invalid pattern code) are collected with an atomicMin on the
// linear group index, so the message names the *first* offending (row, group) in row-major order, like the CPU.
#include "cuda/core_ops.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Float8_e4m3fn.h>
#include <torch/library.h>

#include <limits>
#include <type_traits>
#include <sstream>
#include <string>
#include <vector>

#include "core/messages.h"
#include "core/nm.h"
#include "cuda/epilogue.cuh"

namespace sparsekern {
namespace cuda {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t work) {
  // Grid-stride loops below: cap the grid, every kernel handles any amount of work.
  const int64_t b = (work + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(b, 65535LL * 8));
}

// "Non-zero" as the pattern rules mean it: core::is_nonzero (csrc/core/nm.h), shared with the CPU kernels.
using core::is_nonzero;

// A device-side "first offending index" cell: int64 [1] holding INT64_MAX until an atomicMin lowers it.
at::Tensor new_first_cell(const at::Tensor& like) {
  return at::full({1}, std::numeric_limits<int64_t>::max(), like.options().dtype(at::kLong));
}

int64_t read_first_cell(const at::Tensor& cell) {
  const int64_t v = cell.item<int64_t>();  // synchronises: the caller needs the answer on the host
  return v == std::numeric_limits<int64_t>::max() ? -1 : v;
}

__device__ __forceinline__ void record_first(int64_t* cell, int64_t idx) {
  atomicMin(reinterpret_cast<unsigned long long*>(cell), static_cast<unsigned long long>(idx));
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
}

void check_nm_args(const char* op, const at::Tensor& w, int64_t n, int64_t m) {
  TORCH_CHECK(m >= 1 && m <= core::kMaxGroup, op, ": m must be in [1, ", core::kMaxGroup, "], got m = ", m);
  TORCH_CHECK(n >= 0 && n <= m, op, ": n must be in [0, m] (n of every m are pruned), got n = ", n, ", m = ", m);
  TORCH_CHECK(w.dim() >= 1, op, ": w must have at least one dimension");
  TORCH_CHECK(w.size(-1) % m == 0, op, ": the last dim of w (", w.size(-1), ") must be a multiple of m = ", m,
              " (groups of m consecutive input features, aligned at 0)");
}

// ------------------------------------------------------------------------------------------------ prune_nm
// Scores are compared in float64 when w or scores is float64, else in float32 (exact for 32/16-bit inputs), exactly
// as the CPU kernel does, so no tie appears on one device that the other does not see. NaN in w or scores is an
// error (it cannot be ranked); the first NaN's linear index is reported.
template <typename T, typename A>
__global__ void prune_nm_kernel(const T* __restrict__ w, const A* __restrict__ scores, T* __restrict__ out,
                                bool* __restrict__ mask, int64_t groups, int n, int m, int64_t* nan_w,
                                int64_t* nan_s) {
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < groups; g += (int64_t)gridDim.x * blockDim.x) {
    const int64_t base = g * m;
    A s[core::kMaxGroup];
    bool bad = false;
    for (int j = 0; j < m; ++j) {
      const A wj = static_cast<A>(w[base + j]);
      if (wj != wj) {
        record_first(nan_w, base + j);
        bad = true;
      }
      if (scores != nullptr) {
        s[j] = scores[base + j];
        if (s[j] != s[j]) {
          record_first(nan_s, base + j);
          bad = true;
        }
      } else {
        s[j] = wj < A(0) ? -wj : wj;
      }
    }
    if (bad) continue;  // the op raises after the kernel
    const uint32_t keep = core::select_keep_mask_t<A>(s, n, m);
    for (int j = 0; j < m; ++j) {
      const bool k = (keep >> j) & 1u;
      out[base + j] = k ? w[base + j] : static_cast<T>(0.f);
      mask[base + j] = k;
    }
  }
}

bool is_prunable_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

using core::index_string;  // csrc/core/messages.h

std::tuple<at::Tensor, at::Tensor> prune_nm_cuda(const at::Tensor& w_in, int64_t n, int64_t m,
                                                 const std::optional<at::Tensor>& scores_in) {
  check_cuda(w_in, "prune_nm", "w");
  check_nm_args("prune_nm", w_in, n, m);
  TORCH_CHECK(is_prunable_dtype(w_in.scalar_type()), "prune_nm: w has unsupported dtype ", w_in.scalar_type(),
              "; supported: float32, float64, float16, bfloat16");
  const c10::cuda::CUDAGuard guard(w_in.device());
  const auto w = w_in.contiguous();
  bool use_double = w.scalar_type() == at::kDouble;
  if (scores_in.has_value()) {
    TORCH_CHECK(scores_in->device() == w.device(), "prune_nm: scores is on ", scores_in->device(), " but w is on ",
                w.device(), "; all tensors must be on the same device");
    TORCH_CHECK(scores_in->sizes() == w.sizes(), "prune_nm: scores must have w's shape ", w.sizes(), ", got ",
                scores_in->sizes());
    TORCH_CHECK(is_prunable_dtype(scores_in->scalar_type()), "prune_nm: scores has unsupported dtype ",
                scores_in->scalar_type(), "; supported: float32, float64, float16, bfloat16");
    use_double = use_double || scores_in->scalar_type() == at::kDouble;
  }
  // Scores converted once to the comparison type (an exact conversion in both cases).
  at::Tensor scores;
  if (scores_in.has_value()) scores = scores_in->to(use_double ? at::kDouble : at::kFloat).contiguous();
  auto out = at::empty_like(w);
  auto mask = at::empty(w.sizes(), w.options().dtype(at::kBool));
  const int64_t groups = w.numel() / m;
  if (groups == 0) return {out, mask};
  auto nan_w = new_first_cell(w), nan_s = new_first_cell(w);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "prune_nm_cuda", [&] {
    if (use_double) {
      prune_nm_kernel<scalar_t, double><<<blocks_for(groups), kThreads, 0, stream>>>(
          w.data_ptr<scalar_t>(), scores.defined() ? scores.data_ptr<double>() : nullptr, out.data_ptr<scalar_t>(),
          mask.data_ptr<bool>(), groups, (int)n, (int)m, nan_w.data_ptr<int64_t>(), nan_s.data_ptr<int64_t>());
    } else {
      prune_nm_kernel<scalar_t, float><<<blocks_for(groups), kThreads, 0, stream>>>(
          w.data_ptr<scalar_t>(), scores.defined() ? scores.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(),
          mask.data_ptr<bool>(), groups, (int)n, (int)m, nan_w.data_ptr<int64_t>(), nan_s.data_ptr<int64_t>());
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // Pruning is an offline step: one synchronisation to report NaN input is affordable here.
  const int64_t bad_w = read_first_cell(nan_w), bad_s = read_first_cell(nan_s);
  TORCH_CHECK(bad_w < 0, "prune_nm: w holds NaN at index ", index_string(w.sizes(), bad_w),
              "; NaN weights cannot be ranked (Inf is allowed and counts as the largest magnitude). Fix the weight "
              "or pass finite scores for it");
  TORCH_CHECK(bad_s < 0, "prune_nm: scores holds NaN at index ", index_string(w.sizes(), bad_s),
              "; scores must not be NaN (Inf is allowed)");
  return {out, mask};
}

// ------------------------------------------------------------------------------------------------ nm_violation
template <typename T>
__global__ void nm_violation_kernel(const T* __restrict__ w, int64_t groups, int n, int m, int64_t* first) {
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < groups; g += (int64_t)gridDim.x * blockDim.x) {
    int cnt = 0;
    for (int j = 0; j < m; ++j) cnt += is_nonzero(w[g * m + j]) ? 1 : 0;
    if (cnt > m - n) record_first(first, g);
  }
}

__global__ void nm_violation_finalize_kernel(const int64_t* first, int64_t groups_per_row, int64_t* out) {
  const int64_t f = *first;
  const bool none = f == std::numeric_limits<int64_t>::max();
  out[0] = none ? -1 : f / groups_per_row;
  out[1] = none ? -1 : f % groups_per_row;
}

// Launches the violation scan into `cell` (see new_first_cell) without synchronising.
void launch_nm_violation(const at::Tensor& w, int64_t n, int64_t m, at::Tensor& cell) {
  const int64_t groups = w.numel() / m;
  if (groups == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  // Any dtype, like the CPU kernel (the check is about non-zeros, not values).
  AT_DISPATCH_V2(
      w.scalar_type(), "nm_violation_cuda", AT_WRAP([&] {
        nm_violation_kernel<scalar_t><<<blocks_for(groups), kThreads, 0, stream>>>(
            w.data_ptr<scalar_t>(), groups, (int)n, (int)m, cell.data_ptr<int64_t>());
      }),
      AT_EXPAND(AT_ALL_TYPES), at::kHalf, at::kBFloat16, at::kBool, AT_EXPAND(AT_FLOAT8_TYPES));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor nm_violation_cuda(const at::Tensor& w_in, int64_t n, int64_t m) {
  check_cuda(w_in, "nm_violation", "w");
  check_nm_args("nm_violation", w_in, n, m);
  const c10::cuda::CUDAGuard guard(w_in.device());
  const auto w = w_in.contiguous();
  auto cell = new_first_cell(w);
  launch_nm_violation(w, n, m, cell);
  auto out = at::empty({2}, w.options().dtype(at::kLong));
  // Stays on the device: no host synchronisation (the C++/Python is_nm helpers read it when they need to).
  const int64_t gpr = std::max<int64_t>(1, w.size(-1) / m);
  nm_violation_finalize_kernel<<<1, 1, 0, at::cuda::getCurrentCUDAStream()>>>(cell.data_ptr<int64_t>(), gpr,
                                                                              out.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ------------------------------------------------------------------------------------------------ compress_24
// The portable format's dtypes (the CPU kernel's list).
#define SK_DTYPES_24 at::kFloat, at::kDouble, at::kHalf, at::kBFloat16, at::kChar, at::kFloat8_e4m3fn, at::kFloat8_e5m2
bool is_24_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16 || t == at::kChar ||
         t == at::kFloat8_e4m3fn || t == at::kFloat8_e5m2;
}
constexpr const char* kDtypes24 = "float32, float64, float16, bfloat16, int8, float8_e4m3fn, float8_e5m2";

// One thread per code byte = two consecutive groups of 4 of one row (two threads never write the same byte).
template <typename T>
__global__ void compress_24_kernel(const T* __restrict__ w, T* __restrict__ values, uint8_t* __restrict__ codes,
                                   int64_t rows, int64_t cols, int64_t bytes_per_row, int64_t* first_bad) {
  const int64_t G = cols / 4;
  const int64_t total = rows * bytes_per_row;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / bytes_per_row, b = i % bytes_per_row;
    uint8_t byte = 0;  // an odd last group leaves the high nibble 0 (format v1)
    for (int h = 0; h < 2; ++h) {
      const int64_t g = 2 * b + h;
      if (g >= G) break;
      const T* src = w + r * cols + g * 4;
      uint32_t nz = 0;
      for (int j = 0; j < 4; ++j) nz |= (is_nonzero(src[j]) ? 1u : 0u) << j;
      uint8_t code = core::code_from_nonzero_mask(nz);
      if (code == 0xFF) {
        record_first(first_bad, r * G + g);
        code = static_cast<uint8_t>(0 | (1 << 2));  // any valid code: the op throws after the kernel
      }
      T* dst = values + r * (cols / 2) + g * 2;
      dst[0] = src[core::code_index0(code)];
      dst[1] = src[core::code_index1(code)];
      byte |= static_cast<uint8_t>(code << (4 * h));
    }
    codes[i] = byte;
  }
}

std::tuple<at::Tensor, at::Tensor> compress_24_cuda(const at::Tensor& w_in) {
  check_cuda(w_in, "compress_24", "w");
  TORCH_CHECK(w_in.dim() == 2, "compress_24: w must be 2-D [rows, cols], got ", w_in.dim(), "-D");
  TORCH_CHECK(is_24_dtype(w_in.scalar_type()), "compress_24: w has unsupported dtype ", w_in.scalar_type(),
              "; supported: ", kDtypes24);
  TORCH_CHECK(w_in.size(1) % 4 == 0, "compress_24: cols (", w_in.size(1),
              ") must be a multiple of 4 (2:4 groups along the last dim)");
  const c10::cuda::CUDAGuard guard(w_in.device());
  const auto w = w_in.contiguous();
  const int64_t rows = w.size(0), cols = w.size(1);
  const int64_t bpr = core::code_bytes_per_row(cols);
  auto values = at::empty({rows, cols / 2}, w.options());
  auto codes = at::empty({rows, bpr}, w.options().dtype(at::kByte));
  if (rows * bpr == 0) return {values, codes};
  auto bad = new_first_cell(w);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(
      w.scalar_type(), "compress_24_cuda", AT_WRAP([&] {
        compress_24_kernel<scalar_t><<<blocks_for(rows * bpr), kThreads, 0, stream>>>(
            w.data_ptr<scalar_t>(), values.data_ptr<scalar_t>(), codes.data_ptr<uint8_t>(), rows, cols, bpr,
            bad.data_ptr<int64_t>());
      }),
      SK_DTYPES_24);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t first = read_first_cell(bad);
  if (first >= 0) {
    const int64_t r = first / (cols / 4), g = first % (cols / 4);
    TORCH_CHECK(false, "compress_24: w is not 2:4 sparse: row ", r, ", group ", g, " (columns ", 4 * g, "..",
                4 * g + 3, ") holds more than 2 non-zeros, at most 2 are allowed per group of 4. Prune it first: "
                "prune_nm(w, 2, 4)");
  }
  return {values, codes};
}

// ------------------------------------------------------------------------------------------------ decompress_24
template <typename T>
__global__ void decompress_24_kernel(const T* __restrict__ values, const uint8_t* __restrict__ codes,
                                     T* __restrict__ out, int64_t rows, int64_t cols, int64_t bytes_per_row,
                                     int64_t* first_bad) {
  const int64_t G = cols / 4;
  const int64_t total = rows * bytes_per_row;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t r = i / bytes_per_row, b = i % bytes_per_row;
    const uint8_t byte = codes[i];
    for (int h = 0; h < 2; ++h) {
      const int64_t g = 2 * b + h;
      if (g >= G) break;  // the padding nibble of an odd last group carries nothing
      const uint8_t code = static_cast<uint8_t>((byte >> (4 * h)) & 0xF);
      T* dst = out + r * cols + g * 4;
      const T zero = static_cast<T>(0.f);
      if (!core::code_is_valid(code)) {
        if (first_bad != nullptr) record_first(first_bad, r * G + g);
        for (int j = 0; j < 4; ++j) dst[j] = zero;
        continue;
      }
      const T* src = values + r * (cols / 2) + g * 2;
      const int i0 = core::code_index0(code), i1 = core::code_index1(code);
      for (int j = 0; j < 4; ++j) dst[j] = j == i0 ? src[0] : (j == i1 ? src[1] : zero);
    }
  }
}

// Shared by both entry points: host-side checks, the launch; `bad` is the first-invalid-code cell or undefined (no
// validation, no synchronisation: invalid codes decompress to zeros).
at::Tensor decompress_24_launch(const at::Tensor& values_in, const at::Tensor& codes_in, int64_t cols, bool validate,
                                int64_t* first_out) {
  check_cuda(values_in, "decompress_24", "values");
  check_cuda(codes_in, "decompress_24", "codes");
  TORCH_CHECK(values_in.device() == codes_in.device(), "decompress_24: values (", values_in.device(),
              ") and codes (", codes_in.device(), ") must be on the same device");
  TORCH_CHECK(cols >= 0 && cols % 4 == 0, "decompress_24: cols must be a non-negative multiple of 4, got ", cols);
  TORCH_CHECK(values_in.dim() == 2 && values_in.size(1) == cols / 2, "decompress_24: values must be [rows, cols/2] = [",
              values_in.dim() >= 1 ? values_in.size(0) : 0, ", ", cols / 2, "], got ", values_in.sizes());
  TORCH_CHECK(is_24_dtype(values_in.scalar_type()), "decompress_24: values has unsupported dtype ",
              values_in.scalar_type(), "; supported: ", kDtypes24);
  const int64_t rows = values_in.size(0);
  const int64_t bpr = core::code_bytes_per_row(cols);
  TORCH_CHECK(codes_in.scalar_type() == at::kByte, "decompress_24: codes must be uint8, got ",
              codes_in.scalar_type());
  TORCH_CHECK(codes_in.dim() == 2 && codes_in.size(0) == rows && codes_in.size(1) == bpr,
              "decompress_24: codes must be [rows, ceil(cols/8)] = [", rows, ", ", bpr, "], got ", codes_in.sizes());
  const c10::cuda::CUDAGuard guard(values_in.device());
  const auto values = values_in.contiguous();
  const auto codes = codes_in.contiguous();
  auto out = at::empty({rows, cols}, values.options());
  *first_out = -1;
  if (rows * bpr == 0) return out;
  at::Tensor bad;
  if (validate) bad = new_first_cell(values);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_V2(
      values.scalar_type(), "decompress_24_cuda", AT_WRAP([&] {
        decompress_24_kernel<scalar_t><<<blocks_for(rows * bpr), kThreads, 0, stream>>>(
            values.data_ptr<scalar_t>(), codes.data_ptr<uint8_t>(), out.data_ptr<scalar_t>(), rows, cols, bpr,
            validate ? bad.data_ptr<int64_t>() : nullptr);
      }),
      SK_DTYPES_24);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (validate) *first_out = read_first_cell(bad);
  return out;
}

at::Tensor decompress_24_cuda(const at::Tensor& values_in, const at::Tensor& codes_in, int64_t cols) {
  int64_t first = -1;
  at::Tensor out = decompress_24_launch(values_in, codes_in, cols, /*validate=*/true, &first);
  if (first >= 0) {
    const int64_t r = first / (cols / 4), g = first % (cols / 4);
    TORCH_CHECK(false, "decompress_24: codes row ", r, ", group ", g,
                " holds an invalid pattern code (a code must name two distinct positions i0 < i1 as i0 | i1 << 2)");
  }
  return out;
}

}  // namespace

// For spmm_24's CUDA path: the same decompression with no code validation and so no host synchronisation (the
// check reads a device cell back), which would stall the stream on every call and make the op impossible to capture
// in a CUDA graph. The codes come from a Sparse24Weight, validated when it was built (docs/failure.md); an invalid
// code decompresses to a zero group instead of raising.
at::Tensor decompress_24_trusted(const at::Tensor& values, const at::Tensor& codes, int64_t cols) {
  int64_t unused = -1;
  return decompress_24_launch(values, codes, cols, /*validate=*/false, &unused);
}

namespace {

// ------------------------------------------------------------------------------------------------ quantize_per_token
// Symmetric per-row quantisation, exactly (bit for bit) the float32 recipe the CPU kernel and the tests' reference use:
//   amax = max_j |x[t, j]| (float32);  scale = amax > 0 ? max(amax / QMAX, 2^-149) : 1   (IEEE division)
//   int8: q = clamp(round_half_even(x / scale), -127, 127);  fp8 e4m3fn: q = e4m3(clamp(x / scale, -448, 448)) (RNE)
// A row holding Inf or NaN gets scale = NaN and q = 0, so q * scale is NaN downstream. (The CPU kernel raises; on the
// GPU a check would synchronise every call of this inference-path op and break CUDA-graph capture.)
template <typename T, typename Q, bool kInt8>
__global__ void quantize_per_token_kernel(const T* __restrict__ x, Q* __restrict__ q, float* __restrict__ scale,
                                          int64_t K) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * K;
  float amax = 0.f;
  bool finite = true;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const float a = fabsf(static_cast<float>(xr[j]));
    finite &= a <= 3.402823466e38f;  // false for Inf and NaN
    amax = fmaxf(amax, a);
  }
  finite = __syncthreads_and(finite);
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  __shared__ float warp_max[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_max[warp] = amax;
  __syncthreads();
  if (warp == 0) {
    const int nwarps = (blockDim.x + 31) >> 5;
    amax = lane < nwarps ? warp_max[lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    if (lane == 0) warp_max[0] = amax;
  }
  __syncthreads();
  amax = warp_max[0];
  constexpr float kQmax = kInt8 ? 127.f : 448.f;
  // The smallest positive float as a floor: amax / QMAX underflows to 0 for denormal amax, and x / 0 gave NaN.
  const float s = amax > 0.f ? fmaxf(__fdiv_rn(amax, kQmax), 1.40129846e-45f) : 1.f;
  Q* qr = q + row * K;
  if (!finite) {
    if (threadIdx.x == 0) scale[row] = __int_as_float(0x7fc00000);  // NaN
    for (int64_t j = threadIdx.x; j < K; j += blockDim.x) qr[j] = static_cast<Q>(0.f);
    return;
  }
  if (threadIdx.x == 0) scale[row] = s;
  for (int64_t j = threadIdx.x; j < K; j += blockDim.x) {
    const float v = __fdiv_rn(static_cast<float>(xr[j]), s);
    if constexpr (kInt8) {
      qr[j] = static_cast<Q>(static_cast<int>(fminf(fmaxf(rintf(v), -127.f), 127.f)));
    } else {
      qr[j] = static_cast<Q>(fminf(fmaxf(v, -448.f), 448.f));
    }
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda(const at::Tensor& x_in, at::ScalarType dtype) {
  check_cuda(x_in, "quantize_per_token", "x");
  TORCH_CHECK(x_in.dim() == 2, "quantize_per_token: x must be 2-D [M, K], got ", x_in.dim(), "-D");
  TORCH_CHECK(dtype == at::kChar || dtype == at::kFloat8_e4m3fn,
              "quantize_per_token: dtype must be torch.int8 or torch.float8_e4m3fn, got ", dtype);
  const auto xt = x_in.scalar_type();
  TORCH_CHECK(xt == at::kHalf || xt == at::kBFloat16 || xt == at::kFloat,
              "quantize_per_token: x must be float16, bfloat16 or float32, got ", xt);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto q = at::empty({M, K}, x.options().dtype(dtype));
  auto scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  TORCH_CHECK(M <= std::numeric_limits<int32_t>::max(), "quantize_per_token: too many rows (", M, ")");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xt, "quantize_per_token_cuda", [&] {
    if (dtype == at::kChar) {
      quantize_per_token_kernel<scalar_t, int8_t, true><<<(unsigned)M, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), q.data_ptr<int8_t>(), scale.data_ptr<float>(), K);
    } else {
      quantize_per_token_kernel<scalar_t, c10::Float8_e4m3fn, false><<<(unsigned)M, kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), q.data_ptr<c10::Float8_e4m3fn>(), scale.data_ptr<float>(), K);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {q, scale};
}

// ------------------------------------------------------------------------------------------------ linear post-op
// apply_activation / to_output: cuda/epilogue.cuh (shared with the decode kernel, spmm_24_skinny.cu)

template <typename Tin, typename Tout, typename Tbias>
__global__ void linear_postop_kernel(const Tin* in, Tout* out, const float* __restrict__ row_scale,
                                     const float* __restrict__ alpha, const Tbias* __restrict__ bias, int64_t M,
                                     int64_t N, int act) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t t = i / N, c = i % N;
    float v = static_cast<float>(in[i]);  // in and out share the row-major [*, N] indexing
    if (alpha != nullptr) v *= alpha[c];
    if (row_scale != nullptr) v *= row_scale[t];
    if (bias != nullptr) v += static_cast<float>(bias[c]);
    out[i] = to_output<Tout>(apply_activation(v, act));
  }
}

template <typename Tin, typename Tout>
void launch_postop_bias(const at::Tensor& in, at::Tensor& out, const float* rs, const float* al,
                        const std::optional<at::Tensor>& bias, int64_t M, int64_t N, int act, cudaStream_t stream) {
  const int64_t blocks = blocks_for(M * N);
  if (bias.has_value() && bias->scalar_type() == at::kFloat) {
    linear_postop_kernel<Tin, Tout, float><<<blocks, kThreads, 0, stream>>>(
        in.data_ptr<Tin>(), out.data_ptr<Tout>(), rs, al, bias->data_ptr<float>(), M, N, act);
  } else if constexpr (std::is_integral_v<Tout>) {
    TORCH_CHECK(!bias.has_value(), "linear_postop: an integer output takes a float32 bias");
    linear_postop_kernel<Tin, Tout, float><<<blocks, kThreads, 0, stream>>>(
        in.data_ptr<Tin>(), out.data_ptr<Tout>(), rs, al, nullptr, M, N, act);
  } else {
    linear_postop_kernel<Tin, Tout, Tout><<<blocks, kThreads, 0, stream>>>(
        in.data_ptr<Tin>(), out.data_ptr<Tout>(), rs, al, bias.has_value() ? bias->data_ptr<Tout>() : nullptr, M, N,
        act);
  }
}

template <typename Tin>
void launch_postop_out(const at::Tensor& in, at::Tensor& out, const float* rs, const float* al,
                       const std::optional<at::Tensor>& bias, int64_t M, int64_t N, int act, cudaStream_t stream) {
  switch (out.scalar_type()) {
    case at::kHalf: return launch_postop_bias<Tin, at::Half>(in, out, rs, al, bias, M, N, act, stream);
    case at::kBFloat16: return launch_postop_bias<Tin, at::BFloat16>(in, out, rs, al, bias, M, N, act, stream);
    case at::kFloat: return launch_postop_bias<Tin, float>(in, out, rs, al, bias, M, N, act, stream);
    case at::kInt: return launch_postop_bias<Tin, int32_t>(in, out, rs, al, bias, M, N, act, stream);
    case at::kChar: return launch_postop_bias<Tin, int8_t>(in, out, rs, al, bias, M, N, act, stream);
    default:
      TORCH_CHECK(false, "linear_postop: out must be float16, bfloat16, float32, int32 or int8, got ",
                  out.scalar_type());
  }
}

}  // namespace

int64_t first_nm_violation(const at::Tensor& w_in, int64_t n, int64_t m) {
  check_cuda(w_in, "nm check", "w");
  check_nm_args("nm check", w_in, n, m);
  const c10::cuda::CUDAGuard guard(w_in.device());
  const auto w = w_in.contiguous();
  auto cell = new_first_cell(w);
  launch_nm_violation(w, n, m, cell);
  return read_first_cell(cell);
}

Activation parse_activation(const std::string& s, const char* op) {
  if (s == "none") return Activation::kNone;
  if (s == "relu") return Activation::kRelu;
  if (s == "gelu") return Activation::kGelu;
  TORCH_CHECK(false, op, ": activation must be \"none\", \"relu\" or \"gelu\", got \"", s, "\"");
  return Activation::kNone;  // unreachable
}

void linear_postop(const at::Tensor& in, at::Tensor& out, const std::optional<at::Tensor>& row_scale,
                   const std::optional<at::Tensor>& alpha, const std::optional<at::Tensor>& bias, Activation act) {
  const int64_t M = out.size(0), N = out.size(1);
  TORCH_CHECK(out.is_contiguous() && in.is_contiguous() && in.dim() == 2 && in.size(1) == N && in.size(0) >= M,
              "linear_postop: internal layout error (in ", in.sizes(), ", out ", out.sizes(), ")");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat ||
                    (bias->scalar_type() == out.scalar_type() && at::isFloatingType(out.scalar_type())),
                "linear_postop: bias must be float32 or the (floating) output dtype ", out.scalar_type());
  }
  if (M * N == 0) return;
  const float* rs = row_scale.has_value() ? row_scale->data_ptr<float>() : nullptr;
  const float* al = alpha.has_value() ? alpha->data_ptr<float>() : nullptr;
  auto stream = at::cuda::getCurrentCUDAStream();
  const int a = static_cast<int>(act);
  switch (in.scalar_type()) {
    case at::kHalf: launch_postop_out<at::Half>(in, out, rs, al, bias, M, N, a, stream); break;
    case at::kBFloat16: launch_postop_out<at::BFloat16>(in, out, rs, al, bias, M, N, a, stream); break;
    case at::kFloat: launch_postop_out<float>(in, out, rs, al, bias, M, N, a, stream); break;
    case at::kInt: launch_postop_out<int32_t>(in, out, rs, al, bias, M, N, a, stream); break;
    default:
      TORCH_CHECK(false, "linear_postop: in must be float16, bfloat16, float32 or int32, got ", in.scalar_type());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace sparsekern

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("prune_nm", &sparsekern::cuda::prune_nm_cuda);
  m.impl("nm_violation", &sparsekern::cuda::nm_violation_cuda);
  m.impl("compress_24", &sparsekern::cuda::compress_24_cuda);
  m.impl("decompress_24", &sparsekern::cuda::decompress_24_cuda);
  m.impl("quantize_per_token", &sparsekern::cuda::quantize_per_token_cuda);
}
