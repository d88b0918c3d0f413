"""Sparsity patterns and the input checks shared by the pruning algorithms.

A pattern is either "n:m" (N:M semi-structured: in every aligned group of m consecutive weights along
in_features, n are pruned; "2:4" is what sparse tensor cores run) or a float in (0, 1) (unstructured: that fraction
of weights is pruned). Every mask this package returns is bool with True = kept.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

MAX_GROUP = 32  # csrc/core/nm.h kMaxGroup: masks of a group live in a 32-bit word

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


class Pattern(NamedTuple):
    """n:m (m > 0, sparsity = n / m) or unstructured (n = m = 0, sparsity in (0, 1))."""

    n: int
    m: int
    sparsity: float

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.sparsity:g} unstructured"


class PruneResult(NamedTuple):
    """weight: pruned weight, w's dtype/shape; mask: bool, w's shape, True = kept; loss: float32 [rows] (SparseGPT's
    per-row OBS loss sum_i (w - q)^2 / d_i^2 / 2; float64 for float64 w) or None.
    scale, quant: the W8A8 grid the weight was jointly quantised on (sparsegpt with quant="int8" / "fp8"): scale
    float32 [rows] on w's device, quant the name; the weight is scale[r] * code with codes int8 in [-127, 127] or
    float8_e4m3fn values. None for every other result (no quantisation, or the dense-export min-max grids).
    Hand them to sparsekern.quant.attach_weight_grid(module, result.quant, result.scale) so sparsify keeps them."""

    weight: torch.Tensor
    mask: torch.Tensor
    loss: torch.Tensor | None
    scale: torch.Tensor | None = None
    quant: str | None = None


def parse_pattern(pattern) -> Pattern:
    """"2:4" / "4:8" / any "n:m" (1 <= n < m <= 32), a float in (0, 1), a Pattern, or a string holding a float."""
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, bool):
        raise ValueError(f"pattern must be an 'n:m' string or a float in (0, 1), got {pattern!r}")
    if isinstance(pattern, (float, int)):
        s = float(pattern)
        if not 0.0 < s < 1.0:
            raise ValueError(f"unstructured sparsity must be a float in (0, 1) (the fraction pruned), got {pattern!r}")
        return Pattern(0, 0, s)
    if isinstance(pattern, str):
        mt = _NM_RE.match(pattern)
        if mt:
            n, m = int(mt.group(1)), int(mt.group(2))
            if not 1 <= n < m:
                raise ValueError(
                    f"pattern {pattern!r}: n:m prunes n of every m weights, so it needs 1 <= n < m (e.g. '2:4')"
                )
            if m > MAX_GROUP:
                raise ValueError(f"pattern {pattern!r}: the group size m must be <= {MAX_GROUP}")
            return Pattern(n, m, n / m)
        try:
            s = float(pattern)
        except ValueError:
            s = None
        if s is not None:
            return parse_pattern(s)
    raise ValueError(
        f"pattern must be an 'n:m' string such as '2:4' or '4:8', or a float in (0, 1) for unstructured sparsity, "
        f"got {pattern!r}"
    )


def check_weight(w: torch.Tensor, what: str = "w", finite: bool = True) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{what} must be a 2-D tensor [out_features, in_features], got {shape}")
    if not w.is_floating_point():
        raise ValueError(f"{what} must be a floating tensor, got {w.dtype}")
    if finite:
        check_finite(w, what)


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise when t holds NaN or Inf. aminmax reduces without a temporary of t's size (NaN propagates into it)."""
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t.detach())
    if not (torch.isfinite(lo) & torch.isfinite(hi)).item():
        raise ValueError(f"{what} contains NaN or Inf; pruning needs finite values")


def check_hessian(hessian, w: torch.Tensor, who: str = "", finite: bool = True) -> None:
    """hessian is a square 2-D tensor [in_features, in_features] of w's in_features, on w's device (and finite).
    who: a prefix for the messages ("refit: ")."""
    cols = w.shape[1]
    if not isinstance(hessian, torch.Tensor) or hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
        raise ValueError(f"{who}hessian must be a square 2-D tensor [in_features, in_features], got {shape}")
    if hessian.shape[0] != cols:
        raise ValueError(f"{who}hessian is {tuple(hessian.shape)} but w has in_features = {cols}; H must be "
                         f"[{cols}, {cols}]")
    if hessian.device != w.device:
        raise ValueError(f"{who}hessian is on {hessian.device} but w is on {w.device}")
    if finite:
        check_finite(hessian, "hessian")


def check_divisible(p: Pattern, cols: int) -> None:
    if p.structured and cols % p.m != 0:
        raise ValueError(
            f"pattern {p.n}:{p.m} needs in_features divisible by m = {p.m} (groups are aligned at column 0), "
            f"got in_features = {cols}"
        )


def call_checking_finite(op, w: torch.Tensor, *args):
    """Run a pruning op that refuses non-finite scores itself (the Wanda kernel checks during its single pass over
    w) and turn that refusal into the package's ValueError."""
    try:
        return op(w, *args)
    except RuntimeError as e:
        if "NaN or Inf" in str(e):
            raise ValueError("w contains NaN or Inf; pruning needs finite values") from None
        raise
