// Argument validation of the pruning engine's ops, shared by the CPU kernels (csrc/cpu/prune_*.cpp) and the CUDA
// kernels (csrc/cuda/prune_kernels.cu) so that both devices refuse the same arguments with the same messages (the
// tests compare them). Host code only; device-specific checks stay with their kernels.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

#include "core/nm.h"

namespace sparsekern {
namespace core {

// hessian_update_ (stat_dim = 2) and act_scale_update_ (stat_dim = 1).
inline void check_update_args(const char* op, const at::Tensor& stat, const at::Tensor& x, int64_t nsamples,
                              int64_t batch, int64_t stat_dim) {
  TORCH_CHECK(stat.dim() == stat_dim, op, ": the statistic must be ", stat_dim, "-D, got shape ", stat.sizes());
  TORCH_CHECK(stat.scalar_type() == at::kFloat, op, ": the statistic must be float32, got ", stat.scalar_type());
  TORCH_CHECK(stat.is_contiguous(), op, ": the statistic must be contiguous");
  TORCH_CHECK(stat.size(0) >= 1, op, ": the statistic has C = 0 columns; it must cover at least one input feature");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == stat.size(0), op, ": x must be [..., C] with C = ", stat.size(0),
              " (the layer's in_features), got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating tensor, got ", x.scalar_type());
  TORCH_CHECK(x.device() == stat.device(), op, ": x is on ", x.device(), " but the statistic is on ", stat.device());
  TORCH_CHECK(nsamples >= 0, op, ": nsamples must be >= 0, got ", nsamples);
  TORCH_CHECK(batch >= 1, op, ": batch (number of sequences in x) must be >= 1, got ", batch);
  // nsamples + batch is the new sample count; it must not overflow int64 (the weights below would be garbage).
  TORCH_CHECK(batch <= INT64_MAX - nsamples, op, ": nsamples + batch must stay below 2^63, got nsamples = ",
              nsamples, ", batch = ", batch);
}

// wanda_prune: w and act_scale (the checks made before the N:M / unstructured split).
inline void check_wanda_args(const at::Tensor& w, const at::Tensor& act_scale) {
  TORCH_CHECK(w.dim() == 2, "wanda_prune: w must be 2-D [out_features, in_features], got shape ", w.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kHalf || w.scalar_type() == at::kBFloat16,
              "wanda_prune: w must be float32, float16 or bfloat16, got ", w.scalar_type());
  const int64_t cols = w.size(1);
  TORCH_CHECK(act_scale.dim() == 1 && act_scale.size(0) == cols, "wanda_prune: act_scale must be [in_features] = [",
              cols, "], got shape ", act_scale.sizes());
  TORCH_CHECK(act_scale.scalar_type() == at::kFloat, "wanda_prune: act_scale must be float32, got ",
              act_scale.scalar_type());
  TORCH_CHECK(act_scale.device() == w.device(), "wanda_prune: act_scale is on ", act_scale.device(), " but w is on ",
              w.device());
}

// wanda_prune: the N:M pattern (cols = in_features).
inline void check_wanda_nm(int64_t cols, int64_t n, int64_t m) {
  TORCH_CHECK(m <= kMaxGroup && n >= 1 && n < m, "wanda_prune: N:M needs 1 <= n < m <= ", kMaxGroup, ", got n=", n,
              " m=", m);
  TORCH_CHECK(cols % m == 0, "wanda_prune: in_features (", cols, ") must be divisible by m (", m, ")");
}

// sparsegpt_prune_block_: every argument rule, in the order the kernels have always checked them.
inline void check_sparsegpt_block_args(const at::Tensor& w1, const at::Tensor& hinv1, int64_t n, int64_t m,
                                       const std::optional<at::Tensor>& prune_mask,
                                       const std::optional<at::Tensor>& qscale,
                                       const std::optional<at::Tensor>& qzero, int64_t maxq) {
  const char* op = "sparsegpt_prune_block_";
  TORCH_CHECK(w1.dim() == 2, op, ": w1 must be 2-D [rows, blocksize], got shape ", w1.sizes());
  TORCH_CHECK(w1.scalar_type() == at::kFloat || w1.scalar_type() == at::kDouble, op,
              ": w1 must be float32 (or float64), got ", w1.scalar_type());
  TORCH_CHECK(w1.stride(1) == 1 && w1.stride(0) >= w1.size(1), op,
              ": w1 must have contiguous rows (a column slice W[:, i1:i2] of a row-major W is fine), got strides ",
              w1.strides());
  const int64_t rows = w1.size(0), bs = w1.size(1);
  TORCH_CHECK(hinv1.dim() == 2 && hinv1.size(0) == bs && hinv1.size(1) == bs, op, ": hinv1 must be [", bs, ", ", bs,
              "] (the block of the inverse-Hessian factor), got shape ", hinv1.sizes());
  TORCH_CHECK(hinv1.scalar_type() == w1.scalar_type(), op, ": hinv1 dtype ", hinv1.scalar_type(),
              " differs from w1 dtype ", w1.scalar_type());
  TORCH_CHECK(hinv1.device() == w1.device(), op, ": hinv1 is on ", hinv1.device(), " but w1 is on ", w1.device());
  if (m > 0) {
    TORCH_CHECK(m <= kMaxGroup && n >= 1 && n < m, op, ": N:M needs 1 <= n < m <= ", kMaxGroup, ", got n=", n,
                " m=", m);
    TORCH_CHECK(bs % m == 0, op, ": the block width (", bs, ") must be a multiple of m (", m, ")");
    TORCH_CHECK(!prune_mask.has_value(), op, ": give either an N:M pattern (m > 0) or prune_mask, not both");
  } else {
    TORCH_CHECK(m == 0 && n == 0, op, ": unstructured / mask mode needs n = m = 0, got n=", n, " m=", m);
    if (prune_mask.has_value()) {
      TORCH_CHECK(prune_mask->sizes() == w1.sizes() && prune_mask->scalar_type() == at::kBool, op,
                  ": prune_mask must be bool with w1's shape ", w1.sizes(), ", got ", prune_mask->scalar_type(), " ",
                  prune_mask->sizes());
      TORCH_CHECK(prune_mask->device() == w1.device(), op, ": prune_mask is on ", prune_mask->device(),
                  " but w1 is on ", w1.device());
    }
  }
  TORCH_CHECK(qscale.has_value() == qzero.has_value(), op, ": qscale and qzero must be given together");
  if (qscale.has_value()) {
    for (const auto* t : {&*qscale, &*qzero}) {
      TORCH_CHECK(t->dim() == 1 && t->size(0) == rows && t->scalar_type() == w1.scalar_type(), op,
                  ": qscale / qzero must be [rows] = [", rows, "] of w1's dtype, got ", t->scalar_type(), " ",
                  t->sizes());
      TORCH_CHECK(t->device() == w1.device(), op, ": qscale / qzero must be on w1's device ", w1.device());
    }
    TORCH_CHECK(maxq >= 1 || maxq == -1, op,
                ": maxq must be 2^bits - 1 >= 1 (min-max grid) or -1 (fp8 e4m3 grid) with quantisation, got ", maxq);
  }
}

}  // namespace core
}  // namespace sparsekern
