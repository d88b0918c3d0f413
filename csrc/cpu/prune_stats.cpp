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

#include <vector>

#include "core/prune_checks.h"

namespace sparsekern {
namespace {

// H = n/(n+B) * H + 2/(n+B) * X^T X as one BLAS call (addmm folds both scalings in; beta = 0 on the first
// batch, which BLAS treats as "ignore H", so an uninitialised H is fine). No copy of x when it is float32 and
// its rows are contiguous: reshape is then a view.
void hessian_update_cpu(const at::Tensor& H, const at::Tensor& x, int64_t nsamples, int64_t batch) {
  core::check_update_args("hessian_update_", H, x, nsamples, batch, 2);
  TORCH_CHECK(H.size(0) == H.size(1), "hessian_update_: H must be square [C, C], got ", H.sizes());
  auto X = x.reshape({-1, x.size(-1)});
  if (X.scalar_type() != at::kFloat) X = X.to(at::kFloat);
  const double total = static_cast<double>(nsamples + batch);
  H.addmm_(X.t(), X, /*beta=*/static_cast<double>(nsamples) / total, /*alpha=*/2.0 / total);
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
