"""Calibration statistics collected from forward hooks: SparseGPT's Hessian and Wanda's activation scale.

Both follow the references' running-mean update (ALGORITHMS.md) through in-place ops, so a hook adds one batch
without copying it (float32 inputs with contiguous rows are read in place; other dtypes are converted once):
    stats = HessianStats(layer.in_features, device)
    handle = stats.attach(layer)          # or layer.register_forward_hook(lambda m, i, o: stats.add(i[0]))
    ... run calibration ...
    handle.remove(); H = stats.value
"""

from __future__ import annotations

import torch

from ..ops import prune as _ops


def _batch_of(x: torch.Tensor, in_features: int, who: str) -> int:
    # The references count sequences: a [B, T, C] input adds B samples, a [T, C] input adds one.
    if x.dim() not in (2, 3) or x.shape[-1] != in_features:
        raise ValueError(f"{who}.add: x must be [B, T, C] or [T, C] with C = {in_features}, got {tuple(x.shape)}")
    return x.shape[0] if x.dim() == 3 else 1


class _RunningStat:
    _who = "stats"

    def __init__(self, in_features: int, device=None):
        if in_features < 1:
            raise ValueError(f"{self._who}: in_features must be >= 1, got {in_features}")
        self.in_features = int(in_features)
        self.nsamples = 0

    def attach(self, module: torch.nn.Module):
        """Register a forward hook on module that adds its first input; returns the hook handle."""
        return module.register_forward_hook(lambda mod, inputs, output: self.add(inputs[0]))


class HessianStats(_RunningStat):
    """H = 2/N * sum over all tokens of x x^T (N = sequences seen), float32 [C, C] on `device`."""

    _who = "HessianStats"

    def __init__(self, in_features: int, device=None):
        super().__init__(in_features, device)
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        """x: floating [B, T, C] (B sequences) or [T, C] (one sequence), on the statistic's device."""
        batch = _batch_of(x, self.in_features, self._who)
        _ops.hessian_update_(self.H, x.detach(), self.nsamples, batch)
        self.nsamples += batch

    @property
    def value(self) -> torch.Tensor:
        return self.H


class ActScaleStats(_RunningStat):
    """s_j = 1/N * sum over tokens of x_j^2 (N = sequences seen), float32 [C]: Wanda's scaler_row."""

    _who = "ActScaleStats"

    def __init__(self, in_features: int, device=None):
        super().__init__(in_features, device)
        self.s = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        """x: floating [B, T, C] (B sequences) or [T, C] (one sequence), on the statistic's device."""
        batch = _batch_of(x, self.in_features, self._who)
        _ops.act_scale_update_(self.s, x.detach(), self.nsamples, batch)
        self.nsamples += batch

    @property
    def value(self) -> torch.Tensor:
        return self.s
