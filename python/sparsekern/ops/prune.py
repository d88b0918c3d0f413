"""Typed wrappers and fake kernels of the pruning engine's ops (schemas: csrc/registration.cpp, "pruning engine").

Kernels: csrc/cpu/prune_{stats,wanda,sparsegpt}.cpp and csrc/cuda/prune_kernels.cu. The user-facing algorithms
(magnitude, Wanda, SparseGPT, calibration statistics) are in `sparsekern.prune`; these wrappers are the thin,
checked layer over the ops. Conventions: W is [rows = out_features, cols = in_features], N:M groups along cols,
"n:m" prunes n of every m; every returned mask is bool with True = kept.
"""

from __future__ import annotations

import torch

from .. import _ext
from .core import check_same_device

__all__ = ["hessian_update_", "act_scale_update_", "wanda_prune", "sparsegpt_prune_block_"]


def _op(name: str):
    _ext.require(f"sparsekern.ops.prune.{name}")
    return getattr(torch.ops.sparsekern, name)


def hessian_update_(H: torch.Tensor, x: torch.Tensor, nsamples: int, batch: int) -> None:
    """In place: H = nsamples/(nsamples+batch) * H + 2/(nsamples+batch) * X^T X, X = x.reshape(-1, C) in float32.

    H: float32 [C, C], contiguous (on the first call, nsamples = 0, its old content is ignored).
    x: floating [..., C] on H's device (float32 with contiguous rows is used without a copy).
    nsamples: sequences seen so far; batch: sequences in x (x.shape[0] of a [B, T, C] input, 1 for [T, C]).
    """
    _op("hessian_update_")(H, x, nsamples, batch)


def act_scale_update_(s: torch.Tensor, x: torch.Tensor, nsamples: int, batch: int) -> None:
    """In place: s = nsamples/(nsamples+batch) * s + sum_t x[t, :]^2 / (nsamples+batch) (Wanda's scaler_row).

    s: float32 [C], contiguous; x: floating [..., C] on s's device; nsamples / batch as in hessian_update_.
    """
    _op("act_scale_update_")(s, x, nsamples, batch)


def wanda_prune(w: torch.Tensor, act_scale: torch.Tensor, n: int, m: int, sparsity: float = 0.0):
    """Wanda's fused prune: metric |w| * sqrt(act_scale); returns (pruned w, keep mask).

    w: float32/float16/bfloat16 [rows, cols]; act_scale: float32 [cols] (mean squared activation per input
    feature). m > 0: N:M, prune the n smallest metrics of every aligned group of m along cols (ties: the higher
    column is pruned). m == 0: unstructured per row, prune the int(cols * sparsity) smallest (stable order: ties
    prune the lower column first). Returns (w's dtype [rows, cols] contiguous, bool [rows, cols], True = kept).
    """
    return _op("wanda_prune")(w, act_scale, n, m, float(sparsity))


def sparsegpt_prune_block_(w1, hinv1, n, m, prune_mask=None, qscale=None, qzero=None, maxq=0):
    """SparseGPT's OBS update of one column block, all of its columns in one call; w1 is updated in place.

    w1: float32 (or float64) [rows, bs] with contiguous rows (a column slice W[:, i1:i2] of a row-major W works
        in place); on return it holds the pruned (and quantised) block Q1.
    hinv1: [bs, bs] of w1's dtype, the block U[i1:i2, i1:i2] of the upper Cholesky factor of H^-1.
    n, m: N:M pattern chosen inside the loop (bs must be a multiple of m); n = m = 0 for mask / no pruning.
    prune_mask: optional bool [rows, bs], True = prune (unstructured: the caller's block-global threshold).
    qscale, qzero: optional [rows] of w1's dtype, the per-row quantiser, given together; maxq selects the grid:
        maxq = 2^bits - 1 (>= 1): min-max q = qscale * (clamp(round(w / qscale) + qzero, 0, maxq) - qzero), round
        half to even (qzero = 127, maxq = 254 is the symmetric int8 grid clamp(round(w / s), -127, 127) exactly);
        maxq = -1: symmetric fp8 e4m3 q = qscale * e4m3(clamp(w / qscale, -448, 448)), e4m3 rounding to nearest
        even onto float8_e4m3fn values as torch's cast (qzero must be given but is ignored).
    Returns (err [rows, bs], loss [rows] = sum_i (w - q)^2 / d_i^2 / 2 over the block, keep mask bool [rows, bs]).
    """
    return _op("sparsegpt_prune_block_")(w1, hinv1, n, m, prune_mask, qscale, qzero, maxq)


def _register_fakes() -> None:
    if not _ext.available():
        return  # no schemas to attach to; calling an op raises ExtensionMissingError with the reason

    @torch.library.register_fake("sparsekern::hessian_update_")
    def _(H, x, nsamples, batch):
        check_same_device("hessian_update_", H=H, x=x)
        return None

    @torch.library.register_fake("sparsekern::act_scale_update_")
    def _(s, x, nsamples, batch):
        check_same_device("act_scale_update_", s=s, x=x)
        return None

    @torch.library.register_fake("sparsekern::wanda_prune")
    def _(w, act_scale, n, m, sparsity):
        check_same_device("wanda_prune", w=w, act_scale=act_scale)
        torch._check(w.dim() == 2, lambda: "wanda_prune: w must be 2-D")
        out = torch.empty(w.shape, dtype=w.dtype, device=w.device)
        return out, torch.empty(w.shape, dtype=torch.bool, device=w.device)

    @torch.library.register_fake("sparsekern::sparsegpt_prune_block_")
    def _(w1, hinv1, n, m, prune_mask, qscale, qzero, maxq):
        check_same_device("sparsegpt_prune_block_", w1=w1, hinv1=hinv1, prune_mask=prune_mask, qscale=qscale,
                          qzero=qzero)
        torch._check(w1.dim() == 2, lambda: "sparsegpt_prune_block_: w1 must be 2-D")
        rows, bs = w1.shape
        return (
            torch.empty((rows, bs), dtype=w1.dtype, device=w1.device),
            torch.empty((rows,), dtype=w1.dtype, device=w1.device),
            torch.empty((rows, bs), dtype=torch.bool, device=w1.device),
        )


_register_fakes()
