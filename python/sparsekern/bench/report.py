"""Tables and summaries of benchmark results: console table, CSV, markdown summary, goal checks.

Command line (used by bench/gpu_validate.sh; needs no matplotlib or jsonschema):
    python -m sparsekern.bench.report summarize RESULTS_DIR [--steps steps.tsv]  > RESULTS_DIR/summary.md
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
from typing import Iterable

# ----------------------------------------------------------------------------------------------- plain tables


def _fmt(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def write_csv(records: list[dict], path: str) -> None:
    """One row per record, the JSON record's fields as columns (null -> empty)."""
    if not records:
        open(path, "w").close()
        return
    cols = list(records[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in cols})


GEMM_COLUMNS = ("dtype", "shape", "M", "contender", "status", "µs", "TFLOP/s", "GB/s", "×dense", "×torch_cslt")


def gemm_rows(records: Iterable[dict]) -> list[tuple[str, ...]]:
    rows = []
    for r in records:
        if r["status"] == "ok":
            vals = (_fmt(r["median_us"]), _fmt(r["tflops"], ".2f"), _fmt(r["gbps"], ".0f"),
                    _fmt(r["speedup_vs_dense"], ".2f"), _fmt(r["speedup_vs_torch_cslt"], ".2f"))
        else:
            vals = ("-",) * 5
        rows.append((r["dtype"], r["shape"], str(r["m"]), r["contender"], r["status"], *vals))
    return rows


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 5 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows])


def markdown_table(header: Iterable[str], rows: Iterable[Iterable[str]]) -> str:
    header = list(header)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def skipped_reasons(records: Iterable[dict]) -> dict[tuple[str, str], str]:
    """(contender, status) -> first reason, for the not-ok records (one line per contender instead of per point)."""
    out: dict[tuple[str, str], str] = {}
    for r in records:
        if r["status"] != "ok":
            out.setdefault((r["contender"], r["status"]), r.get("reason") or "")
    return out


# ------------------------------------------------------------------------------------------------- summaries


def _ok(records, **match):
    return [r for r in records if r["status"] == "ok" and all(r.get(k) == v for k, v in match.items())]


def speedup_pivot(records: list[dict], dtype: str, key: str = "speedup_vs_dense") -> str:
    """Markdown: rows (shape, M), columns = contenders with any ok record; cells = median µs and the speedup."""
    ok = _ok(records, dtype=dtype)
    contenders = [c for c in dict.fromkeys(r["contender"] for r in ok)]
    points = list(dict.fromkeys((r["shape"], r["m"]) for r in ok))
    cell = {(r["shape"], r["m"], r["contender"]): r for r in ok}
    rows = []
    for shape, m in points:
        row = [shape, str(m)]
        for c in contenders:
            r = cell.get((shape, m, c))
            row.append("" if r is None else f"{r['median_us']:.1f} ({_fmt(r[key], '.2f')}×)")
        rows.append(row)
    return markdown_table(["shape", "M"] + contenders, rows)


def _sparsekern_layer(records: list[dict], **match) -> tuple[str | None, list[dict]]:
    """The records of what a user of sparsekern runs: SparseLinear when measured, else the best raw op."""
    for name in ("sk_linear", "sk_cslt", "sk_spmm24"):
        rs = _ok(records, contender=name, **match)
        if rs:
            return name, rs
    return None, []


def _median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def goals(gemm: dict | None, overhead: dict | None = None) -> list[dict]:
    """Evaluate the measurable goals of issues 8 (GPU) and 10 (CPU) on a run's documents.

    Each goal: {goal, contender, measured, target, met (bool or None when not measurable from these files)}.
    """
    out: list[dict] = []

    def add(goal, contender, measured, target, cmp=">="):
        met = None if measured is None else (measured >= target if cmp == ">=" else measured <= target)
        out.append({"goal": goal, "contender": contender, "measured": measured, "target": target, "met": met})

    recs = gemm["records"] if gemm else []
    device = gemm["env"]["device"] if gemm else None
    llama = lambda r: r.get("model") is not None  # noqa: E731 - preset (Llama) shapes only
    if device == "cuda":
        name, rs = _sparsekern_layer(recs, dtype="bf16")
        sel = [r["speedup_vs_dense"] for r in rs if r["m"] >= 512 and llama(r)]
        add("prefill bf16 (M >= 512, Llama shapes): median speedup vs dense cuBLAS", name, _median(sel), 1.3)
        # The raw int8 GEMM (the goal's subject) and the W8A8 layer (which also quantises x per token).
        measured_any = False
        for name8 in ("sk_cslt", "sk_linear"):
            sel8 = [r["speedup_vs_dense"] for r in _ok(recs, contender=name8, dtype="int8") if r["m"] >= 2048]
            if sel8 or (name8 == "sk_linear" and not measured_any):
                add("W8A8 int8 2:4 (M >= 2048): min speedup vs bf16 dense", name8 if sel8 else None,
                    min(sel8) if sel8 else None, 2.0)
                measured_any = measured_any or bool(sel8)
    elif device == "cpu":
        for dt in ("fp32", "bf16"):
            for m, target in ((1, 1.6), (16, 1.3), (256, 1.0)):
                name, rs = _sparsekern_layer(recs, dtype=dt, m=m)
                sel = [r["speedup_vs_dense"] for r in rs if (r["n"], r["k"]) in ((11008, 4096), (4096, 11008))]
                add(f"CPU {dt} M={m} (11008x4096, 4096x11008): min speedup vs dense F.linear", name,
                    min(sel) if sel else None, target)
                # The same point for a layer allowed to keep a dense copy (SparseLinear(dense_cache=True)).
                selc = [r["speedup_vs_dense"] for r in _ok(recs, contender="sk_linear_cache", dtype=dt)
                        if r["m"] == m and (r["n"], r["k"]) in ((11008, 4096), (4096, 11008))]
                if selc:
                    add(f"CPU {dt} M={m} (11008x4096, 4096x11008), layer with a dense copy: min speedup vs dense",
                        "sk_linear_cache", min(selc), target)
    if overhead:
        orecs = overhead["records"]
        for r in orecs:
            if r["contender"] == "sk_cslt" and r["status"] == "ok" and r.get("mode") == "eager" and r["m"] <= 256:
                add(f"host-bound per call M={r['m']} N={r['n']} K={r['k']}: speedup vs torch._cslt_sparse_mm",
                    "sk_cslt", r.get("speedup_vs_torch_cslt"), 1.5)
                add(f"host overhead per call M={r['m']} N={r['n']} K={r['k']} (eager - graph replay, µs)",
                    "sk_cslt", r.get("overhead_us"), 5.0, cmp="<=")
    return out


def goals_markdown(gs: list[dict]) -> str:
    if not gs:
        return "_No goal is measurable from these files._"
    rows = []
    for g in gs:
        met = {True: "met", False: "**missed**", None: "not measured"}[g["met"]]
        rows.append([g["goal"], g["contender"] or "-", _fmt(g["measured"], ".2f"), f"{g['target']:g}", met])
    return markdown_table(["goal", "measured on", "measured", "target", ""], rows)


def env_markdown(env: dict) -> str:
    keys = ("device_name", "arch", "driver", "torch", "cuda", "cusparselt_torch", "cusparselt_sparsekern",
            "sparsekern", "git_commit", "python", "cpu", "threads", "loadavg")
    return markdown_table(["", "value"], [[k, "-" if env.get(k) is None else str(env.get(k))] for k in keys])


def _load(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def find_docs(results_dir: str) -> dict[str, list[dict]]:
    """Every benchmark JSON under results_dir (any depth), grouped by its "benchmark" field."""
    out: dict[str, list[dict]] = {}
    for root, _, files in sorted(os.walk(results_dir)):
        for fn in sorted(files):
            if not fn.endswith(".json"):
                continue
            try:
                doc = _load(os.path.join(root, fn))
            except (OSError, ValueError):
                continue
            # gemm / overhead documents hold "records"; the pruning benchmark's (bench/prune.py) "results"
            if isinstance(doc, dict) and "benchmark" in doc and ("records" in doc or "results" in doc):
                doc["_path"] = os.path.relpath(os.path.join(root, fn), results_dir)
                out.setdefault(doc["benchmark"], []).append(doc)
    return out


def merged(docs: list[dict] | None) -> dict | None:
    """Several documents of one benchmark (e.g. one per dtype step) as one: records concatenated, env of the first."""
    if not docs:
        return None
    return dict(docs[0], records=[r for d in docs for r in d["records"]])


def summarize(results_dir: str, steps_tsv: str | None = None) -> str:
    docs = find_docs(results_dir)
    gemm, overhead = merged(docs.get("gemm")), merged(docs.get("overhead"))
    env = (gemm or overhead or {}).get("env", {})
    parts = [f"# sparsekern benchmark run: {os.path.basename(os.path.abspath(results_dir))}", ""]
    if env:
        parts += ["## Environment", "", env_markdown(env), ""]
    if steps_tsv and os.path.exists(steps_tsv):
        rows = []
        with open(steps_tsv) as f:
            for line in f:
                cells = line.rstrip("\n").split("\t")
                if len(cells) >= 3 and cells[0] != "step":
                    rows.append(cells[:4] + [""] * (4 - len(cells[:4])))
        parts += ["## Steps", "", markdown_table(["step", "status", "seconds", "log"], rows), ""]
    parts += ["## Goals", "", goals_markdown(goals(gemm, overhead)), ""]
    if gemm:
        for dt in dict.fromkeys(r["dtype"] for r in gemm["records"]):
            if _ok(gemm["records"], dtype=dt):
                parts += [f"## GEMM {dt}: median µs (speedup vs dense)", "", speedup_pivot(gemm["records"], dt), ""]
        reasons = skipped_reasons(gemm["records"])
        if reasons:
            parts += ["## Contenders not measured", "",
                      markdown_table(["contender", "status", "first reason"],
                                     [[c, s, why.replace("|", "/")] for (c, s), why in reasons.items()]), ""]
    if overhead:
        rows = []
        for r in overhead["records"]:
            rows.append([r["contender"], r.get("mode", "-"), f"{r['m']}x{r['n']}x{r['k']}", r["dtype"], r["status"],
                         _fmt(r.get("median_us"), ".2f"), _fmt(r.get("host_us"), ".2f"),
                         _fmt(r.get("overhead_us"), ".2f"), _fmt(r.get("speedup_vs_torch_cslt"), ".2f"),
                         (r.get("reason") or "").replace("|", "/")[:120]])
        parts += ["## Host overhead (per call)", "",
                  markdown_table(["contender", "mode", "MxNxK", "dtype", "status", "µs/call", "host µs",
                                  "overhead µs", "×torch_cslt", "reason"], rows), ""]
    prune_rows = [[r.get("method", "-"), r.get("pattern", "-"), r.get("shape", "-"), r.get("device", "-"),
                   _fmt(r.get("ours_s"), ".4f"), _fmt(r.get("reference_s"), ".4f"), _fmt(r.get("speedup"), ".1f")]
                  for d in docs.get("prune", []) for r in d.get("results", [])]
    if prune_rows:
        parts += ["## Pruning kernels (per layer, sparsekern vs reference-structured PyTorch)", "",
                  markdown_table(["method", "pattern", "shape", "device", "ours s", "reference s", "speedup"],
                                 prune_rows), ""]
    files = sorted(d["_path"] for ds in docs.values() for d in ds)
    if files:
        parts += ["## Files", ""] + [f"- `{p}`" for p in files] + [""]
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparsekern.bench.report")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("summarize", help="markdown summary of a results directory (stdout)")
    s.add_argument("results_dir")
    s.add_argument("--steps", help="steps.tsv written by bench/gpu_validate.sh")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.results_dir):
        ap.error(f"results_dir {args.results_dir!r} is not a directory")
    sys.stdout.write(summarize(args.results_dir, args.steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
