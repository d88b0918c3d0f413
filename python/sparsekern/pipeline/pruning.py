"""Pruning the linears of one group with sparsekern.prune (the engine: magnitude / wanda / sparsegpt), and the
statistics object each method needs (Hessian for SparseGPT, activation scale for Wanda, none for magnitude)."""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .report import LinearReport, PruneReport
from .structure import set_weight_matrix, weight_matrix


def _engine():
    # Looked up at each use (tests replace it with a spy).
    from .. import prune as engine

    return engine


def make_stats(method: str, in_features: int, device: torch.device):
    """A fresh statistics object for `method` over inputs of `in_features` (None for magnitude: data-free)."""
    engine = _engine()
    if method == "sparsegpt":
        return engine.HessianStats(in_features, device)
    if method == "wanda":
        return engine.ActScaleStats(in_features, device)
    return None


def prune_weight(method: str, w: torch.Tensor, stat: torch.Tensor | None, pattern, options: Mapping[str, Any]):
    """Prune one weight [out, in] with the engine; `stat` is the statistics' value (None for magnitude),
    `pattern` the engine's form (engine_pattern). Returns the engine's result (.weight, and .loss for sparsegpt)."""
    engine = _engine()
    if method == "magnitude":
        return engine.magnitude(w, pattern)
    if method == "wanda":
        return engine.wanda(w, stat, pattern, use_variant=options.get("use_variant", False))
    return engine.sparsegpt(w, stat, pattern, blocksize=options.get("blocksize", 128),
                            percdamp=options.get("percdamp", 0.01), quant=options.get("quant"))


def sparsity_of(w: torch.Tensor) -> float:
    """Fraction of zeros of `w`."""
    return float((w == 0).sum()) / w.numel()


class GroupPruner:
    """Prunes the linears of one group in place from the group's shared statistics and appends a LinearReport per
    linear (full name, shape, loss, sparsity, engine seconds) to `report`."""

    def __init__(self, method: str, pattern, options: Mapping[str, Any], report: PruneReport, layers_path: str):
        self.method, self.pattern, self.options = method, pattern, options
        self.report, self.layers_path = report, layers_path

    def __call__(self, layer_index: int, mods: Mapping[str, nn.Module], group: Sequence[str], stat) -> None:
        value = None if stat is None else stat.value
        for n in group:
            t0 = time.perf_counter()
            w = weight_matrix(mods[n])
            # The engine leaves its statistics untouched, so a group shares one object.
            res = prune_weight(self.method, w, value, self.pattern, self.options)
            set_weight_matrix(mods[n], res.weight)
            loss = getattr(res, "loss", None)
            self.report.linears.append(LinearReport(
                layer=layer_index, name=f"{self.layers_path}.{layer_index}.{n}", shape=tuple(w.shape),
                loss=None if loss is None else float(loss.sum()), sparsity=sparsity_of(w),
                seconds=time.perf_counter() - t0))
