"""Calibration statistics of a block's linears: grouping by shared input, and one statistics pass.

- Linears reading the *same input tensor* (q/k/v; gate/up; GPT-2's fused c_attn is one linear anyway) share one
  statistics object: the Hessian of an input is computed once, not once per consumer. Groups are found by tensor
  identity in one forward of the first batch, once per block class (discover_groups).
- The statistics pass (collect_stats) stops (StopForward) as soon as the last statistics it needs are taken: the
  last group's own matmul and everything after it are not computed. Magnitude pruning needs no data at all and runs
  no forward.

Hessians are accumulated on their upper block-triangle only (csrc/cpu/prune_stats.cpp).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .capture import Chunk, run_block
from .errors import StopForward
from .pruning import make_stats
from .structure import block_linears, weight_matrix


class _InputGrouper:
    """Forward pre-hooks grouping linears by the identity of the input tensor they receive, in call order."""

    def __init__(self):
        self.seen: list[tuple[torch.Tensor, list[str]]] = []

    def hook_for(self, name: str):
        def hook(_mod, args):
            x = args[0]
            for t, group in self.seen:
                if t is x:
                    group.append(name)
                    return
            self.seen.append((x, [name]))
        return hook


def discover_groups(layer: nn.Module, names: Sequence[str], chunk: Chunk, hidden: torch.Tensor) -> list[list[str]]:
    """Group the block's linears `names` by the input tensor they receive, in call order.

    Linears fed the very same tensor object (q/k/v after the attention norm, gate/up after the MLP norm) share
    calibration statistics; the groups' order is the block's execution order, which is also the true-sequential
    order. Linears never called on this input are put last, each alone.
    """
    mods = block_linears(layer)
    grouper = _InputGrouper()
    handles = [mods[n].register_forward_pre_hook(grouper.hook_for(n)) for n in names]
    try:
        with torch.no_grad():
            run_block(layer, [chunk], [hidden], keep=False)
    finally:
        for h in handles:
            h.remove()
    groups = [g for _, g in grouper.seen]
    called = {n for g in groups for n in g}
    return groups + [[n] for n in names if n not in called]


def _stats_hook(stats: dict[str, Any], leader: str, last: str):
    def hook(_mod, args):
        stats[leader].add(args[0].detach())
        if leader == last:
            raise StopForward  # nothing later in the block is needed for these statistics
    return hook


def collect_stats(layer: nn.Module, groups: Sequence[Sequence[str]], chunks: Sequence[Chunk],
                  hidden: Sequence[torch.Tensor], method: str, device: torch.device) -> dict[str, Any]:
    """One pass of the block over all chunks, feeding one statistics object per group (keyed by the group's first
    linear) from forward pre-hooks; the pass stops right after the last group's statistics are taken."""
    mods = block_linears(layer)
    stats: dict[str, Any] = {}
    handles = []
    last = groups[-1][0]
    for g in groups:
        leader = g[0]
        w = weight_matrix(mods[leader])
        stats[leader] = make_stats(method, w.shape[1], device)
        handles.append(mods[leader].register_forward_pre_hook(_stats_hook(stats, leader, last)))
    try:
        run_block(layer, chunks, hidden, keep=False)
    finally:
        for h in handles:
            h.remove()
    return stats
