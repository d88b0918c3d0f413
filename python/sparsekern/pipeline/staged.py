"""The single paused pass of true-sequential calibration (run_block_staged).

true_sequential=True prunes the groups in the order the block calls them (q/k/v -> o -> gate/up -> down), each
group calibrated on the outputs of the block with the earlier groups already pruned. By default that takes one
forward per chunk, paused before each group until all chunks got there and the group is pruned
(run_block_staged): the statistics of every group and the re-run come from that single pass, bit-identical to one
statistics pass per group (each stopping at its group) plus a re-run (single_pass=False).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Sequence

import torch
from torch import nn

from .capture import Chunk, hidden_of
from .pruning import make_stats
from .structure import block_linears, weight_matrix


class _AbortForward(Exception):
    """Raised inside a paused chunk forward to unwind it when the staged pass is abandoned (error or no output
    needed)."""


class _StagedPass:
    """The chunk threads of one staged pass and the calling thread's side of their hand-over.

    Each chunk's forward runs in its own thread and parks (hook_for) before each group's leader; the calling thread
    lets one chunk run at a time (resume) and learns from `status` where it stopped."""

    def __init__(self, layer: nn.Module, stats: list, chunks: Sequence[Chunk], hidden: Sequence[torch.Tensor],
                 device: torch.device, keep: bool, context: Callable):
        self.layer, self.stats, self.chunks, self.hidden = layer, stats, chunks, hidden
        self.keep, self.context = keep, context
        self.n = len(chunks)
        self.stage = 0  # groups[:stage] are pruned
        self.go = [threading.Semaphore(0) for _ in range(self.n)]  # the calling thread lets chunk c run
        self.back = threading.Semaphore(0)  # chunk thread -> caller: paused, done or failed
        # ("paused", k) | ("done", out) | ("aborted", None) | ("error", exc), per chunk
        self.status: list[tuple | None] = [None] * self.n
        self.abort = False
        self.local = threading.local()
        self.cuda_ctx = (lambda: torch.cuda.device(device)) if device.type == "cuda" else contextlib.nullcontext
        # The intra-op thread count is per OS thread (OpenMP): a new thread starts at the default, not at what the
        # caller set with torch.set_num_threads. The chunk threads take the caller's count, so the paused pass splits
        # its reductions (and rounds) exactly as the calling thread would: bit-identical to the per-group passes.
        self.num_threads = torch.get_num_threads()

    def hook_for(self, k: int):
        """Forward pre-hook on group k's leader: add the chunk's input to the group's statistics and park."""
        def hook(_mod, args):
            c = getattr(self.local, "chunk", None)
            if c is None or k < self.stage:
                return  # not a staged forward, or a group already pruned (data-dependent call order)
            if self.stats[k] is not None:
                self.stats[k].add(args[0].detach())
            self.status[c] = ("paused", k)
            self.back.release()
            self.go[c].acquire()
            if self.abort:
                raise _AbortForward
        return hook

    def worker(self, c: int) -> None:
        torch.set_num_threads(self.num_threads)
        self.local.chunk = c
        self.go[c].acquire()
        try:
            if self.abort:
                raise _AbortForward
            # Grad mode, autocast and the current CUDA device are per thread.
            with torch.no_grad(), self.cuda_ctx(), self.context():
                out = self.layer(self.hidden[c], *self.chunks[c].args, **self.chunks[c].kwargs)
            self.status[c] = ("done", hidden_of(out) if self.keep else None)
        except _AbortForward:
            self.status[c] = ("aborted", None)
        except BaseException as e:  # handed to the calling thread, which re-raises it
            self.status[c] = ("error", e)
        finally:
            self.back.release()

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self.worker, args=(c,), name=f"sparsekern-chunk-{c}", daemon=True)
                   for c in range(self.n)]
        for t in threads:
            t.start()
        return threads

    def resume(self, c: int) -> None:
        self.go[c].release()
        self.back.acquire()
        if self.status[c][0] == "error":
            raise self.status[c][1]

    def advance_to(self, k: int) -> None:
        """Run every chunk not started yet, or parked at an earlier group, until it parks at group >= k or ends."""
        self.stage = k
        for c in range(self.n):
            st = self.status[c]
            if st is None or (st[0] == "paused" and st[1] < k):
                self.resume(c)

    def outputs(self) -> list[torch.Tensor]:
        return [self.status[c][1] for c in range(self.n)]

    def unwind(self, threads: list[threading.Thread]) -> None:
        """Abort the chunks still parked or not started, and join every thread."""
        self.abort = True
        for c in range(self.n):
            st = self.status[c]
            if st is None or st[0] == "paused":
                self.go[c].release()
                self.back.acquire()
        for t in threads:
            t.join()


def run_block_staged(layer: nn.Module, groups: Sequence[Sequence[str]], chunks: Sequence[Chunk],
                     hidden: Sequence[torch.Tensor], method: str, device: torch.device, on_group,
                     keep: bool = True, context=contextlib.nullcontext) -> list[torch.Tensor] | None:
    """True-sequential calibration and re-run of one block in a single forward per chunk.

    True-sequential order wants group k's statistics from the block with groups 0..k-1 already pruned, and the
    next block's inputs from the fully pruned block. Both are what one forward computes if it can be *paused*
    right before each group's first linear until every chunk got there and the group is pruned: every chunk's
    forward runs in its own thread, and a forward pre-hook on each group's leader adds the chunk's input to the
    group's statistics and parks the thread. The calling thread advances the chunks one at a time (never two
    forwards at once, so each still gets all cores and the order of every floating-point operation is that of a
    plain forward), calls `on_group(k, stat)` once all chunks reached group k (or finished without calling it),
    and resumes them. The result is bit-identical to one statistics pass per group plus a re-run of the pruned
    block, at the cost of one forward instead of (groups + 1) partial ones.

    groups:  the block's linear groups in call order (discover_groups); on_group(k, stat) prunes groups[k]
             (stat: the group's statistics object, None for magnitude).
    context: a factory of context managers entered in every chunk thread (autocast is thread-local, so the
             caller's would not apply there).
    Returns the block's output hidden states per chunk when `keep`, else None (forwards still running after the
    last group are then abandoned). Memory: all chunks are paused mid-block at the same time, so their live
    intermediate tensors add up (about one block's activations over all calibration sequences).
    """
    mods = block_linears(layer)
    stats = [make_stats(method, weight_matrix(mods[g[0]]).shape[1], device) for g in groups]
    run = _StagedPass(layer, stats, chunks, hidden, device, keep, context)
    handles = [mods[g[0]].register_forward_pre_hook(run.hook_for(k)) for k, g in enumerate(groups)]
    threads = run.start()
    try:
        for k in range(len(groups) + 1):
            if k == len(groups) and not keep:
                run.stage = k
                break  # every group is pruned and no output is needed: leave the rest unrun
            run.advance_to(k)
            if k < len(groups):
                on_group(k, stats[k])
        return run.outputs() if keep else None
    finally:
        run.unwind(threads)
        for h in handles:
            h.remove()
