// Calibration statistics of the pruning engine on the CPU: SparseGPT's Hessian and Wanda's activation scale.
//
// Both are running means updated in place, in the references' order (ALGORITHMS.md):
//   H *= n / (n + B);  n += B;  H += (2 / n) * X^T X          X = x.reshape(-1, C) in float32
//   s *= n / (n + B);  n += B;  s += (sum_t X[t, :]^2) / n
// where B counts sequences (x.shape[0] of a [B, T, C] input), not tokens. The caller owns n (the Python
// HessianStats / ActScaleStats objects); the ops take the old n and B and do not return anything.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "core/prune_checks.h"

namespace sparsekern {
namespace {

// H = n/(n+B) * H + 2/(n+B) * X^T X, computed on the upper block-triangle only and mirrored.
//
// X^T X is symmetric, so a full GEMM wastes half of its flops, and ATen reaches no BLAS syrk. The columns are
// cut into panels [c0, c1) and each panel's upper part is one BLAS call on strided views (no copies):
//   H[0:c1, c0:c1] = beta * H[0:c1, c0:c1] + alpha * X[:, 0:c1]^T X[:, c0:c1]
// which computes the diagonal block whole and everything above it. With p panels that is (p+1)/(2p) of the
// full product's flops; p = kPanels = 6 measured best on the 2-core development CPU (fewer: more wasted flops;
// more: thinner, less efficient GEMMs): per 4096-token update, 1536^2 went from 95 to 62 ms and 576^2 from 13.4
// to 8.7 ms (2 threads, MKL; tools in docs/pipeline.md "Measurements"). Each call is threaded by BLAS itself:
// that measured better than running single-threaded panels side by side.
// The strictly lower triangle is then copied from the upper one, so H is complete and exactly symmetric after
// every call: the op's contract does not change (callers, the CUDA kernel and the tests see a full H). The copy
// moves C^2/2 floats against ~C^2 * tokens flops (~2% of the call at 4096 tokens).
// beta = 0 on the first batch, which BLAS treats as "ignore H", so an uninitialised H is fine. Below
// kMinSymmetric columns the saving is not worth the extra calls and one full addmm is used (then mirrored too).
constexpr int64_t kPanels = 6;
constexpr int64_t kMinSymmetric = 192;

int64_t panel_width(int64_t C) {
  const int64_t width = (C + kPanels - 1) / kPanels;
  return (width + 31) / 32 * 32;  // whole cache lines of floats at every panel start
}

// H[c][r] = H[r][c] for every r < c: the lower triangle becomes an exact copy of the upper one. Needed below
// the panels' diagonal blocks (never computed), and also inside them: a GEMM does not promise that entries
// (a, b) and (b, a) round identically (MKL's small-shape kernels do not), and an exactly symmetric H keeps the
// Cholesky-based consumers independent of which triangle they read. 32 x 32 blocks keep both sides in cache.
void mirror_upper(float* H, int64_t C) {
  constexpr int64_t kB = 32;
  at::parallel_for(0, (C + kB - 1) / kB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t bi = b0; bi < b1; ++bi) {
      const int64_t rb = bi * kB, re = std::min(C, rb + kB);
      for (int64_t cb = rb; cb < C; cb += kB) {
        const int64_t ce = std::min(C, cb + kB);
        for (int64_t c = cb; c < ce; ++c) {
          float* dst = H + c * C;
          for (int64_t r = rb, rend = std::min(re, c); r < rend; ++r) dst[r] = H[r * C + c];
        }
      }
    }
  });
}

void hessian_update_cpu(const at::Tensor& H, const at::Tensor& x, int64_t nsamples, int64_t batch) {
  core::check_update_args("hessian_update_", H, x, nsamples, batch, 2);
  TORCH_CHECK(H.size(0) == H.size(1), "hessian_update_: H must be square [C, C], got ", H.sizes());
  auto X = x.reshape({-1, x.size(-1)});
  if (X.scalar_type() != at::kFloat) X = X.to(at::kFloat);
  const double total = static_cast<double>(nsamples + batch);
  const double beta = static_cast<double>(nsamples) / total, alpha = 2.0 / total;
  const int64_t C = H.size(0);
  if (C < kMinSymmetric) {
    H.addmm_(X.t(), X, beta, alpha);
  } else {
    const int64_t width = panel_width(C);
    for (int64_t c0 = 0; c0 < C; c0 += width) {
      const int64_t c1 = std::min(C, c0 + width);
      H.narrow(0, 0, c1).narrow(1, c0, c1 - c0).addmm_(X.narrow(1, 0, c1).t(), X.narrow(1, c0, c1 - c0), beta,
                                                         alpha);
    }
  }
  mirror_upper(H.data_ptr<float>(), C);
}

// s = n/(n+B) * s + (sum_t x_t^2) / (n+B). Columns are split across threads; each thread streams all rows of
// its column slice (contiguous within a row, so the inner loop vectorises) and accumulates in double so the
// result does not depend on T or on the split.
template <typename T>
void act_scale_kernel(const T* x, int64_t rows, int64_t cols, float* s, float keep, float inv_total) {
  constexpr int64_t kColsPerTask = 256;
  const int64_t tasks = (cols + kColsPerTask - 1) / kColsPerTask;
  at::parallel_for(0, tasks, 1, [&](int64_t t0, int64_t t1) {
    std::vector<double> acc(kColsPerTask);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t c0 = t * kColsPerTask;
      const int64_t nc = std::min(kColsPerTask, cols - c0);
      std::fill(acc.begin(), acc.end(), 0.0);
      double* a = acc.data();
      for (int64_t r = 0; r < rows; ++r) {
        const T* xr = x + r * cols + c0;
        for (int64_t c = 0; c < nc; ++c) {
          const double v = static_cast<double>(xr[c]);
          a[c] += v * v;
        }
      }
      for (int64_t c = 0; c < nc; ++c) {
        s[c0 + c] = s[c0 + c] * keep + static_cast<float>(a[c]) * inv_total;
      }
    }
  });
}

void act_scale_update_cpu(const at::Tensor& s, const at::Tensor& x, int64_t nsamples, int64_t batch) {
  core::check_update_args("act_scale_update_", s, x, nsamples, batch, 1);
  auto X = x.reshape({-1, x.size(-1)}).contiguous();
  const int64_t rows = X.size(0), cols = X.size(1);
  const double total = static_cast<double>(nsamples + batch);
  // On the first batch the old value is ignored (multiplied by 0 could still propagate NaN from torch.empty).
  const float keep = static_cast<float>(static_cast<double>(nsamples) / total);
  if (nsamples == 0) s.zero_();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "act_scale_update_", [&] {
    act_scale_kernel<scalar_t>(X.const_data_ptr<scalar_t>(), rows, cols, s.data_ptr<float>(), keep,
                               static_cast<float>(1.0 / total));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) {
  m.impl("hessian_update_", &hessian_update_cpu);
  m.impl("act_scale_update_", &act_scale_update_cpu);
}

}  // namespace sparsekern
