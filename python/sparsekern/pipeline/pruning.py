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


class WithHessian:
    """The statistics of a method plus the Hessian a refit needs, fed from the same inputs (stats_method
    "<method>+hessian"). .value is the method's own statistic (None for magnitude), .hessian the Hessian."""

    def __init__(self, own, hessian):
        self.own, self.hessian_stats = own, hessian

    def add(self, x: torch.Tensor) -> None:
        if self.own is not None:
            self.own.add(x)
        self.hessian_stats.add(x)

    @property
    def value(self):
        return None if self.own is None else self.own.value

    @property
    def hessian(self) -> torch.Tensor:
        return self.hessian_stats.value

    @property
    def nsamples(self) -> int:
        return self.hessian_stats.nsamples


def make_stats(method: str, in_features: int, device: torch.device):
    """A fresh statistics object for `method` over inputs of `in_features` (None for magnitude: data-free).
    "<method>+hessian" (PruneConfig.stats_method with a refit): the method's statistics and the Hessian."""
    engine = _engine()
    if method.endswith("+hessian"):
        own = method.removesuffix("+hessian")
        if own in ("sparsegpt", "admm"):
            return make_stats(own, in_features, device)
        return WithHessian(make_stats(own, in_features, device), engine.HessianStats(in_features, device))
    if method in ("sparsegpt", "admm"):
        return engine.HessianStats(in_features, device)
    if method == "wanda":
        return engine.ActScaleStats(in_features, device)
    return None


def hessian_of(stat) -> torch.Tensor | None:
    """The Hessian a statistics object holds (HessianStats or WithHessian), else None."""
    if stat is None:
        return None
    if isinstance(stat, WithHessian):
        return stat.hessian
    return stat.value if getattr(stat, "value", None) is not None and stat.value.dim() == 2 else None


def prune_weight(method: str, w: torch.Tensor, stat: torch.Tensor | None, pattern, options: Mapping[str, Any]):
    """Prune one weight [out, in] with the engine; `stat` is the statistics' value (None for magnitude),
    `pattern` the engine's form (engine_pattern). Returns the engine's result (.weight, and .loss for sparsegpt)."""
    engine = _engine()
    if method == "admm":
        from ..prune.refit import admm_gradual

        gradual = options.get("gradual_iters", 30)
        return admm_gradual(w, stat, pattern, iters=gradual + options.get("iters", 20), gradual_iters=gradual,
                            cg_iters=options.get("cg_iters", 10), percdamp=options.get("percdamp", 0.01))
    if method == "magnitude":
        return engine.magnitude(w, pattern)
    if method == "wanda":
        return engine.wanda(w, stat, pattern, use_variant=options.get("use_variant", False))
    return engine.sparsegpt(w, stat, pattern, blocksize=options.get("blocksize", 128),
                            percdamp=options.get("percdamp", 0.01), quant=options.get("quant"))


def sparsity_of(w: torch.Tensor) -> float:
    """Fraction of zeros of `w`."""
    return float((w == 0).sum()) / w.numel()


class BlockPermuter:
    """Searches and folds the N:M input-channel permutation of each permutable linear right before it is pruned
    (PruneConfig.permute; pipeline/permute.py), and records it in the report.

    rules[i]: {name relative to block i: FoldRule} of the linears to permute. __call__(i, name, act_scale) returns
    the consumer's column permutation (CPU LongTensor) after folding it into block i, or None when `name` has no
    rule. The caller permutes its statistics of that linear's input the same way."""

    def __init__(self, layers, rules: list[dict], n: int, m: int, seconds: float, report: PruneReport,
                 layers_path: str):
        self.layers, self.rules, self.n, self.m, self.seconds = layers, rules, n, m, seconds
        self.report, self.layers_path = report, layers_path

    def __call__(self, i: int, name: str, act_scale: torch.Tensor | None) -> torch.Tensor | None:
        rule = self.rules[i].get(name)
        if rule is None:
            return None
        from .permute import permute_block

        t0 = time.perf_counter()
        perm, gain = permute_block(self.layers[i], rule, act_scale, self.n, self.m, time_budget=self.seconds)
        self.report.permutations[f"{self.layers_path}.{i}.{name}"] = {
            "producers": [f"{self.layers_path}.{i}.{p}" for p in rule.producers], "gain": gain,
            "seconds": time.perf_counter() - t0, "perm": perm.tolist()}
        return perm


def _permuted_stats(value, hessian, perm: torch.Tensor):
    """The statistics of a linear's input after its channels were permuted by `perm`."""
    def ph(h):
        p = perm.to(h.device)
        return h.index_select(0, p).index_select(1, p)

    if hessian is not None:
        hessian = ph(hessian)
    if value is not None:
        value = ph(value) if value.dim() == 2 else value.index_select(0, perm.to(value.device))
    return value, hessian


class GroupPruner:
    """Prunes the linears of one group in place from the group's shared statistics and appends a LinearReport per
    linear (full name, shape, loss, sparsity, engine seconds) to `report`.

    refit ("admm" or None): after the method's pruning, the kept weights are replaced by the least-squares solution
    on the method's mask (prune.refit), from the dense weight and the group's Hessian; the factorisation is shared
    by the group's linears (one RefitSolver per group)."""

    def __init__(self, method: str, pattern, options: Mapping[str, Any], report: PruneReport, layers_path: str,
                 refit: str | None = None, refit_options: Mapping[str, Any] | None = None,
                 permuter: BlockPermuter | None = None):
        self.method, self.pattern, self.options = method, pattern, options
        self.report, self.layers_path = report, layers_path
        self.refit, self.refit_options = refit, dict(refit_options or {})
        self.permuter = permuter

    def __call__(self, layer_index: int, mods: Mapping[str, nn.Module], group: Sequence[str], stat) -> None:
        group_value = None if stat is None else stat.value
        group_hessian = hessian_of(stat) if (self.refit is not None or self.method == "admm") else None
        group_solver = None
        for n in group:
            t0 = time.perf_counter()
            value, hessian, solver = group_value, group_hessian, group_solver
            perm = None
            if self.permuter is not None:
                if self.method == "magnitude":
                    act_scale = None
                elif group_value is not None and group_value.dim() == 1:
                    act_scale = group_value  # Wanda's activation scale
                else:  # the Hessian's diagonal is 2 x the activation scale: the same ranking
                    act_scale = torch.diagonal(hessian_of(stat))
                perm = self.permuter(layer_index, n, act_scale)
                if perm is not None:
                    value, hessian = _permuted_stats(value, hessian, perm)
            if self.refit is not None and (solver is None or perm is not None):
                from ..prune.refit import RefitSolver

                solver = RefitSolver(hessian, self.refit_options.get("percdamp", 0.01))
                if perm is None:
                    group_solver = solver  # shared by the group's linears (one factorisation)
            if self.method == "admm":
                value = hessian
            w = weight_matrix(mods[n])
            # The engine leaves its statistics untouched, so a group shares one object.
            opts = dict(self.options, **self.refit_options) if self.method == "admm" else self.options
            quant = self.options.get("quant")
            if solver is not None and quant is not None:
                opts = dict(opts, quant=None)  # quantised after the refit, on the refit's weights
            res = prune_weight(self.method, w, value, self.pattern, opts)
            if solver is not None:
                res = solver.refit(w, res.mask, self.pattern, iters=self.refit_options.get("iters", 20),
                                   cg_iters=self.refit_options.get("cg_iters", 10))
                if quant is not None:
                    # GPTQ on the refit's mask: the OBS loop rounds onto the grid column by column and compensates
                    # the rounding error on the columns not yet rounded; the mask does not change.
                    res = _engine().sparsegpt(res.weight, hessian, self.pattern,
                                              blocksize=self.options.get("blocksize", 128),
                                              percdamp=self.options.get("percdamp", 0.01), quant=quant, mask=res.mask)
            set_weight_matrix(mods[n], res.weight)
            if getattr(res, "scale", None) is not None:
                # The grid the weight was optimised on: sparsify(quant=...) stores exactly these codes and scales.
                from ..quant import attach_weight_grid

                attach_weight_grid(mods[n], res.quant, res.scale)
            loss = getattr(res, "loss", None)
            self.report.linears.append(LinearReport(
                layer=layer_index, name=f"{self.layers_path}.{layer_index}.{n}", shape=tuple(w.shape),
                loss=None if loss is None else float(loss.sum()), sparsity=sparsity_of(w),
                seconds=time.perf_counter() - t0))
