"""The timing discipline shared by every sparsekern benchmark.

GPU (`time_cuda`):
  * Warm-up calls first: plan caches, algorithm searches, lazy CUDA init and GPU clock ramp-up all happen there.
  * Every timed call is bracketed by its own pair of CUDA events and the *median* over calls is reported (robust to
    the odd preemption or clock dip; p10/p90 show the spread).
  * Before each timed call L2 is flushed by *reading* a buffer of twice the L2 size (a sum, outside the events),
    and the input rotates over several x buffers. Reading, not writing: zeroing the buffer (the usual recipe) would
    leave L2 full of dirty lines whose write-back to HBM then runs during the timed call, charging tens of MB of
    extra traffic to exactly the memory-bound decode kernels this is meant to measure fairly. At decode sizes the whole cost of a layer is streaming its weight from
    HBM; a weight or activation left in L2 by the previous call would flatter exactly the cases that matter.
  * While the host queues a batch of calls, the stream is held by a device-side spin (`torch.cuda._sleep`) sized
    from the measured host cost per call. The events then measure device time only, never a gap where the GPU
    waited for a slow host: a contender with 100 us of host setup per call is not charged for it here (host cost
    is measured separately, in the same pass as `host_us`, and on its own by overhead.py).
CPU (`time_cpu`): `time.perf_counter` around every call, the same warm-up, median and input rotation, and the
same cache discipline: before each timed call (outside the timing) a buffer of twice the last-level cache is
read (`cpu_cache_flusher`; read, not written, for the write-back reason given above). A 2:4 bf16 weight of 11008x4096 is 50 MB; with a 32 MB L3 a good part of it
survives from one call to the next unless something else ran in between, which made a contender's time depend
on which contender ran before it (up to 2x at M = 1). In a model, every layer's weight is read once per token with
the other layers' weights in between: cold caches are the case that matters.
`time_cpu_interleaved` times several contenders of one point in rounds of one call each, in a shuffled order, so
that the varying load of a shared machine falls on all of them alike (the GEMM benchmark's default on the CPU).

Both take `fn(i)`, a callable that runs the operation on input buffer `i % n_buffers` (the caller owns rotation),
and return `Stats` in microseconds. The number of timed calls adapts: at most `iters`, at least `min_iters`, and no
more than about `max_seconds` of measured work per point, so a sweep over 8192-row GEMMs stays bounded.
"""

from __future__ import annotations

import dataclasses
import os
import random
import statistics
import time
from typing import Callable

import torch

Clock = Callable[[], float]


@dataclasses.dataclass(frozen=True)
class Stats:
    """Per-call times of one measured point, in microseconds."""

    median_us: float
    p10_us: float
    p90_us: float
    min_us: float
    iters: int
    host_us: float | None = None  # GPU only: host (CPU) time to enqueue one call, median

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of an ascending list (q in [0, 1])."""
    if not sorted_values:
        raise ValueError("no samples")
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_us: list[float], host_us: float | None = None) -> Stats:
    """Stats of per-call samples (microseconds)."""
    s = sorted(samples_us)
    return Stats(
        median_us=statistics.median(s),
        p10_us=_quantile(s, 0.1),
        p90_us=_quantile(s, 0.9),
        min_us=s[0],
        iters=len(s),
        host_us=host_us,
    )


def _check_counts(warmup: int, iters: int, min_iters: int, max_seconds: float) -> None:
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if iters < 1 or min_iters < 1:
        raise ValueError(f"iters and min_iters must be >= 1, got iters={iters}, min_iters={min_iters}")
    if max_seconds <= 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")


def _planned_iters(per_call_s: float, iters: int, min_iters: int, max_seconds: float) -> int:
    """Timed calls for a point: about max_seconds of work, clamped to [min(min_iters, iters), iters]."""
    if per_call_s <= 0:
        return iters
    return max(min(min_iters, iters), min(iters, int(max_seconds / per_call_s)))


def llc_bytes(default: int = 32 << 20) -> int:
    """Size of the CPU's largest cache (Linux sysfs), `default` where it cannot be read."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip().upper()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            digits = text.rstrip("KMG")
            if digits.isdigit():
                best = max(best, int(digits) * mult)
    except OSError:
        pass
    return best or default


_CPU_FLUSH: list[torch.Tensor] = []


def cpu_cache_flusher() -> Callable[[], object]:
    """A callable that reads a buffer of 2x the last-level cache (at least 64 MiB), evicting the last call's data
    with clean lines. The buffer holds ones, not zeros: untouched zero pages may all map to one shared page."""
    if not _CPU_FLUSH:
        _CPU_FLUSH.append(torch.ones(max(2 * llc_bytes(), 64 << 20) // 4, dtype=torch.int32))
    buf = _CPU_FLUSH[0]
    return lambda: buf.sum()


def time_cpu(
    fn: Callable[[int], object],
    *,
    warmup: int = 3,
    iters: int = 50,
    min_iters: int = 5,
    max_seconds: float = 1.0,
    clock: Clock = time.perf_counter,
    flush: Callable[[], object] | None = None,
) -> Stats:
    """Median wall time of `fn(i)` on the CPU, i = 0, 1, 2, ... (the caller maps i to an input buffer).

    Warm-up stops early once it has used max_seconds / 2 (at least one call is always made when warmup > 0).
    """
    _check_counts(warmup, iters, min_iters, max_seconds)
    i = 0
    per_call = 0.0
    start = clock()
    for _ in range(warmup):
        t0 = clock()
        fn(i)
        per_call = clock() - t0  # the last warm call is the best estimate of a steady call
        i += 1
        if clock() - start > max_seconds / 2:
            break
    n = _planned_iters(per_call, iters, min_iters, max_seconds)
    samples = []
    for _ in range(n):
        if flush is not None:
            flush()
        t0 = clock()
        fn(i)
        samples.append((clock() - t0) * 1e6)
        i += 1
    return summarize(samples)


def time_cpu_interleaved(
    fns: dict[str, Callable[[int], object]],
    *,
    warmup: int = 3,
    iters: int = 50,
    min_iters: int = 5,
    max_seconds: float = 1.0,
    clock: Clock = time.perf_counter,
    seed: int = 0,
    flush: Callable[[], object] | None = None,
) -> dict[str, Stats]:
    """time_cpu for several contenders of one point, in alternating rounds: each round times one call of each, in
    a freshly shuffled order (seeded: reproducible). On a machine shared with other work the load changes over
    seconds; timing A's 50 calls and then B's 50 would charge a load burst to one of them only, interleaving spreads
    it over all. The order is shuffled rather than rotated because a rotation keeps every contender's predecessor
    fixed, and a predecessor that streams hundreds of MB (decompress-and-GEMM) slows whichever call comes next.

    Each fn gets its own call index (0, 1, 2, ...) as in time_cpu. Rounds stop after `iters`, or once the work
    measured exceeds max_seconds per contender and at least min_iters rounds ran.
    """
    _check_counts(warmup, iters, min_iters, max_seconds)
    names = list(fns)
    idx = dict.fromkeys(names, 0)
    for name in names:  # warm-up, each bounded like time_cpu's
        t_name = clock()
        for _ in range(warmup):
            fns[name](idx[name])
            idx[name] += 1
            if clock() - t_name > max_seconds / 2:
                break
    samples: dict[str, list[float]] = {n: [] for n in names}
    spent = 0.0
    rng = random.Random(seed)
    for r in range(iters):
        if r >= min(min_iters, iters) and spent > max_seconds * len(names):
            break
        order = names[:]
        rng.shuffle(order)
        for name in order:
            if flush is not None:
                flush()
            t0 = clock()
            fns[name](idx[name])
            dt = clock() - t0
            idx[name] += 1
            samples[name].append(dt * 1e6)
            spent += dt
    return {n: summarize(samples[n]) for n in names}


# ----------------------------------------------------------------------------------------------------- CUDA

_SLEEP_CYCLES_PER_US: dict[int, float] = {}


def _sleep_cycles_per_us(device: int) -> float:
    """Calibrate torch.cuda._sleep (a spin of N GPU clock cycles) once per device."""
    if device not in _SLEEP_CYCLES_PER_US:
        cycles = 2_000_000
        torch.cuda._sleep(cycles)  # first call loads the kernel
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        _SLEEP_CYCLES_PER_US[device] = cycles / max(start.elapsed_time(end) * 1e3, 1.0)
    return _SLEEP_CYCLES_PER_US[device]


_FLUSH: dict[int, torch.Tensor] = {}


def l2_flush_buffer(device: int) -> torch.Tensor:
    """An int32 buffer of 2x the device's L2 size (at least 64 MiB); reading it (.sum()) evicts what the last call
    left in L2."""
    if device not in _FLUSH:
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0)
        _FLUSH[device] = torch.ones(max(2 * l2, 64 << 20) // 4, dtype=torch.int32, device=f"cuda:{device}")
    return _FLUSH[device]


def time_cuda(
    fn: Callable[[int], object],
    *,
    warmup: int = 10,
    iters: int = 100,
    min_iters: int = 10,
    max_seconds: float = 0.5,
    flush_l2: bool = True,
    batch: int = 32,
    clock: Clock = time.perf_counter,
) -> Stats:
    """Median device time of `fn(i)` on the current CUDA device (see the module docstring for the method).

    `batch` timed calls are queued behind one device spin; 32 keeps the launch queue (about 1000 entries) far
    from full even for contenders that launch several kernels per call.
    """
    _check_counts(warmup, iters, min_iters, max_seconds)
    dev = torch.cuda.current_device()
    flush = l2_flush_buffer(dev) if flush_l2 else None
    i = 0
    # Warm-up, also measuring the host enqueue time per call (no sync in between: the GPU runs behind).
    torch.cuda.synchronize()
    host = []
    t_start = clock()
    for _ in range(warmup):
        t0 = clock()
        fn(i)
        host.append(clock() - t0)
        i += 1
        if clock() - t_start > max_seconds / 2:
            break
    torch.cuda.synchronize()
    warm_wall = (clock() - t_start) / max(len(host), 1)
    host_est = statistics.median(host) if host else 1e-4
    n = _planned_iters(warm_wall, iters, min_iters, max_seconds)
    cycles_per_us = _sleep_cycles_per_us(dev)

    samples: list[float] = []
    host_samples: list[float] = []
    while len(samples) < n:
        b = min(batch, n - len(samples))
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(b)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(b)]
        # Hold the stream long enough for the host to queue the whole batch (1.5x margin + flush launches),
        # capped at 200 ms: beyond that the device work itself keeps the queue ahead of the host.
        spin_us = min(200_000.0, b * (host_est * 1e6 + 10.0) * 1.5 + 50.0)
        torch.cuda._sleep(int(spin_us * cycles_per_us))
        for j in range(b):
            if flush is not None:
                flush.sum()
            starts[j].record()
            t0 = clock()
            fn(i)
            host_samples.append(clock() - t0)
            ends[j].record()
            i += 1
        torch.cuda.synchronize()
        samples.extend(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))
        host_est = statistics.median(host_samples)
    return summarize(samples, host_us=statistics.median(host_samples) * 1e6)


def time_device(device: str, fn: Callable[[int], object], **kw) -> Stats:
    """time_cuda for a CUDA device, time_cpu otherwise; CUDA-only keywords are dropped on the CPU."""
    if torch.device(device).type == "cuda":
        return time_cuda(fn, **kw)
    flush = kw.pop("flush_l2", False)
    kw.pop("batch", None)
    return time_cpu(fn, flush=cpu_cache_flusher() if flush else None, **kw)
