"""`sparsekern bench overhead`: per-call cost at tiny shapes, where host time dominates the GPU work.

PyTorch's `torch._cslt_sparse_mm` rebuilds cuSPARSELt descriptors and a plan on every call; sparsekern caches them
per shape, so a steady-state call should cost little more than cusparseLtMatmul itself. Three numbers per
(contender, shape, dtype), each the median over repetitions:

  eager   back-to-back calls, wall time per call (host and device overlap: this is max(host, device) per call,
          what a decode step pays when the layer runs eagerly);
  host    host time to issue one call while the GPU is held busy by a device spin (pure CPU-side cost);
  graph   the same calls captured in one CUDA graph and replayed, device time per call (CUDA events): the floor
          without any host work. Contenders that cannot be captured are recorded as skipped with the reason.

overhead_us (on eager records) = eager - graph of the same contender: the host cost a call adds on top of its
device work. For sk_cslt this bounds "host overhead above a bare cusparseLtMatmul" from above (the graph floor has
no host cost at all, not even cusparseLtMatmul's own).

On the CPU there is nothing to measure (no launch path); every record is "skipped" with that reason.
"""

from __future__ import annotations

import dataclasses
import datetime
import statistics
import sys
import time
from typing import Callable

import torch

from . import environment
from .contenders import CONTENDERS, Skip, make_inputs, make_problem
from .gemm import SCHEMA_VERSION, _reason
from .shapes import Shape, parse_shapes

DEFAULT_SHAPES = "16x256x256,1x256x256,16x4096x4096,256x4096x4096"
DEFAULT_CONTENDERS = ["dense", "torch_cslt", "sk_cslt", "sk_linear"]
MODES = ("eager", "host", "graph")


@dataclasses.dataclass
class OverheadConfig:
    shapes: list[Shape] = dataclasses.field(default_factory=lambda: parse_shapes(DEFAULT_SHAPES))
    dtypes: list[str] = dataclasses.field(default_factory=lambda: ["bf16"])
    device: str = "cuda"
    contenders: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_CONTENDERS))
    calls: int = 200  # calls per repetition (eager, host) and per captured graph
    reps: int = 15
    rotate: int = 4
    seed: int = 0


def _eager(call, args, calls: int, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for j in range(calls):
            call(args[j % len(args)])
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / calls * 1e6)
    return out


def _host(call, args, calls: int, reps: int) -> list[float]:
    from .timing import _sleep_cycles_per_us

    cyc = _sleep_cycles_per_us(torch.cuda.current_device())
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        torch.cuda._sleep(int(cyc * min(200_000, calls * 500)))  # 500 µs of device spin per queued call, at most
        samples = []
        for j in range(calls):
            t0 = time.perf_counter()
            call(args[j % len(args)])
            samples.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
        out.append(statistics.median(samples))
    return out


def _graph(call, args, calls: int, reps: int) -> list[float]:
    # Warm up on a side stream (as torch.cuda.graphs requires), then capture `calls` calls into one graph.
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for j in range(3):
            call(args[j % len(args)])
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for j in range(calls):
            call(args[j % len(args)])
    g.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) * 1e3 / calls)
    return out


_MEASURE: dict[str, Callable] = {"eager": _eager, "host": _host, "graph": _graph}


def _record(name: str, shape: Shape, dt: str, mode: str, device: str, arch: str, **kw) -> dict:
    c = CONTENDERS[name]
    rec = {"contender": name, "library": "sparsekern" if c.ours else "torch", "mode": mode, "m": shape.m,
           "n": shape.n, "k": shape.k, "dtype": dt, "device": torch.device(device).type, "arch": arch,
           "status": "ok", "reason": None, "median_us": None, "p10_us": None, "p90_us": None, "iters": None,
           "host_us": None, "overhead_us": None, "speedup_vs_torch_cslt": None}
    rec.update(kw)
    return rec


def _add_derived(records: list[dict]) -> None:
    by = {(r["contender"], r["m"], r["n"], r["k"], r["dtype"], r["mode"]): r for r in records if r["status"] == "ok"}
    for r in records:
        if r["status"] != "ok":
            continue
        key = (r["m"], r["n"], r["k"], r["dtype"])
        ref = by.get(("torch_cslt", *key, r["mode"]))
        if ref is not None and r["mode"] != "host":
            r["speedup_vs_torch_cslt"] = ref["median_us"] / r["median_us"]
        if r["mode"] == "eager":
            host = by.get((r["contender"], *key, "host"))
            graph = by.get((r["contender"], *key, "graph"))
            r["host_us"] = host["median_us"] if host else None
            r["overhead_us"] = r["median_us"] - graph["median_us"] if graph else None


def run_overhead(cfg: OverheadConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    device = cfg.device
    for s in cfg.shapes:
        if s.m is None:
            raise ValueError(f"overhead shapes need a fixed M (MxNxK), got {s.n}x{s.k}")
    env = environment.capture(device)
    arch = env["arch"]
    records: list[dict] = []
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is visible to torch")
    gen = torch.Generator(device=device)
    for dt in cfg.dtypes:
        for shape in cfg.shapes:
            if not on_cuda:
                for name in cfg.contenders:
                    for mode in MODES:
                        records.append(_record(name, shape, dt, mode, device, arch, status="skipped",
                                               reason="the host-overhead benchmark measures CUDA launch paths; "
                                                      "nothing to measure on the CPU"))
                continue
            gen.manual_seed(cfg.seed)
            problem = make_problem(dt, shape.n, shape.k, device, gen)
            bufs = [make_inputs(problem, shape.m, gen) for _ in range(max(cfg.rotate, 1))]
            for name in cfg.contenders:
                c = CONTENDERS[name]
                try:
                    prep = c.prepare(problem)
                    args = [prep.adapt(b) for b in bufs]
                except Exception as e:  # noqa: BLE001 - recorded, never fatal
                    status = "error" if (c.ours and not isinstance(e, (Skip, ImportError))) else "skipped"
                    for mode in MODES:
                        records.append(_record(name, shape, dt, mode, device, arch, status=status,
                                               reason=_reason(e)))
                    log(f"[{dt} {shape.m}x{shape.n}x{shape.k}] {name}: {status}: {_reason(e)}")
                    continue
                for mode in MODES:
                    try:
                        samples = _MEASURE[mode](prep.call, args, cfg.calls, cfg.reps)
                        s = sorted(samples)
                        rec = _record(name, shape, dt, mode, device, arch, median_us=statistics.median(s),
                                      p10_us=s[len(s) // 10], p90_us=s[(len(s) * 9) // 10], iters=len(s))
                        log(f"[{dt} {shape.m}x{shape.n}x{shape.k}] {name} {mode}: {rec['median_us']:.2f} us/call")
                    except Exception as e:  # noqa: BLE001
                        # A failure (capture included) of a PyTorch path is its limit; of ours, a bug: sparsekern's
                        # steady-state calls are meant to be CUDA-graph capturable.
                        status = "error" if c.ours else "skipped"
                        rec = _record(name, shape, dt, mode, device, arch, status=status, reason=_reason(e))
                        log(f"[{dt} {shape.m}x{shape.n}x{shape.k}] {name} {mode}: {status}: {_reason(e)}")
                        torch.cuda.synchronize()
                    records.append(rec)
    _add_derived(records)
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "overhead",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "env": env,
        "config": {"device": device, "dtypes": cfg.dtypes, "contenders": cfg.contenders, "calls": cfg.calls,
                   "reps": cfg.reps, "rotate": cfg.rotate, "seed": cfg.seed},
        "records": records,
    }


def overhead_rows(records: list[dict]) -> list[tuple[str, ...]]:
    f = lambda v, s=".2f": "-" if v is None else format(v, s)  # noqa: E731
    return [(r["dtype"], f"{r['m']}x{r['n']}x{r['k']}", r["contender"], r["mode"], r["status"], f(r["median_us"]),
             f(r["overhead_us"]), f(r["speedup_vs_torch_cslt"])) for r in records]


OVERHEAD_COLUMNS = ("dtype", "MxNxK", "contender", "mode", "status", "µs/call", "overhead µs", "×torch_cslt")
