"""The pipeline's calibration statistics as sums of per-batch terms, so that splitting the batches across ranks
(pipeline/dist.py) does not change them.

The engine's HessianStats / ActScaleStats (prune/stats.py) keep the references' running mean in float32:
H <- n/(n+B) H + 2/(n+B) X^T X after every batch. That recurrence is sequential: computed over two halves of the
batches and combined, it rounds differently. prune_model instead defines each statistic as a sum over calibration
batches k (chunks of batch_size sequences, numbered as in the one-process run):

    Hessian       H = 2/N * sum_k G_k,   G_k = X_k^T X_k   (float32, sparsekern's hessian_update_ kernel)
    act. scale    s = 1/N * sum_k q_k,   q_k = sum over the batch's tokens of x^2   (float32, act_scale_update_)

with N the number of sequences, the sum taken in float64 and rounded to float32 once at the end. Each term G_k /
q_k is computed from the same batch by the same kernel on whichever rank runs it, so it is bit-identical to the
one-process run's term (same intra-op thread count: BLAS may split a dot product differently with more threads).
A float64 sum of float32 terms is exact -- and then independent of the order and grouping of the additions --
whenever one entry's terms span fewer than ~(29 - log2(batches)) binary orders of magnitude (24-bit significands
in a 53-bit one); otherwise the grouping can change the float64 result in its last bit, which changes the float32
value only if it lies within 2^-29 (relative) of a float32 rounding boundary. So the statistics of a run on N ranks
(each rank sums its contiguous range of batches, the ranks' partial sums are added in rank order) equal the
one-process statistics except with a probability of order 2^-29 per such entry; tests/test_distributed.py checks
bit equality of the resulting masks and weights. Against the references' float32 running mean, the float64 sum is
also the more accurate of the two (one rounding instead of one per batch); the two agree to ~2e-7 relative, yet
SparseGPT's greedy choices carry such last-bit differences through its columns and blocks: on the bundled protocol
its perplexity moved from 93.88 to 90.92 with this change (docs/pruning.md), Wanda's not at all.
"""

from __future__ import annotations

import math

import torch

from ..ops import prune as _ops
from ..prune.stats import _batch_of


class SummedHessian:
    """H = 2/N * sum_k X_k^T X_k, float32 [C, C] (see the module docstring): .add(x) per batch, .value at the end;
    .reduce(dist) adds the other ranks' partial sums (pipeline/dist.py) before .value is read.

    Memory: the float64 sum (2x a float32 statistic) while batches are added, plus one float32 term during each add
    (allocated per call, not kept); reading .value turns the sum into the float32 result in place of it (the sum is
    freed: no batch can be added after that)."""

    _who = "SummedHessian"

    def __init__(self, in_features: int, device=None):
        if in_features < 1:
            raise ValueError(f"{self._who}: in_features must be >= 1, got {in_features}")
        self.in_features = int(in_features)
        self.acc: torch.Tensor | None = torch.zeros(self._shape(), dtype=torch.float64, device=device)
        self._value: torch.Tensor | None = None
        self.nsamples = 0

    def _shape(self) -> tuple[int, ...]:
        return (self.in_features, self.in_features)

    def _fill_term(self, term: torch.Tensor, x: torch.Tensor) -> None:
        # The kernel's contract: H = n/(n+B) H + 2/(n+B) X^T X. With n = 0 and B = 2 that is H = X^T X (beta 0:
        # the old content ignored, so an uninitialised term is fine; alpha 1: no scaling rounded into the product).
        _ops.hessian_update_(term, x, 0, 2)

    def _check_open(self, what: str) -> None:
        if self.acc is None:
            raise ValueError(f"{self._who}.{what}: the statistic was already read (.value); it takes no more input")

    def add(self, x: torch.Tensor) -> None:
        """x: floating [B, T, C] (B sequences) or [T, C] (one sequence), on the statistic's device."""
        self._check_open("add")
        batch = _batch_of(x, self.in_features, self._who)
        term = torch.empty(self._shape(), dtype=torch.float32, device=self.acc.device)
        self._fill_term(term, x.detach())
        self.acc.add_(term)  # float32 -> float64 exactly, one float64 rounding
        del term
        self.nsamples += batch

    def reduce(self, dist) -> None:
        """Replace this rank's partial sum by the sum over all ranks, added in rank order (identical on every
        rank); likewise the sequence count. A no-op without a DistContext."""
        if dist is None:
            return
        self._check_open("reduce")
        self.nsamples = dist.sum_in_rank_order_(self.acc, self.nsamples)

    def _scale(self) -> float:
        return 2.0

    @property
    def numel(self) -> int:
        """Elements of the sum (pipeline/dist.py sizes its exchange buffers by it)."""
        return math.prod(self._shape())

    @property
    def value(self) -> torch.Tensor:
        if self._value is None:
            if self.nsamples == 0:
                raise ValueError(f"{self._who}: no calibration input was added")
            acc, self.acc = self.acc, None
            acc.mul_(self._scale() / self.nsamples)  # in place: no float64 temporary
            self._value = acc.float()
            del acc
        return self._value


class SummedActScale(SummedHessian):
    """Wanda's s = 1/N * sum over tokens of x^2, float32 [C], as a float64 sum of per-batch float32 terms."""

    _who = "SummedActScale"

    def _shape(self) -> tuple[int, ...]:
        return (self.in_features,)

    def _fill_term(self, term: torch.Tensor, x: torch.Tensor) -> None:
        # n = 0, B = 1: s = float32(sum_t x_t^2) (the kernel zeroes s first, sums in double and rounds once)
        _ops.act_scale_update_(term, x, 0, 1)

    def _scale(self) -> float:
        return 1.0
