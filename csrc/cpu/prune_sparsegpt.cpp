// SparseGPT's column-block OBS update on the CPU, fused: one op call processes all columns of one block
// (the reference runs ~10 small PyTorch ops per column from Python). The trailing update of the columns right of
// the block is one GEMM done by the caller (python/sparsekern/prune/sparsegpt.py).
//
// For a block W1 = W[:, i1:i2] (rows x bs, updated in place) and Hinv1 = U[i1:i2, i1:i2] (upper Cholesky factor
// of H^-1), for i = 0 .. bs-1, per row (ALGORITHMS.md, "SparseGPT"):
//   N:M: at i % m == 0, score W1[:, i:i+m] (current values) by w^2 / d^2 and prune the n smallest (core/nm.h)
//   q = 0 if pruned else w; joint quantisation: q = quant(q) with the row's (scale, zero, maxq), or with maxq = -1
//   the symmetric fp8 e4m3 grid q = scale * e4m3(clamp(q / scale, -448, 448)) (core/prune.h)
//   d = Hinv1[i, i]; err = (w - q) / d; W1[:, i:] -= err * Hinv1[i, i:]; Err1[:, i] = err;
//   loss += (w - q)^2 / d^2;  W1[:, i] ends as q exactly (the reference's Q1).
// Rows never interact, so each thread takes a range of rows; four rows are processed together so every
// element of Hinv1's row is loaded once per four weight rows, and the update loop over j vectorises.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "core/nm.h"
#include "core/prune.h"
#include "core/prune_checks.h"

namespace sparsekern {
namespace {

constexpr int kRowTile = 4;

struct BlockArgs {
  int64_t rows, bs;
  int n, m;
  const bool* prune_mask;  // [rows, bs] row stride bs, true = prune (unstructured); nullptr for N:M / none
  const void* qscale;      // [rows] or nullptr
  const void* qzero;       // [rows] or nullptr
  double maxq;             // 2^bits - 1 (min-max grid), or -1: fp8 e4m3 grid
};

template <typename T>
void sparsegpt_block_kernel(T* w1, int64_t ldw, const T* hinv, int64_t ldh, const BlockArgs& a, T* err, T* loss,
                            bool* keep_out) {
  const int64_t bs = a.bs;
  std::vector<T> diag(bs);
  for (int64_t i = 0; i < bs; ++i) diag[i] = hinv[i * ldh + i];
  const T* qscale = static_cast<const T*>(a.qscale);
  const T* qzero = static_cast<const T*>(a.qzero);
  const T maxq = static_cast<T>(a.maxq);
  const bool fp8 = a.maxq < 0;  // maxq = -1: symmetric fp8 e4m3 grid, qzero ignored
  const int64_t tiles = (a.rows + kRowTile - 1) / kRowTile;
  const int64_t grain = std::max<int64_t>(1, 64 / kRowTile);

  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    // The tile's rows, contiguous, stay in L1 for the whole block (4 x 128 floats = 2 KiB at bs = 128).
    std::vector<T> tile(kRowTile * bs);
    T scores[core::kMaxGroup];
    float fscores[core::kMaxGroup];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t r0 = t * kRowTile;
      const int nr = static_cast<int>(std::min<int64_t>(kRowTile, a.rows - r0));
      for (int r = 0; r < kRowTile; ++r) {
        T* dst = tile.data() + r * bs;
        if (r < nr) {
          std::copy(w1 + (r0 + r) * ldw, w1 + (r0 + r) * ldw + bs, dst);
        } else {
          std::fill(dst, dst + bs, T(0));  // padding rows: err stays 0, so they never disturb anything
        }
      }
      uint32_t keep_bits[kRowTile] = {0, 0, 0, 0};
      T row_loss[kRowTile] = {0, 0, 0, 0};
      for (int64_t i = 0; i < bs; ++i) {
        const T d = diag[i];
        T e[kRowTile];
        for (int r = 0; r < kRowTile; ++r) {
          T* wr = tile.data() + r * bs;
          if (r >= nr) {
            e[r] = T(0);
            continue;
          }
          const int64_t row = r0 + r;
          bool pruned;
          if (a.m > 0) {
            const int64_t pos = i % a.m;
            if (pos == 0) {
              // Score the group's *current* values (already updated by the block's earlier columns).
              for (int k = 0; k < a.m; ++k) {
                scores[k] = core::obs_score<T>(wr[i + k], diag[i + k]);
                fscores[k] = static_cast<float>(scores[k]);
              }
              keep_bits[r] = core::select_keep_mask_fast(fscores, a.n, a.m);
            }
            pruned = !((keep_bits[r] >> pos) & 1u);
          } else {
            pruned = a.prune_mask != nullptr && a.prune_mask[row * bs + i];
          }
          const T w = wr[i];
          T q = pruned ? T(0) : w;
          if (qscale != nullptr) {
            q = fp8 ? core::quantize_e4m3<T>(q, qscale[row])
                    : core::quantize_minmax<T>(q, qscale[row], qzero[row], maxq);
          }
          const T diff = w - q;
          e[r] = diff / d;
          row_loss[r] += (diff * diff) / (d * d);
          err[row * bs + i] = e[r];
          keep_out[row * bs + i] = !pruned;
          wr[i] = q;
        }
        // Rank-1 update of the rest of the block: W1[:, i+1:] -= e (outer) Hinv1[i, i+1:].
        const T* h = hinv + i * ldh;
        T* w0 = tile.data();
        T* w1r = tile.data() + bs;
        T* w2r = tile.data() + 2 * bs;
        T* w3r = tile.data() + 3 * bs;
        const T e0 = e[0], e1 = e[1], e2 = e[2], e3 = e[3];
        for (int64_t j = i + 1; j < bs; ++j) {
          const T hj = h[j];
          w0[j] -= e0 * hj;
          w1r[j] -= e1 * hj;
          w2r[j] -= e2 * hj;
          w3r[j] -= e3 * hj;
        }
      }
      for (int r = 0; r < nr; ++r) {
        std::copy(tile.data() + r * bs, tile.data() + (r + 1) * bs, w1 + (r0 + r) * ldw);
        loss[r0 + r] = row_loss[r] / T(2);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparsegpt_prune_block_cpu(
    const at::Tensor& w1, const at::Tensor& hinv1, int64_t n, int64_t m, const std::optional<at::Tensor>& prune_mask,
    const std::optional<at::Tensor>& qscale, const std::optional<at::Tensor>& qzero, int64_t maxq) {
  core::check_sparsegpt_block_args(w1, hinv1, n, m, prune_mask, qscale, qzero, maxq);
  const int64_t rows = w1.size(0), bs = w1.size(1);
  auto h = hinv1.stride(1) == 1 ? hinv1 : hinv1.contiguous();
  BlockArgs a{rows, bs, static_cast<int>(n), static_cast<int>(m), nullptr, nullptr, nullptr, static_cast<double>(maxq)};
  at::Tensor pm;
  if (prune_mask.has_value()) {  // the checks refuse prune_mask with m > 0
    pm = prune_mask->contiguous();
    a.prune_mask = pm.const_data_ptr<bool>();
  }
  at::Tensor qs, qz;
  if (qscale.has_value()) {
    qs = qscale->contiguous();
    qz = qzero->contiguous();
    a.qscale = qs.const_data_ptr();
    a.qzero = qz.const_data_ptr();
  }
  auto err = at::empty({rows, bs}, w1.options());
  auto loss = at::empty({rows}, w1.options());
  auto keep = at::empty({rows, bs}, w1.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES(w1.scalar_type(), "sparsegpt_prune_block_", [&] {
    sparsegpt_block_kernel<scalar_t>(w1.data_ptr<scalar_t>(), w1.stride(0), h.const_data_ptr<scalar_t>(),
                                     h.stride(0), a, err.data_ptr<scalar_t>(), loss.data_ptr<scalar_t>(),
                                     keep.data_ptr<bool>());
  });
  return {err, loss, keep};
}

}  // namespace

TORCH_LIBRARY_IMPL(sparsekern, CPU, m) { m.impl("sparsegpt_prune_block_", &sparsegpt_prune_block_cpu); }

}  // namespace sparsekern
