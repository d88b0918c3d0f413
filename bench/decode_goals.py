"""The decode kernel's goals (issue 22), from a `sparsekern bench gemm` run at M = 1..16, on the GPU that ran it.

    python -m sparsekern bench gemm --device cuda --preset llama3-8b,llama3-70b --m 1,2,4,8,16 --dtype bf16,int8 \\
        --contenders dense,torch_cslt,sk_cslt,sk_spmm24 --out DIR --policy DIR/policy.json
    python bench/decode_goals.py --gemm DIR/gemm.json --out DIR/goals.json      # measures the copy bandwidth too
    ncu --kernel-name regex:skinny24 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section Occupancy python bench/decode_goals.py --profile-one             # one M = 1 call, for the profile

Goals (same run, ratios of medians; sk_spmm24 on CUDA at M <= 16 is the decode kernel, csrc/cuda/spmm_24_skinny.cu):
  m1_8b_vs_dense       M = 1, bf16, every Llama-3-8B shape: dense cuBLAS / sk_spmm24 >= 1.5 (bound ~1.78)
  never_below_dense    bf16, every shape, M = 1..16: dense / sk_spmm24 >= 1.0
  m1_bandwidth         M = 1, bf16, every shape: achieved bytes/s (weight + x + y) >= 75 % of the device copy
                       bandwidth measured here (a 1 GiB device-to-device copy: read + write bytes / time)
  m1_int8_vs_dense     M = 1, every Llama-3-8B shape: dense bf16 / sk_spmm24 int8 (W8A8) >= 2.5
Each goal lists every point with its ratio; "met" only when every point meets it (no point: "not measured").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

LLAMA3_8B = {(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)}


def copy_bandwidth_gbps(reps: int = 10) -> float:
    import torch

    n = 1 << 29  # 1 GiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9


def _ok(records, **want):
    return [r for r in records if r["status"] == "ok" and all(r[k] == v for k, v in want.items())]


def _find(records, contender, shape, m, dtype):
    hit = _ok(records, contender=contender, shape=shape, m=m, dtype=dtype)
    return hit[0] if hit else None


def goals(doc: dict, copy_gbps: float | None) -> dict:
    recs = doc["records"]
    out: dict = {"copy_gbps": copy_gbps, "goals": {}}

    def goal(name, threshold, points):
        ratios = [p["ratio"] for p in points]
        out["goals"][name] = {"threshold": threshold, "points": points,
                              "min": min(ratios) if ratios else None,
                              "met": (all(r >= threshold for r in ratios) if ratios else None)}

    sparse = _ok(recs, contender="sk_spmm24")
    pts = []
    for r in sparse:
        d = _find(recs, "dense", r["shape"], r["m"], "bf16")
        if r["dtype"] == "bf16" and d:
            pts.append({"shape": r["shape"], "n": r["n"], "k": r["k"], "m": r["m"],
                        "dense_us": d["median_us"], "sk_spmm24_us": r["median_us"],
                        "ratio": d["median_us"] / r["median_us"]})
    goal("m1_8b_vs_dense", 1.5, [p for p in pts if p["m"] == 1 and (p["n"], p["k"]) in LLAMA3_8B])
    goal("never_below_dense", 1.0, [p for p in pts if p["m"] <= 16])
    bw = []
    if copy_gbps:
        for r in sparse:
            if r["dtype"] == "bf16" and r["m"] == 1 and r.get("gbps"):
                bw.append({"shape": r["shape"], "n": r["n"], "k": r["k"], "m": 1, "gbps": r["gbps"],
                           "ratio": r["gbps"] / copy_gbps})
    goal("m1_bandwidth", 0.75, bw)
    i8 = []
    for r in sparse:
        d = _find(recs, "dense", r["shape"], r["m"], "bf16")
        if r["dtype"] == "int8" and r["m"] == 1 and d and (r["n"], r["k"]) in LLAMA3_8B:
            i8.append({"shape": r["shape"], "n": r["n"], "k": r["k"], "m": 1, "dense_bf16_us": d["median_us"],
                       "sk_spmm24_int8_us": r["median_us"], "ratio": d["median_us"] / r["median_us"]})
    goal("m1_int8_vs_dense", 2.5, i8)
    return out


def profile_one() -> None:
    """One decode call (Llama-3-8B gate projection, M = 1, bf16) after a warm-up, for ncu --launch-count 1."""
    import torch

    import sparsekern  # noqa: F401
    from sparsekern.ops import core

    n, k = 14336, 4096
    w, _ = core.prune_nm(torch.randn(n, k, device="cuda", dtype=torch.bfloat16), 2, 4)
    values, codes = core.compress_24(w)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    core.spmm_24(x, values, codes)
    torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gemm", help="gemm.json of the bench gemm run")
    p.add_argument("--out", help="write goals.json here (and goals.md beside it)")
    p.add_argument("--no-copy", action="store_true", help="do not measure the copy bandwidth (no GPU)")
    p.add_argument("--profile-one", action="store_true", help="run one M = 1 call and exit (for ncu)")
    args = p.parse_args()
    if args.profile_one:
        profile_one()
        return 0
    if not args.gemm:
        p.error("--gemm is required (or --profile-one)")
    doc = json.loads(Path(args.gemm).read_text())
    res = goals(doc, None if args.no_copy else copy_bandwidth_gbps())
    res["source"] = str(args.gemm)
    lines = ["| goal | threshold | min ratio | met | points |", "|---|---|---|---|---|"]
    for name, g in res["goals"].items():
        mn = "-" if g["min"] is None else f"{g['min']:.2f}"
        lines.append(f"| {name} | {g['threshold']} | {mn} | {g['met']} | {len(g['points'])} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
        Path(args.out).with_suffix(".md").write_text(f"copy bandwidth: {res['copy_gbps']} GB/s\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
