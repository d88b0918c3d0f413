"""prune_model across the ranks of a torch.distributed process group (torchrun; gloo on CPUs, NCCL on GPUs).

    torchrun --nproc-per-node 2 -m sparsekern prune --model DIR --method sparsegpt --out OUT
    # or, in a script every rank runs after torch.distributed.init_process_group(...):
    sparsekern.prune_model(model, calib_ids, method="sparsegpt")      # every rank passes the same model and ids

Every rank holds the model (or, with low_memory, reads the same checkpoint) and the same calibration ids, and
runs the same block loop (pipeline/run.py). What is split:
- calibration: the batches (batch_size sequences each, numbered as in a one-process run) are cut into one
  contiguous range per rank; each rank captures, runs and re-runs only its own batches, and holds only their
  activations;
- statistics: each rank sums its batches' terms (pipeline/sums.py); the partial sums are added in rank order
  (sum_in_rank_order_), so every rank gets the same statistics, equal to the one-process ones (sums.py says when
  float addition could make them differ in a last bit);
- pruning: the linears pruned together (one group with true_sequential, a whole block otherwise) are dealt to the
  ranks by estimated cost (deal); each rank prunes its own, then every pruned weight (and its W8A8 grid and
  report row) is broadcast from its owner, so all ranks continue with the same pruned block.
Rank 0 shows progress and writes the output (low_memory: its shards).

Failures. Before every exchange of data the ranks run `check`: a rank that failed reports its error there instead
of joining the exchange, and every rank then raises (the failing one its own error, the others a RankFailed naming
it). A rank that dies leaves the others in a collective: gloo notices the closed connection at once, otherwise the
process group's timeout ends the wait (the CLI sets it: --dist-timeout). torchrun also stops the other workers
when one exits with an error. Refused with more than one rank: permute (a time-budgeted search could fold
different permutations on different ranks) and rerun_kernel="auto" (decided by timing on each rank).
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch

from .errors import PipelineError


class RankFailed(PipelineError):
    """Another rank of the process group failed (its error is in the message), or the group lost a rank."""


def _td():
    import torch.distributed as td

    return td


def active_world() -> int:
    """The default process group's size, or 1 when torch.distributed is not initialised."""
    td = _td()
    return td.get_world_size() if td.is_available() and td.is_initialized() else 1


class DistContext:
    """This rank's view of the default process group, and the collectives the pipeline uses."""

    # The rank-order sum works through slices of at most this many float64 elements (128 MB): its two buffers are
    # allocated before the check that precedes the exchange, so running out of memory is reported there, not half
    # way through a collective.
    SLICE = 1 << 24

    def __init__(self):
        td = _td()
        self.rank, self.world = td.get_rank(), td.get_world_size()
        self.backend = str(td.get_backend())
        # Tensors travel on the backend's device: CPU for gloo, this rank's GPU for NCCL (also in a mixed
        # "cpu:gloo,cuda:nccl" group, whose CUDA tensors go through NCCL).
        self.comm_device = (torch.device("cuda", torch.cuda.current_device()) if "nccl" in self.backend
                            else torch.device("cpu"))
        self._bufs: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def detect(cls, setting: bool | None) -> "DistContext | None":
        """setting (PruneConfig.distributed): None -- the default process group when one is initialised with more
        than one rank; False -- never; True -- required (PipelineError without an initialised group)."""
        if setting is False:
            return None
        world = active_world()
        if world > 1:
            return cls()
        if setting is True:
            raise PipelineError("distributed=True needs an initialised torch.distributed process group with more "
                                "than one rank (launch with torchrun; init_process_group)"
                                + ("" if world == 1 and _td().is_available() and _td().is_initialized()
                                   else "; none is initialised"))
        return None

    # ------------------------------------------------------------------ error handling

    def _collective(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RankFailed:
            raise
        except RuntimeError as exc:
            if not _is_comm_error(exc):
                raise  # a local error (e.g. out of memory): the caller reports it at the next check
            raise RankFailed(f"distributed pruning: rank {self.rank} lost the other ranks while {what} "
                             f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); "
                             "another rank died or did not answer within the process group's timeout") from exc

    def check(self, err: BaseException | None, what: str, fingerprint: dict | None = None) -> None:
        """Every rank calls this at the same point with its own error (or None). If any rank failed, every rank
        raises: the failing one its own error, the others a RankFailed naming the failed ranks and their errors.
        With `fingerprint` (a dict of comparable values), the ranks also check that they agree on it."""
        mine = None if err is None else f"{type(err).__name__}: {err}"
        got: list = [None] * self.world
        self._collective(what, _td().all_gather_object, got, (mine, fingerprint))
        failed = [(r, e) for r, (e, _) in enumerate(got) if e is not None]
        if failed:
            if err is not None:
                mark_reported(err)
                raise err
            raise RankFailed(f"distributed pruning: {what} failed on " + "; ".join(
                f"rank {r} ({e.splitlines()[0][:400]})" for r, e in failed))
        if fingerprint is not None:
            ref = got[0][1]
            bad = sorted({k for _, fp in got[1:] for k in set(ref) | set(fp) if ref.get(k) != fp.get(k)})
            if bad:
                detail = "; ".join(f"{k}: " + ", ".join(f"rank {r} {_short(got[r][1].get(k))}"
                                                       for r in range(self.world)) for k in bad)
                raise PipelineError(f"distributed pruning: the ranks were started with different arguments ({detail}); "
                                    "every rank must prune the same model with the same options and calibration data")

    # ------------------------------------------------------------------ data

    def prepare_sum(self, numel: int) -> None:
        """Allocate the buffers of sum_in_rank_order_ for tensors of up to `numel` elements (before the check that
        precedes the exchange: see SLICE)."""
        n = max(1, min(int(numel), self.SLICE))
        if self._bufs is None or self._bufs[0].numel() < n:
            self._bufs = None
            self._bufs = (torch.empty(n, dtype=torch.float64, device=self.comm_device),
                          torch.empty(n, dtype=torch.float64, device=self.comm_device))

    def sum_in_rank_order_(self, t: torch.Tensor, count: int) -> int:
        """In place: `t` (float64, contiguous) becomes the sum over ranks of every rank's `t`, added in rank order
        (((t_0 + t_1) + t_2) ..., identical on every rank), slice by slice; returns the sum of `count`."""
        td = _td()
        self.prepare_sum(t.numel())
        total_buf, recv_buf = self._bufs
        flat = t.view(-1)
        for s0 in range(0, flat.numel(), total_buf.numel()):
            part = flat[s0:s0 + total_buf.numel()]
            total, recv = total_buf[:part.numel()], recv_buf[:part.numel()]
            for r in range(self.world):
                if r == self.rank:
                    recv.copy_(part)
                self._collective("adding the statistics", td.broadcast, recv, src=r)
                if r == 0:
                    total.copy_(recv)  # = 0 + t_0, exactly
                else:
                    total.add_(recv)
            part.copy_(total)
        n = torch.tensor([count], dtype=torch.int64, device=self.comm_device)
        self._collective("adding the statistics", td.all_reduce, n)
        return int(n.item())

    def broadcast_(self, t: torch.Tensor, src: int) -> None:
        """Overwrite `t` on every rank with rank `src`'s (in place; same shape and dtype everywhere)."""
        td = _td()
        if t.device == self.comm_device and t.is_contiguous():
            self._collective("sharing the pruned weights", td.broadcast, t, src=src)
            return
        buf = t.detach().to(self.comm_device).contiguous()
        self._collective("sharing the pruned weights", td.broadcast, buf, src=src)
        with torch.no_grad():
            t.copy_(buf)

    def broadcast_object(self, obj: Any, src: int) -> Any:
        box = [obj if self.rank == src else None]
        self._collective("sharing the pruning reports", _td().broadcast_object_list, box, src=src)
        return box[0]

    # ------------------------------------------------------------------ plans

    def deal(self, costs: Sequence[float]) -> list[int]:
        """The rank that prunes each item: longest first, each to the least-loaded rank (ties: the lower rank).
        Deterministic, so every rank computes the same plan without communicating."""
        loads = [0.0] * self.world
        owners = [0] * len(costs)
        for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
            r = min(range(self.world), key=lambda r: (loads[r], r))
            owners[k] = r
            loads[r] += costs[k]
        return owners

    def batch_range(self, nbatches: int, rank: int) -> tuple[int, int]:
        """Rank `rank`'s contiguous range [first, end) of the calibration batches."""
        return rank * nbatches // self.world, (rank + 1) * nbatches // self.world


def _is_comm_error(exc: BaseException) -> bool:
    """Whether a RuntimeError raised by a collective means the group is broken (a peer gone, a timeout), rather than
    a local failure such as running out of memory."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    dist_error = getattr(_td(), "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return any(k in text for k in ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer", "closed"))


def mark_reported(exc: BaseException) -> None:
    """Mark an error as already reported to the other ranks (a later step must not report it again)."""
    try:
        exc._sparsekern_reported_to_ranks = True
    except AttributeError:
        pass


def was_reported(exc: BaseException) -> bool:
    return isinstance(exc, RankFailed) or getattr(exc, "_sparsekern_reported_to_ranks", False)


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 120 else s[:117] + "..."


def tensor_digest(t: torch.Tensor) -> str:
    """A digest of a tensor's dtype, shape and up to 4096 evenly spaced elements (cheap on a large weight; tells
    different checkpoints of one architecture apart)."""
    h = hashlib.sha256(f"{t.dtype} {tuple(t.shape)}".encode())
    if t.device.type != "meta" and t.numel():
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step][:4096].to("cpu")
        sample = sample.to(torch.float64 if sample.is_floating_point() else torch.int64).contiguous()
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def model_digest(model: torch.nn.Module) -> str:
    """A digest of the model's class and state-dict entries (names, shapes, dtypes, sampled values)."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor_digest(t).encode())
    return h.hexdigest()[:16]
