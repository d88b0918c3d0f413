"""Memory of `AutoModelForCausalLM.from_pretrained` on a sparsekern 2:4 checkpoint, next to the same model's dense
checkpoint: each load runs in a fresh process (peak RSS is per process), with `import sparsekern` done first.

    python bench/hf_load_memory.py --sparse DIR [--dense DIR] [--json]
    python bench/hf_load_memory.py --prepare OUT   # writes OUT/dense and OUT/sparse24 from the bundled model
                                                   # (magnitude 2:4), then measures both

Per load: RSS after the imports (base), the peak RSS during from_pretrained (VmHWM), RSS after it, RSS after
one forward pass of 64 tokens (every weight page touched), the load time, the number of SparseLinear layers. The
increase over base is what the load cost; file-backed pages of the memory-mapped checkpoint count in RSS while they
are mapped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) // 1024
    return out


def measure(path: str) -> dict:
    import torch
    import transformers

    import sparsekern  # noqa: F401  (registers the loader)

    base = _status()
    t = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    load_s = time.perf_counter() - t
    peak = _status()["VmHWM"]  # this process's own high-water mark (ru_maxrss would include a parent's, after fork)
    after = _status()
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    fwd = _status()
    return {"path": path, "base_mb": base["VmRSS"], "peak_mb": peak, "peak_increase_mb": peak - base["VmRSS"],
            "after_mb": after["VmRSS"], "after_anon_increase_mb": after["RssAnon"] - base["RssAnon"],
            "after_forward_mb": fwd["VmRSS"], "after_forward_increase_mb": fwd["VmRSS"] - base["VmRSS"],
            "load_s": round(load_s, 2),
            "sparse_layers": sum(type(m).__name__ == "SparseLinear" for m in model.modules()),
            "checkpoint_mb": round(sum(p.stat().st_size for p in Path(path).glob("*.safetensors")) / 2**20, 1)}


def _in_subprocess(path: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "--measure", path], capture_output=True, text=True, check=False,
                       env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    if r.returncode != 0:
        raise SystemExit(f"measuring {path} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def prepare(out: Path) -> tuple[str, str]:
    import sparsekern
    from sparsekern import data

    model, tok = data.load_model("bundled")
    sparsekern.prune_model(model, method="magnitude", progress=False)
    model.save_pretrained(out / "dense")
    sparsekern.sparsify(model)
    model.save_pretrained(out / "sparse24")
    return str(out / "dense"), str(out / "sparse24")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparse")
    ap.add_argument("--dense")
    ap.add_argument("--prepare", type=Path)
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    if args.prepare:
        args.dense, args.sparse = prepare(args.prepare)
    if not args.sparse and not args.dense:
        ap.error("give --sparse DIR, --dense DIR or --prepare OUT")
    result = {}
    for kind in ("dense", "sparse"):
        if getattr(args, kind):
            result[kind] = _in_subprocess(getattr(args, kind))
    if args.json:
        print(json.dumps(result))
    else:
        for kind, r in result.items():
            print(f"{kind:6s} checkpoint {r['checkpoint_mb']:7.1f} MB  load {r['load_s']:5.2f} s  peak +"
                  f"{r['peak_increase_mb']} MB  after load +{r['after_mb'] - r['base_mb']} MB  after a forward +"
                  f"{r['after_forward_increase_mb']} MB  SparseLinear {r['sparse_layers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
