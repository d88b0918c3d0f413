#!/usr/bin/env python3
"""Fold a bench/gpu_validate.sh output folder into bench/results/<date>-<gpu>/ and the README's performance block.

    python bench/fold_gpu_results.py DIR|ARCHIVE.tgz [--root bench/results] [--readme README.md] [--name NAME]
                                     [--force] [--no-readme]
    python bench/fold_gpu_results.py --summary DIR      (re)write DIR/summary.md only (what gpu_validate.sh calls
                                                        after every stage; standard library only, no torch)

Kept (the files worth committing): JSON, CSV, PNG, summary.md, stages.tsv, and the logs cut to their last 200 lines
(a note at the top says how many were cut). Left out: junit XML (the summary holds its counts and failures),
build temporaries, anything else, and any file over 5 MB. The date and GPU of the folder name come from
DIR/run.json (written by gpu_validate.sh), else DIR/versions.json, else the summary. An existing destination is
never overwritten: a second run of the same day and GPU gets "-2", "-3", ... unless --force replaces it. Then
`python bench/render_readme.py --write` (with --root / --readme) regenerates the README block, which shows the
newest GPU run's goals and tables (when its gemm / overhead stages ran) and its validation stages and probes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
KEEP_EXT = (".json", ".csv", ".png")
KEEP_NAMES = ("summary.md", "stages.tsv", "goals.md", "ncu.txt")
LOG_LINES = 200
MAX_BYTES = 5 * 1024 * 1024
STAGE_WHAT = {
    "a1-versions": "versions", "a2-build": "build for this GPU", "b-probes": "probes of findings 1-4, 6",
    "c-tests": "cuda tests most likely to break", "d-memcheck": "compute-sanitizer memcheck",
    "e1-gemm": "GEMM benchmark (Llama-3-8B)", "e2-overhead": "per-call host overhead",
    "e3-decode": "decode kernel M = 1..16 (Llama-3-8B, 70B), goals, ncu",
    "f-tests-rest": "the other cuda tests", "g-ctest": "C++ library (CMake) + ctest",
}


def _report():
    """python/sparsekern/bench/report.py loaded by path: it needs only the standard library, and importing the
    sparsekern package would import torch (seconds of a GPU lease, after every stage)."""
    spec = importlib.util.spec_from_file_location("_sk_bench_report", os.path.join(ROOT, "python", "sparsekern",
                                                                                   "bench", "report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _load_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ reading a run


def read_stages(d: str) -> list[dict]:
    """stages.tsv as dicts; the last line per stage wins (a --stages re-run appends)."""
    path = os.path.join(d, "stages.tsv")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [ln.rstrip("\n").split("\t") for ln in f if ln.strip()]
    if not lines:
        return []
    head, rows = lines[0], lines[1:]
    by_stage: dict[str, dict] = {}
    for cells in rows:
        rec = dict(zip(head, cells + [""] * (len(head) - len(cells))))
        by_stage.pop(rec.get("stage", ""), None)
        by_stage[rec.get("stage", "")] = rec
    return list(by_stage.values())


def read_probes(d: str) -> list[dict]:
    doc = _load_json(os.path.join(d, "probes.json"))
    return list(doc.get("probes", [])) if isinstance(doc, dict) else []


def junit_counts(path: str) -> dict | None:
    """{tests, failures, errors, skipped, failed: [names]} of a pytest junit XML, or None."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    for s in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            out[key] += int(s.get(key, 0) or 0)
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                msg = (bad.get("message") or "").splitlines()[0][:160] if bad is not None else ""
                out["failed"].append(f"{case.get('classname', '')}::{case.get('name', '')}: {msg}")
    return out


def sanitizer_result(d: str) -> str | None:
    path = os.path.join(d, "logs", "d-memcheck.log")
    try:
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    hits = [ln for ln in lines if "ERROR SUMMARY" in ln]
    return hits[-1].strip("= ").strip() if hits else None


def run_info(d: str) -> dict:
    """date, gpu, slug (+ the rest of run.json) of a run folder."""
    info = _load_json(os.path.join(d, "run.json")) or {}
    if not isinstance(info, dict):
        info = {}
    v = _load_json(os.path.join(d, "versions.json"))
    if isinstance(v, dict):
        info.setdefault("gpu", v.get("device_name") if v.get("device") == "cuda" else None)
        info.setdefault("versions", {k: v.get(k) for k in ("torch", "cuda", "nvcc", "driver", "cusparselt_torch",
                                                           "cusparselt_wheel", "python")})
    if not info.get("gpu") or not info.get("date"):
        try:
            with open(os.path.join(d, "summary.md")) as f:
                text = f.read()
        except OSError:
            text = ""
        m = re.search(r"^GPU: (.+?)(?: \(|$)", text, re.M)
        if m and not info.get("gpu"):
            info["gpu"] = m.group(1).strip()
        m = re.search(r"\b(\d{4}-\d{2}-\d{2})\b", text)
        if m and not info.get("date"):
            info["date"] = m.group(1)
    if not info.get("date"):
        info["date"] = datetime.datetime.fromtimestamp(os.path.getmtime(d), datetime.timezone.utc).strftime("%Y-%m-%d")
    info["gpu"] = info.get("gpu") or "unknown-gpu"
    if not info.get("gpu_slug"):
        s = re.sub(r"[^a-z0-9]+", "-", info["gpu"].lower().replace("nvidia", "")).strip("-")
        info["gpu_slug"] = s or "gpu"
    return info


# ---------------------------------------------------------------------------------------------------- summary


def _cell(v) -> str:
    return str(v).replace("|", "/").replace("\n", " ")


def summary_markdown(d: str) -> str:
    info = run_info(d)
    stages = read_stages(d)
    parts = [f"# GPU validation: {os.path.basename(os.path.abspath(d))}", "",
             f"GPU: {info['gpu']} (compute capability {info.get('compute_capability') or '?'}, "
             f"TORCH_CUDA_ARCH_LIST={info.get('torch_cuda_arch_list') or '?'}); date {info['date']}; "
             f"commit `{str(info.get('git_commit') or 'unknown')[:12]}`; budget {info.get('budget_s', '?')} s.", ""]
    running = os.path.join(d, "running.txt")
    if os.path.exists(running):
        with open(running) as f:
            cells = f.read().strip().split("\t")
        parts += [f"**Cut off:** stage `{cells[0]}` was running ({', '.join(cells[1:])}) when the run stopped; its "
                  "log holds what it printed.", ""]
    parts += ["## Stages", ""]
    if stages:
        rows = [[s.get("stage", ""), STAGE_WHAT.get(s.get("stage", ""), ""), _cell(s.get("status", "")),
                 s.get("seconds", ""), s.get("estimate_s", ""), s.get("log", "")] for s in stages]
        spent = sum(int(s["seconds"]) for s in stages if str(s.get("seconds", "")).isdigit())
        parts += [_report().markdown_table(["stage", "what", "status", "s", "estimate s", "log"], rows), "",
                  f"{spent} s in stages.", ""]
    else:
        parts += ["No stage has finished yet.", ""]
    probes = read_probes(d)
    if probes:
        rows = [[p.get("finding"), "ok" if p.get("ok") else "**NOT OK**", _cell(p.get("verdict", ""))[:400],
                 p.get("seconds") if p.get("seconds") is not None else "-"] for p in probes]
        parts += ["## Probes (bench/gpu_probes.py; details in probes.json)", "",
                  _report().markdown_table(["finding", "", "verdict", "s"], rows), ""]
    tests = []
    for stage, name in (("c-tests", "pytest-c.xml"), ("f-tests-rest", "pytest-f.xml")):
        c = junit_counts(os.path.join(d, name))
        if c:
            tests.append((stage, c))
    parts += ["## Tests", ""]
    if tests:
        rows = [[st, c["tests"], c["tests"] - c["failures"] - c["errors"] - c["skipped"], c["failures"], c["errors"],
                 c["skipped"]] for st, c in tests]
        parts += [_report().markdown_table(["stage", "tests", "passed", "failed", "errors", "skipped"], rows), ""]
        for st, c in tests:
            if c["failed"]:
                parts += [f"Failing in {st} (first 15):", ""] + [f"- `{_cell(x)}`" for x in c["failed"][:15]] + [""]
    else:
        parts += ["No junit file yet.", ""]
    san = sanitizer_result(d)
    if san:
        parts += ["## compute-sanitizer", "", f"memcheck: {san}", ""]
    goals = os.path.join(d, "decode", "goals.md")
    if os.path.exists(goals):
        with open(goals, errors="replace") as f:
            parts += ["## Decode kernel goals (bench/decode_goals.py; points in decode/goals.json, profile in "
                      "decode/ncu.txt)", "", f.read().strip(), ""]
    try:
        body = _report().summarize(d)
    except Exception as e:  # noqa: BLE001 - the benchmark part must not take the stage summary down
        body = f"(benchmark summary failed: {type(e).__name__}: {e})"
    body = "\n".join(body.splitlines()[1:]).strip()  # drop its title: this page has one
    if body:
        parts += ["## Benchmarks (sparsekern.bench.report)", "", re.sub(r"^## ", "### ", body, flags=re.M), ""]
    return "\n".join(parts).rstrip() + "\n"


def write_summary(d: str) -> str:
    path = os.path.join(d, "summary.md")
    text = summary_markdown(d)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------------- fold


def _keep(rel: str) -> str | None:
    """How a file is kept: "copy", "log" (cut to its tail) or None (left out)."""
    parts = rel.split(os.sep)
    name = parts[-1]
    if any(p in ("__pycache__",) or p.startswith(".") for p in parts) or name.endswith(".tmp"):
        return None
    if len(parts) >= 2 and parts[-2] == "logs" and name.endswith(".log"):
        return "log"
    if name in KEEP_NAMES or name.lower().endswith(KEEP_EXT):
        return "copy"
    return None


def _copy_log(src: str, dst: str) -> None:
    with open(src, errors="replace") as f:
        lines = f.read().splitlines()
    cut = max(0, len(lines) - LOG_LINES)
    with open(dst, "w") as f:
        if cut:
            f.write(f"[... {cut} earlier lines cut by bench/fold_gpu_results.py; the last {LOG_LINES} follow ...]\n")
        f.write("\n".join(lines[cut:]) + ("\n" if lines else ""))


def _unpack(archive: str, into: str) -> str:
    with tarfile.open(archive) as t:
        try:
            t.extractall(into, filter="data")
        except TypeError:  # Python < 3.12 without extraction filters: refuse anything odd ourselves
            for m in t.getmembers():
                if m.name.startswith("/") or ".." in m.name.split("/") or not (m.isfile() or m.isdir()):
                    raise SystemExit(f"fold_gpu_results.py: {archive}: refusing member {m.name!r}")
            t.extractall(into)
    entries = [os.path.join(into, e) for e in os.listdir(into)]
    dirs = [e for e in entries if os.path.isdir(e)]
    # gpu_validate.sh --archive holds one top folder; a tar of the folder's contents works too
    return dirs[0] if len(dirs) == 1 and len(entries) == 1 else into


def fold(src: str, root: str, name: str | None = None, force: bool = False) -> tuple[str, list[str], list[str]]:
    """Copy the kept files of run folder `src` to root/<name>; returns (destination, kept, left out)."""
    info = run_info(src)
    name = name or f"{info['date']}-{info['gpu_slug']}"
    dest = os.path.join(root, name)
    if os.path.exists(dest):
        if force:
            shutil.rmtree(dest)
        else:
            i = 2
            while os.path.exists(f"{dest}-{i}"):
                i += 1
            dest = f"{dest}-{i}"
    kept, left = [], []
    staged = tempfile.mkdtemp(prefix=".fold-", dir=root if os.path.isdir(root) else None)
    try:
        for base, dirs, files in os.walk(src):
            dirs.sort()
            for fn in sorted(files):
                p = os.path.join(base, fn)
                rel = os.path.relpath(p, src)
                how = _keep(rel)
                if how is None or os.path.islink(p) or (how == "log" and os.path.getsize(p) == 0):
                    left.append(rel)
                    continue
                if how == "copy" and os.path.getsize(p) > MAX_BYTES:
                    left.append(f"{rel} (over {MAX_BYTES // (1024 * 1024)} MB)")
                    continue
                out = os.path.join(staged, rel)
                os.makedirs(os.path.dirname(out), exist_ok=True)
                if how == "log":
                    _copy_log(p, out)
                else:
                    shutil.copyfile(p, out)
                kept.append(rel)
        if "summary.md" not in kept:  # a run cut off before its first summary: write one from what is there
            with open(os.path.join(staged, "summary.md"), "w", encoding="utf-8") as f:
                f.write(summary_markdown(src))
            kept.append("summary.md")
        os.makedirs(root, exist_ok=True)
        os.replace(staged, dest)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return dest, kept, left


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a gpu_validate.sh output folder, or its --archive (.tar.gz)")
    ap.add_argument("--summary", action="store_true", help="only (re)write SOURCE/summary.md")
    ap.add_argument("--root", default=os.path.join(ROOT, "bench", "results"), help="folder of results folders")
    ap.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    ap.add_argument("--name", help="destination folder name (default <date>-<gpu>)")
    ap.add_argument("--force", action="store_true", help="replace an existing destination folder")
    ap.add_argument("--no-readme", action="store_true", help="do not run render_readme.py --write")
    args = ap.parse_args(argv)
    if args.summary:
        if not os.path.isdir(args.source):
            ap.error(f"{args.source!r} is not a directory")
        print(write_summary(args.source))
        return 0
    tmp = None
    try:
        if os.path.isfile(args.source) and tarfile.is_tarfile(args.source):
            tmp = tempfile.mkdtemp(prefix="gpu-validate-")
            src = _unpack(args.source, tmp)
        elif os.path.isdir(args.source):
            src = args.source
        else:
            ap.error(f"{args.source!r} is neither a folder nor a .tar.gz archive")
        if not (os.path.exists(os.path.join(src, "stages.tsv")) or os.path.exists(os.path.join(src, "run.json"))):
            ap.error(f"{args.source!r} holds no stages.tsv or run.json: not a bench/gpu_validate.sh output folder")
        dest, kept, left = fold(src, args.root, args.name, args.force)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"folded into {dest}: {len(kept)} files kept" + (f", {len(left)} left out" if left else ""))
    for rel in left:
        print(f"  left out: {rel}")
    if not args.no_readme:
        r = subprocess.run([sys.executable, os.path.join(HERE, "render_readme.py"), "--write", "--root", args.root,
                            "--readme", args.readme])
        if r.returncode != 0:
            print("fold_gpu_results.py: render_readme.py --write failed (see above); the folder is folded",
                  file=sys.stderr)
            return 1
    rel = os.path.relpath(dest, ROOT)
    if not rel.startswith(".."):
        print(f"commit it: git add {rel} README.md && git commit -m 'GPU validation: {os.path.basename(dest)}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
