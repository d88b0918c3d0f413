"""`sparsekern bench prune` (also `python bench/prune_bench.py`): per-layer pruning time of sparsekern's fused
kernels against plain-PyTorch implementations that follow the reference implementations' loop structure
(SparseGPT's Python loop over every column of every block; Wanda's Python loop over groups with topk + scatter),
written here from ../shared/ALGORITHMS.md. Both run in the same process on the same inputs, measured alternately
(ours, reference, ours, ...) so that the load of a shared machine hits both alike; medians are reported.

Inputs: W = randn * 0.02 [rows, cols] float32; calibration statistics from 2048 synthetic tokens with a few outlier
features (H = 2/N X^T X, s = mean x^2). SparseGPT is timed with the Hessian given (the statistics are not part of
the per-layer time), blocksize 128, percdamp 0.01, on both sides.

Memory pages (`--thp`): every call of either side writes fresh outputs of tens of MiB, and on a VM faulting them in
4 KiB pages can cost more than the work itself. Both sides get the same page policy, chosen for the whole process:
`both` (default) puts every large CPU tensor of both sides on transparent huge pages (PyTorch's own allocator
switch THP_MEM_ALLOC_ENABLE=1, which covers the reference's tensors and sparsekern's outputs alike), `none` keeps
4 KiB pages on both sides (THP_MEM_ALLOC_ENABLE=0 and SPARSEKERN_NO_HUGEPAGE_HINT=1, which turns off the hint the
Wanda kernel gives its outputs). Both variables are read once per process, so the benchmark runs in a child
process started with them unless this process was. Neither side reuses buffers across calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from .. import envs

DEFAULT_SHAPES = "4096x4096,11008x4096,4096x11008"
# Targets of issue 6 on the 2-core development CPU (speed-up over the reference structure, same process).
CPU_TARGETS = {("sparsegpt", "2:4", "4096x4096"): 2.5, ("wanda", "2:4", "4096x4096"): 20.0}


# ---------------------------------------------------------------- reference-structured implementations


def reference_wanda(W: torch.Tensor, s: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The Wanda repo's N:M path: metric, then a Python loop over columns with topk + scatter per group."""
    W = W.clone()
    metric = torch.abs(W) * torch.sqrt(s.reshape((1, -1)))
    mask = torch.zeros_like(metric) == 1
    for ii in range(metric.shape[1]):
        if ii % m == 0:
            tmp = metric[:, ii : ii + m].float()
            mask.scatter_(1, ii + torch.topk(tmp, n, dim=1, largest=False)[1], True)
    W[mask] = 0
    return W


def reference_sparsegpt(W: torch.Tensor, H: torch.Tensor, n: int, m: int, blocksize=128, percdamp=0.01):
    """SparseGPT's fasterprune for N:M (ALGORITHMS.md): three factorisations, then per block a Python loop over
    its columns with ~10 small tensor ops each, then the trailing GEMM."""
    W = W.clone().float()
    H = H.clone()
    cols = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(cols, device=W.device)
    H[diag, diag] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    losses = torch.zeros(W.shape[0], device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        mask1 = torch.zeros_like(W1) == 1
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if i % m == 0:
                tmp = W1[:, i : i + m] ** 2 / (torch.diag(Hinv1)[i : i + m].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            Losses1[:, i] = (w - q) ** 2 / d**2
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W, losses


# ---------------------------------------------------------------- inputs and timing


def _inputs(rows: int, cols: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(rows, cols, generator=g) * 0.02).to(device)
    X = torch.randn(2048, cols, generator=g)
    X[:, torch.randperm(cols, generator=g)[:4]] *= 20
    X = X.to(device)
    H = (X.t() @ X) * (2.0 / 2048)
    s = (X * X).mean(0)
    del X
    return W, H, s


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _alternate(ours, ref, device: str, repeats: int, budget_s: float):
    """Alternate ours / reference after one warm-up of each; stop after `repeats` pairs or when the pairs so far
    took `budget_s` (at least one pair). Returns the lists of seconds."""
    ours()
    ref()
    t_ours, t_ref = [], []
    start = time.perf_counter()
    while len(t_ours) < repeats and (not t_ours or time.perf_counter() - start < budget_s):
        t_ours.append(_timed(ours, device))
        t_ref.append(_timed(ref, device))
    return t_ours, t_ref


def _pattern(p: str):
    n, m = (int(v) for v in p.split(":"))
    return n, m


def bench_point(method: str, pattern: str, rows: int, cols: int, device: str, repeats: int, budget_s: float) -> dict:
    import sparsekern.prune as P

    n, m = _pattern(pattern)
    W, H, s = _inputs(rows, cols, device)
    with torch.backends.cuda.matmul.flags(allow_tf32=False) if device.startswith("cuda") else _null():
        if method == "sparsegpt":
            ours = lambda: P.sparsegpt(W, H, pattern)  # noqa: E731
            ref = lambda: reference_sparsegpt(W, H, n, m)  # noqa: E731
        elif method == "wanda":
            ours = lambda: P.wanda(W, s, pattern)  # noqa: E731
            ref = lambda: reference_wanda(W, s, n, m)  # noqa: E731
        else:
            raise ValueError(f"unknown method {method!r} (sparsegpt, wanda)")
        t_ours, t_ref = _alternate(ours, ref, device, repeats, budget_s)
    med_ours, med_ref = statistics.median(t_ours), statistics.median(t_ref)
    return {
        "method": method,
        "pattern": pattern,
        "shape": f"{rows}x{cols}",
        "device": device,
        "ours_s": med_ours,
        "reference_s": med_ref,
        "speedup": med_ref / med_ours,
        "ours_all_s": t_ours,
        "reference_all_s": t_ref,
        "target": CPU_TARGETS.get((method, pattern, f"{rows}x{cols}")) if device == "cpu" else None,
    }


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------- CLI


def _type(parse):
    """argparse type from a parser raising ValueError: the message becomes argparse's (exit 2, before any work)."""
    def conv(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    conv.__name__ = getattr(parse, "__name__", "value")
    return conv


def _parse_shapes(text: str) -> str:
    items = [t for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("empty shape list (expected e.g. 4096x4096,11008x4096)")
    for t in items:
        parts = t.strip().lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and 0 < int(p) <= 2 ** 20 for p in parts):
            raise ValueError(f"shape {t!r} is not ROWSxCOLS with both in 1..2^20 (e.g. 4096x11008)")
    return text


def _parse_methods(text: str) -> str:
    names = [m for m in text.split(",") if m]
    bad = [m for m in names if m not in ("sparsegpt", "wanda")]
    if not names or bad:
        raise ValueError(f"methods must be a non-empty comma-separated list of sparsegpt, wanda (got {text!r})")
    return text


def _parse_pattern(text: str) -> str:
    from ..prune import parse_pattern

    p = parse_pattern(text)  # ValueError names the rule
    if not p.structured:
        raise ValueError(f"pattern {text!r}: the benchmark measures N:M patterns (e.g. 2:4)")
    return text


def _parse_devices(text: str) -> str:
    if not [d for d in text.split(",") if d]:
        raise ValueError("empty device list; use cpu, cuda or cuda:N")
    for d in (d for d in text.split(",") if d):
        dev = torch.device(d) if d in ("cpu", "cuda") or d.startswith("cuda:") else None
        if dev is None:
            raise ValueError(f"device {d!r}: use cpu, cuda or cuda:N")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {d!r}: no CUDA GPU is visible")
    return text


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise ValueError(f"must be >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    v = float(text)
    if not v > 0 or v == float("inf"):
        raise ValueError(f"must be a positive number, got {text}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, type=_type(_parse_shapes),
                        help=f"comma-separated ROWSxCOLS (out_features x in_features), default {DEFAULT_SHAPES}")
    parser.add_argument("--methods", default="sparsegpt,wanda", type=_type(_parse_methods),
                        help="comma-separated: sparsegpt, wanda")
    parser.add_argument("--pattern", default="2:4", type=_type(_parse_pattern), help="n:m pattern (default 2:4)")
    parser.add_argument("--devices", default=None, type=_type(_parse_devices),
                        help="comma-separated devices (default: cpu, plus cuda when a GPU is present)")
    parser.add_argument("--repeats", type=_type(_positive_int), default=3,
                        help="alternating ours/reference pairs per point (default 3)")
    parser.add_argument("--budget", type=_type(_positive_float), default=60.0,
                        help="seconds per point after which no new pair starts (at least one pair runs; default 60)")
    parser.add_argument("--threads", type=_type(_positive_int), default=None,
                        help="torch.set_num_threads for the CPU runs")
    parser.add_argument("--thp", default="both", choices=sorted(THP_POLICIES),
                        help="page policy applied to both sides alike: both = transparent huge pages for every large "
                             "tensor of ours and the reference's (default), none = no huge-page request on either side "
                             "(the system THP mode 'always' still gives them to both; the header prints the mode)")
    parser.add_argument("--json", default=None, type=_type(_parse_json_path),
                        help="write the results to this JSON file")


def _parse_json_path(text: str) -> str:
    from .._fsutil import FileRefused, check_output_path

    try:
        check_output_path(text, what="--json", overwrite=True, kind="file")
    except FileRefused as e:
        raise ValueError(str(e)) from None
    return text


# Environment of each page policy; _THP_MARK records that a process was started with it (the variables only take
# effect when set before the process allocates, and sparsekern's is read once at load, so setting them here, in a
# running process, would change nothing). sparsekern's variables are named through its registry (sparsekern.envs).
_NO_HINT = envs.VARIABLES["SPARSEKERN_NO_HUGEPAGE_HINT"].name
_THP_MARK = envs.VARIABLES["SPARSEKERN_BENCH_PRUNE_THP"].name
THP_POLICIES = {
    "both": {"THP_MEM_ALLOC_ENABLE": "1"},
    "none": {"THP_MEM_ALLOC_ENABLE": "0", _NO_HINT: "1"},
}


def _system_thp() -> str:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), or "unknown"."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
        return text[text.index("[") + 1 : text.index("]")]
    except (OSError, ValueError):
        return "unknown"


def _argv_of(args) -> list:
    """The command line that reproduces `args` (for the child process of the page policy)."""
    argv = ["--shapes", args.shapes, "--methods", args.methods, "--pattern", args.pattern, "--repeats",
            str(args.repeats), "--budget", repr(args.budget), "--thp", args.thp]
    if args.devices:
        argv += ["--devices", args.devices]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.json:
        argv += ["--json", os.path.abspath(args.json)]
    return argv


def _run_with_policy(args) -> int:
    """Run the benchmark in a child process whose environment carries the page policy; returns its exit status."""
    env = dict(os.environ, **THP_POLICIES[args.thp])
    # both sides on huge pages: the kernel's hint may stay
    env = envs.child_env(env, **{_THP_MARK: args.thp, **({_NO_HINT: None} if args.thp == "both" else {})})
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "sparsekern.bench.prune", *_argv_of(args)]
    sys.stdout.flush()
    return subprocess.run(cmd, env=env).returncode


def run(args) -> int:
    if envs.raw(_THP_MARK) != args.thp:
        return _run_with_policy(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    results = []
    print(f"# sparsekern bench prune  torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"pattern {args.pattern}  pages: --thp {args.thp} for both sides (system THP: {_system_thp()})  "
          f"(median of alternating runs; speedup = reference / ours)")
    print(f"{'method':<10} {'shape':<11} {'device':<6} {'ours s':>9} {'ref s':>9} {'speedup':>8}  target")
    for device in devices:
        for rows, cols in shapes:
            for method in methods:
                r = bench_point(method, args.pattern, rows, cols, device, args.repeats, args.budget)
                results.append(r)
                tgt = r["target"]
                verdict = "" if tgt is None else (f">= {tgt:g}x " + ("met" if r["speedup"] >= tgt else "NOT met"))
                print(f"{method:<10} {r['shape']:<11} {device:<6} {r['ours_s']:>9.4f} {r['reference_s']:>9.4f} "
                      f"{r['speedup']:>7.1f}x  {verdict}", flush=True)
    if args.json:
        doc = {
            "benchmark": "prune",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "thp": args.thp,
            "system_thp": _system_thp(),
            "page_env": {"THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"), _NO_HINT: envs.raw(_NO_HINT)},
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "results": results,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="prune_bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
