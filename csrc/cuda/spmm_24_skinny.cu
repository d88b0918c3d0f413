// The small-M (decode) 2:4 GEMM on CUDA: spmm_24 for M = 1..16 with float16 / bfloat16 (fp32 accumulation) or int8
// (exact int32 accumulation) inputs, reading the portable format directly -- 1 byte of values + 1 bit of code per
// original 16-bit weight instead of 2 bytes -- with spmm_24's epilogue fused (alpha, row_scale, bias, relu / gelu,
// any output dtype).
//
// Layout of the work (csrc/core/skinny24.h, which also holds the decoding and the order of operations; its CPU
// emulation, csrc/cpu/skinny24_emulate.cpp, is tested on every CPU run and equals this kernel's sums bit for bit):
//   * a thread block = 8 warps = 8 output rows; one warp per row n, so a row's values and codes are read by one
//     warp in 512-byte (16-bit values) / 128-byte (codes) coalesced pieces: each lane loads its unit of 16 values
//     (128-bit loads) and 4 code bytes (one 32-bit load) per step of 1024 columns;
//   * the activations of the step (x[0:M, 1024 columns]) are staged in shared memory by the whole block (every
//     warp of the block reads them; 128-bit loads when x's rows allow), each lane's 32 columns padded by 4 bytes so
//     that the 32 lanes of a warp read 32 different banks;
//   * each lane's weights for step st + 1 are loaded into registers before step st is staged and computed, so the
//     weight stream's HBM latency overlaps the block's synchronisation and shared-memory work;
//   * split-K over blockIdx.y (skinny_plan: while the grid has fewer than 2 blocks per SM) fills the GPU for a
//     narrow N; the ranges' sums go to a float32 / int32 workspace and a second kernel adds them in range order
//     and applies the epilogue (deterministic: no atomics);
//   * no host synchronisation, allocations through the caching allocator: CUDA-graph capturable.
// Unaligned operands (K not a multiple of 32, or a storage offset breaking 16-byte alignment) take the same kernel
// with element-wise loads.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "core/nm.h"
#include "core/skinny24.h"
#include "cuda/core_ops.h"
#include "cuda/epilogue.cuh"
#include "cuda/spmm_24_skinny.h"

namespace sparsekern {
namespace cuda {
namespace {

using namespace sparsekern::core;

constexpr int kThreads = kSkinnyWarp * kSkinnyRowsPerBlock;  // 256

enum OutKind : int { kOutF32 = 0, kOutF16 = 1, kOutBF16 = 2, kOutI32 = 3, kOutI8 = 4 };

struct Epilogue {
  const float* alpha;      // [N] or null
  const float* row_scale;  // [M] or null
  const float* bias;       // [N] or null (float32: spmm_24 converts every epilogue vector to float32)
  int act;                 // 0 none, 1 relu, 2 gelu
  void* out;               // [M, N] row-major
  int out_kind;
  bool plain_int;          // int32 output without any epilogue: the exact integer sum is written
};

__device__ __forceinline__ void store_out(const Epilogue& e, int64_t idx, float v) {
  switch (e.out_kind) {
    case kOutF32: static_cast<float*>(e.out)[idx] = v; break;
    case kOutF16: static_cast<at::Half*>(e.out)[idx] = to_output<at::Half>(v); break;
    case kOutBF16: static_cast<at::BFloat16*>(e.out)[idx] = to_output<at::BFloat16>(v); break;
    case kOutI32: static_cast<int32_t*>(e.out)[idx] = to_output<int32_t>(v); break;  // rounded, saturated
    default: static_cast<int8_t*>(e.out)[idx] = to_output<int8_t>(v);
  }
}

template <typename Acc>
__device__ __forceinline__ void finish(const Epilogue& e, int64_t m, int64_t n, int64_t N, Acc sum) {
  if constexpr (std::is_same_v<Acc, int32_t>) {
    if (e.plain_int) {
      static_cast<int32_t*>(e.out)[m * N + n] = sum;
      return;
    }
  }
  float v = static_cast<float>(sum);  // the order of linear_postop: alpha, row_scale, bias, activation
  if (e.alpha != nullptr) v *= e.alpha[n];
  if (e.row_scale != nullptr) v *= e.row_scale[m];
  if (e.bias != nullptr) v += e.bias[n];
  store_out(e, m * N + n, apply_activation(v, e.act));
}

// One lane's unit of one step held in registers: its 16 values, 4 code bytes and how many of its 8 groups exist.
template <typename T>
struct Unit {
  static constexpr int kVec = 2 * kSkinnyUnitGroups * static_cast<int>(sizeof(T)) / 16;
  union {
    uint4 u[kVec];
    T v[2 * kSkinnyUnitGroups];
  } vals;
  union {
    unsigned int u;
    uint8_t b[kSkinnyUnitGroups / 2];
  } cb;
  int ngroups;  // 0: nothing to do (past K, or past N)

  // vec: whole units, 16-byte aligned values, 4-byte aligned codes (128-bit and 32-bit loads); else element-wise.
  __device__ __forceinline__ void load(const T* __restrict__ values, const uint8_t* __restrict__ codes, int64_t n,
                                       int64_t N, int64_t K, int64_t col0, bool vec) {
    ngroups = 0;
    if (n >= N || col0 >= K) return;
    const int64_t left = (K - col0) / 4;
    ngroups = left < kSkinnyUnitGroups ? static_cast<int>(left) : kSkinnyUnitGroups;
    const T* vp = values + n * (K / 2) + col0 / 2;
    const uint8_t* cp = codes + n * code_bytes_per_row(K) + col0 / 8;
    if (vec) {
#pragma unroll
      for (int i = 0; i < kVec; ++i) vals.u[i] = __ldg(reinterpret_cast<const uint4*>(vp) + i);
      cb.u = __ldg(reinterpret_cast<const unsigned int*>(cp));
    } else {
#pragma unroll
      for (int j = 0; j < 2 * kSkinnyUnitGroups; ++j) vals.v[j] = j < 2 * ngroups ? vp[j] : T(0);
#pragma unroll
      for (int b = 0; b < kSkinnyUnitGroups / 2; ++b) cb.b[b] = 2 * b < ngroups ? cp[b] : uint8_t(0);
    }
  }
};

template <typename T, typename Acc, int MT>
__global__ void __launch_bounds__(kThreads)
    skinny24_kernel(const T* __restrict__ x, const T* __restrict__ values, const uint8_t* __restrict__ codes,
                    int64_t M, int64_t N, int64_t K, int64_t steps_per_split, int ksplit, bool vec, bool xvec,
                    Acc* __restrict__ partial, Epilogue e) {
  constexpr int kPad = 4 / static_cast<int>(sizeof(T));  // 4 bytes after each lane's 32 columns
  constexpr int kSeg = kSkinnyUnitCols + kPad;
  constexpr int kPerVec = 16 / static_cast<int>(sizeof(T));  // x elements per 128-bit load
  __shared__ __align__(16) T xs[MT][kSkinnyWarp * kSeg];

  const int warp = threadIdx.x / kSkinnyWarp, lane = threadIdx.x % kSkinnyWarp;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kSkinnyRowsPerBlock + warp;
  const int s = blockIdx.y;
  const int64_t steps = (K + kSkinnyStepCols - 1) / kSkinnyStepCols;
  const int64_t st0 = s * steps_per_split;
  const int64_t st1 = st0 + steps_per_split < steps ? st0 + steps_per_split : steps;

  Acc acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m] = 0;

  // The weights of step st + 1 are loaded (into registers) while step st's activations are staged and used: the
  // HBM latency of the weight stream overlaps the block's synchronisation and the shared-memory work.
  Unit<T> cur, next;
  const int64_t lane_col = static_cast<int64_t>(lane) * kSkinnyUnitCols;
  if (st0 < st1) cur.load(values, codes, n, N, K, st0 * kSkinnyStepCols + lane_col, vec);
  for (int64_t st = st0; st < st1; ++st) {
    const int64_t c0 = st * kSkinnyStepCols;
    if (st + 1 < st1) next.load(values, codes, n, N, K, c0 + kSkinnyStepCols + lane_col, vec);
    if (xvec) {  // stage x[:, c0 : c0 + 1024): 128-bit loads, 32-bit shared-memory stores (a lane segment is
                 // 4-byte aligned after its padding)
      for (int i = threadIdx.x; i < MT * kSkinnyStepCols / kPerVec; i += kThreads) {
        const int m = i / (kSkinnyStepCols / kPerVec), c = (i % (kSkinnyStepCols / kPerVec)) * kPerVec;
        const int64_t col = c0 + c;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (m < M && col < K) v = __ldg(reinterpret_cast<const uint4*>(x + m * K + col));
        unsigned int* dst = reinterpret_cast<unsigned int*>(&xs[m][(c / kSkinnyUnitCols) * kSeg + c % kSkinnyUnitCols]);
        dst[0] = v.x;
        dst[1] = v.y;
        dst[2] = v.z;
        dst[3] = v.w;
      }
    } else {
      for (int i = threadIdx.x; i < MT * kSkinnyStepCols; i += kThreads) {
        const int m = i / kSkinnyStepCols, c = i % kSkinnyStepCols;
        const int64_t col = c0 + c;
        xs[m][(c / kSkinnyUnitCols) * kSeg + c % kSkinnyUnitCols] = (m < M && col < K) ? x[m * K + col] : T(0);
      }
    }
    __syncthreads();
    if (cur.ngroups > 0) {
      const T* xl = &xs[0][lane * kSeg];
      skinny_unit<MT>(acc, cur.vals.v, cur.cb.b, cur.ngroups,
                      [&](int m, int col) { return static_cast<Acc>(xl[m * kSkinnyWarp * kSeg + col]); });
    }
    __syncthreads();
    cur = next;
  }

#pragma unroll
  for (int m = 0; m < MT; ++m) {
    for (int off = kSkinnyWarp / 2; off > 0; off /= 2) acc[m] += __shfl_xor_sync(0xffffffffu, acc[m], off);
  }
  if (lane == 0 && n < N) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (m >= M) break;
      if (ksplit == 1) {
        finish(e, m, n, N, acc[m]);
      } else {
        partial[(static_cast<int64_t>(s) * M + m) * N + n] = acc[m];
      }
    }
  }
}

// The split-K ranges' sums added in range order (as the emulation), then the epilogue.
template <typename Acc>
__global__ void skinny24_finish_kernel(const Acc* __restrict__ partial, int ksplit, int64_t M, int64_t N,
                                       Epilogue e) {
  const int64_t total = M * N;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc t = partial[i];
    for (int s = 1; s < ksplit; ++s) t = t + partial[s * total + i];
    finish(e, i / N, i % N, N, t);
  }
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

template <typename T, typename Acc, int MT>
void launch(const at::Tensor& x, const at::Tensor& values, const at::Tensor& codes, int64_t M, int64_t N,
            int64_t K, const SkinnyPlan& plan, bool vec, const Epilogue& e, cudaStream_t stream) {
  // x rows start 16-byte aligned and hold whole 128-bit pieces
  const bool xvec = K % (16 / static_cast<int64_t>(sizeof(T))) == 0 && aligned(x.const_data_ptr(), 16);
  at::Tensor partial;
  Acc* part = nullptr;
  if (plan.ksplit > 1) {
    partial = at::empty({plan.ksplit, M, N}, x.options().dtype(std::is_same_v<Acc, int32_t> ? at::kInt : at::kFloat));
    part = partial.data_ptr<Acc>();
  }
  const dim3 grid(static_cast<unsigned>((N + kSkinnyRowsPerBlock - 1) / kSkinnyRowsPerBlock),
                  static_cast<unsigned>(plan.ksplit));
  skinny24_kernel<T, Acc, MT><<<grid, kThreads, 0, stream>>>(
      x.const_data_ptr<T>(), values.const_data_ptr<T>(), codes.const_data_ptr<uint8_t>(), M, N, K,
      plan.steps_per_split, plan.ksplit, vec, xvec, part, e);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (plan.ksplit > 1) {
    const int64_t blocks = std::min<int64_t>((M * N + 255) / 256, 1024);
    skinny24_finish_kernel<Acc><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(part, plan.ksplit, M, N, e);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, typename Acc>
void launch_m(const at::Tensor& x, const at::Tensor& values, const at::Tensor& codes, int64_t M, int64_t N,
              int64_t K, const SkinnyPlan& plan, bool vec, const Epilogue& e, cudaStream_t stream) {
  if (M <= 1) return launch<T, Acc, 1>(x, values, codes, M, N, K, plan, vec, e, stream);
  if (M <= 2) return launch<T, Acc, 2>(x, values, codes, M, N, K, plan, vec, e, stream);
  if (M <= 4) return launch<T, Acc, 4>(x, values, codes, M, N, K, plan, vec, e, stream);
  if (M <= 8) return launch<T, Acc, 8>(x, values, codes, M, N, K, plan, vec, e, stream);
  return launch<T, Acc, 16>(x, values, codes, M, N, K, plan, vec, e, stream);
}

}  // namespace

bool skinny24_supports(const at::Tensor& x) {
  const auto t = x.scalar_type();
  return x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= kSkinnyMaxM &&
         (t == at::kHalf || t == at::kBFloat16 || t == at::kChar);
}

at::Tensor spmm_24_skinny(const at::Tensor& x_in, const at::Tensor& values_in, const at::Tensor& codes_in,
                          const at::Tensor& alpha, const at::Tensor& bias, const at::Tensor& row_scale,
                          Activation act, at::ScalarType out_dtype) {
  TORCH_CHECK(skinny24_supports(x_in), "spmm_24_skinny: internal: unsupported x ", x_in.sizes(), " ",
              x_in.scalar_type());
  const auto x = x_in.contiguous(), values = values_in.contiguous(), codes = codes_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = values.size(0);
  at::Tensor out = at::empty({M, N}, x.options().dtype(out_dtype));
  if (N == 0) return out;
  int kind;
  switch (out_dtype) {
    case at::kFloat: kind = kOutF32; break;
    case at::kHalf: kind = kOutF16; break;
    case at::kBFloat16: kind = kOutBF16; break;
    case at::kInt: kind = kOutI32; break;
    case at::kChar: kind = kOutI8; break;
    default: TORCH_CHECK(false, "spmm_24: out_dtype ", out_dtype, " is not supported");
  }
  const bool is_int = x.scalar_type() == at::kChar;
  Epilogue e{alpha.defined() ? alpha.const_data_ptr<float>() : nullptr,
             row_scale.defined() ? row_scale.const_data_ptr<float>() : nullptr,
             bias.defined() ? bias.const_data_ptr<float>() : nullptr,
             static_cast<int>(act),
             out.data_ptr(),
             kind,
             is_int && kind == kOutI32 && !alpha.defined() && !row_scale.defined() && !bias.defined() &&
                 act == Activation::kNone};
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const SkinnyPlan plan = skinny_plan(N, K, sms);
  const bool vec = K % kSkinnyUnitCols == 0 && aligned(values.const_data_ptr(), 16) &&
                   aligned(codes.const_data_ptr(), 4);
  auto stream = at::cuda::getCurrentCUDAStream();
  switch (x.scalar_type()) {
    case at::kHalf: launch_m<at::Half, float>(x, values, codes, M, N, K, plan, vec, e, stream); break;
    case at::kBFloat16: launch_m<at::BFloat16, float>(x, values, codes, M, N, K, plan, vec, e, stream); break;
    default: launch_m<int8_t, int32_t>(x, values, codes, M, N, K, plan, vec, e, stream);
  }
  return out;
}

}  // namespace cuda
}  // namespace sparsekern
