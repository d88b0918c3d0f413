"""`sparsekern bench gemm | overhead | prune`: argument parsing and output for the benchmarks.

`add_commands(subparsers)` is called by sparsekern.cli. Bad input (a malformed shape, an unknown preset, dtype or
contender) is reported by argparse as "argument --shapes: ..." with the rule, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import shapes as shp
from .contenders import CONTENDERS, parse_contenders


def _arg_type(parse):
    """Wrap a parse function so argparse reports its ValueError as the argument's error."""

    def conv(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    conv.__name__ = parse.__name__  # argparse names the type in some messages
    return conv


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"{text!r} is not a positive integer")
    return int(text)


def _nonneg_int(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"{text!r} is not a non-negative integer")
    return int(text)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not v > 0:
        raise ValueError(f"{text!r} must be > 0")
    return v


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _no_gpu(command: str, device: str) -> bool:
    """Print the error and return True when --device cuda was asked for on a machine without a visible GPU."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print(f"sparsekern bench {command}: error: --device cuda, but torch sees no CUDA GPU "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}); use --device cpu",
              file=sys.stderr)
        return True
    return False


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where to run (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", type=_arg_type(shp.parse_dtypes), default=None, metavar="LIST",
                   help=f"comma-separated dtypes from {', '.join(shp.DTYPES)} (default: bf16 on cuda, fp32,bf16 on cpu)")
    p.add_argument("--contenders", type=_arg_type(parse_contenders), default=None, metavar="LIST",
                   help=f"comma-separated subset of: {', '.join(CONTENDERS)}")
    p.add_argument("--seed", type=_arg_type(_nonneg_int), default=0)
    p.add_argument("--out", metavar="DIR", help="write JSON + CSV (+ PNG for gemm) into DIR")


def add_commands(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: gemm, overhead, prune, generate",
                                  description="sparsekern benchmarks (docs/benchmarks.md)")
    bsub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bsub.required = True

    g = bsub.add_parser(
        "gemm", help="GEMM shapes: dense vs PyTorch 2:4 vs sparsekern, over M and dtypes",
        description="y = x @ W^T with a 2:4 W [N, K] and x [M, K]: every contender side by side. Shapes from "
                    f"--preset ({', '.join(shp.PRESETS)}) and/or --shapes; M from --m (default: the sweep "
                    f"{','.join(map(str, shp.M_SWEEP))}).")
    _add_common(g)
    g.add_argument("--preset", type=_arg_type(shp.parse_presets), default=None, metavar="LIST",
                   help=f"comma-separated model presets: {', '.join(shp.PRESETS)} (default llama3-8b unless --shapes)")
    g.add_argument("--shapes", type=_arg_type(shp.parse_shapes), default=None, metavar="LIST",
                   help="comma-separated MxNxK (fixed M) or NxK (M from --m), e.g. 16x4096x4096,11008x4096")
    g.add_argument("--m", dest="m_list", type=_arg_type(shp.parse_m_list), default=None, metavar="LIST",
                   help="M values for NxK and preset shapes, e.g. 1,16,256 (default: the full sweep)")
    g.add_argument("--m-max", type=_arg_type(_positive_int), default=None, help="drop sweep values above this M")
    g.add_argument("--warmup", type=_arg_type(_nonneg_int), default=10)
    g.add_argument("--iters", type=_arg_type(_positive_int), default=100, help="timed calls per point, at most")
    g.add_argument("--min-iters", type=_arg_type(_positive_int), default=None,
                   help="timed calls per point, at least, even past --max-seconds (default 10 on cuda, 3 on cpu)")
    g.add_argument("--max-seconds", type=_arg_type(_positive_float), default=0.5,
                   help="bound on measured work per (contender, point); fewer than --iters calls when reached")
    g.add_argument("--rotate", type=_arg_type(_positive_int), default=4, help="x buffers cycled through")
    g.add_argument("--threads", type=_arg_type(_positive_int), default=None, help="CPU: torch.set_num_threads")
    g.add_argument("--no-flush-l2", action="store_true",
                   help="do not flush the last-level cache (GPU L2, CPU L3) before each timed call")
    g.add_argument("--no-interleave", action="store_true",
                   help="CPU: time each contender's calls in one block instead of alternating rounds")
    g.add_argument("--no-check", action="store_true", help="skip the per-point correctness check")
    g.add_argument("--no-plot", action="store_true", help="with --out: do not write the PNG")
    g.add_argument("--policy", metavar="PATH",
                   help="also write the measured policy table to PATH (e.g. the file SparseLinear reads)")
    g.set_defaults(func=run_gemm_command)

    o = bsub.add_parser(
        "overhead", help="per-call host overhead at tiny shapes, eager and CUDA-graph",
        description="Per-call time of sparsekern vs torch._cslt_sparse_mm at shapes where host time dominates "
                    "(eager, host-only, CUDA-graph replay). Needs a GPU; on the CPU every record is skipped.")
    _add_common(o)
    o.add_argument("--shapes", type=_arg_type(shp.parse_shapes), default=None, metavar="LIST",
                   help="comma-separated MxNxK (default 16x256x256,1x256x256,16x4096x4096,256x4096x4096)")
    o.add_argument("--calls", type=_arg_type(_positive_int), default=200, help="calls per repetition / graph")
    o.add_argument("--reps", type=_arg_type(_positive_int), default=15, help="repetitions (median reported)")
    o.set_defaults(func=run_overhead_command)

    _add_prune(bsub)

    from . import generate

    gen = bsub.add_parser("generate", help="end-to-end generation: dense vs 2:4 vs 2:4 int8 tokens/s (prefill, "
                                           "decode), memory, greedy-token agreement")
    generate.add_arguments(gen)
    gen.set_defaults(func=generate.run)


def _add_prune(bsub) -> None:
    """`bench prune` comes from the pruning area's sparsekern/bench/prune.py (add_arguments, run), imported here
    only when present; a broken or missing module does not take `bench gemm` down with it."""
    try:
        mod = importlib.import_module("sparsekern.bench.prune")
        add_arguments, run = mod.add_arguments, mod.run
    except Exception as e:  # noqa: BLE001 - any failure of that module only disables `bench prune`
        why = f"{type(e).__name__}: {e}"
        p = bsub.add_parser("prune", help="pruning benchmark (not available in this checkout)")
        p.set_defaults(func=lambda args: _unavailable(why))
        return
    p = bsub.add_parser("prune", help="pruning benchmark (magnitude / Wanda / SparseGPT kernels)")
    add_arguments(p)
    p.set_defaults(func=run)


def _unavailable(why: str) -> int:
    print(f"sparsekern bench prune is not available: sparsekern.bench.prune could not be loaded ({why})",
          file=sys.stderr)
    return 2


def _validate_if_possible(doc: dict) -> None:
    from . import validate

    try:
        validate(doc)
    except ImportError:
        print("note: jsonschema not installed; the JSON was not validated against schema.json", file=sys.stderr)


def _with_sigterm_stop(fn, exc_type):
    """Run fn() with SIGTERM raising exc_type, so `timeout` (bench/gpu_validate.sh) stops a sweep and the points
    measured so far are still written. Only the main thread may install handlers; elsewhere fn runs as is."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return fn()

    def _raise(signum, frame):
        raise exc_type()

    old = signal.signal(signal.SIGTERM, _raise)
    try:
        return fn()
    finally:
        signal.signal(signal.SIGTERM, old)


def _check_outputs(command: str, args) -> bool:
    """--out (a folder, created or reused) and --policy (a file) can be written: checked before measuring, so a
    typo does not cost the whole sweep. Prints the error and returns False when not."""
    from .._fsutil import FileRefused, check_output_path

    try:
        if getattr(args, "out", None) is not None:
            out = check_output_path(args.out, what="--out", overwrite=True, kind="dir")
            if out.exists() and not out.is_dir():
                raise FileRefused(f"--out {out} is a file; results are written into a folder")
        if getattr(args, "policy", None):
            check_output_path(args.policy, what="--policy", overwrite=True, kind="file")
    except FileRefused as e:
        print(f"sparsekern bench {command}: error: {e}", file=sys.stderr)
        return False
    return True


def run_gemm_command(args) -> int:
    from . import gemm, report

    if not _check_outputs("gemm", args):
        return 2
    device = args.device or _default_device()
    if _no_gpu("gemm", device):
        return 2
    is_cuda = device == "cuda"
    dtypes = args.dtype or (["bf16"] if is_cuda else ["fp32", "bf16"])
    shapes = []
    presets = args.preset if args.preset is not None else ([] if args.shapes else ["llama3-8b"])
    for name in presets:
        shapes += shp.preset_shapes(name)
    shapes += args.shapes or []
    m_list = args.m_list or list(shp.M_SWEEP)
    if args.m_max is not None:
        m_list = [m for m in m_list if m <= args.m_max]
        if not m_list:
            print(f"sparsekern bench gemm: error: --m-max {args.m_max} leaves no M value", file=sys.stderr)
            return 2
    cfg = gemm.GemmConfig(
        shapes=shapes, dtypes=dtypes, device=device, m_list=m_list, contenders=args.contenders,
        warmup=args.warmup, iters=args.iters,
        min_iters=args.min_iters if args.min_iters is not None else (10 if is_cuda else 3),
        max_seconds=args.max_seconds,
        rotate=args.rotate, flush_l2=not args.no_flush_l2, interleave=not args.no_interleave,
        check=not args.no_check, threads=args.threads,
        seed=args.seed)
    doc = _with_sigterm_stop(lambda: gemm.run_gemm(cfg), gemm.Interrupted)
    print(report.text_table(report.GEMM_COLUMNS, report.gemm_rows(doc["records"])))
    _validate_if_possible(doc)
    if args.out:
        paths = gemm.write_outputs(doc, args.out, log=lambda s: print(s, file=sys.stderr), plot=not args.no_plot)
        print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    if args.policy:
        entries = gemm.policy_entries(doc["records"])
        how = gemm.write_policy(entries, args.policy)
        print(f"policy table: {len(entries)} entries to {args.policy} (via {how})", file=sys.stderr)
    if doc["config"].get("interrupted"):
        print("sparsekern bench gemm: interrupted (SIGTERM); the files hold the points measured before it",
              file=sys.stderr)
        return 3
    bad = [r for r in doc["records"] if r["status"] in ("error", "wrong")]
    for r in bad[:10]:
        print(f"{r['status'].upper()}: {r['contender']} {r['dtype']} {r['shape']} M={r['m']}: {r['reason']}",
              file=sys.stderr)
    return 1 if bad else 0


def run_overhead_command(args) -> int:
    from . import overhead, report

    if not _check_outputs("overhead", args):
        return 2
    device = args.device or _default_device()
    if _no_gpu("overhead", device):
        return 2
    cfg = overhead.OverheadConfig(device=device, calls=args.calls, reps=args.reps, seed=args.seed)
    if args.shapes:
        for s in args.shapes:
            if s.m is None:
                print(f"sparsekern bench overhead: error: argument --shapes: {s.n}x{s.k} needs a fixed M (MxNxK)",
                      file=sys.stderr)
                return 2
        cfg.shapes = args.shapes
    if args.dtype:
        cfg.dtypes = args.dtype
    if args.contenders:
        cfg.contenders = args.contenders
    doc = overhead.run_overhead(cfg)
    print(report.text_table(overhead.OVERHEAD_COLUMNS, overhead.overhead_rows(doc["records"])))
    _validate_if_possible(doc)
    if args.out:
        import json
        import os

        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "overhead.json")
        with open(path, "w") as f:
            json.dump(doc, f, indent=1)
        report.write_csv(doc["records"], os.path.join(args.out, "overhead.csv"))
        print(f"wrote {path}", file=sys.stderr)
    bad = [r for r in doc["records"] if r["status"] in ("error", "wrong")]
    return 1 if bad else 0
