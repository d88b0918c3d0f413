#!/usr/bin/env python3
"""Generate the README "Performance" section from the newest committed benchmark results, never typed by hand.

    python bench/render_readme.py                 print the section (newest GPU run and newest CPU run)
    python bench/render_readme.py --write         replace the block between <!-- perf:begin --> and
                                                  <!-- perf:end --> in README.md with it
    python bench/render_readme.py --check         exit 1 when README.md's block is not what --write would write
    python bench/render_readme.py --results DIR   render one results folder only

Results folders are bench/results/<YYYY-MM-DD>-<device>/ as written by bench/gpu_validate.sh (GPU) or by
`sparsekern bench gemm --out` (CPU); the newest is the one whose name sorts last among those holding a result file
for that device. Every number printed comes from those files and the section names them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "python"))

from sparsekern.bench import report  # noqa: E402  (works without the compiled extension)

BEGIN, END = "<!-- perf:begin -->", "<!-- perf:end -->"


def result_dirs(results_root: str) -> list[str]:
    if not os.path.isdir(results_root):
        return []
    return sorted(os.path.join(results_root, d) for d in os.listdir(results_root)
                  if os.path.isdir(os.path.join(results_root, d)))


def newest_per_device(results_root: str) -> dict[str, str]:
    """device ("cuda" / "cpu") -> newest results folder holding a gemm or overhead document for that device."""
    out: dict[str, str] = {}
    for d in result_dirs(results_root):  # ascending names: later ones overwrite
        docs = report.find_docs(d)
        for ds in docs.values():
            for doc in ds:
                if "env" in doc:  # gemm / overhead (the pruning benchmark's file has no env)
                    out[doc["env"]["device"]] = d
    return out


def _layer_table(records: list[dict], dtype: str) -> str | None:
    """Rows M, columns preset shapes; cell 'a× / b×' = sparsekern layer vs dense / vs torch._cslt_sparse_mm."""
    name, rs = report._sparsekern_layer(records, dtype=dtype)
    rs = [r for r in rs if r.get("speedup_vs_dense") is not None]
    if not rs:
        return None
    shapes = list(dict.fromkeys(r["shape"] for r in rs))
    ms = sorted({r["m"] for r in rs})
    cell = {(r["shape"], r["m"]): r for r in rs}
    has_cslt = any(r.get("speedup_vs_torch_cslt") is not None for r in rs)

    def fmt(r):
        if r is None:
            return ""
        a = f"{r['speedup_vs_dense']:.2f}×"
        if has_cslt:
            b = r.get("speedup_vs_torch_cslt")
            a += f" / {b:.2f}×" if b is not None else " / -"
        return a

    head = f"`{name}` {dtype}, speedup vs dense" + (" / vs `torch._cslt_sparse_mm`" if has_cslt else "")
    table = report.markdown_table(["M"] + shapes, [[str(m)] + [fmt(cell.get((s, m))) for s in shapes] for m in ms])
    return f"{head}:\n\n{table}"


def render_run(d: str, device: str, rel_to: str) -> str:
    docs = report.find_docs(d)
    pick = lambda b: report.merged([x for x in docs.get(b, []) if x["env"]["device"] == device])  # noqa: E731
    gemm, overhead = pick("gemm"), pick("overhead")
    env = (gemm or overhead)["env"]
    rel = os.path.relpath(d, rel_to)
    commit = (env.get("git_commit") or "unknown")[:12]
    if device == "cuda":
        title = (f"### GPU: {env['device_name']} ({env['arch']}; torch {env['torch']}, CUDA {env.get('cuda')}, "
                 f"cuSPARSELt {env.get('cusparselt_sparsekern') or env.get('cusparselt_torch')}, "
                 f"driver {env.get('driver')})")
    else:
        load = env.get("loadavg")
        title = (f"### CPU: {env['device_name']} ({env['threads']} threads, {env.get('cpu_capability')}; "
                 f"torch {env['torch']}" + (f"; load average {load[0]:.1f} at the start" if load else "") + ")")
    parts = [title, "", f"From [`{rel}`]({rel}) (commit `{commit}`, {(gemm or overhead)['created'][:10]}).", ""]
    parts += [report.goals_markdown(report.goals(gemm, overhead)), ""]
    if gemm:
        for dt in dict.fromkeys(r["dtype"] for r in gemm["records"]):
            t = _layer_table(gemm["records"], dt)
            if t:
                parts += [t, ""]
    if overhead:
        rows = [[r["contender"], r["mode"], f"{r['m']}x{r['n']}x{r['k']}", r["dtype"],
                 f"{r['median_us']:.2f}", "-" if r.get("speedup_vs_torch_cslt") is None else
                 f"{r['speedup_vs_torch_cslt']:.2f}×"]
                for r in overhead["records"] if r["status"] == "ok" and r["mode"] in ("eager", "graph")]
        if rows:
            parts += ["Per-call time at tiny shapes (host overhead):", "",
                      report.markdown_table(["contender", "mode", "MxNxK", "dtype", "µs/call", "vs torch_cslt"],
                                            rows), ""]
    return "\n".join(parts)


def newest_generate(results_root: str) -> str | None:
    """The newest results folder holding a `sparsekern bench generate` document, or None."""
    runs = [d for d in result_dirs(results_root) if report.find_docs(d).get("generate")]
    return runs[-1] if runs else None


def render_generate(d: str, rel_to: str) -> str:
    """End-to-end generation, dense vs 2:4 (sparsekern bench generate): tokens/s table and goal lines."""
    from sparsekern.bench.generate import summary_table

    doc = min(report.find_docs(d)["generate"], key=lambda x: x["_path"].count(os.sep))  # the folder's own run
    env = doc["environment"]
    rel = os.path.relpath(d, rel_to)
    load = env.get("loadavg")
    parts = [f"### CPU generation: {doc['model']} ({env.get('device_name')}, {env.get('threads')} threads; torch "
             f"{env.get('torch')}" + (f"; load average {load[0]:.1f} at the start" if load else "") + ")", "",
             f"From [`{rel}`]({rel}) (commit `{(env.get('git_commit') or 'unknown')[:12]}`): "
             f"`{doc.get('command', 'sparsekern bench generate')}`. Tokens/s, batch 1, median of {doc['repeats']} "
             "interleaved runs; (x) = vs dense of the same dtype (int8 also vs bf16 dense).", "", "```",
             summary_table(doc), "```", ""]
    rows = [[g["goal"], f"{g['value']:.2f}", "met" if g["met"] else "**missed**"] for g in doc.get("goals", [])]
    if rows:
        parts += [report.markdown_table(["goal (issue 18)", "measured", ""], rows), ""]
    return "\n".join(parts)


def newest_validation(results_root: str) -> str | None:
    """The newest results folder written by bench/gpu_validate.sh (it holds stages.tsv), or None."""
    runs = [d for d in result_dirs(results_root) if os.path.exists(os.path.join(d, "stages.tsv"))]
    return runs[-1] if runs else None


def render_validation(d: str, rel_to: str) -> str:
    """Stages and probe verdicts of a GPU validation run (bench/gpu_validate.sh + bench/fold_gpu_results.py)."""
    rows: dict[str, list[str]] = {}
    with open(os.path.join(d, "stages.tsv"), encoding="utf-8") as f:
        lines = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
    for cells in lines[1:]:  # the last line per stage wins (a --stages re-run appends)
        cells = (cells + [""] * 3)[:3]
        rows.pop(cells[0], None)
        rows[cells[0]] = [c.replace("|", "/") for c in cells]
    rel = os.path.relpath(d, rel_to)
    parts = [f"### GPU validation: `{os.path.basename(d)}`", "",
             f"Stages of `bench/gpu_validate.sh` from [`{rel}`]({rel}) (summary: [`summary.md`]({rel}/summary.md)).",
             "", report.markdown_table(["stage", "status", "s"], list(rows.values())), ""]
    try:
        with open(os.path.join(d, "probes.json"), encoding="utf-8") as f:
            probes = json.load(f).get("probes", [])
    except (OSError, ValueError, AttributeError):
        probes = []
    if probes:
        parts += ["Probes of the pre-flight findings (issue 17):", "",
                  report.markdown_table(["finding", "", "verdict"],
                                        [[str(p.get("finding")), "ok" if p.get("ok") else "**not ok**",
                                          str(p.get("verdict", "")).replace("|", "/")[:300]] for p in probes]), ""]
    return "\n".join(parts)


def render(results_root: str, only: str | None = None, rel_to: str = ROOT) -> str:
    parts = ["## Performance", "",
             "_Generated by `python bench/render_readme.py --write` from the newest files in `bench/results/`; "
             "do not edit by hand. Method and file format: [docs/benchmarks.md](docs/benchmarks.md)._", ""]
    if only:
        docs = report.find_docs(only)
        devices = list(dict.fromkeys(doc["env"]["device"] for ds in docs.values() for doc in ds if "env" in doc))
        runs = {dev: only for dev in devices}
    else:
        runs = newest_per_device(results_root)
    if not runs:
        parts += ["No benchmark results are committed yet. On a GPU machine run `bench/gpu_validate.sh` and commit "
                  "the `bench/results/<date>-<gpu>/` folder it writes; on a CPU, "
                  "`sparsekern bench gemm --device cpu --out bench/results/<date>-cpu-<name>`.", ""]
    for dev in ("cuda", "cpu"):
        if dev in runs:
            parts += [render_run(runs[dev], dev, rel_to), ""]
    generation = None if only else newest_generate(results_root)
    if generation:
        parts += [render_generate(generation, rel_to), ""]
    # The newest GPU validation run's stages and probes (only where a folder holds them: a run whose benchmark
    # stages did not run still shows here).
    validation = (only if os.path.exists(os.path.join(only, "stages.tsv")) else None) if only else \
        newest_validation(results_root)
    if validation:
        parts += [render_validation(validation, rel_to), ""]
    return "\n".join(parts).rstrip() + "\n"


def replace_block(text: str, section: str, readme: str) -> str:
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise SystemExit(
            f"render_readme.py: {readme} has no '{BEGIN}' ... '{END}' block; add those two lines (in that order) "
            "where the Performance section belongs, then run --write again")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{section}{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", help="render this one results folder (default: newest per device under --root)")
    ap.add_argument("--root", default=os.path.join(ROOT, "bench", "results"), help="folder of results folders")
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="update the marked block of --readme")
    mode.add_argument("--check", action="store_true", help="exit 1 when the marked block is out of date")
    args = ap.parse_args(argv)
    if args.results and not os.path.isdir(args.results):
        ap.error(f"--results {args.results!r} is not a directory")
    section = render(args.root, args.results, rel_to=os.path.dirname(os.path.abspath(args.readme)))
    if not (args.write or args.check):
        sys.stdout.write(section)
        return 0
    if not os.path.exists(args.readme):
        ap.error(f"--readme {args.readme!r} does not exist")
    with open(args.readme, encoding="utf-8") as f:
        text = f.read()
    new = replace_block(text, section, args.readme)
    if args.check:
        if new != text:
            print(f"{args.readme}: the Performance block is out of date; run python bench/render_readme.py --write",
                  file=sys.stderr)
            return 1
        return 0
    if new != text:
        with open(args.readme, "w", encoding="utf-8") as f:
            f.write(new)
        print(f"updated the Performance block of {args.readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
