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

    def reduce(self, dist) -> None:
        if self.own is not None:
            self.own.reduce(dist)
        self.hessian_stats.reduce(dist)

    @property
    def value(self):
        return None if self.own is None else self.own.value

    @property
    def hessian(self) -> torch.Tensor:
        return self.hessian_stats.value

    @property
    def nsamples(self) -> int:
        return self.hessian_stats.nsamples

    @property
    def numel(self) -> int:
        """The largest of its sums (pipeline/dist.py sizes its exchange buffers by it)."""
        return max(self.hessian_stats.numel, 0 if self.own is None else self.own.numel)


def make_stats(method: str, in_features: int, device: torch.device):
    """A fresh statistics object for `method` over inputs of `in_features` (None for magnitude: data-free).
    "<method>+hessian" (PruneConfig.stats_method with a refit): the method's statistics and the Hessian.
    The statistics are float64 sums of per-batch terms (pipeline/sums.py), so that a run split across ranks
    computes the one-process values."""
    from .sums import SummedActScale, SummedHessian

    if method.endswith("+hessian"):
        own = method.removesuffix("+hessian")
        if own in ("sparsegpt", "admm"):
            return make_stats(own, in_features, device)
        return WithHessian(make_stats(own, in_features, device), SummedHessian(in_features, device))
    if method in ("sparsegpt", "admm"):
        return SummedHessian(in_features, device)
    if method == "wanda":
        return SummedActScale(in_features, device)
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
                 permuter: BlockPermuter | None = None, dist=None):
        self.method, self.pattern, self.options = method, pattern, options
        self.report, self.layers_path = report, layers_path
        self.refit, self.refit_options = refit, dict(refit_options or {})
        self.permuter = permuter
        self.dist = dist  # pipeline/dist.py's DistContext, or None for one process

    def __call__(self, layer_index: int, mods: Mapping[str, nn.Module], group: Sequence[str], stat) -> None:
        self.prune_groups(layer_index, mods, [group], [stat])

    def prune_groups(self, layer_index: int, mods: Mapping[str, nn.Module], groups: Sequence[Sequence[str]],
                     stats: Sequence) -> None:
        """Prune every linear of `groups` (stats[k]: group k's statistics). Across ranks (self.dist): the
        statistics are summed over the ranks, the linears dealt to the ranks, each rank prunes its own, and every
        result is broadcast from its owner (pipeline/dist.py)."""
        if self.dist is None:
            for g, stat in zip(groups, stats):
                shared: dict = {}
                for n in g:
                    self.report.linears.append(self._prune_one(layer_index, mods, n, stat, shared))
            return
        dist = self.dist
        err = None
        try:
            # before the check: running out of memory is reported there
            dist.prepare_sum(max((st.numel for st in stats if st is not None), default=1))
        except Exception as exc:  # noqa: BLE001
            err = exc
        dist.check(err, f"calibrating block {layer_index}")
        for stat in stats:
            if stat is not None:
                stat.reduce(dist)
        items = [(k, n) for k, g in enumerate(groups) for n in g]
        owners = dist.deal([self._cost(mods[n]) for _, n in items])
        mine: dict[str, LinearReport] = {}
        err = None
        try:
            shared: dict[int, dict] = {}
            for (k, n), owner in zip(items, owners):
                if owner == dist.rank:
                    mine[n] = self._prune_one(layer_index, mods, n, stats[k], shared.setdefault(k, {}))
        except Exception as exc:  # noqa: BLE001  (reported to every rank by check, then re-raised here)
            err = exc
        dist.check(err, f"pruning block {layer_index}")
        from ..quant import attach_weight_grid, weight_grid

        for (_, n), owner in zip(items, owners):
            w = weight_matrix(mods[n])
            dist.broadcast_(w, src=owner)
            payload = None
            if owner == dist.rank:
                grid = weight_grid(mods[n])
                payload = (mine[n], None if grid is None else (grid[0], grid[1].cpu()))
            row, grid = dist.broadcast_object(payload, src=owner)
            if owner != dist.rank and grid is not None:  # the W8A8 grid SparseGPT optimised on (quant=...)
                attach_weight_grid(mods[n], grid[0], grid[1].to(w.device))
            row.rank = owner
            self.report.linears.append(row)

    def _cost(self, module: nn.Module) -> float:
        """Relative pruning time of a linear, for dealing linears to ranks: out x in^2 with a Hessian (SparseGPT,
        ADMM, a refit), out x in otherwise."""
        out_f, in_f = weight_matrix(module).shape
        hessian = self.method in ("sparsegpt", "admm") or self.refit is not None
        return float(out_f) * in_f * (in_f if hessian else 1)

    def _prune_one(self, layer_index: int, mods: Mapping[str, nn.Module], n: str, stat, shared: dict) -> LinearReport:
        """Prune linear `n` from its group's statistics `stat`; `shared` carries what the group's linears share
        (the refit's factorisation). Returns its report row."""
        group_value = None if stat is None else stat.value
        group_hessian = hessian_of(stat) if (self.refit is not None or self.method == "admm") else None
        t0 = time.perf_counter()
        value, hessian, solver = group_value, group_hessian, shared.get("solver")
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
                shared["solver"] = solver  # shared by the group's linears (one factorisation)
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
        return LinearReport(layer=layer_index, name=f"{self.layers_path}.{layer_index}.{n}", shape=tuple(w.shape),
                            loss=None if loss is None else float(loss.sum()), sparsity=sparsity_of(w),
                            seconds=time.perf_counter() - t0)
