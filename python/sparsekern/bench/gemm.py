"""`sparsekern bench gemm`: y = x @ W^T with a 2:4 W, every contender side by side, over shapes x M x dtypes.

One record per (contender, shape, M, dtype): the median time (see timing.py for the method), TFLOP/s counted as
the *dense-equivalent* 2*M*N*K for every contender (so the column compares directly: a 2:4 kernel that halves the
time shows twice the TFLOP/s), GB/s of the bytes the call must move at least (x + the weight in the contender's
own storage + y), and the speedups over `dense` and over `torch_cslt` measured in the same run. Each contender's
output is checked once per point against a float64 reference of the same values; a wrong result is recorded as
status "wrong" with its error instead of a time.

Output: a table on stdout, and with `out_dir` gemm.json (validated by schema.json), gemm.csv, gemm.png and
policy.json (the measured best SparseLinear kernel per (arch, dtype, N, K, M), see policy_entries).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
from typing import Callable, Iterable

import torch

from . import environment, report
from .contenders import (
    CONTENDERS,
    TOLERANCE,
    Contender,
    Inputs,
    Skip,
    dtype_name,
    forget_cslt_searches,
    make_inputs,
    make_problem,
    max_rel_error,
    reference_output,
)
from .shapes import M_SWEEP, Shape
from .timing import cpu_cache_flusher, time_cpu_interleaved, time_device

SCHEMA_VERSION = 1


class Interrupted(BaseException):
    """Raised (from a SIGTERM handler the CLI installs) to stop a run early and keep what was measured.

    A BaseException so that the per-contender `except Exception` blocks do not swallow it."""

# Default contender lists per device (those that cannot run there are still recorded as skipped when asked for).
DEFAULT_CONTENDERS = {
    "cuda": ["dense", "dense_int8", "dense_fp8", "torch_cslt", "torch_semi", "torch_semi_cutlass", "sk_cslt",
             "sk_spmm24", "sk_decompress", "sk_linear", "sk_linear_search"],
    "cpu": ["dense", "dense_int8", "dense_fp8", "sk_spmm24", "sk_decompress", "sk_linear", "sk_linear_cache"],
}


@dataclasses.dataclass
class GemmConfig:
    shapes: list[Shape]
    dtypes: list[str]
    device: str = "cpu"
    m_list: list[int] = dataclasses.field(default_factory=lambda: list(M_SWEEP))
    contenders: list[str] | None = None  # None: DEFAULT_CONTENDERS[device type]
    warmup: int = 10
    iters: int = 100
    min_iters: int = 10
    max_seconds: float = 0.5  # per (contender, point): a bound on measured work
    rotate: int = 4  # x buffers cycled through
    flush_l2: bool = True  # flush the last-level cache (GPU L2, CPU L3) before every timed call
    check: bool = True
    threads: int | None = None  # CPU: torch.set_num_threads
    interleave: bool = True  # CPU: time the contenders of a point in alternating rounds (shared machines)
    seed: int = 0

    def contender_names(self) -> list[str]:
        return self.contenders or DEFAULT_CONTENDERS[torch.device(self.device).type]


def _record(c: Contender, shape: Shape, m: int, dtype: str, device: str, arch: str, **kw) -> dict:
    rec = {
        "contender": c.name,
        "library": "sparsekern" if c.ours else "torch",
        "sparse": c.sparse,
        "shape": shape.label,
        "model": shape.model,
        "layers": shape.layers,
        "m": m,
        "n": shape.n,
        "k": shape.k,
        "dtype": dtype,
        "compute_dtype": None,
        "out_dtype": None,
        "device": torch.device(device).type,
        "arch": arch,
        "status": "ok",
        "reason": None,
        "median_us": None,
        "p10_us": None,
        "p90_us": None,
        "min_us": None,
        "iters": None,
        "host_us": None,
        "tflops": None,
        "gbps": None,
        "weight_bytes": None,
        "speedup_vs_dense": None,
        "speedup_vs_torch_cslt": None,
        "max_rel_err": None,
        "tolerance": None,
    }
    rec.update(kw)
    return rec


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:300]}" if not isinstance(e, Skip) else msg


def add_derived(records: list[dict]) -> None:
    """Fill speedup_vs_dense / speedup_vs_torch_cslt from the ok records of the same (shape, M, dtype)."""
    base: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r["status"] == "ok" and r["contender"] in ("dense", "torch_cslt"):
            base.setdefault((r["shape"], r["m"], r["dtype"]), {})[r["contender"]] = r["median_us"]
    for r in records:
        if r["status"] != "ok":
            continue
        b = base.get((r["shape"], r["m"], r["dtype"]), {})
        r["speedup_vs_dense"] = b["dense"] / r["median_us"] if "dense" in b else None
        r["speedup_vs_torch_cslt"] = b["torch_cslt"] / r["median_us"] if "torch_cslt" in b else None


def _m_values(shape: Shape, m_list: list[int]) -> list[int]:
    return [shape.m] if shape.m is not None else list(m_list)


def _check_point(prep, problem, bufs: list[Inputs], ref, m: int, base: dict) -> tuple[dict, list | None]:
    """Adapt the inputs and check the output once; returns (record fields, args to time) — args None when the
    result is wrong (then the fields say so and the point is not timed)."""
    args = [prep.adapt(b) for b in bufs]
    fields = dict(base, compute_dtype=prep.compute_dtype, out_dtype=dtype_name(prep.out_dtype),
                  weight_bytes=prep.weight_bytes)
    if ref is not None:
        y = prep.finish(prep.call(args[0]), m)
        tol = TOLERANCE.get(y.dtype, 1e-2)
        if tuple(y.shape) != (m, problem.n):
            return dict(fields, status="wrong",
                        reason=f"output shape {tuple(y.shape)}, expected {(m, problem.n)}"), None
        err = max_rel_error(y, ref)
        fields.update(max_rel_err=err, tolerance=tol)
        if not err <= tol:  # also catches NaN
            return dict(fields, status="wrong", reason=f"max |y - ref| / max |ref| = {err:.3g} > {tol:g}"), None
    return fields, args


def _with_stats(fields: dict, stats, prep, problem, bufs: list[Inputs], args: list, m: int) -> dict:
    n, k = problem.n, problem.k
    x_el = args[0].element_size() if isinstance(args[0], torch.Tensor) else bufs[0].x.element_size()
    x_bytes = m * k * x_el
    y_bytes = m * n * torch.empty((), dtype=prep.out_dtype).element_size()
    sec = stats.median_us * 1e-6
    fields = dict(fields, **stats.as_dict())
    fields.update(tflops=2.0 * m * n * k / sec / 1e12, gbps=(x_bytes + prep.weight_bytes + y_bytes) / sec / 1e9)
    return fields


def _caller(prep, args: list) -> Callable[[int], object]:
    n_args = len(args)
    return lambda i: prep.call(args[i % n_args])


def _measure_point(
    c: Contender, prep, problem, bufs: list[Inputs], ref, m: int, cfg: GemmConfig, base: dict
) -> dict:
    """Check, then time one contender at one point on its own; returns the record's fields."""
    fields, args = _check_point(prep, problem, bufs, ref, m, base)
    if args is None:
        return fields
    stats = time_device(cfg.device, _caller(prep, args), warmup=cfg.warmup, iters=cfg.iters,
                        min_iters=cfg.min_iters, max_seconds=cfg.max_seconds, flush_l2=cfg.flush_l2)
    return _with_stats(fields, stats, prep, problem, bufs, args, m)


def _failed(c: Contender, base: dict, e: BaseException) -> dict:
    status = "error" if (c.ours and not isinstance(e, Skip)) else "skipped"
    return dict(base, status=status, reason=_reason(e))


def _measure_point_interleaved(prepared: dict, problem, bufs, ref, m: int, cfg: GemmConfig,
                               bases: dict) -> dict[str, dict]:
    """CPU: check every contender, then time them together in alternating rounds (timing.time_cpu_interleaved),
    so that the load of a shared machine falls on all of them alike. Returns name -> record fields."""
    out: dict[str, dict] = {}
    timed: dict[str, tuple[dict, list]] = {}
    for name, prep in prepared.items():
        try:
            fields, args = _check_point(prep, problem, bufs, ref, m, bases[name])
        except Exception as e:  # noqa: BLE001
            out[name] = _failed(CONTENDERS[name], bases[name], e)
            continue
        if args is None:
            out[name] = fields
        else:
            timed[name] = (fields, args)
    if timed:
        fns = {name: _caller(prepared[name], args) for name, (_, args) in timed.items()}
        try:
            stats = time_cpu_interleaved(fns, warmup=cfg.warmup, iters=cfg.iters, min_iters=cfg.min_iters,
                                         max_seconds=cfg.max_seconds, seed=cfg.seed,
                                         flush=cpu_cache_flusher() if cfg.flush_l2 else None)
        except Exception:  # noqa: BLE001 - one contender failed mid-timing: time each alone to say which
            stats = {}
            for name, (fields, args) in timed.items():
                try:
                    stats[name] = time_device(cfg.device, fns[name], warmup=cfg.warmup, iters=cfg.iters,
                                              min_iters=cfg.min_iters, max_seconds=cfg.max_seconds)
                except Exception as e:  # noqa: BLE001
                    out[name] = _failed(CONTENDERS[name], bases[name], e)
        for name, st in stats.items():
            fields, args = timed[name]
            out[name] = _with_stats(fields, st, prepared[name], problem, bufs, args, m)
    return {name: out[name] for name in prepared if name in out}


def run_gemm(cfg: GemmConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """Run the benchmark; returns the JSON document (see schema.json). cfg.threads applies for the run only: the
    caller's intra-op thread count is restored afterwards (it is process state other code depends on)."""
    before = torch.get_num_threads()
    try:
        return _run_gemm(cfg, log)
    finally:
        torch.set_num_threads(before)


def _run_gemm(cfg: GemmConfig, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    device = cfg.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is visible to torch")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    names = cfg.contender_names()
    env = environment.capture(device)
    arch = env["arch"]
    log(f"policy table in use: {env['policy_table']}")
    records: list[dict] = []
    gen = torch.Generator(device=device)
    interrupted = False
    try:
        _run_points(cfg, names, arch, gen, records, log)
    except Interrupted:
        interrupted = True
        log("interrupted: keeping the points measured so far")
    # Report order: dtype, shape and M as given, contenders in the order asked for.
    order = {n: i for i, n in enumerate(names)}
    labels = {s.label: i for i, s in enumerate(cfg.shapes)}
    records.sort(key=lambda r: (cfg.dtypes.index(r["dtype"]), labels[r["shape"]], r["m"], order[r["contender"]]))
    add_derived(records)
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "gemm",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "env": env,
        "config": {
            "device": device,
            "dtypes": cfg.dtypes,
            "m_list": cfg.m_list,
            "contenders": names,
            "warmup": cfg.warmup,
            "iters": cfg.iters,
            "min_iters": cfg.min_iters,
            "max_seconds": cfg.max_seconds,
            "rotate": cfg.rotate,
            "flush_l2": cfg.flush_l2,
            "check": cfg.check,
            "threads": torch.get_num_threads() if torch.device(device).type == "cpu" else None,
            "interleave": cfg.interleave and torch.device(device).type == "cpu",
            "seed": cfg.seed,
            "interrupted": interrupted,
        },
        "records": records,
    }


def _run_points(cfg: GemmConfig, names: list[str], arch: str, gen: torch.Generator, records: list[dict],
                log: Callable[[str], None]) -> None:
    device = cfg.device
    for dt in cfg.dtypes:
        for shape in cfg.shapes:
            gen.manual_seed(cfg.seed)
            problem = make_problem(dt, shape.n, shape.k, device, gen)
            ms = _m_values(shape, cfg.m_list)
            prepared = {}
            for name in names:
                c = CONTENDERS[name]
                if not c.applies_to(dt):
                    continue
                try:
                    prepared[name] = c.prepare(problem)
                except Exception as e:  # noqa: BLE001 - every failure is recorded, never fatal
                    status = "error" if (c.ours and not isinstance(e, (Skip, ImportError))) else "skipped"
                    for m in ms:
                        records.append(_record(c, shape, m, dt, device, arch, status=status, reason=_reason(e)))
                    log(f"[{dt} {shape.label}] {name}: {status}: {_reason(e)}")
            for m in ms:
                if "sk_linear_search" in prepared:
                    forget_cslt_searches()  # the default-algorithm contenders must not inherit a search result
                bufs = [make_inputs(problem, m, gen) for _ in range(max(cfg.rotate, 1))]
                ref = reference_output(problem, bufs[0]) if cfg.check else None
                bases = {name: _record(CONTENDERS[name], shape, m, dt, device, arch) for name in prepared}
                recs: dict[str, dict] = {}
                try:
                    if cfg.interleave and torch.device(device).type == "cpu":
                        recs = _measure_point_interleaved(prepared, problem, bufs, ref, m, cfg, bases)
                    else:
                        for name, prep in prepared.items():
                            try:
                                recs[name] = _measure_point(CONTENDERS[name], prep, problem, bufs, ref, m, cfg,
                                                            bases[name])
                            except Exception as e:  # noqa: BLE001
                                recs[name] = _failed(CONTENDERS[name], bases[name], e)
                finally:  # also on Interrupted: keep the contenders measured before it
                    for name, rec in recs.items():
                        records.append(rec)
                        if rec["status"] == "ok":
                            log(f"[{dt} {shape.label} M={m}] {name}: {rec['median_us']:.1f} us")
                        else:
                            log(f"[{dt} {shape.label} M={m}] {name}: {rec['status']}: {rec['reason']}")
                del bufs, ref
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
            del prepared, problem


# -------------------------------------------------------------------------------------------- policy table

# Contender -> kernel name in sparsekern.policy's table: the kernels SparseLinear dispatches between.
POLICY_KERNELS = {"sk_cslt": "cslt", "sk_spmm24": "spmm24", "sk_decompress": "dense_fallback"}
# Benchmark dtype -> the weight dtype name the policy table is keyed by (str(torch dtype) without "torch.").
POLICY_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "int8", "fp8": "float8_e4m3fn"}


def policy_arch(arch: str) -> str:
    """The policy table keys CPUs as plain "cpu" (the layer does not know the SIMD level); GPUs as "sm90"."""
    return "cpu" if arch.startswith("cpu") else arch


def policy_entries(records: Iterable[dict]) -> list[dict]:
    """The measured best kernel per (arch, dtype, N, K, M), in sparsekern.policy's entry format.

    Entry: {"arch", "dtype", "n", "k", "m", "kernel", "timings_us"[, "kernel_dense_cache"]}; m is the measured M
    (the table buckets it to the next power of two); kernel is the fastest of the SparseLinear kernels measured
    there (POLICY_KERNELS); timings_us holds every measured kernel's median and "dense_linear" (F.linear on a dense
    weight). On CPUs, where a layer may keep a dense copy (SparseLinear(dense_cache=True)), "kernel_dense_cache" is
    "dense_cached" where that dense F.linear beats every kernel (layers with the copy take it; others keep "kernel").
    """
    by_point: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r["status"] != "ok" or r["contender"] not in (*POLICY_KERNELS, "dense"):
            continue
        key = (policy_arch(r["arch"]), POLICY_DTYPES[r["dtype"]], r["n"], r["k"], r["m"])
        kernel = POLICY_KERNELS.get(r["contender"], "dense_linear")
        by_point.setdefault(key, {})[kernel] = r["median_us"]
    entries = []
    for (arch, dt, n, k, m), timings in sorted(by_point.items()):
        sparse = {kn: us for kn, us in timings.items() if kn != "dense_linear"}
        if not sparse:
            continue
        best = min(sparse, key=sparse.get)
        e = {"arch": arch, "dtype": dt, "n": n, "k": k, "m": m, "kernel": best,
             "timings_us": dict(sorted(timings.items()))}
        dense_us = timings.get("dense_linear")
        if arch == "cpu" and dense_us is not None and dt in ("float32", "float16", "bfloat16") \
                and dense_us < sparse[best]:
            e["kernel_dense_cache"] = "dense_cached"
        entries.append(e)
    return entries


def write_policy(entries: list[dict], path: str) -> str:
    """Write the policy table through sparsekern.policy.write_table (merging into an existing file); where that
    module is missing, the same format ({"format": "sparsekern-policy", "version": 1, "entries": [...]}) directly.
    Returns how it was written."""
    try:
        from .. import policy  # owned by the SparseLinear area
    except ImportError:
        policy = None
    writer = getattr(policy, "write_table", None)
    if writer is not None:
        writer(entries, path)
        return "sparsekern.policy.write_table"
    with open(path, "w") as f:
        json.dump({"format": "sparsekern-policy", "version": 1, "entries": entries}, f, indent=1)
    return "json"


# -------------------------------------------------------------------------------------------------- output


def write_outputs(doc: dict, out_dir: str, log: Callable[[str], None] = print, plot: bool = True) -> dict:
    """gemm.json, gemm.csv, policy.json and (matplotlib permitting) gemm.png under out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "gemm.json"), "csv": os.path.join(out_dir, "gemm.csv")}
    with open(paths["json"], "w") as f:
        json.dump(doc, f, indent=1)
    report.write_csv(doc["records"], paths["csv"])
    entries = policy_entries(doc["records"])
    if entries:
        paths["policy"] = os.path.join(out_dir, "policy.json")
        how = write_policy(entries, paths["policy"])
        log(f"policy table ({len(entries)} entries, via {how}): {paths['policy']}")
    if plot:
        from . import plot as plot_mod

        png = os.path.join(out_dir, "gemm.png")
        try:
            plot_mod.plot_speedup(doc["records"], png, title=f"{doc['env'].get('device_name', '')}")
            paths["png"] = png
        except plot_mod.PlotUnavailable as e:
            log(f"plot skipped: {e}")
    return paths
