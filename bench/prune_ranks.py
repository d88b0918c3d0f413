"""Wall time of `sparsekern prune` on 1 process vs N torchrun ranks, side by side in one invocation.

    PYTHONPATH=python python bench/prune_ranks.py --ranks 1 2 --threads 1 --json        # the bundled model
    PYTHONPATH=python python bench/prune_ranks.py --model DIR --low-memory --ranks 1 2 4 --threads 4

Each configuration runs `python -m torch.distributed.run --nproc-per-node N -m sparsekern prune ... --json` in a
fresh process tree with OMP_NUM_THREADS=--threads per rank (torchrun's own default for N > 1 is 1), plus, with
--plain, one ordinary `sparsekern prune` (no torchrun) on all cores. Reports per run: wall seconds of the command,
the report's prune seconds (rank 0), how the calibration sequences and linears were split, and whether the
output checkpoint's tensors equal the first run's (they must: the ranks sum statistics in a fixed order).
Run on a quiet machine: other processes on the cores slow the ranks unevenly.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _digest(folder: Path) -> str:
    """sha256 over the output checkpoint's tensors (names, dtypes, shapes, bytes) in name order."""
    import hashlib

    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(f))
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].contiguous()
        h.update(f"{key} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def _run(args, nproc: int | None, threads: int | None, out: Path) -> dict:
    prune = ["prune", "--model", args.model, "--method", args.method, "--pattern", "2:4", "--nsamples",
             str(args.nsamples), "--seqlen", str(args.seqlen), "--batch-size", str(args.batch_size), "--out", str(out),
             "--json"] + (["--low-memory"] if args.low_memory else [])
    if nproc is None:
        cmd = [sys.executable, "-m", "sparsekern", *prune]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(_port()), "-m", "sparsekern", *prune]
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    doc = json.loads(proc.stdout)
    rep = doc["report"]
    return {"launcher": "plain" if nproc is None else "torchrun", "ranks": nproc or 1,
            "threads_per_rank": threads, "wall_s": round(wall, 2), "prune_s": round(doc["seconds"]["prune"], 2),
            "world_size": doc["world_size"],
            "split": [{"rank": r["rank"], "samples": r["samples"], "linears": len(r["linears"])}
                      for r in rep["ranks"]]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled")
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank (default 1)")
    p.add_argument("--plain", action="store_true", help="also one plain `sparsekern prune` with default threads")
    p.add_argument("--low-memory", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = ([(None, None)] if args.plain else []) + [(n, args.threads) for n in args.ranks]
        for k, (nproc, threads) in enumerate(configs):
            out = Path(tmp) / f"out{k}"
            row = _run(args, nproc, threads, out)
            row["output_sha256"] = _digest(out)
            rows.append(row)
            print(f"{row['launcher']:>8} ranks {row['ranks']} x {threads or 'default'} thread(s): wall "
                  f"{row['wall_s']:.1f} s, prune {row['prune_s']:.1f} s, output {row['output_sha256']}",
                  file=sys.stderr, flush=True)
    base = next((r for r in rows if r["launcher"] == "torchrun" and r["ranks"] == 1), rows[0])
    for r in rows:
        # equal thread counts per process give identical outputs for any number of ranks (pipeline/sums.py)
        r["identical_to_1_rank"] = r["output_sha256"] == base["output_sha256"]
        r["speedup_vs_1_rank_wall"] = round(base["wall_s"] / r["wall_s"], 2)
        r["speedup_vs_1_rank_prune"] = round(base["prune_s"] / r["prune_s"], 2)
    result = {"model": args.model, "method": args.method, "nsamples": args.nsamples, "seqlen": args.seqlen,
              "batch_size": args.batch_size, "low_memory": args.low_memory, "cpu_count": os.cpu_count(), "runs": rows}
    if args.json:
        print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
