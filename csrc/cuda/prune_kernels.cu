// The pruning engine's CUDA kernels: calibration statistics, fused Wanda, and SparseGPT's column block in one
// kernel launch (the reference launches ~10 tiny kernels per column: thousands per layer).
//
// Semantics, argument rules and error messages are those of the CPU kernels (csrc/cpu/prune_*.cpp); the
// per-element arithmetic comes from csrc/core/prune.h and the N:M selection from csrc/core/nm.h, so both devices
// compute the same floats. Schemas: csrc/registration.cpp, section "pruning engine".
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "core/nm.h"
#include "core/prune.h"
#include "core/prune_checks.h"

namespace sparsekern {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t work, int threads = kThreads) {
  const int64_t b = (work + threads - 1) / threads;
  return std::max<int64_t>(1, std::min<int64_t>(b, int64_t{1} << 16));
}

// ---------------------------------------------------------------- statistics

// H = n/(n+B) H + 2/(n+B) X^T X: one cuBLAS GEMM (TF32 follows torch.backends.cuda.matmul.allow_tf32, off by
// default, as the references want).
void hessian_update_cuda(const at::Tensor& H, const at::Tensor& x, int64_t nsamples, int64_t batch) {
  core::check_update_args("hessian_update_", H, x, nsamples, batch, 2);
  TORCH_CHECK(H.size(0) == H.size(1), "hessian_update_: H must be square [C, C], got ", H.sizes());
  c10::cuda::CUDAGuard guard(H.device());
  auto X = x.reshape({-1, x.size(-1)});
  if (X.scalar_type() != at::kFloat) X = X.to(at::kFloat);
  const double total = static_cast<double>(nsamples + batch);
  H.addmm_(X.t(), X, static_cast<double>(nsamples) / total, 2.0 / total);
}

// Column sums of squares: a thread per column (consecutive threads read consecutive columns: coalesced), the rows
// split over blockIdx.y, partial sums combined with one atomicAdd per thread. Accumulated in double, as the CPU
// kernel: the float result then does not depend on the row split or on the (unordered) atomicAdd order.
template <typename T>
__global__ void column_sumsq_kernel(const T* __restrict__ x, int64_t rows, int64_t cols, int64_t rows_per_block,
                                    double* __restrict__ acc) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t r1 = r0 + rows_per_block < rows ? r0 + rows_per_block : rows;
  double sum = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const double v = static_cast<double>(x[r * cols + c]);
    sum += v * v;
  }
  atomicAdd(acc + c, sum);
}

// s = s * keep + float(acc) * inv_total, rounded as the CPU does it (explicit _rn: no FMA contraction).
__global__ void act_scale_finish_kernel(float* __restrict__ s, const double* __restrict__ acc, int64_t cols,
                                        float keep, float inv_total, bool first) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  const float old = first ? 0.f : __fmul_rn(s[c], keep);
  s[c] = __fadd_rn(old, __fmul_rn(static_cast<float>(acc[c]), inv_total));
}

void act_scale_update_cuda(const at::Tensor& s, const at::Tensor& x, int64_t nsamples, int64_t batch) {
  core::check_update_args("act_scale_update_", s, x, nsamples, batch, 1);
  c10::cuda::CUDAGuard guard(s.device());
  auto X = x.reshape({-1, x.size(-1)}).contiguous();
  const int64_t rows = X.size(0), cols = X.size(1);
  if (cols == 0) return;  // nothing to update; a launch with 0 blocks would be an invalid configuration
  auto acc = at::zeros({cols}, s.options().dtype(at::kDouble));
  const int64_t col_blocks = (cols + kThreads - 1) / kThreads;
  const int64_t row_blocks = std::max<int64_t>(1, std::min<int64_t>((rows + 63) / 64, 1024));
  const int64_t rows_per_block = (rows + row_blocks - 1) / row_blocks;
  auto stream = at::cuda::getCurrentCUDAStream();
  if (rows > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "act_scale_update_", [&] {
      column_sumsq_kernel<scalar_t><<<dim3(col_blocks, row_blocks), kThreads, 0, stream>>>(
          X.const_data_ptr<scalar_t>(), rows, cols, rows_per_block, acc.data_ptr<double>());
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const double total = static_cast<double>(nsamples + batch);
  act_scale_finish_kernel<<<col_blocks, kThreads, 0, stream>>>(s.data_ptr<float>(), acc.const_data_ptr<double>(), cols,
                                                               static_cast<float>(nsamples / total),
                                                               static_cast<float>(1.0 / total), nsamples == 0);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------- Wanda

// One thread per group of m: read the group (m consecutive weights: coalesced across the warp), score, select
// with the shared N:M rule, write the pruned weights and the keep-mask. M_FIXED > 0 unrolls the 2:4 / 4:8 paths.
template <typename T, int M_FIXED>
__global__ void wanda_nm_kernel(const T* __restrict__ w, const float* __restrict__ sqrt_scale, T* __restrict__ out,
                                bool* __restrict__ keep, int64_t rows, int64_t cols, int n, int m_rt,
                                unsigned long long* __restrict__ first_bad_row) {
  const int m = M_FIXED > 0 ? M_FIXED : m_rt;
  const int64_t groups_per_row = cols / m;
  const int64_t total = rows * groups_per_row;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < total;
       g += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = g / groups_per_row;
    const int64_t c0 = (g - r * groups_per_row) * m;
    const T* wp = w + r * cols + c0;
    float sc[M_FIXED > 0 ? M_FIXED : core::kMaxGroup];
    T wv[M_FIXED > 0 ? M_FIXED : core::kMaxGroup];
#pragma unroll
    for (int k = 0; k < (M_FIXED > 0 ? M_FIXED : core::kMaxGroup); ++k) {
      if (M_FIXED == 0 && k >= m) break;
      wv[k] = wp[k];
      sc[k] = core::wanda_metric(static_cast<float>(wv[k]), sqrt_scale[c0 + k]);
    }
    bool bad = false;
#pragma unroll
    for (int k = 0; k < (M_FIXED > 0 ? M_FIXED : core::kMaxGroup); ++k) {
      if (M_FIXED == 0 && k >= m) break;
      bad |= !(sc[k] - sc[k] == 0.f);  // NaN / Inf score: refused by the host after the launch
    }
    if (bad) atomicMin(first_bad_row, static_cast<unsigned long long>(r));
    const uint32_t bits = core::select_keep_mask_fast(sc, n, m);
#pragma unroll
    for (int k = 0; k < (M_FIXED > 0 ? M_FIXED : core::kMaxGroup); ++k) {
      if (M_FIXED == 0 && k >= m) break;
      const bool kept = (bits >> k) & 1u;
      keep[r * cols + c0 + k] = kept;
      out[r * cols + c0 + k] = kept ? wv[k] : T(0);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> wanda_prune_cuda(const at::Tensor& w, const at::Tensor& act_scale, int64_t n,
                                                    int64_t m, double sparsity) {
  core::check_wanda_args(w, act_scale);
  const int64_t rows = w.size(0), cols = w.size(1);
  c10::cuda::CUDAGuard guard(w.device());
  auto wc = w.contiguous();
  auto sqrt_scale = act_scale.sqrt().contiguous();
  if (m == 0) {
    TORCH_CHECK(sparsity >= 0.0 && sparsity < 1.0, "wanda_prune: sparsity must be in [0, 1), got ", sparsity);
    // Unstructured: a per-row stable sort (torch's segmented radix sort) of the same float32 metric; the first
    // k = int(cols * sparsity) of each row are pruned, ties lower column first, as on the CPU.
    const int64_t k = static_cast<int64_t>(static_cast<double>(cols) * sparsity);
    auto metric = wc.abs().to(at::kFloat).mul_(sqrt_scale.unsqueeze(0));
    auto bad = at::isfinite(metric).logical_not_().any(1);
    if (bad.any().item<bool>()) {
      TORCH_CHECK(false, "wanda_prune: w contains NaN or Inf (or |w| * sqrt(act_scale) overflows), first in row ",
                  bad.nonzero()[0][0].item<int64_t>(), "; pruning needs finite scores");
    }
    auto keep = at::ones({rows, cols}, wc.options().dtype(at::kBool));
    if (k > 0) {
      auto order = std::get<1>(metric.sort(/*stable=*/true, /*dim=*/1, /*descending=*/false));
      keep.scatter_(1, order.narrow(1, 0, k), false);
    }
    return {at::where(keep, wc, at::zeros({}, wc.options())), keep};
  }
  core::check_wanda_nm(cols, n, m);
  auto out = at::empty_like(wc, at::MemoryFormat::Contiguous);
  auto keep = at::empty({rows, cols}, wc.options().dtype(at::kBool));
  const int64_t groups = rows * (cols / m);
  if (groups == 0) return {out, keep};
  auto first_bad = at::full({1}, rows, wc.options().dtype(at::kLong));
  auto* fb = reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, wc.scalar_type(), "wanda_prune", [&] {
    const auto* wp = wc.const_data_ptr<scalar_t>();
    const auto* sp = sqrt_scale.const_data_ptr<float>();
    auto* op = out.data_ptr<scalar_t>();
    auto* kp = keep.data_ptr<bool>();
    const int64_t blocks = blocks_for(groups);
    if (m == 4) {
      wanda_nm_kernel<scalar_t, 4><<<blocks, kThreads, 0, stream>>>(wp, sp, op, kp, rows, cols, (int)n, (int)m, fb);
    } else if (m == 8) {
      wanda_nm_kernel<scalar_t, 8><<<blocks, kThreads, 0, stream>>>(wp, sp, op, kp, rows, cols, (int)n, (int)m, fb);
    } else {
      wanda_nm_kernel<scalar_t, 0><<<blocks, kThreads, 0, stream>>>(wp, sp, op, kp, rows, cols, (int)n, (int)m, fb);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  // One small device-to-host read per layer: the API promises an error for non-finite input.
  const int64_t bad_row = first_bad.item<int64_t>();
  TORCH_CHECK(bad_row == rows, "wanda_prune: w contains NaN or Inf (or |w| * sqrt(act_scale) overflows), first in row ",
              bad_row, "; pruning needs finite scores");
  return {out, keep};
}

// ---------------------------------------------------------------- SparseGPT column block

// One warp per 32 rows; each thread owns one row of the block and runs the block's whole column loop for it (rows
// never interact). The block of W, the errors and the keep flags live in shared memory in column-major tiles
// [bs][kRowsPerCta + 1] (the +1 pads away bank conflicts of the cooperative row-major load / store); Hinv1 is read
// through the read-only cache, every thread of the warp reading the same element (a broadcast).
constexpr int kRowsPerCta = 32;
constexpr int kTileLd = kRowsPerCta + 1;

template <typename T>
size_t sparsegpt_smem_bytes(int64_t bs) {
  return static_cast<size_t>(bs) * kTileLd * (2 * sizeof(T) + 1);
}

template <typename T>
__global__ void sparsegpt_block_kernel(T* __restrict__ w1, int64_t ldw, const T* __restrict__ hinv, int64_t ldh,
                                       int64_t rows, int bs, int n, int m, const bool* __restrict__ prune_mask,
                                       const T* __restrict__ qscale, const T* __restrict__ qzero, T maxq,
                                       T* __restrict__ err, T* __restrict__ loss, bool* __restrict__ keep) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* wt = reinterpret_cast<T*>(smem_raw);  // [bs][kTileLd]
  T* et = wt + static_cast<int64_t>(bs) * kTileLd;
  uint8_t* kt = reinterpret_cast<uint8_t*>(et + static_cast<int64_t>(bs) * kTileLd);
  const int lane = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerCta;
  const int64_t row = row0 + lane;
  const bool active = row < rows;

  for (int r = 0; r < kRowsPerCta; ++r) {
    const int64_t gr = row0 + r;
    for (int c = lane; c < bs; c += kRowsPerCta) wt[c * kTileLd + r] = gr < rows ? w1[gr * ldw + c] : T(0);
  }
  __syncthreads();

  T row_loss = 0;
  uint32_t keep_bits = 0;
  for (int i = 0; i < bs; ++i) {
    const T d = __ldg(hinv + static_cast<int64_t>(i) * ldh + i);
    bool pruned;
    if (m > 0) {
      const int pos = i % m;
      if (pos == 0) {
        float sc[core::kMaxGroup];
        for (int k = 0; k < m; ++k) {
          const T dk = __ldg(hinv + static_cast<int64_t>(i + k) * ldh + i + k);
          sc[k] = static_cast<float>(core::obs_score<T>(wt[(i + k) * kTileLd + lane], dk));
        }
        keep_bits = core::select_keep_mask_fast(sc, n, m);
      }
      pruned = !((keep_bits >> pos) & 1u);
    } else {
      pruned = active && prune_mask != nullptr && prune_mask[row * bs + i];
    }
    const T w = wt[i * kTileLd + lane];
    T q = pruned ? T(0) : w;
    if (qscale != nullptr && active) {
      // maxq = -1: the symmetric fp8 e4m3 grid (qzero ignored); else the min-max grid.
      q = maxq < T(0) ? core::quantize_e4m3<T>(q, qscale[row])
                      : core::quantize_minmax<T>(q, qscale[row], qzero[row], maxq);
    }
    const T diff = w - q;
    const T e = diff / d;
    row_loss += (diff * diff) / (d * d);
    et[i * kTileLd + lane] = e;
    kt[i * kTileLd + lane] = !pruned;
    wt[i * kTileLd + lane] = q;
    const T* h = hinv + static_cast<int64_t>(i) * ldh;
    // mul_rn: no FMA contraction, so the update rounds as the CPU kernel's (and the reference's) w - e * h.
    for (int j = i + 1; j < bs; ++j) wt[j * kTileLd + lane] -= core::mul_rn(e, __ldg(h + j));
  }
  __syncthreads();

  for (int r = 0; r < kRowsPerCta; ++r) {
    const int64_t gr = row0 + r;
    if (gr >= rows) break;
    for (int c = lane; c < bs; c += kRowsPerCta) {
      w1[gr * ldw + c] = wt[c * kTileLd + r];
      err[gr * bs + c] = et[c * kTileLd + r];
      keep[gr * bs + c] = kt[c * kTileLd + r] != 0;
    }
  }
  if (active) loss[row] = row_loss / T(2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparsegpt_prune_block_cuda(
    const at::Tensor& w1, const at::Tensor& hinv1, int64_t n, int64_t m, const std::optional<at::Tensor>& prune_mask,
    const std::optional<at::Tensor>& qscale, const std::optional<at::Tensor>& qzero, int64_t maxq) {
  const char* op = "sparsegpt_prune_block_";
  core::check_sparsegpt_block_args(w1, hinv1, n, m, prune_mask, qscale, qzero, maxq);
  const int64_t rows = w1.size(0), bs = w1.size(1);
  c10::cuda::CUDAGuard guard(w1.device());
  auto h = hinv1.stride(1) == 1 ? hinv1 : hinv1.contiguous();
  at::Tensor pm, qs, qz;
  if (prune_mask.has_value()) pm = prune_mask->contiguous();  // the checks refuse prune_mask with m > 0
  if (qscale.has_value()) {
    qs = qscale->contiguous();
    qz = qzero->contiguous();
  }
  auto err = at::empty({rows, bs}, w1.options());
  auto loss = at::empty({rows}, w1.options());
  auto keep = at::empty({rows, bs}, w1.options().dtype(at::kBool));
  if (rows == 0 || bs == 0) return {err, loss, keep};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(w1.scalar_type(), "sparsegpt_prune_block_", [&] {
    const size_t smem = sparsegpt_smem_bytes<scalar_t>(bs);
    int dev = 0, optin = 0;
    C10_CUDA_CHECK(cudaGetDevice(&dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    TORCH_CHECK(smem <= static_cast<size_t>(optin), op, ": blocksize ", bs, " needs ", smem,
                " bytes of shared memory per block, more than this GPU's ", optin, "; use a smaller blocksize");
    if (smem > 48 * 1024) {
      C10_CUDA_CHECK(cudaFuncSetAttribute(sparsegpt_block_kernel<scalar_t>,
                                          cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    }
    const int64_t ctas = (rows + kRowsPerCta - 1) / kRowsPerCta;
    sparsegpt_block_kernel<scalar_t><<<ctas, kRowsPerCta, smem, stream>>>(
        w1.data_ptr<scalar_t>(), w1.stride(0), h.const_data_ptr<scalar_t>(), h.stride(0), rows, static_cast<int>(bs),
        static_cast<int>(n), static_cast<int>(m), pm.defined() ? pm.const_data_ptr<bool>() : nullptr,
        qs.defined() ? qs.const_data_ptr<scalar_t>() : nullptr, qz.defined() ? qz.const_data_ptr<scalar_t>() : nullptr,
        static_cast<scalar_t>(maxq), err.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>(), keep.data_ptr<bool>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {err, loss, keep};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CUDA, m) {
  m.impl("hessian_update_", &hessian_update_cuda);
  m.impl("act_scale_update_", &act_scale_update_cuda);
  m.impl("wanda_prune", &wanda_prune_cuda);
  m.impl("sparsegpt_prune_block_", &sparsegpt_prune_block_cuda);
}

}  // namespace sparsekern
