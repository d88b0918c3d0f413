"""Tests of the benchmark tooling (python/sparsekern/bench, bench/): shapes, CLI errors, timing discipline, the CPU
GEMM run and its files (JSON against schema.json, CSV, PNG, policy table), result classification, summaries, the
README renderer and bench/gpu_validate.sh. Everything runs on the CPU in seconds; the `cuda` tests run the same on
a GPU."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from sparsekern.bench import contenders as cmod
from sparsekern.bench import gemm, overhead, report, shapes, timing, validate
from sparsekern.cli import main as cli_main

try:  # CI installs it (the `test` extra); a bare GPU box may not: the cuda tests still run there
    import jsonschema
except ImportError:
    jsonschema = None
needs_jsonschema = pytest.mark.skipif(jsonschema is None, reason="jsonschema is not installed")


def validated(doc: dict) -> dict:
    """validate() where jsonschema exists (always in CI); the schema tests themselves are marked needs_jsonschema."""
    if jsonschema is not None:
        validate(doc)
    return doc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_validate.sh")
RENDER = os.path.join(ROOT, "bench", "render_readme.py")


# ----------------------------------------------------------------------------------------------------- shapes


# (N, K) = (out_features, in_features) per layer, from the models' published config.json (hidden, intermediate,
# heads, KV heads): written out by hand, independent of shapes.ModelConfig.layers().
EXPECTED_PRESETS = {
    "llama3-8b": {(4096, 4096): "q/o", (1024, 4096): "k/v", (14336, 4096): "gate/up", (4096, 14336): "down"},
    "llama3-70b": {(8192, 8192): "q/o", (1024, 8192): "k/v", (28672, 8192): "gate/up", (8192, 28672): "down"},
    "llama2-7b": {(4096, 4096): "q/k/v/o", (11008, 4096): "gate/up", (4096, 11008): "down"},
}


@pytest.mark.parametrize("preset", sorted(EXPECTED_PRESETS))
def test_preset_shapes_match_model_configs(preset):
    got = {(s.n, s.k): s.layers for s in shapes.preset_shapes(preset)}
    assert got == EXPECTED_PRESETS[preset]
    assert all(s.m is None and s.model == preset for s in shapes.preset_shapes(preset))


@pytest.mark.parametrize("text,expect", [
    ("16x4096x4096", (16, 4096, 4096)),
    ("4096X11008", (None, 4096, 11008)),
    (" 3x33x100 ", (3, 33, 100)),
])
def test_parse_shape_accepts(text, expect):
    s = shapes.parse_shape(text)
    assert (s.m, s.n, s.k) == expect


@pytest.mark.parametrize("text,needle", [
    ("12x", "is not MxNxK or NxK"),
    ("x", "is not MxNxK or NxK"),
    ("0x64x64", "is not MxNxK or NxK"),
    ("1x2x3x4", "is not MxNxK or NxK"),
    ("ax64", "is not MxNxK or NxK"),
    ("16x64x30", "K = 30 is not a multiple of 4"),
])
def test_parse_shape_rejects_with_the_rule(text, needle):
    with pytest.raises(ValueError, match=needle):
        shapes.parse_shape(text)


def _cli_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,needles", [
    (["--shapes", "12x"], ["argument --shapes", "'12x' is not MxNxK or NxK", "e.g. 16x4096x4096"]),
    (["--preset", "llama9"], ["argument --preset", "unknown preset 'llama9'", "llama2-7b, llama3-70b, llama3-8b"]),
    (["--dtype", "fp64"], ["argument --dtype", "unknown dtype 'fp64'", "fp32, fp16, bf16, int8, fp8"]),
    (["--contenders", "cublas"], ["argument --contenders", "unknown contender 'cublas'", "torch_cslt"]),
    (["--m", "1,0"], ["argument --m", "'0' is not a positive integer"]),
    (["--iters", "0"], ["argument --iters", "'0' is not a positive integer"]),
])
def test_gemm_cli_bad_input_messages(capsys, argv, needles):
    err = _cli_error(capsys, ["bench", "gemm", *argv])
    for n in needles:
        assert n in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("bench", ["gemm", "overhead"])
def test_cuda_requested_without_gpu(capsys, bench):
    assert cli_main(["bench", bench, "--device", "cuda", "--shapes", "16x64x64"]) == 2
    assert "--device cuda, but torch sees no CUDA GPU" in capsys.readouterr().err


def test_overhead_cli_needs_fixed_m(capsys):
    assert cli_main(["bench", "overhead", "--device", "cpu", "--shapes", "256x256"]) == 2
    assert "256x256 needs a fixed M (MxNxK)" in capsys.readouterr().err


def test_gemm_cli_m_max_leaving_nothing(capsys):
    rc = cli_main(["bench", "gemm", "--device", "cpu", "--shapes", "64x64", "--m", "8,16", "--m-max", "4"])
    assert rc == 2
    assert "--m-max 4 leaves no M value" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------- timing


class FakeClock:
    """A clock that only moves when the timed function says how long it took."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_time_cpu_median_rotation_and_adaptive_count():
    clock = FakeClock()
    durations = [0.003, 0.001, 0.002, 0.005, 0.004, 0.001, 0.009, 0.002, 0.003, 0.004, 0.002, 0.001]
    seen = []

    def fn(i):
        seen.append(i)
        clock.t += durations[i]

    st = timing.time_cpu(fn, warmup=2, iters=8, min_iters=2, max_seconds=10.0, clock=clock)
    assert seen == list(range(10))  # indices keep counting through warm-up: buffers rotate, no restart
    timed = [d * 1e6 for d in durations[2:10]]
    assert st.iters == 8
    assert st.median_us == pytest.approx(statistics.median(timed))
    assert st.min_us == pytest.approx(min(timed))
    assert st.p10_us <= st.median_us <= st.p90_us


def test_time_cpu_interleaved_alternates_contenders():
    clock = FakeClock()
    calls = []
    cost = {"a": [0.010, 0.001, 0.002, 0.003, 0.004], "b": [0.020, 0.005, 0.006, 0.007, 0.008]}

    def make(name):
        def fn(i):
            calls.append((name, i))
            clock.t += cost[name][i]
        return fn

    st = timing.time_cpu_interleaved({"a": make("a"), "b": make("b")}, warmup=1, iters=4, min_iters=1,
                                     max_seconds=10.0, clock=clock)
    # warm-up once each, then 4 rounds of one call of each (shuffled order); indices count per contender
    assert calls[:2] == [("a", 0), ("b", 0)]
    rounds = [calls[2 + 2 * r: 4 + 2 * r] for r in range(4)]
    for r, rnd in enumerate(rounds):
        assert sorted(rnd) == [("a", r + 1), ("b", r + 1)]
    assert len(calls) == 10
    assert len({tuple(name for name, _ in rnd) for rnd in rounds}) == 2  # both orders occur (seed 0)
    assert st["a"].iters == st["b"].iters == 4
    assert st["a"].median_us == pytest.approx(statistics.median([1000.0, 2000.0, 3000.0, 4000.0]))
    assert st["b"].median_us == pytest.approx(statistics.median([5000.0, 6000.0, 7000.0, 8000.0]))


def test_time_cpu_interleaved_stops_at_the_time_budget():
    clock = FakeClock()

    def fn(i):
        clock.t += 1.0

    st = timing.time_cpu_interleaved({"a": fn, "b": fn}, warmup=0, iters=100, min_iters=3, max_seconds=1.0,
                                     clock=clock)
    assert st["a"].iters == st["b"].iters == 3  # budget (2 s) spent after round 1, min_iters rounds still run


def test_cpu_timing_flushes_before_every_timed_call_only():
    log = []
    st = timing.time_cpu(lambda i: log.append(f"call{i}"), warmup=2, iters=3, min_iters=1, max_seconds=10.0,
                         flush=lambda: log.append("flush"))
    assert log == ["call0", "call1", "flush", "call2", "flush", "call3", "flush", "call4"] and st.iters == 3
    log.clear()
    timing.time_cpu_interleaved({"a": lambda i: log.append("a"), "b": lambda i: log.append("b")}, warmup=1,
                                iters=2, min_iters=1, max_seconds=10.0, flush=lambda: log.append("flush"))
    assert log[:2] == ["a", "b"] and log[2::2] == ["flush"] * 4 and sorted(log[3::2]) == ["a", "a", "b", "b"]


def test_cpu_cache_flusher_covers_the_last_level_cache():
    flush = timing.cpu_cache_flusher()
    buf = timing._CPU_FLUSH[0]
    assert int(flush()) == buf.numel()  # every element read (ones: real pages, not the shared zero page)
    assert torch.equal(buf, torch.ones_like(buf))  # read only: no dirty lines left to write back in a timed call
    assert buf.numel() * buf.element_size() >= max(2 * timing.llc_bytes(), 64 << 20)


def test_time_cpu_bounds_work_by_max_seconds():
    clock = FakeClock()

    def fn(i):
        clock.t += 0.5  # every call takes half a second

    st = timing.time_cpu(fn, warmup=3, iters=100, min_iters=4, max_seconds=1.0, clock=clock)
    # warm-up stops after max_seconds/2 (one call), then ~1 s of work would be 2 calls: min_iters wins.
    assert st.iters == 4
    assert st.median_us == pytest.approx(0.5e6)


class _FakeCuda:
    """Stand-ins for the torch.cuda calls time_cuda makes, driven by a FakeClock: lets the CPU test check the
    control flow (batches, one L2 flush before every timed call, events around the call only, the spin before
    each batch) that otherwise only a GPU could run."""

    def __init__(self, clock):
        self.clock, self.log = clock, []
        outer = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self):
                self.t = outer.clock.t
                outer.log.append("event")

            def synchronize(self):
                pass

            def elapsed_time(self, end):
                return (end.t - self.t) * 1e3  # ms, as torch.cuda.Event does

        self.Event = Event

    def _sleep(self, cycles):
        self.log.append("spin")

    def synchronize(self):
        pass

    def current_device(self):
        return 0


class _FakeFlush:
    def __init__(self, log):
        self.log = log

    def sum(self):
        self.log.append("flush")


def test_time_cuda_control_flow_with_fake_cuda(monkeypatch):
    clock = FakeClock()
    fake = _FakeCuda(clock)
    for name in ("Event", "_sleep", "synchronize", "current_device"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(timing, "l2_flush_buffer", lambda dev: _FakeFlush(fake.log))
    monkeypatch.setitem(timing._SLEEP_CYCLES_PER_US, 0, 1000.0)
    durations = [0.002, 0.001, 0.004, 0.003, 0.001, 0.005, 0.002, 0.006, 0.001, 0.002]

    def fn(i):
        fake.log.append(f"call{i}")
        clock.t += durations[i]

    st = timing.time_cuda(fn, warmup=2, iters=8, min_iters=2, max_seconds=10.0, batch=5, clock=clock)
    assert st.iters == 8
    assert st.median_us == pytest.approx(statistics.median(d * 1e6 for d in durations[2:]))
    timed = fake.log[2:]  # after the two warm-up calls
    # batch of 5 then of 3, each behind one spin; every timed call: flush, event, call, event
    per_call = lambda i: ["flush", "event", f"call{i}", "event"]  # noqa: E731
    expect = ["spin"] + sum((per_call(i) for i in range(2, 7)), []) + ["spin"] + sum(
        (per_call(i) for i in range(7, 10)), [])
    assert timed == expect
    assert st.host_us == pytest.approx(statistics.median(d * 1e6 for d in durations[2:]))


@pytest.mark.parametrize("kw,needle", [
    ({"warmup": -1}, "warmup must be >= 0"),
    ({"iters": 0}, "iters and min_iters must be >= 1"),
    ({"max_seconds": 0.0}, "max_seconds must be > 0"),
])
def test_time_cpu_rejects_bad_counts(kw, needle):
    with pytest.raises(ValueError, match=needle):
        timing.time_cpu(lambda i: None, **kw)


# ----------------------------------------------------------------------------------------- problem generation


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8", "fp8"])
def test_make_problem_is_24_and_consistent(dtype):
    gen = torch.Generator().manual_seed(1)
    p = cmod.make_problem(dtype, 33, 100, "cpu", gen)
    w = p.w.float()
    assert tuple(w.shape) == (33, 100)
    assert ((w.reshape(33, 25, 4) != 0).sum(-1) <= 2).all()  # 2:4 along K
    assert (w != 0).sum() > 33 * 100 // 4  # not degenerate (random values: ~half kept)
    assert torch.equal(p.w_float.float(), w)  # the dense baseline sees the same values
    inp = cmod.make_inputs(p, 5, gen)
    assert torch.equal(inp.x_float.float(), inp.x.float())
    if dtype in ("int8", "fp8"):
        qmax = 127.0 if dtype == "int8" else 448.0
        # per-row / per-token absmax pinned to qmax: symmetric quantisation reproduces the values exactly
        assert torch.equal(w.abs().amax(1), torch.full((33,), qmax))
        assert torch.equal(inp.x.float().abs().amax(1), torch.full((5,), qmax))


def test_reference_prune_keeps_two_largest():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 4.0, -0.2, 0.3, -5.0]])
    assert torch.equal(cmod.prune_24_reference(w), torch.tensor([[0.0, -3.0, 2.0, 0.0, 4.0, 0.0, 0.0, -5.0]]))


# ----------------------------------------------------------------------------------------------- the CPU run

ALL = ",".join(cmod.CONTENDERS)
CPU_ARGS = ["bench", "gemm", "--device", "cpu", "--shapes", "3x64x128,96x64", "--m", "1,5", "--dtype",
            "fp32,bf16,int8", "--contenders", ALL, "--warmup", "1", "--iters", "3", "--min-iters", "2",
            "--rotate", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gemm")
    rc = cli_main([*CPU_ARGS, "--out", str(out)])
    with open(out / "gemm.json") as f:
        doc = json.load(f)
    return rc, out, doc


@needs_jsonschema
def test_cpu_run_json_validates_and_covers_every_point(cpu_run):
    rc, out, doc = cpu_run
    assert rc == 0, [r for r in doc["records"] if r["status"] in ("error", "wrong")]
    validate(doc)
    got = [(r["contender"], r["shape"], r["m"], r["dtype"]) for r in doc["records"]]
    assert len(got) == len(set(got))  # one record per (contender, shape, M, dtype)
    expect = set()
    for dt in ("fp32", "bf16", "int8"):
        for label, ms in (("64x128", [3]), ("96x64", [1, 5])):
            for name, c in cmod.CONTENDERS.items():
                if c.dtypes is None or dt in c.dtypes:
                    expect |= {(name, label, m, dt) for m in ms}
    assert set(got) == expect


def test_cpu_run_dense_is_measured_and_checked(cpu_run):
    _, _, doc = cpu_run
    dense = [r for r in doc["records"] if r["contender"] == "dense"]
    assert len(dense) == 9 and all(r["status"] == "ok" for r in dense)
    for r in dense:
        assert r["max_rel_err"] <= r["tolerance"]
        assert r["median_us"] > 0 and r["iters"] >= 2
        # derived columns recomputed independently from the record's own fields
        assert r["tflops"] == pytest.approx(2 * r["m"] * r["n"] * r["k"] / (r["median_us"] * 1e-6) / 1e12)
        assert r["speedup_vs_dense"] == pytest.approx(1.0)
    int8 = [r for r in dense if r["dtype"] == "int8"]
    assert all(r["compute_dtype"] == "bf16" for r in int8)  # W8A8 rows compare against the bf16 layer


def test_cpu_run_speedups_are_against_same_point_dense(cpu_run):
    _, _, doc = cpu_run
    dense = {(r["shape"], r["m"], r["dtype"]): r["median_us"] for r in doc["records"] if r["contender"] == "dense"}
    ok = [r for r in doc["records"] if r["status"] == "ok" and r["contender"] != "dense"]
    assert ok, "dense_int8 at least runs on every CPU"
    for r in ok:
        assert r["speedup_vs_dense"] == pytest.approx(dense[(r["shape"], r["m"], r["dtype"])] / r["median_us"])
        assert r["speedup_vs_torch_cslt"] is None  # torch_cslt cannot run on the CPU


def test_cpu_run_cuda_contenders_skipped_with_reason(cpu_run):
    _, _, doc = cpu_run
    for name in ("torch_cslt", "torch_semi", "torch_semi_cutlass", "sk_cslt", "sk_linear_search"):
        rs = [r for r in doc["records"] if r["contender"] == name]
        assert rs and all(r["status"] == "skipped" for r in rs)
        assert all("CUDA" in r["reason"] or "cuda" in r["reason"] for r in rs if r["dtype"] != "int8"), rs[0]


@pytest.mark.skipif(not torch._C._dispatch_has_kernel_for_dispatch_key("sparsekern::spmm_24", "CPU")
                    if hasattr(torch.ops.sparsekern, "spmm_24") else True,
                    reason="sparsekern's CPU spmm_24 kernel is not in this build")
def test_cpu_run_measures_sparsekern_kernel(cpu_run):
    _, _, doc = cpu_run
    rs = [r for r in doc["records"] if r["contender"] == "sk_spmm24" and r["dtype"] in ("fp32", "bf16")]
    assert rs and all(r["status"] == "ok" for r in rs), rs
    assert all(r["max_rel_err"] <= r["tolerance"] for r in rs)


def test_cpu_run_csv_png_and_table(cpu_run, capsys):
    _, out, doc = cpu_run
    with open(out / "gemm.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["records"])
    assert [(r["contender"], r["m"]) for r in rows] == [(r["contender"], str(r["m"])) for r in doc["records"]]
    pytest.importorskip("matplotlib")
    with open(out / "gemm.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (out / "gemm.png").stat().st_size > 5000


@needs_jsonschema
def test_schema_rejects_inconsistent_records(cpu_run):
    _, _, doc = cpu_run
    ok = next(r for r in doc["records"] if r["status"] == "ok")
    skipped = next(r for r in doc["records"] if r["status"] == "skipped")
    bad_docs = [
        dict(doc, records=[dict(ok, median_us=None)]),  # ok without a time
        dict(doc, records=[dict(ok, reason="x")]),  # ok with a reason
        dict(doc, records=[dict(skipped, reason=None)]),  # skipped without a reason
        dict(doc, records=[dict(skipped, median_us=3.0)]),  # skipped with a time
        dict(doc, records=[dict(ok, status="fine")]),  # unknown status
        dict(doc, records=[dict(ok, extra=1)]),  # unknown field
        dict(doc, records=[dict(ok, dtype="fp64")]),
        {k: v for k, v in doc.items() if k != "env"},
    ]
    validate(dict(doc, records=[ok, skipped]))
    for bad in bad_docs:
        with pytest.raises(jsonschema.ValidationError):
            validate(bad)


# ------------------------------------------------------------------------------------- result classification


def _fake(name, ours, prepare):
    return cmod.Contender(name, "test contender", ours=ours, sparse=True, prepare=prepare)


def test_wrong_results_errors_and_skips_are_classified(monkeypatch):
    def wrong(p):
        w = p.w_float
        return cmod.Prepared(call=lambda x: F.linear(x, w) * 1.01, adapt=lambda i: i.x_float,
                             weight_bytes=w.numel() * w.element_size(), compute_dtype="fp32", out_dtype=w.dtype)

    def crash(p):
        raise RuntimeError("kernel exploded")

    def skip(p):
        raise cmod.Skip("not here")

    fakes = {"t_wrong": _fake("t_wrong", True, wrong), "t_crash_ours": _fake("t_crash_ours", True, crash),
             "t_crash_torch": _fake("t_crash_torch", False, crash), "t_skip": _fake("t_skip", True, skip)}
    monkeypatch.setattr(cmod, "CONTENDERS", {**cmod.CONTENDERS, **fakes})
    monkeypatch.setattr(gemm, "CONTENDERS", cmod.CONTENDERS)
    cfg = gemm.GemmConfig(shapes=shapes.parse_shapes("2x32x64"), dtypes=["fp32"], device="cpu",
                          contenders=["dense", *fakes], warmup=0, iters=2, min_iters=1, rotate=1)
    doc = validated(gemm.run_gemm(cfg, log=lambda s: None))
    st = {r["contender"]: r for r in doc["records"]}
    assert st["dense"]["status"] == "ok"
    assert st["t_wrong"]["status"] == "wrong" and "max |y - ref| / max |ref| = 0.01" in st["t_wrong"]["reason"]
    assert st["t_wrong"]["max_rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert st["t_crash_ours"]["status"] == "error" and "RuntimeError: kernel exploded" in st["t_crash_ours"]["reason"]
    assert st["t_crash_torch"]["status"] == "skipped"  # PyTorch's limits are not our bug
    assert st["t_skip"] == dict(st["t_skip"], status="skipped", reason="not here")
    assert cli_rc_for(doc) == 1


def cli_rc_for(doc):
    return 1 if any(r["status"] in ("error", "wrong") for r in doc["records"]) else 0


@pytest.mark.parametrize("interleave,kept", [
    (False, [("dense", 1), ("t_int", 1), ("dense", 2)]),
    (True, [("dense", 1), ("t_int", 1)]),  # a point timed in rounds is kept whole or not at all
])
def test_interrupt_keeps_measured_points(monkeypatch, interleave, kept):
    calls = {"n": 0}

    def interrupting(p):
        w = p.w_float

        def call(x):
            calls["n"] += 1
            if calls["n"] > 3:
                raise gemm.Interrupted()
            return F.linear(x, w)

        return cmod.Prepared(call=call, adapt=lambda i: i.x_float, weight_bytes=1, compute_dtype="fp32",
                             out_dtype=w.dtype)

    monkeypatch.setattr(cmod, "CONTENDERS", {**cmod.CONTENDERS, "t_int": _fake("t_int", True, interrupting)})
    monkeypatch.setattr(gemm, "CONTENDERS", cmod.CONTENDERS)
    cfg = gemm.GemmConfig(shapes=shapes.parse_shapes("32x64"), m_list=[1, 2], dtypes=["fp32"], device="cpu",
                          contenders=["dense", "t_int"], warmup=0, iters=2, min_iters=1, rotate=1,
                          interleave=interleave)
    doc = gemm.run_gemm(cfg, log=lambda s: None)
    assert doc["config"]["interrupted"] is True
    assert [(r["contender"], r["m"]) for r in doc["records"]] == kept
    validated(doc)


# ---------------------------------------------------------------------------------------------- policy table


def _rec(contender, m, us, n=64, k=128, dtype="bf16", arch="sm90", status="ok"):
    return {"contender": contender, "m": m, "n": n, "k": k, "dtype": dtype, "arch": arch, "status": status,
            "median_us": us if status == "ok" else None}


def test_policy_entries_pick_the_fastest_sparse_kernel():
    recs = [_rec("dense", 1, 5.0), _rec("sk_cslt", 1, 9.0), _rec("sk_spmm24", 1, 4.0),
            _rec("dense", 512, 50.0), _rec("sk_cslt", 512, 30.0), _rec("sk_spmm24", 512, 70.0),
            _rec("sk_decompress", 512, 60.0), _rec("torch_cslt", 512, 1.0),  # not a SparseLinear kernel
            _rec("sk_cslt", 16, 1.0, status="error"),  # failed points never win
            _rec("sk_spmm24", 8, 2.0, arch="cpu-avx512", dtype="fp32")]
    assert gemm.policy_entries(recs) == [
        {"arch": "cpu", "dtype": "float32", "n": 64, "k": 128, "m": 8, "kernel": "spmm24",
         "timings_us": {"spmm24": 2.0}},
        {"arch": "sm90", "dtype": "bfloat16", "n": 64, "k": 128, "m": 1, "kernel": "spmm24",
         "timings_us": {"cslt": 9.0, "dense_linear": 5.0, "spmm24": 4.0}},
        {"arch": "sm90", "dtype": "bfloat16", "n": 64, "k": 128, "m": 512, "kernel": "cslt",
         "timings_us": {"cslt": 30.0, "dense_fallback": 60.0, "dense_linear": 50.0, "spmm24": 70.0}},
    ]


def test_policy_entries_mark_where_a_cpu_dense_copy_wins():
    cpu = dict(arch="cpu-avx512", dtype="bf16")
    recs = [_rec("dense", 1, 9.0, **cpu), _rec("sk_spmm24", 1, 4.0, **cpu), _rec("sk_decompress", 1, 90.0, **cpu),
            _rec("dense", 256, 50.0, **cpu), _rec("sk_spmm24", 256, 80.0, **cpu),
            _rec("sk_decompress", 256, 55.0, **cpu),
            _rec("dense", 512, 50.0), _rec("sk_cslt", 512, 60.0)]  # GPUs keep no dense copy
    entries = {(e["arch"], e["m"]): e for e in gemm.policy_entries(recs)}
    assert "kernel_dense_cache" not in entries["cpu", 1] and entries["cpu", 1]["kernel"] == "spmm24"
    assert entries["cpu", 256]["kernel"] == "dense_fallback"
    assert entries["cpu", 256]["kernel_dense_cache"] == "dense_cached"
    assert "kernel_dense_cache" not in entries["sm90", 512] and entries["sm90", 512]["kernel"] == "cslt"


def test_policy_table_round_trips_through_sparsekern_policy(tmp_path):
    policy = pytest.importorskip("sparsekern.policy")
    if not hasattr(policy, "load_table"):
        pytest.skip("sparsekern.policy has no load_table in this checkout")
    recs = [_rec("sk_cslt", 1, 9.0), _rec("sk_spmm24", 1, 4.0), _rec("sk_cslt", 512, 30.0),
            _rec("sk_spmm24", 512, 70.0)]
    path = str(tmp_path / "policy.json")
    assert gemm.write_policy(gemm.policy_entries(recs), path) == "sparsekern.policy.write_table"
    table = policy.load_table(path)
    assert table.lookup("sm90", "bfloat16", 64, 128, 1) == "spmm24"
    assert table.lookup("sm90", "bfloat16", 64, 128, 512) == "cslt"
    assert table.lookup("sm90", "bfloat16", 64, 128, 300) == "cslt"  # bucket 512 covers 257..512


# --------------------------------------------------------------------------------------------------- overhead


def test_overhead_on_cpu_is_skipped_cleanly(tmp_path, capsys):
    rc = cli_main(["bench", "overhead", "--device", "cpu", "--shapes", "16x256x256", "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "overhead.json") as f:
        doc = json.load(f)
    validated(doc)
    assert len(doc["records"]) == len(overhead.DEFAULT_CONTENDERS) * len(overhead.MODES)
    assert all(r["status"] == "skipped" and "nothing to measure on the CPU" in r["reason"] for r in doc["records"])


def test_overhead_derived_fields():
    base = dict(m=16, n=256, k=256, dtype="bf16", status="ok")
    recs = [dict(base, contender="torch_cslt", mode="eager", median_us=60.0),
            dict(base, contender="sk_cslt", mode="eager", median_us=12.0),
            dict(base, contender="sk_cslt", mode="graph", median_us=8.0),
            dict(base, contender="sk_cslt", mode="host", median_us=3.0),
            dict(base, contender="torch_cslt", mode="graph", status="skipped", median_us=None)]
    overhead._add_derived(recs)
    sk = recs[1]
    assert sk["speedup_vs_torch_cslt"] == pytest.approx(5.0)
    assert sk["overhead_us"] == pytest.approx(4.0)
    assert sk["host_us"] == pytest.approx(3.0)
    assert recs[2].get("speedup_vs_torch_cslt") is None  # torch_cslt's graph was not measured


# -------------------------------------------------------------------------------------------- summary, goals


def test_goals_for_the_cpu_issue():
    recs = []
    for dt in ("fp32", "bf16"):
        for (n, k) in ((11008, 4096), (4096, 11008)):
            for m, sp in ((1, 1.7), (16, 1.2), (256, 1.0)):
                recs.append(dict(contender="sk_linear", status="ok", dtype=dt, m=m, n=n, k=k, speedup_vs_dense=sp))
    gs = report.goals({"env": {"device": "cpu"}, "records": recs})
    met = {g["goal"].split(" (")[0]: g["met"] for g in gs}
    assert met == {"CPU fp32 M=1": True, "CPU fp32 M=16": False, "CPU fp32 M=256": True,
                   "CPU bf16 M=1": True, "CPU bf16 M=16": False, "CPU bf16 M=256": True}


def test_goals_for_the_gpu_issue():
    def r(contender, dtype, m, sp, model="llama3-8b"):
        return dict(contender=contender, status="ok", dtype=dtype, m=m, n=4096, k=4096, model=model,
                    speedup_vs_dense=sp)

    recs = [r("sk_linear", "bf16", 512, 1.1), r("sk_linear", "bf16", 1024, 1.4), r("sk_linear", "bf16", 4096, 1.5),
            r("sk_linear", "bf16", 256, 9.0),  # below the prefill range: ignored
            r("sk_linear", "bf16", 4096, 0.1, model=None),  # custom shape: not a Llama shape, ignored
            r("sk_cslt", "int8", 2048, 2.5), r("sk_cslt", "int8", 8192, 1.9), r("sk_cslt", "int8", 1024, 0.5)]
    ov = {"records": [dict(contender="sk_cslt", status="ok", mode="eager", m=16, n=256, k=256,
                           speedup_vs_torch_cslt=4.0, overhead_us=6.5)]}
    gs = report.goals({"env": {"device": "cuda"}, "records": recs}, ov)
    got = [(g["contender"], g["measured"], g["met"]) for g in gs]
    assert got == [("sk_linear", pytest.approx(1.4), True), ("sk_cslt", pytest.approx(1.9), False),
                   ("sk_cslt", 4.0, True), ("sk_cslt", 6.5, False)]


def test_summary_of_the_cpu_run(cpu_run):
    _, out, _ = cpu_run
    steps = out / "steps.tsv"
    steps.write_text("step\tstatus\tseconds\tlog\nbuild\tok\t12\tlogs/build.log\ngemm\ttimeout\t570\tlogs/g.log\n")
    md = report.summarize(str(out), str(steps))
    assert "## GEMM fp32: median µs (speedup vs dense)" in md
    assert "| gemm | timeout | 570 | logs/g.log |" in md
    assert "| torch_cslt | skipped |" in md
    assert "cpu-" in md  # arch in the environment table


def _render_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_readme", RENDER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_render_readme_block(cpu_run, tmp_path, capsys):
    _, out, _ = cpu_run
    render = _render_module()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- perf:begin -->\nstale\n<!-- perf:end -->\n\nrest\n")
    run = lambda *a: render.main(["--results", str(out), "--readme", str(readme), *a])  # noqa: E731
    assert run("--check") == 1
    assert run("--write") == 0
    text = readme.read_text()
    assert text.startswith("# x\n\n<!-- perf:begin -->\n## Performance\n")
    assert text.endswith("<!-- perf:end -->\n\nrest\n")
    assert "### CPU:" in text and "stale" not in text
    assert run("--check") == 0
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="has no '<!-- perf:begin -->' ... '<!-- perf:end -->' block"):
        run("--write")


def test_summary_includes_the_pruning_benchmark(tmp_path):
    (tmp_path / "prune").mkdir()
    doc = {"benchmark": "prune", "results": [{"method": "wanda", "pattern": "2:4", "shape": "64x128",
                                              "device": "cuda", "ours_s": 0.0012, "reference_s": 0.06,
                                              "speedup": 50.0}]}
    (tmp_path / "prune" / "prune.json").write_text(json.dumps(doc))
    md = report.summarize(str(tmp_path))
    assert "| wanda | 2:4 | 64x128 | cuda | 0.0012 | 0.0600 | 50.0 |" in md
    assert "No benchmark results" in _render_module().render(str(tmp_path.parent), str(tmp_path))


def test_render_readme_without_results(tmp_path):
    r = subprocess.run([sys.executable, RENDER, "--root", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0 and "No benchmark results are committed yet" in r.stdout


def test_plot_without_matplotlib_says_so(monkeypatch, tmp_path):
    from sparsekern.bench import plot

    recs = [dict(contender="sk_x", status="ok", shape="s", m=1, dtype="bf16", speedup_vs_dense=1.5)]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(plot.PlotUnavailable, match="matplotlib is not installed"):
        plot.plot_speedup(recs, str(tmp_path / "p.png"))
    with pytest.raises(ValueError, match="no measured speedup vs dense"):
        plot.plot_speedup([dict(recs[0], contender="dense")], str(tmp_path / "p.png"))


# ---------------------------------------------------------------------------------------------- gpu_validate


def test_gpu_validate_script_parses():
    r = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# The dry run of bench/gpu_validate.sh (stages, estimates, budget) is tested in tests/test_gpu_validate.py.


def test_gpu_validate_rejects_unknown_argument():
    r = subprocess.run(["bash", SCRIPT, "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown argument '--frobnicate'" in r.stderr


def test_versions_script_runs(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "versions.py"), "--out", str(tmp_path / "v.json")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["torch"] == torch.__version__ and "packages" in v


# ------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_gemm_on_cuda_small(tmp_path):
    rc = cli_main(["bench", "gemm", "--device", "cuda", "--shapes", "64x128,16x256x512", "--m", "1,32",
                   "--dtype", "fp16,bf16,int8", "--warmup", "2", "--iters", "5", "--min-iters", "2", "--out",
                   str(tmp_path), "--no-plot"])
    doc = validated(json.loads((tmp_path / "gemm.json").read_text()))
    bad = [r for r in doc["records"] if r["status"] in ("error", "wrong")]
    assert rc == 0 and not bad, bad
    assert all(r["status"] == "ok" for r in doc["records"] if r["contender"] == "dense")


@pytest.mark.cuda
def test_overhead_on_cuda_small(tmp_path):
    rc = cli_main(["bench", "overhead", "--device", "cuda", "--shapes", "16x256x256", "--calls", "20", "--reps", "3",
                   "--out", str(tmp_path)])
    doc = validated(json.loads((tmp_path / "overhead.json").read_text()))
    assert rc == 0, [r for r in doc["records"] if r["status"] == "error"]
    assert any(r["status"] == "ok" and r["mode"] == "eager" for r in doc["records"])
