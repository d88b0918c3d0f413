"""Wanda: prune by |W_ij| * sqrt(s_j) (s_j = mean squared activation of input feature j), no weight update."""

from __future__ import annotations

import torch

from ..ops import prune as _ops
from .pattern import (PruneResult, call_checking_finite, check_divisible, check_finite, check_weight,
                      parse_pattern)


def wanda(w: torch.Tensor, act_scale: torch.Tensor, pattern, use_variant: bool = False) -> PruneResult:
    """Wanda pruning of one Linear weight; w is not modified.

    w: float32/float16/bfloat16 [out_features, in_features].
    act_scale: [in_features] float (converted to float32), s_j = 1/N sum_tokens x_j^2 (ActScaleStats.value).
    pattern: "n:m" -> per row and aligned group of m, prune the n smallest metrics (one fused kernel);
      float s -> per row, prune the int(in_features * s) smallest metrics (stable order: ties prune the lower
      column first).
    use_variant: the reference's Wanda variant (unstructured only): per row prune entries whose cumulative sorted
      metric is <= alpha * row sum, alpha bisected in [0, 0.8] from 0.4 until the overall sparsity is within 0.001
      of s (at most ~10 halvings, as the reference).
    Returns PruneResult(weight (w's dtype), mask (bool, True = kept), loss=None).
    """
    check_weight(w, finite=False)  # the kernel refuses NaN / Inf in its single pass over w (no extra read)
    cols = w.shape[1]
    if not isinstance(act_scale, torch.Tensor) or act_scale.dim() != 1 or act_scale.shape[0] != cols:
        shape = tuple(act_scale.shape) if isinstance(act_scale, torch.Tensor) else type(act_scale).__name__
        raise ValueError(f"act_scale must be a 1-D tensor [in_features] = [{cols}], got {shape}")
    check_finite(act_scale, "act_scale")
    s = act_scale.detach().to(device=w.device, dtype=torch.float32)
    if bool((s < 0).any()):
        raise ValueError("act_scale must be >= 0 (a mean of squares)")
    p = parse_pattern(pattern)
    check_divisible(p, cols)
    if use_variant:
        check_finite(w, "w")
        if p.structured:
            raise ValueError("use_variant is the reference's unstructured variant; it does not apply to n:m patterns")
        return _wanda_variant(w.detach(), s, p.sparsity)
    weight, mask = call_checking_finite(_ops.wanda_prune, w.detach(), s, p.n, p.m, p.sparsity)
    return PruneResult(weight, mask, None)


def _wanda_variant(w: torch.Tensor, s: torch.Tensor, sparsity: float) -> PruneResult:
    # Whole-matrix alpha search with torch ops, the reference's arithmetic (float32 cumsum of sorted metrics).
    metric = w.abs().float() * torch.sqrt(s)
    sorted_metric = torch.sort(metric, dim=-1, stable=True).values
    cum = torch.cumsum(sorted_metric, dim=1)
    row_sum = metric.sum(dim=1)

    def prune_mask_for(alpha: float):
        below = cum <= (row_sum * alpha).reshape(-1, 1)
        count = below.sum(dim=1, keepdim=True)
        thresh = torch.gather(sorted_metric, 1, (count - 1).clamp(min=0))
        # A row where not even the smallest metric is under alpha * sum prunes nothing (the reference would
        # index position -1 there and fail).
        prune = (metric <= thresh) & (count > 0)
        return prune, prune.sum().item() / prune.numel()

    alpha, lo, hi = 0.4, 0.0, 0.8
    prune, cur = prune_mask_for(alpha)
    while abs(cur - sparsity) > 0.001 and hi - lo >= 0.001:
        if cur > sparsity:
            alpha, hi = (alpha + lo) / 2.0, alpha
        else:
            alpha, lo = (alpha + hi) / 2.0, alpha
        prune, cur = prune_mask_for(alpha)
    keep = ~prune
    return PruneResult(w * keep, keep, None)
