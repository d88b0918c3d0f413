"""First-use calibration of CPU SparseLinear kernels: never slower than dense where no table says otherwise.

Why: which CPU kernel is fastest for a (dtype, N, K, M) depends on the CPU far more than on the shape. On the Intel
Xeon development VM (AMX), oneDNN's dense bfloat16 GEMM is 10x faster than any AVX-512 2:4 kernel at M >= 128,
while at M = 1 the 2:4 kernel is 2x faster than dense; on the AMD EPYC the crossovers sat elsewhere. No built-in
table can be right for every CPU, so a CPU layer measures, once, the shapes nobody measured for it.

When a CPU SparseLinear runs eagerly (not under torch.compile), with no kernel forced (set_kernel / override), and
the policy table in use has no entry for its exact (arch "cpu", dtype, N, K, M bucket), it times its candidates on
the input it was given, before computing its output:
  spmm24          the CPU 2:4 kernel (its own family choice: rows / pairs / tokens / amx)
  dense_fallback  the weight decompressed panel by panel and a dense GEMM (no dense copy kept)
  dense           F.linear on a dense copy of the weight: the speed of "dense_cached", which only a layer that keeps
                  a dense copy (SparseLinear(dense_cache=True)) may run; unquantised layers only
Calls are interleaved round by round (one of each candidate per round, the first round untimed), at most
ROUNDS timed rounds, and no more rounds once BUDGET_S has passed (at least one timed round always runs). The
per-candidate minimum decides:
  kernel              dense_fallback if it is more than MARGIN faster than spmm24, else spmm24 (the 2:4 kernel
                      allocates nothing weight-sized; a tie goes to it)
  kernel_dense_cache  dense_cached if dense is more than MARGIN faster than `kernel`, else `kernel`
The entry (with its timings_us) is added to the table in use and written to its file: the table's own file, else
the default file (~/.cache/sparsekern/policy.json or $SPARSEKERN_POLICY_TABLE) -- so a later process starts from
the measured choice. A table set in memory (policy.set_table(PolicyTable)) is updated in memory only. A file that
cannot be written is reported once (RuntimeWarning) and the choice kept for the process.

Bounds: each (dtype, N, K, bucket) is calibrated at most once per process (even if it failed); a process spends at
most PROCESS_BUDGET_S in calibration, after which uncovered shapes get the built-in defaults
(sparsekern.policy.default_kernel). SPARSEKERN_CPU_CALIBRATE=0 turns calibration off (defaults or the table only:
deterministic kernel choice, e.g. for bit-reproducible runs); `stats()` reports what was calibrated and the time
spent. The test suite runs with it off except in tests/test_calibrate.py.

Caveat (documented, not hidden): a calibration measures the machine as it is at that moment; on a loaded machine it
may pick a kernel that is not the best on a quiet one. Delete the table file (or run `sparsekern bench gemm
--policy PATH` on a quiet machine) to measure again.
"""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping

from . import envs, policy

ROUNDS = 3  # timed rounds at most (after one untimed round)
BUDGET_S = 0.02  # per (dtype, N, K, bucket): no new round once this much time has passed
PROCESS_BUDGET_S = 5.0  # per process, all calibrations together
MARGIN = 0.03  # a dense candidate must win by more than this fraction to be chosen

_lock = threading.RLock()


@dataclass
class _Stats:
    seconds: float = 0.0
    calibrated: list[dict] = field(default_factory=list)
    attempted: set = field(default_factory=set)
    write_warned: bool = False


_stats = _Stats()


def enabled() -> bool:
    """Whether first-use calibration is on (SPARSEKERN_CPU_CALIBRATE, default on) and the process budget is left."""
    return bool(envs.get("SPARSEKERN_CPU_CALIBRATE")) and _stats.seconds < PROCESS_BUDGET_S


def stats() -> dict:
    """What this process calibrated: {"seconds": total time, "entries": [...], "budget_s": PROCESS_BUDGET_S}."""
    return {"seconds": _stats.seconds, "entries": [dict(e) for e in _stats.calibrated], "budget_s": PROCESS_BUDGET_S}


def reset() -> None:
    """Forget this process's calibrations and time spent (tests)."""
    with _lock:
        _stats.seconds = 0.0
        _stats.calibrated.clear()
        _stats.attempted.clear()
        _stats.write_warned = False


def wanted(dtype: str, n: int, k: int, m: int) -> bool:
    """Whether a CPU layer of this dtype and shape should calibrate before running m rows (cheap: dict lookups)."""
    if not enabled():
        return False
    key = (dtype, int(n), int(k), policy.m_bucket(m))
    if key in _stats.attempted:
        return False
    return not policy.active_table().has_entry("cpu", dtype, n, k, m)


def _time_round(fns: Mapping[str, Callable[[], object]], best: dict[str, float], timed: bool) -> None:
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        if timed:
            best[name] = min(best.get(name, float("inf")), dt)


def decide(timings: Mapping[str, float], *, margin: float = MARGIN) -> tuple[str, str | None]:
    """(kernel, kernel_dense_cache) from per-candidate times (seconds or any unit), by the rule in the module doc.
    kernel_dense_cache is None when "dense" was not timed."""
    kernel = "spmm24"
    if "dense_fallback" in timings and timings["dense_fallback"] < (1 - margin) * timings["spmm24"]:
        kernel = "dense_fallback"
    cached = None
    if "dense" in timings:
        cached = "dense_cached" if timings["dense"] < (1 - margin) * timings[kernel] else kernel
    return kernel, cached


def calibrate(dtype: str, n: int, k: int, m: int, candidates: Mapping[str, Callable[[], object]]) -> dict | None:
    """Time `candidates` (name -> a call computing the layer's output for this input: "spmm24" and
    "dense_fallback", optionally "dense") and record the decision for (cpu, dtype, n, k, bucket of m) in the policy
    table in use. Returns the recorded entry, or None when calibration does not apply (off, done, budget spent)."""
    with _lock:
        key = (dtype, int(n), int(k), policy.m_bucket(m))
        if not wanted(dtype, n, k, m):
            return None
        _stats.attempted.add(key)
        t_start = time.perf_counter()
        best: dict[str, float] = {}
        try:
            _time_round(candidates, best, timed=False)  # warm-up: first-touch allocations, lazy inits
            for _ in range(ROUNDS):
                _time_round(candidates, best, timed=True)
                if time.perf_counter() - t_start >= BUDGET_S:
                    break
        finally:
            _stats.seconds += time.perf_counter() - t_start
        kernel, cached = decide(best)
        entry = {"arch": "cpu", "dtype": dtype, "n": int(n), "k": int(k), "m": key[3], "kernel": kernel,
                 "timings_us": {name: round(t * 1e6, 2) for name, t in best.items()}}
        if cached is not None:
            entry["kernel_dense_cache"] = cached
        _stats.calibrated.append(dict(entry, measured_m=int(m)))
        problem = policy.record_entries([entry])
        if problem and not _stats.write_warned:
            _stats.write_warned = True
            warnings.warn(f"sparsekern: calibrated CPU kernel choices are kept for this process only: {problem}",
                          RuntimeWarning, stacklevel=3)
        return entry
