"""bench/gpu_validate.sh, bench/gpu_probes.py and bench/fold_gpu_results.py on the CPU (issue 17): the stage plan and
its budget, the scheduler with a stub interpreter (skips for budget, timeouts, a failed build, the archive), the
c / f test selections, the probe runner's isolation (a hung, crashing or context-breaking probe does not take the
others down), and folding a run into bench/results/ and the README block. Nothing here needs a GPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_validate.sh")
FOLD = os.path.join(ROOT, "bench", "fold_gpu_results.py")
PROBES = os.path.join(ROOT, "bench", "gpu_probes.py")
STAGES = ["a1-versions", "a2-build", "b-probes", "c-tests", "d-memcheck", "e1-gemm", "e2-overhead", "e3-decode",
          "f-tests-rest"]
OPT_IN = ["g-ctest"]  # listed, run only when --stages names it


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args, env=None, timeout=120):
    e = dict(os.environ, **(env or {}))
    e.pop("TORCH_CUDA_ARCH_LIST", None)
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=e, cwd=ROOT)


def _plan(stdout: str) -> list[tuple[str, int]]:
    """(stage, estimate) rows of a --dry-run listing."""
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"^([a-g]\d?-[a-z0-9-]+)\s+(\d+)\s+\d+\s", stdout,
                                                               re.M)]


# ------------------------------------------------------------------------------------------------- the plan


def test_dry_run_lists_stages_a_to_f_within_570_s(tmp_path):
    out = tmp_path / "run"
    r = _run("--dry-run", "--out", str(out))  # the default budget: 570 s
    assert r.returncode == 0, r.stderr
    plan = _plan(r.stdout)
    assert [s for s, _ in plan] == STAGES + OPT_IN
    default = [(s, e) for s, e in plan if s not in OPT_IN]
    letters = [s[0] for s, _ in default]
    assert letters == sorted(letters) and set(letters) == set("abcdef")
    total = int(re.search(r"^total\s+(\d+)", r.stdout, re.M).group(1))
    assert total == sum(e for _, e in plan) <= 570 and "(budget 570 s)" in r.stdout
    assert all(e > 0 for _, e in default) and dict(plan)["g-ctest"] == 0 and "[opt-in: --stages g]" in r.stdout
    assert "would be skipped" not in r.stdout
    # the commands the stages run
    assert "setup.py build_ext --inplace" in r.stdout and "SPARSEKERN_CUDA=1" in r.stdout
    assert r.stdout.count("SPARSEKERN_REQUIRE_CUDA=1") >= 2 and "--junitxml" in r.stdout
    assert "--tool memcheck" in r.stdout or "compute-sanitizer not found" in r.stdout
    assert "--preset llama3-8b --m 128,512,2048,8192 --dtype bf16,int8" in r.stdout
    # the decode kernel's stage (issue 22): M = 1..16 at Llama-3-8B and 70B shapes, its goals and the profile
    assert "--preset llama3-8b,llama3-70b --m 1,2,4,8,16 --dtype bf16,int8" in r.stdout
    assert "dense,torch_cslt,sk_cslt,sk_spmm24" in r.stdout and "bench/decode_goals.py --gemm" in r.stdout
    assert "ncu" in r.stdout and "decode/ncu.txt" in r.stdout
    assert "dense,dense_int8,torch_cslt,sk_cslt,sk_linear" in r.stdout and "bench overhead" in r.stdout
    assert not out.exists()  # a dry run writes nothing


def test_dry_run_over_budget_fails_naming_what_a_run_would_skip():
    r = _run("--dry-run", "--budget", "100")
    assert r.returncode == 1
    assert "over --budget 100 s" in r.stderr and "would skip:" in r.stderr
    assert "a2-build" in r.stderr.split("would skip:")[1]
    assert "[would be skipped: budget]" in r.stdout


def test_dry_run_skip_build_and_stage_selection_change_the_plan():
    r = _run("--dry-run", "--skip-build", "--budget", "400")
    assert r.returncode == 0, r.stderr
    assert dict(_plan(r.stdout))["a2-build"] == 0 and "[skipped: --skip-build]" in r.stdout
    r = _run("--dry-run", "--stages", "b,e", "--budget", "200")
    assert r.returncode == 0, r.stderr
    plan = dict(_plan(r.stdout))
    assert [s for s, e in plan.items() if e] == ["b-probes", "e1-gemm", "e2-overhead", "e3-decode"]
    r = _run("--dry-run", "--estimate", "a2-build=400")
    assert r.returncode == 1 and dict(_plan(r.stdout))["a2-build"] == 400
    r = _run("--dry-run", "--skip-build", "--stages", "g")
    assert r.returncode == 0 and [s for s, e in _plan(r.stdout) if e] == ["g-ctest"]
    assert "ctest --test-dir build/cmake-gpu" in r.stdout and "-DSPARSEKERN_CUDA=ON" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--frobnicate"], "unknown argument '--frobnicate'"),
    (["--budget", "abc"], "--budget must be a positive number of seconds"),
    (["--budget", "0"], "--budget must be a positive number of seconds"),
    (["--budget"], "--budget needs a value"),
    (["--out"], "--out needs a value"),
    (["--stages", "z"], "--stages: unknown stage 'z'"),
    (["--estimate", "nope=3"], "--estimate: unknown stage 'nope'"),
    (["--estimate", "b-probes=soon"], "seconds must be a whole number"),
])
def test_bad_arguments_exit_2(args, message):
    r = _run("--dry-run", *args)
    assert r.returncode == 2 and message in r.stderr, (r.returncode, r.stderr)


def test_help_exits_0():
    r = _run("--help")
    assert r.returncode == 0 and "--budget S" in r.stdout and "--dry-run" in r.stdout


# ------------------------------------------------------------------------------------------ the scheduler


STUB = """#!/usr/bin/env bash
echo "stub python: $*"
case " $* " in *" setup.py "*) exit "${STUB_BUILD_RC:-0}" ;; esac
case " $* " in *gpu_probes.py*--out*) sleep "${STUB_SLEEP:-0}" ;; esac
exit 0
"""


@pytest.fixture
def stub(tmp_path):
    p = tmp_path / "python-stub"
    p.write_text(STUB)
    p.chmod(0o755)
    return str(p)


def _stages(out) -> dict[str, str]:
    rows = [ln.split("\t") for ln in (out / "stages.tsv").read_text().splitlines()]
    assert rows[0][:3] == ["stage", "status", "seconds"]
    return {r[0]: r[1] for r in rows[1:]}


def _fast(*ids, est=1):
    return [a for i in ids for a in ("--estimate", f"{i}={est}")]


def test_a_stage_that_does_not_fit_is_skipped_for_budget(tmp_path, stub):
    out = tmp_path / "run"
    arch = tmp_path / "keep" / "gv.tgz"
    r = _run("--python", stub, "--budget", "60", "--out", str(out), "--archive", str(arch),
             *_fast("a1-versions", "a2-build", "b-probes", "d-memcheck", "e1-gemm", "e2-overhead", "e3-decode"),
             "--estimate", "c-tests=500", "--estimate", "f-tests-rest=500")
    st = _stages(out)
    assert list(st) == STAGES
    assert st["c-tests"].startswith("skipped: budget") and st["f-tests-rest"].startswith("skipped: budget")
    for s in ("a1-versions", "a2-build", "b-probes", "e1-gemm", "e2-overhead", "e3-decode"):
        assert st[s] == "ok", (s, st[s])
    # d: ok where compute-sanitizer exists, else failed with the reason (and the run exits 1)
    assert st["d-memcheck"] == "ok" or "compute-sanitizer not found" in (out / "logs" / "d-memcheck.log").read_text()
    assert r.returncode == (0 if st["d-memcheck"] == "ok" else 1), r.stdout + r.stderr
    # every stage left its log, the summary and the run facts
    assert "stub python: bench/versions.py" in (out / "logs" / "a1-versions.log").read_text()
    assert not (out / "logs" / "c-tests.log").exists()
    summary = (out / "summary.md").read_text()
    assert "## Stages" in summary and "skipped: budget" in summary and "| e1-gemm |" in summary
    run = json.loads((out / "run.json").read_text())
    assert run["budget_s"] == 60 and run["format"] == "sparsekern-gpu-validate" and run["date"]
    assert not (out / "running.txt").exists()
    with tarfile.open(arch) as t:
        names = t.getnames()
    assert "run/stages.tsv" in names and "run/summary.md" in names and "run/logs/e2-overhead.log" in names


def test_a_stage_is_cut_at_what_is_left_of_the_budget(tmp_path, stub):
    out = tmp_path / "run"
    r = _run("--python", stub, "--budget", "3", "--out", str(out), "--stages", "b", "--estimate", "b-probes=1",
             env={"STUB_SLEEP": "30"}, timeout=60)
    assert r.returncode == 1
    st = _stages(out)
    assert st["b-probes"].startswith("timeout"), st
    secs = int((out / "stages.tsv").read_text().splitlines()[1].split("\t")[2])
    assert secs <= 10  # min(limit 90 s, budget left ~3 s) + the 5 s kill grace at most


def test_a_run_stopped_by_sigterm_records_the_stage_it_cut_off(tmp_path, stub):
    import signal
    import time

    out, arch = tmp_path / "run", tmp_path / "gv.tgz"
    env = dict(os.environ, STUB_SLEEP="60")
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    proc = subprocess.Popen(["bash", SCRIPT, "--python", stub, "--out", str(out), "--archive", str(arch), "--stages",
                             "a1,b", *_fast("a1-versions", "b-probes")], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    log = out / "logs" / "b-probes.log"
    while not log.exists() or "stub python: bench/gpu_probes.py" not in log.read_text():  # the stage is running
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.1)
    with tarfile.open(arch) as t:  # the archive already says what is running, should the next kill be SIGKILL
        assert "run/running.txt" in t.getnames()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143 and "stopped by SIGTERM" in err
    assert _stages(out) == {"a1-versions": "ok", "b-probes": "cut off (SIGTERM)"}
    assert not (out / "running.txt").exists()
    assert "cut off by SIGTERM" in (out / "logs" / "b-probes.log").read_text()
    assert "cut off (SIGTERM)" in (out / "summary.md").read_text()


def test_a_failed_build_skips_the_stages_that_need_it(tmp_path, stub):
    out = tmp_path / "run"
    r = _run("--python", stub, "--out", str(out), "--stages", "a,b,c", *_fast("a1-versions", "a2-build", "b-probes",
                                                                               "c-tests"),
             env={"STUB_BUILD_RC": "1"})
    assert r.returncode == 1
    st = _stages(out)
    assert st["a1-versions"] == "ok" and st["a2-build"] == "failed (rc 1)"
    assert st["b-probes"] == "skipped: a2-build failed" and st["c-tests"] == "skipped: a2-build failed"
    assert "d-memcheck" not in st  # not selected


def test_skip_build_and_a_partial_rerun_appends(tmp_path, stub):
    out = tmp_path / "run"
    r = _run("--python", stub, "--out", str(out), "--skip-build", "--stages", "a,b", *_fast("a1-versions", "b-probes"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert _stages(out) == {"a1-versions": "ok", "a2-build": "skipped: --skip-build", "b-probes": "ok"}
    r = _run("--python", stub, "--out", str(out), "--skip-build", "--stages", "e2", *_fast("e2-overhead"))
    assert r.returncode == 0
    assert list(_stages(out)) == ["a1-versions", "a2-build", "b-probes", "e2-overhead"]


def _selection(stdout: str, stage: str) -> tuple[str, list[str]]:
    line = stdout.split(f"\n{stage}", 1)[1].split("$ ", 1)[1].splitlines()[0]
    words = shlex.split(line)
    k = words[words.index("-k") + 1]
    paths = [w for w in words if w.startswith("tests")]
    return k, paths


def test_c_and_f_together_are_exactly_the_cuda_tests(tmp_path):
    r = _run("--dry-run")
    ck, cpaths = _selection(r.stdout, "c-tests")
    fk, fpaths = _selection(r.stdout, "f-tests-rest")
    assert cpaths == ["tests/test_cuda_ops.py", "tests/test_linear.py", "tests/test_quant.py",
                      "tests/test_skinny24.py"] and fpaths == ["tests"]

    def collect(k, paths):
        res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              "-m", "cuda", *(["-k", k] if k else []), *paths], capture_output=True, text=True,
                             cwd=ROOT, timeout=300, env=dict(os.environ, SPARSEKERN_REQUIRE_CUDA="0"))
        return {ln for ln in res.stdout.splitlines() if "::" in ln}

    c, f, every = collect(ck, cpaths), collect(fk, fpaths), collect(None, ["tests"])
    assert c and f and not (c & f)
    assert c | f == every
    assert any("graph" in t for t in c) and any("int8" in t for t in c) and any("search" in t for t in c)
    assert any("test_skinny24.py" in t for t in c)  # the decode kernel's tests run early
    assert not any("compile" in t or "opcheck" in t for t in c)


# ----------------------------------------------------------------------------------------- probe isolation


FAKE_CHILD = textwrap.dedent("""
    import json, os, sys, time
    todo = [int(x) for x in sys.argv[sys.argv.index("--child") + 1].split(",")]
    mode = json.loads(os.environ["FAKE_MODES"])
    for f in todo:
        print(json.dumps({"event": "start", "finding": f}), flush=True)
        m = mode.get(str(f), "ok")
        if m == "hang":
            time.sleep(60)
        if m == "crash":
            print("segfault-ish", file=sys.stderr, flush=True)
            os._exit(139)
        print(json.dumps({"event": "result", "finding": f, "ok": m != "bad", "verdict": m, "detail": {},
                          "seconds": 0.0}), flush=True)
        if m == "poison":
            sys.exit(3)
""")


@pytest.mark.parametrize("modes, expect", [
    ({}, {1: True, 2: True, 3: True}),
    ({"2": "hang"}, {1: True, 2: False, 3: True}),
    ({"2": "crash"}, {1: True, 2: False, 3: True}),
    ({"1": "poison", "2": "bad"}, {1: True, 2: False, 3: True}),
])
def test_a_probe_never_takes_the_others_down(tmp_path, monkeypatch, capsys, modes, expect):
    gp = _load("gpu_probes_under_test", PROBES)
    child = tmp_path / "child.py"
    child.write_text(FAKE_CHILD)
    monkeypatch.setenv("FAKE_MODES", json.dumps(modes))
    monkeypatch.setattr(gp, "STARTUP_TIMEOUT", 10.0)
    out = tmp_path / "probes.json"
    rc = gp.run_parent([1, 2, 3], str(out), 1.5, [sys.executable, str(child)])
    got = {p["finding"]: p["ok"] for p in json.loads(out.read_text())["probes"]}
    assert got == expect
    assert rc == (0 if all(expect.values()) else 1)
    lines = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert sorted(ln["finding"] for ln in lines) == [1, 2, 3]
    assert all(set(ln) == {"finding", "title", "ok", "verdict", "detail", "seconds"} for ln in lines)
    if modes.get("2") == "hang":
        assert "did not finish within 1.5 s" in next(ln["verdict"] for ln in lines if ln["finding"] == 2)
    if modes.get("2") == "crash":
        bad = next(ln for ln in lines if ln["finding"] == 2)
        assert "died" in bad["verdict"] and "segfault-ish" in bad["detail"]["stderr_tail"]


def test_probes_without_a_gpu_report_every_finding_as_not_run(tmp_path):
    out = tmp_path / "p.json"
    r = subprocess.run([sys.executable, PROBES, "--only", "1,6", "--out", str(out)], capture_output=True, text=True,
                       timeout=180, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""), cwd=ROOT)
    assert r.returncode == 1
    probes = json.loads(out.read_text())["probes"]
    assert [p["finding"] for p in probes] == [1, 6] and not any(p["ok"] for p in probes)
    assert all(p["verdict"].startswith("probe not run:") for p in probes)
    bad = subprocess.run([sys.executable, PROBES, "--only", "5"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "not a probed finding" in bad.stderr


# ------------------------------------------------------------------------------------------------- folding


def _overhead_doc():
    env = {"device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "arch": "sm90", "torch": "2.11.0+cu130",
           "cuda": "13.0", "cusparselt_torch": "0.8.1", "cusparselt_sparsekern": "0.8.1", "driver": "580.159.04",
           "git_commit": "0123456789abcdef", "python": "3.12.3"}
    rec = {"contender": "sk_cslt", "library": "sparsekern", "mode": "eager", "m": 16, "n": 256, "k": 256,
           "dtype": "bf16", "device": "cuda", "arch": "sm90", "status": "ok", "reason": None, "median_us": 9.5,
           "host_us": 4.0, "overhead_us": 3.0, "speedup_vs_torch_cslt": 2.5}
    return {"schema_version": 1, "benchmark": "overhead", "created": "2026-12-05T10:00:00+00:00", "env": env,
            "config": {}, "records": [rec]}


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="0" failures="1"
skipped="0" tests="3"><testcase classname="tests.test_cuda_ops" name="test_a"/><testcase classname="tests.test_cuda_ops"
name="test_b"><failure message="AssertionError: boom">tb</failure></testcase><testcase classname="tests.test_linear"
name="test_c"/></testsuite></testsuites>"""


@pytest.fixture
def gpu_run(tmp_path):
    """A synthetic gpu_validate.sh folder: its gemm stage did not run, the overhead stage did."""
    d = tmp_path / "gv-out"
    (d / "logs").mkdir(parents=True)
    (d / "overhead").mkdir()
    (d / "run.json").write_text(json.dumps({"format": "sparsekern-gpu-validate", "date": "2026-12-05",
                                            "gpu": "NVIDIA H100 80GB HBM3", "gpu_slug": "h100-80gb-hbm3",
                                            "budget_s": 540, "git_commit": "0123456789abcdef"}))
    (d / "stages.tsv").write_text("stage\tstatus\tseconds\testimate_s\ttimeout_s\tlog\n"
                                  "a1-versions\tok\t9\t15\t60\tlogs/a1-versions.log\n"
                                  "b-probes\tok\t20\t35\t90\tlogs/b-probes.log\n"
                                  "c-tests\tfailed (rc 1)\t60\t70\t150\tlogs/c-tests.log\n"
                                  "e1-gemm\tskipped: budget (needs 75 s, 40 s left)\t0\t75\t0\t-\n"
                                  "e2-overhead\tok\t20\t25\t40\tlogs/e2-overhead.log\n")
    (d / "probes.json").write_text(json.dumps({"format": "sparsekern-gpu-probes", "probes": [
        {"finding": 1, "ok": False, "verdict": "finding 1 confirmed: 384 B vs 288 B", "detail": {}, "seconds": 1.0},
        {"finding": 6, "ok": True, "verdict": "fixed: rebuilt", "detail": {}, "seconds": 0.5}]}))
    (d / "pytest-c.xml").write_text(JUNIT)
    (d / "overhead" / "overhead.json").write_text(json.dumps(_overhead_doc()))
    (d / "overhead" / "overhead.csv").write_text("contender,median_us\nsk_cslt,9.5\n")
    (d / "logs" / "c-tests.log").write_text("".join(f"line {i}\n" for i in range(500)))
    (d / "logs" / "b-probes.log").write_text("short\n")
    (d / "core.1234").write_bytes(b"\0" * 100)
    (d / "build-temp.o").write_bytes(b"\0" * 10)
    (d / "running.txt").write_text("e2-overhead\tstarted x\ttimeout 40s\n")
    return d


def test_summary_of_a_run_folder(gpu_run):
    fold = _load("fold_under_test", FOLD)
    text = fold.summary_markdown(str(gpu_run))
    assert "# GPU validation: gv-out" in text and "NVIDIA H100 80GB HBM3" in text
    assert "| c-tests | cuda tests most likely to break | failed (rc 1) |" in text
    assert "| 1 | **NOT OK** | finding 1 confirmed: 384 B vs 288 B |" in text
    assert "| c-tests | 3 | 2 | 1 | 0 | 0 |" in text and "test_b: AssertionError: boom" in text
    assert "**Cut off:** stage `e2-overhead`" in text
    assert "### Host overhead (per call)" in text  # the benchmark part, from report.summarize
    r = subprocess.run([sys.executable, FOLD, "--summary", str(gpu_run)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and (gpu_run / "summary.md").read_text() == text


def _readme(tmp_path):
    p = tmp_path / "README.md"
    p.write_text("# x\n\n<!-- perf:begin -->\nold\n<!-- perf:end -->\n\ntail\n")
    return p


def test_fold_keeps_what_is_worth_committing_and_updates_the_readme(tmp_path, gpu_run):
    root, readme = tmp_path / "results", _readme(tmp_path)
    r = subprocess.run([sys.executable, FOLD, str(gpu_run), "--root", str(root), "--readme", str(readme)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    dest = root / "2026-12-05-h100-80gb-hbm3"
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["logs/b-probes.log", "logs/c-tests.log", "overhead/overhead.csv", "overhead/overhead.json",
                     "probes.json", "run.json", "stages.tsv", "summary.md"]
    log = (dest / "logs" / "c-tests.log").read_text().splitlines()
    assert len(log) == 201 and "300 earlier lines cut" in log[0] and log[-1] == "line 499"
    assert (dest / "logs" / "b-probes.log").read_text() == "short\n"
    assert "left out: pytest-c.xml" in r.stdout and "left out: core.1234" in r.stdout
    text = readme.read_text()
    assert text.startswith("# x\n\n<!-- perf:begin -->\n## Performance\n")
    assert text.endswith("<!-- perf:end -->\n\ntail\n")
    assert "### GPU: NVIDIA H100 80GB HBM3" in text  # from the overhead document: no gemm stage needed
    assert "### GPU validation: `2026-12-05-h100-80gb-hbm3`" in text
    assert "| e1-gemm | skipped: budget (needs 75 s, 40 s left) | 0 |" in text
    assert "| 1 | **not ok** | finding 1 confirmed: 384 B vs 288 B |" in text
    # --check agrees with what --write wrote
    chk = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "render_readme.py"), "--check", "--root",
                          str(root), "--readme", str(readme)], capture_output=True, text=True, timeout=120)
    assert chk.returncode == 0, chk.stderr
    # a second fold of the same day and GPU never overwrites the first
    r2 = subprocess.run([sys.executable, FOLD, str(gpu_run), "--root", str(root), "--no-readme"],
                        capture_output=True, text=True, timeout=60)
    assert r2.returncode == 0 and (root / "2026-12-05-h100-80gb-hbm3-2" / "stages.tsv").exists()


def test_fold_an_archive_with_neither_benchmark(tmp_path, gpu_run):
    import shutil

    shutil.rmtree(gpu_run / "overhead")
    (gpu_run / "run.json").unlink()  # the name then comes from the summary's GPU line and date
    (gpu_run / "summary.md").write_text("# GPU validation: x\n\nGPU: NVIDIA H100 80GB HBM3 (compute capability 9.0, "
                                        "TORCH_CUDA_ARCH_LIST=9.0a); date 2026-12-06; commit `abc`.\n")
    arch = tmp_path / "gv.tgz"
    with tarfile.open(arch, "w:gz") as t:
        t.add(gpu_run, arcname="gv-out")
    root, readme = tmp_path / "results", _readme(tmp_path)
    r = subprocess.run([sys.executable, FOLD, str(arch), "--root", str(root), "--readme", str(readme)],
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    dest = root / "2026-12-06-h100-80gb-hbm3"
    assert (dest / "stages.tsv").exists() and (dest / "summary.md").exists()
    text = readme.read_text()
    assert "### GPU validation: `2026-12-06-h100-80gb-hbm3`" in text and "### GPU:" not in text


def test_fold_refuses_what_is_not_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    r = subprocess.run([sys.executable, FOLD, str(tmp_path / "empty"), "--root", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "not a bench/gpu_validate.sh output folder" in r.stderr
    r = subprocess.run([sys.executable, FOLD, str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "neither a folder nor" in r.stderr
