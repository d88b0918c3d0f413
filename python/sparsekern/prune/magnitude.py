"""Magnitude pruning: N:M (prune the n smallest |w| of every group of m) and unstructured (global threshold)."""

from __future__ import annotations

import torch

from ..ops import prune as _ops
from .pattern import (PruneResult, call_checking_finite, check_divisible, check_finite, check_weight,
                      parse_pattern)


def magnitude(w: torch.Tensor, pattern) -> PruneResult:
    """Prune w by |w|; w is not modified.

    w: floating [out_features, in_features] (float32/float16/bfloat16 for N:M), any device with a kernel.
    pattern: "n:m" -> in every aligned group of m along in_features, prune the n smallest |w| (ties: the higher
      column is pruned, core/nm.h's rule shared with sparsekern.ops.core.prune_nm);
      float s in (0, 1) -> per matrix, threshold t = sorted(|w|.flatten())[int(numel * s)], prune |w| <= t (the
      Wanda repo's magnitude baseline: prunes k + 1 entries plus ties).
    Returns PruneResult(weight (w's dtype), mask (bool, True = kept), loss=None).
    """
    check_weight(w, finite=False)
    p = parse_pattern(pattern)
    if p.structured:
        check_divisible(p, w.shape[1])
        # Wanda's metric with a unit activation scale is |w| exactly (float(|w|) * sqrt(1.0)), so the fused Wanda
        # kernel is the magnitude N:M kernel; the selection is core/nm.h's, as in prune_nm.
        ones = torch.ones(w.shape[1], dtype=torch.float32, device=w.device)
        weight, mask = call_checking_finite(_ops.wanda_prune, w.detach(), ones, p.n, p.m, 0.0)
        return PruneResult(weight, mask, None)
    check_finite(w, "w")
    a = w.detach().abs()
    k = int(a.numel() * p.sparsity)
    thresh = torch.kthvalue(a.flatten(), k + 1).values  # sorted(...)[k], 0-based
    mask = a > thresh
    return PruneResult(w.detach() * mask, mask, None)
