"""First-use calibration of CPU SparseLinear kernels (sparsekern.calibrate) and the dispatch it feeds.

What is proven here, with the timing made deterministic where the outcome must not depend on the machine:
- where the 2:4 kernel loses (a table entry says so, or calibration measures it), the layer runs the dense-equivalent
  kernel: dense_cached when it keeps a dense copy, else the decompress-and-GEMM fallback; with the same numbers;
- calibration is bounded: one warm-up and at most ROUNDS timed rounds per shape, no new round after BUDGET_S, once per
  (dtype, N, K, M bucket) per process, PROCESS_BUDGET_S per process;
- its result is cached: in the table in use, in the table file (a new process does not measure again), and in the
  layer (later calls of the same bucket do not consult anything);
- it is off with SPARSEKERN_CPU_CALIBRATE=0, under a forced kernel, and under torch.compile.
"""

from __future__ import annotations

import json
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparsekern.linear as linmod
from sparsekern import calibrate, policy
from sparsekern.linear import SparseLinear


@pytest.fixture
def table_file(tmp_path, monkeypatch):
    """Calibration on, a fresh process-like state, and the table file in tmp_path."""
    path = tmp_path / "policy.json"
    monkeypatch.setenv("SPARSEKERN_CPU_CALIBRATE", "1")
    monkeypatch.setenv("SPARSEKERN_POLICY_TABLE", str(path))
    policy.set_table(None)
    calibrate.reset()
    yield path
    policy.set_table(None)
    calibrate.reset()


def _layer(n=48, k=64, dtype=torch.float32, dense_cache=False, quant=None):
    lin = torch.nn.Linear(k, n, bias=True)
    with torch.no_grad():
        keep = torch.rand(n, k // 4, 4).argsort(-1) < 2
        lin.weight.mul_(keep.reshape(n, k))
    lin = lin.to(dtype)
    return SparseLinear.from_linear(lin, dense_cache=dense_cache, quant=quant), lin


def _slow_kernel(monkeypatch, slow: str, seconds: float, calls: dict | None = None):
    """Make one kernel of _sparse_matmul slow (and count calls per kernel)."""
    real = linmod._sparse_matmul

    def patched(*args):
        kernel = args[6]
        if calls is not None:
            calls[kernel] = calls.get(kernel, 0) + 1
        if kernel == slow:
            time.sleep(seconds)
        return real(*args)

    monkeypatch.setattr(linmod, "_sparse_matmul", patched)


def test_decide_rule():
    assert calibrate.decide({"spmm24": 10, "dense_fallback": 20, "dense": 5}) == ("spmm24", "dense_cached")
    assert calibrate.decide({"spmm24": 10, "dense_fallback": 9.8, "dense": 9.8}) == ("spmm24", "spmm24")  # < 3 %
    assert calibrate.decide({"spmm24": 10, "dense_fallback": 9, "dense": 8.9}) == ("dense_fallback",
                                                                                   "dense_fallback")
    assert calibrate.decide({"spmm24": 10, "dense_fallback": 9, "dense": 5}) == ("dense_fallback", "dense_cached")
    assert calibrate.decide({"spmm24": 10, "dense_fallback": 30}) == ("spmm24", None)


def test_a_table_entry_where_sparse_loses_runs_dense_equivalent(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_POLICY_TABLE", str(tmp_path / "t.json"))
    layer, lin = _layer(dense_cache=True)
    plain, _ = _layer()
    plain.load_state_dict(layer.state_dict())
    entry = {"arch": "cpu", "dtype": "float32", "n": 48, "k": 64, "m": 16, "kernel": "dense_fallback",
             "kernel_dense_cache": "dense_cached"}
    policy.set_table(policy.table_from_entries([entry]))
    try:
        x = torch.randn(3, 5, 64)  # M = 15: bucket 16
        assert layer.kernel_for(15) == "dense_cached" and plain.kernel_for(15) == "dense_fallback"
        assert layer.kernel_for(1) == "dense_cached"  # nearest measured bucket
        with torch.no_grad():
            ref = F.linear(x, lin.weight, lin.bias)
            torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(plain(x), ref, rtol=1e-5, atol=1e-5)
        # A layer that cannot run the table's choice gets the default (quantised: no dense copy at all).
        q, _ = _layer(quant="int8")
        assert q.kernel_for(15) == "spmm24"
    finally:
        policy.set_table(None)


@pytest.mark.parametrize("dense_cache", [False, True])
def test_calibration_picks_dense_where_sparse_loses_and_writes_the_table(table_file, monkeypatch, dense_cache):
    layer, lin = _layer(dense_cache=dense_cache)
    _slow_kernel(monkeypatch, "spmm24", 0.01)  # the 2:4 kernel "loses" on this machine
    x = torch.randn(7, 64)
    with torch.no_grad():
        y = layer(x)
    torch.testing.assert_close(y, F.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert layer.kernel_for(7) == ("dense_cached" if dense_cache else "dense_fallback")
    doc = json.loads(table_file.read_text())
    (e,) = doc["entries"]
    assert (e["arch"], e["dtype"], e["n"], e["k"], e["m"]) == ("cpu", "float32", 48, 64, 8)
    assert e["kernel"] == "dense_fallback" and e["kernel_dense_cache"] == "dense_cached"
    assert set(e["timings_us"]) == {"spmm24", "dense_fallback", "dense"} and e["timings_us"]["spmm24"] >= 10000
    # A new process (fresh state, same file) reads the choice and measures nothing.
    policy.set_table(None)
    calibrate.reset()
    fresh, _ = _layer()
    assert not calibrate.wanted("float32", 48, 64, 7)
    assert fresh.kernel_for(5) == "dense_fallback"
    with torch.no_grad():
        fresh(torch.randn(5, 64))
    assert calibrate.stats()["entries"] == []


def test_calibration_keeps_the_sparse_kernel_where_it_wins(table_file, monkeypatch):
    layer, _ = _layer()
    _slow_kernel(monkeypatch, "dense_fallback", 0.03)
    real_linear = F.linear

    def slow_linear(*a, **k):
        time.sleep(0.03)
        return real_linear(*a, **k)

    monkeypatch.setattr(linmod.F, "linear", slow_linear)
    with torch.no_grad():
        layer(torch.randn(1, 64))
    monkeypatch.setattr(linmod.F, "linear", real_linear)
    assert layer.kernel_for(1) == "spmm24"
    e = json.loads(table_file.read_text())["entries"][0]
    assert e["kernel_dense_cache"] == "spmm24", json.dumps(e)


def test_calibration_is_bounded_and_happens_once_per_bucket(table_file, monkeypatch):
    layer, _ = _layer()
    calls: dict[str, int] = {}
    _slow_kernel(monkeypatch, "spmm24", 0.015, calls)  # one round (> 15 ms) exceeds BUDGET_S (20 ms) after 2 rounds
    with torch.no_grad():
        layer(torch.randn(4, 64))
    # Calibration: one warm-up + timed rounds until BUDGET_S passed (the warm-up and first round take >= 30 ms):
    # exactly one timed round (2 calls of each); then the call itself runs the chosen kernel (not spmm24: it lost).
    assert calls == {"spmm24": 2, "dense_fallback": 3}, calls
    assert calibrate.stats()["seconds"] < 5 * (0.015 * 2) + 1.0  # bounded: no runaway rounds
    calls.clear()
    with torch.no_grad():
        for _ in range(3):
            layer(torch.randn(3, 64))  # same bucket (4): cached in the layer, no calibration
    assert calls == {"dense_fallback": 3}
    calls.clear()
    with torch.no_grad():
        layer(torch.randn(9, 64))  # a new bucket (16): calibrated once
        layer(torch.randn(10, 64))
    assert calls["spmm24"] == 2 and calls["dense_fallback"] == 2 + 2  # calibration 2 + the two calls
    assert [e["m"] for e in calibrate.stats()["entries"]] == [4, 16]
    assert max(calibrate.ROUNDS, 1) >= 1 and calibrate.BUDGET_S <= 0.05


def test_process_budget_stops_calibration(table_file, monkeypatch):
    monkeypatch.setattr(calibrate, "PROCESS_BUDGET_S", 0.0)
    layer, _ = _layer()
    calls: dict[str, int] = {}
    _slow_kernel(monkeypatch, "none", 0, calls)
    with torch.no_grad():
        layer(torch.randn(4, 64))
    assert calls == {"spmm24": 1} and not table_file.exists()  # the built-in default, nothing measured


def test_off_by_setting_forced_kernel_and_compile(table_file, monkeypatch):
    calls: dict[str, int] = {}
    _slow_kernel(monkeypatch, "none", 0, calls)
    layer, _ = _layer()
    monkeypatch.setenv("SPARSEKERN_CPU_CALIBRATE", "0")
    with torch.no_grad():
        layer(torch.randn(4, 64))
    assert calls == {"spmm24": 1}
    monkeypatch.setenv("SPARSEKERN_CPU_CALIBRATE", "1")
    calls.clear()
    layer.set_kernel("dense_fallback")
    with torch.no_grad():
        layer(torch.randn(4, 64))
    layer.set_kernel(None)
    with policy.override("spmm24"), torch.no_grad():
        layer(torch.randn(4, 64))
    assert calls == {"dense_fallback": 1, "spmm24": 1} and not table_file.exists()
    monkeypatch.setenv("SPARSEKERN_CPU_CALIBRATE", "banana")
    with pytest.raises(ValueError, match="SPARSEKERN_CPU_CALIBRATE=banana is not understood"):
        layer(torch.randn(4, 64))


def test_unwritable_table_warns_once_and_keeps_the_choice(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("SPARSEKERN_CPU_CALIBRATE", "1")
    monkeypatch.setenv("SPARSEKERN_POLICY_TABLE", str(blocker / "policy.json"))  # parent is a file
    policy.set_table(None)
    calibrate.reset()
    try:
        layer, _ = _layer()
        _slow_kernel(monkeypatch, "spmm24", 0.01)
        with warnings.catch_warnings(record=True) as w, torch.no_grad():
            warnings.simplefilter("always")
            layer(torch.randn(4, 64))
            layer(torch.randn(20, 64))
        msgs = [str(x.message) for x in w if "calibrated CPU kernel choices" in str(x.message)]
        assert len(msgs) == 1 and "cannot write the policy table" in msgs[0]
        assert layer.kernel_for(4) == "dense_fallback" and layer.kernel_for(20) == "dense_fallback"
    finally:
        policy.set_table(None)
        calibrate.reset()


def test_in_memory_table_is_updated_in_memory_only(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_CPU_CALIBRATE", "1")
    monkeypatch.setenv("SPARSEKERN_POLICY_TABLE", str(tmp_path / "never.json"))
    policy.set_table(policy.PolicyTable())
    calibrate.reset()
    try:
        layer, _ = _layer()
        _slow_kernel(monkeypatch, "spmm24", 0.01)
        with torch.no_grad():
            layer(torch.randn(4, 64))
        assert policy.active_table().has_entry("cpu", "float32", 48, 64, 4)
        assert not (tmp_path / "never.json").exists()
    finally:
        policy.set_table(None)
        calibrate.reset()


def test_int8_layers_calibrate_without_a_dense_candidate(table_file, monkeypatch):
    layer, _ = _layer(quant="int8")
    calls: dict[str, int] = {}
    _slow_kernel(monkeypatch, "none", 0, calls)
    with torch.no_grad():
        layer(torch.randn(4, 64))
    (e,) = json.loads(table_file.read_text())["entries"]
    assert e["dtype"] == "int8" and set(e["timings_us"]) == {"spmm24", "dense_fallback"}
    assert "kernel_dense_cache" not in e


def test_layer_kernel_cache_follows_the_policy_buckets_and_generation(monkeypatch):
    layer, _ = _layer()
    asked = []
    real = SparseLinear.kernel_for

    def counting(self, m):
        asked.append(m)
        return real(self, m)

    monkeypatch.setattr(SparseLinear, "kernel_for", counting)
    ms = [1, 2, 3, 4, 5, 8, 9, 16, 17, 16384, 16385, 40000]
    for m in ms:
        layer._eager_kernel(torch.empty(m, 64))
    first = list(asked)
    assert len(first) == len({policy.m_bucket(m) for m in ms})  # once per bucket (16385 and 40000 share the cap)
    for m in ms:
        layer._eager_kernel(torch.empty(m, 64))
    assert asked == first  # the hot path answered every repeat
    with policy.override("dense_fallback"):
        assert layer._eager_kernel(torch.empty(3, 64)) == "dense_fallback"  # a new generation: asked again
    assert layer._eager_kernel(torch.empty(3, 64)) == "spmm24"
    layer.set_kernel("dense_fallback")
    assert layer._eager_kernel(torch.empty(3, 64)) == "dense_fallback"


def test_record_entries_refuses_a_malformed_entry_and_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEKERN_POLICY_TABLE", str(tmp_path / "t.json"))
    policy.set_table(None)
    try:
        policy.active_table()  # the table in use is read (its first use activates it)
        gen = policy.generation()
        with pytest.raises(policy.PolicyError, match=r"record_entries: entry .* 'm' must be a positive integer"):
            policy.record_entries([{"arch": "cpu", "dtype": "float32", "n": 4, "k": 8, "m": 0, "kernel": "spmm24"}])
        with pytest.raises(policy.PolicyError, match="unknown kernel 'fast'"):
            policy.record_entries([{"arch": "cpu", "dtype": "float32", "n": 4, "k": 8, "m": 1, "kernel": "fast"}])
        assert policy.generation() == gen and not (tmp_path / "t.json").exists()
    finally:
        policy.set_table(None)
