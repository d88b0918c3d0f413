"""The settings registry (sparsekern.envs), the C++ CPU dispatch settings (read once at load, changed through the
setter), the policy table's "cpu_dispatch" thresholds, cuSPARSELt's shape rule from C++, and where doctor and bench
show all of it."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sparsekern
from sparsekern import _ext, diagnostics, envs, policy, weight
from sparsekern.ops import core
from sparsekern.ops import prune as prune_ops

REPO = Path(__file__).resolve().parents[1]
needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}")


from cpuinfo import FLAGS as _FLAGS  # noqa: E402  (tests/cpuinfo.py: /proc/cpuinfo, independent of the library)
AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= _FLAGS
BF16 = AVX512 and "avx512_bf16" in _FLAGS
VNNI = AVX512 and "avx512_vnni" in _FLAGS
VBMI = AVX512 and "avx512vbmi" in _FLAGS


@pytest.fixture(autouse=True)
def _fresh_policy(monkeypatch, tmp_path):
    """No user policy file leaks in; the table state is reset around each test."""
    monkeypatch.setenv(policy.ENV_TABLE, str(tmp_path / "no-policy.json"))
    policy.set_table(None)
    yield
    policy.set_table(None)


# ------------------------------------------------------------------------------------------------ the registry

# Compile-time macros that share the prefix but are not environment variables.
_MACROS = {"SPARSEKERN_WITH_CUDA", "SPARSEKERN_TORCH_VERSION", "SPARSEKERN_VERSION", "SPARSEKERN_CUDA_VERSION",
           "SPARSEKERN_CUDA_ARCHS"}


def _source_files():
    for top in ("python/sparsekern", "csrc", "tools"):
        for p in sorted((REPO / top).rglob("*")):
            if p.suffix in (".py", ".cpp", ".h", ".cu", ".cuh", ".sh") and p.is_file():
                yield p
    yield REPO / "setup.py"
    # the test suite's own settings (the test files themselves use made-up names to test the registry)
    for name in ("conftest.py", "fuzz_support.py"):
        if (REPO / "tests" / name).exists():
            yield REPO / "tests" / name


def test_every_variable_in_the_sources_is_declared_once():
    found = set()
    for p in _source_files():
        found |= set(re.findall(r"\bSPARSEKERN_[A-Z0-9_]*[A-Z0-9]\b", p.read_text(errors="replace")))
    found -= _MACROS
    assert found <= set(envs.VARIABLES), sorted(found - set(envs.VARIABLES))
    assert len(envs.VARIABLES) == 13
    for v in envs.VARIABLES.values():
        assert v.doc and v.read_by in (envs.PYTHON, envs.CPP, envs.BUILD, envs.TESTS) and v.type


def test_python_reads_sparsekern_variables_only_through_the_registry():
    bad = []
    for p in sorted((REPO / "python/sparsekern").rglob("*.py")):
        if p.name == "envs.py":
            continue
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if re.search(r"(environ|getenv)\b.*SPARSEKERN_|SPARSEKERN_.*\b(environ\.get|getenv)", line):
                bad.append(f"{p.relative_to(REPO)}:{i}: {line.strip()}")
    assert not bad, bad


def test_cpp_reads_the_environment_in_two_places_and_probes_the_cpu_in_one():
    getenv, probe = set(), set()
    for p in sorted((REPO / "csrc").rglob("*")):
        if p.suffix in (".cpp", ".h", ".cu", ".cuh"):
            text = p.read_text()
            if "getenv(" in text:
                getenv.add(str(p.relative_to(REPO)))
            if "__builtin_cpu_supports(" in text:
                probe.add(str(p.relative_to(REPO)))
    assert getenv == {"csrc/cpu/dispatch.cpp", "csrc/cusparselt/cslt.cpp"}
    assert probe == {"csrc/cpu/dispatch.cpp"}
    defs = [p for p in (REPO / "csrc").rglob("*.cpp") if re.search(r"\nconst CpuFeatures& cpu_features\(\) \{",
                                                                     p.read_text())]
    assert [str(p.relative_to(REPO)) for p in defs] == ["csrc/cpu/dispatch.cpp"]


def test_typed_values_defaults_and_errors(monkeypatch):
    monkeypatch.delenv("SPARSEKERN_CSLT_MAX_PLANS", raising=False)
    assert envs.get("SPARSEKERN_CSLT_MAX_PLANS") == 4096
    monkeypatch.setenv("SPARSEKERN_CSLT_MAX_PLANS", "17")
    assert envs.get("SPARSEKERN_CSLT_MAX_PLANS") == 17 and envs.SPARSEKERN_CSLT_MAX_PLANS == 17
    monkeypatch.setenv("SPARSEKERN_CSLT_MAX_PLANS", "-3")
    with pytest.raises(envs.EnvError, match=r"SPARSEKERN_CSLT_MAX_PLANS=-3 is not understood; use a positive integer"):
        envs.get("SPARSEKERN_CSLT_MAX_PLANS")
    monkeypatch.setenv("SPARSEKERN_CPU_SPMM_LAYOUT", "columns")
    with pytest.raises(envs.EnvError, match="SPARSEKERN_CPU_SPMM_LAYOUT=columns is not understood; use one of auto, "
                                             "rows, pairs, tokens"):
        envs.get("SPARSEKERN_CPU_SPMM_LAYOUT")
    monkeypatch.setenv("SPARSEKERN_NO_HUGEPAGE_HINT", "0")
    assert envs.get("SPARSEKERN_NO_HUGEPAGE_HINT") is False
    monkeypatch.setenv("SPARSEKERN_NO_HUGEPAGE_HINT", "1")
    assert envs.get("SPARSEKERN_NO_HUGEPAGE_HINT") is True
    monkeypatch.setenv("SPARSEKERN_DEBUG", "maybe")
    with pytest.raises(envs.EnvError, match="SPARSEKERN_DEBUG=maybe is not understood"):
        envs.get("SPARSEKERN_DEBUG")
    monkeypatch.setenv("SPARSEKERN_CACHE", "/tmp/x")
    assert envs.SPARSEKERN_CACHE == "/tmp/x"
    with pytest.raises(KeyError, match="SPARSEKERN_NOPE is not a sparsekern environment variable"):
        envs.get("SPARSEKERN_NOPE")
    with pytest.raises(AttributeError):
        envs.SPARSEKERN_NOPE  # noqa: B018


def test_describe_lists_every_variable_with_value_and_source(monkeypatch):
    for name in envs.VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SPARSEKERN_CACHE", "/tmp/cache-here")
    monkeypatch.setenv("SPARSEKERN_CPU_ISA", "sse9")
    rows = {r["name"]: r for r in envs.describe()}
    assert set(rows) == set(envs.VARIABLES)
    for r in rows.values():
        assert {"name", "value", "default", "source", "doc", "read_by"} <= set(r)
    assert (rows["SPARSEKERN_CACHE"]["value"], rows["SPARSEKERN_CACHE"]["source"]) == ("/tmp/cache-here", "environment")
    plans = rows["SPARSEKERN_CSLT_MAX_PLANS"]
    assert (plans["value"], plans["default"], plans["source"]) == (4096, 4096, "default")
    assert rows["SPARSEKERN_CPU_ISA"]["value"] == "sse9" and "is not understood" in rows["SPARSEKERN_CPU_ISA"]["error"]
    assert rows["SPARSEKERN_CUDA"]["read_by"] == envs.BUILD
    assert rows["SPARSEKERN_CPU_ISA"]["read_by"] == envs.CPP
    assert rows["SPARSEKERN_POLICY_TABLE"]["read_by"] == envs.PYTHON


def test_child_env_names_only_declared_variables():
    env = envs.child_env({"A": "1", "SPARSEKERN_NO_HUGEPAGE_HINT": "1"}, SPARSEKERN_NO_HUGEPAGE_HINT=None,
                         SPARSEKERN_CPU_ISA="scalar")
    assert env == {"A": "1", "SPARSEKERN_CPU_ISA": "scalar"}
    with pytest.raises(KeyError):
        envs.child_env({}, SPARSEKERN_TYPO="1")


# ------------------------------------------------------------------------------------------------ C++ settings


@needs_ext
def test_cpp_reads_the_environment_once_not_per_call(monkeypatch):
    # Setting the variables after load changes nothing (no getenv per call) ...
    before = envs.cpu_dispatch_settings()
    w = torch.randn(8, 64)
    w = core.prune_nm(w, 2, 4)[0]
    c = weight.compress_24(w)
    x = torch.randn(3, 64)
    ref = weight.sparse_linear(x, c)
    monkeypatch.setenv("SPARSEKERN_CPU_SPMM_LAYOUT", "columns")
    monkeypatch.setenv("SPARSEKERN_CPU_ISA", "sse9")
    assert torch.equal(weight.sparse_linear(x, c), ref)  # would raise if the variables were read now
    prune_ops.wanda_prune(torch.randn(4, 16), torch.rand(16), 2, 4)
    assert envs.cpu_dispatch_settings() == before
    # ... while the setter does.
    with envs.cpu_dispatch(isa="scalar", layout="rows") as now:
        assert now["isa"] == "scalar" and now["layout"] == "rows"
        assert _ext._C.cpu_spmm_kernel(3, 64, "float32") == ("rows", "scalar-f32")
    assert envs.cpu_dispatch_settings() == before


@needs_ext
def test_setter_rejects_bad_values_with_the_messages_and_changes_nothing():
    before = envs.cpu_dispatch_settings()
    cases = [
        ({"isa": "sse9"}, "SPARSEKERN_CPU_ISA=sse9 is not understood; use avx512, avx512-base"),
        ({"layout": "columns"}, r"SPARSEKERN_CPU_SPMM_LAYOUT=columns is not understood; use auto \(default\), rows, "
                                "pairs or tokens"),
        ({"layout": "rows", "isa": "sse9"}, "SPARSEKERN_CPU_ISA=sse9 is not understood"),  # all or nothing
        ({"isa": 3}, "isa must be a string or None"),
        ({"huge_page_hint": 1}, "huge_page_hint must be True or False"),
        ({"pairs_bf16_min_m": 0}, "pairs_bf16_min_m must be a positive integer .* or None \\(never\\)"),
        ({"pairs_bf16_min_m": "80"}, "pairs_bf16_min_m must be a positive integer"),
        ({"slab_rows": None}, "slab_rows must be a positive integer \\(got None\\)"),
        ({"tokens_min": 4}, "unknown setting 'tokens_min'; known: isa, layout, huge_page_hint, rows_pair_bf16_min_m"),
        ({"slab_rows": 2.5}, "slab_rows must be None, a bool, an int or a string \\(got float\\)"),
    ]
    for values, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            with envs.cpu_dispatch(**values):
                pass
        assert envs.cpu_dispatch_settings() == before, values
    if not AVX512:
        with pytest.raises(RuntimeError, match="SPARSEKERN_CPU_ISA=avx512 but this CPU does not support it"):
            with envs.cpu_dispatch(isa="avx512"):
                pass


@needs_ext
def test_context_manager_restores_on_error_and_nests():
    before = envs.cpu_dispatch_settings()
    with pytest.raises(ZeroDivisionError):
        with envs.cpu_dispatch(layout="rows", slab_rows=64):
            with envs.cpu_dispatch(tokens_f32_min_m=None):
                assert envs.cpu_dispatch_settings()["slab_rows"] == 64
                assert envs.cpu_dispatch_settings()["tokens_f32_min_m"] is None
            assert envs.cpu_dispatch_settings()["tokens_f32_min_m"] == before["tokens_f32_min_m"]
            1 / 0  # noqa: B018
    assert envs.cpu_dispatch_settings() == before


@needs_ext
def test_defaults_table_and_default_choices_unchanged():
    assert envs.cpu_dispatch_defaults() == {
        "rows_pair_bf16_min_m": 8, "rows_pair_i8_min_m": 32, "pairs_bf16_min_m": 80, "pairs_i8_min_m": 80,
        "pairs_u8_min_m": 24, "tokens_f32_min_m": 32, "tokens_bf16_min_m": None, "tokens_i8_min_m": 256,
        "slab_rows": 256, "amx_bf16_min_m": 12, "amx_i8_min_m": 8, "amx_slab_rows": 1024}
    s = envs.cpu_dispatch_settings()
    assert {k: s[k] for k in envs.cpu_dispatch_defaults()} == envs.cpu_dispatch_defaults()
    kern = _ext._C.cpu_spmm_kernel
    if not AVX512:
        assert kern(256, 1024, "float32")[0] == "rows"
        return
    # The choices the kernels made before the dispatch moved (spmm_24.cpp / spmm_24_avx512.cpp of commit 921fca6),
    # with the AMX family (newer, Intel with AMX only) switched off.
    with envs.cpu_dispatch(amx_bf16_min_m=None, amx_i8_min_m=None):
        assert kern(31, 1024, "float32") == ("rows", "avx512-f32")
        assert kern(32, 1024, "float32") == ("tokens", "avx512-tokens-f32")
        assert kern(32, 1024, "float16") == ("tokens", "avx512-tokens-f16")
        if BF16:
            assert kern(7, 1024, "bfloat16") == ("rows", "avx512-bf16-dp")
            assert kern(8, 1024, "bfloat16") == ("rows", "avx512-bf16-dp-pairs-unblocked")
            assert kern(79, 1024, "bfloat16") == ("rows", "avx512-bf16-dp-pairs-unblocked")
            assert kern(80, 1024, "bfloat16") == ("pairs", "avx512-bf16-dp-pairs")
            assert kern(10_000, 1024, "bfloat16") == ("pairs", "avx512-bf16-dp-pairs")  # its first slab: 256 rows
        if VNNI and VBMI:
            assert kern(23, 1024, "int8") == ("rows", "avx512-i8-vnni")
            assert kern(24, 1024, "int8") == ("pairs", "avx512-i8-vnni-u8-pairs")
            assert kern(32, 70_000, "int8") == ("rows", "avx512-i8-vnni-pairs-unblocked")  # K past vpdpbusd's bound
            assert kern(80, 70_000, "int8") == ("pairs", "avx512-i8-vnni-pairs")
        with envs.cpu_dispatch(isa="avx512-base"):
            assert kern(79, 1024, "int8") == ("rows", "avx512-i8")
            assert kern(80, 1024, "int8") == ("pairs", "avx512-i8-pairs")
            assert kern(79, 1024, "bfloat16") == ("tokens", "avx512-tokens-bf16-f32")
        with envs.cpu_dispatch(isa="avx2"):
            assert kern(256, 1024, "bfloat16") == ("rows", "avx2-bf16")


@pytest.mark.skipif(not AVX512, reason="the token-lane kernels need AVX-512")
def test_a_threshold_moves_the_kernel_that_runs():
    # fp32 row and token kernels sum in different orders: with tokens_f32_min_m = 4, M = 8 runs the token lanes,
    # bit for bit what layout=tokens gives.
    K, N, M = 2048, 24, 8
    w = core.prune_nm(torch.randn(N, K), 2, 4)[0]
    c = weight.compress_24(w)
    x = torch.randn(M, K)
    with envs.cpu_dispatch(layout="tokens"):
        tokens = weight.sparse_linear(x, c)
    with envs.cpu_dispatch(layout="rows"):
        rows = weight.sparse_linear(x, c)
    assert not torch.equal(rows, tokens)
    assert torch.equal(weight.sparse_linear(x, c), rows)
    with envs.cpu_dispatch(tokens_f32_min_m=4):
        assert torch.equal(weight.sparse_linear(x, c), tokens)
    with envs.cpu_dispatch(tokens_f32_min_m=None):
        assert torch.equal(weight.sparse_linear(torch.cat([x] * 8), c)[:M], rows)


@needs_ext
def test_slab_rows_setting_splits_large_calls():
    K, N, M = 200, 37, 300
    w = core.prune_nm(torch.randn(N, K), 2, 4)[0].to(torch.int8)
    x = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    c = weight.compress_24(w)
    row_scale = torch.rand(M) + 0.5
    ref = weight.sparse_linear(x, c, row_scale=row_scale, out_dtype=torch.float32)
    with envs.cpu_dispatch(slab_rows=7):
        assert torch.equal(weight.sparse_linear(x, c).long(), x.long() @ w.long().t())
        got = weight.sparse_linear(x, c, row_scale=row_scale, out_dtype=torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-3)


_CHILD = """
import json, torch
from sparsekern import envs
from sparsekern import weight
from sparsekern.ops import core
from sparsekern.ops import prune as prune_ops
out = {"settings": envs.cpu_dispatch_settings(), "pending": envs.cpu_dispatch_pending_errors()}
w = core.prune_nm(torch.randn(8, 64), 2, 4)[0]
c = weight.compress_24(w)
def err(fn):
    try:
        fn()
        return None
    except RuntimeError as e:
        return str(e)
out["spmm"] = err(lambda: weight.sparse_linear(torch.randn(3, 64), c))
out["wanda"] = err(lambda: prune_ops.wanda_prune(torch.randn(4, 16), torch.rand(16), 2, 4))
with envs.cpu_dispatch(isa=None):
    out["spmm_isa_fixed"] = err(lambda: weight.sparse_linear(torch.randn(3, 64), c))
    with envs.cpu_dispatch(layout="auto"):
        out["spmm_both_fixed"] = err(lambda: weight.sparse_linear(torch.randn(3, 64), c))
out["restored"] = err(lambda: weight.sparse_linear(torch.randn(3, 64), c))
print(json.dumps(out))
"""


def _child(env_values: dict, code: str) -> dict:
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(sparsekern.__file__)))
    env = envs.child_env(**env_values)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_ext
def test_bad_values_at_load_do_not_fail_the_import_and_are_refused_by_the_first_call():
    got = _child({"SPARSEKERN_CPU_ISA": "sse9", "SPARSEKERN_CPU_SPMM_LAYOUT": "columns",
                  "SPARSEKERN_NO_HUGEPAGE_HINT": "1"}, _CHILD)
    assert got["settings"]["huge_page_hint"] is False
    assert len(got["pending"]) == 2
    assert re.search("sparsekern.spmm_24: SPARSEKERN_CPU_ISA=sse9 is not understood; use avx512, avx512-base",
                     got["spmm"])
    assert re.search("wanda_prune: SPARSEKERN_CPU_ISA=sse9 is not understood; use avx512, avx2 or scalar",
                     got["wanda"])
    assert re.search(r"SPARSEKERN_CPU_SPMM_LAYOUT=columns is not understood; use auto \(default\), rows, pairs or "
                     "tokens", got["spmm_isa_fixed"])
    assert got["spmm_both_fixed"] is None
    assert got["restored"] == got["spmm"]  # the context manager restores the pending error too


@needs_ext
def test_good_values_at_load_are_in_effect():
    got = _child({"SPARSEKERN_CPU_ISA": "scalar", "SPARSEKERN_CPU_SPMM_LAYOUT": "rows"}, _CHILD)
    assert got["settings"]["isa"] == "scalar" and got["settings"]["layout"] == "rows"
    assert got["pending"] == [] and got["spmm"] is None and got["wanda"] is None
    assert got["settings"]["huge_page_hint"] is True


# ------------------------------------------------------------------------------------------------ policy table


def _table(path: Path, **extra) -> Path:
    path.write_text(json.dumps({"format": "sparsekern-policy", "version": 1, "entries": [], **extra}))
    return path


@needs_ext
def test_policy_table_pushes_its_cpu_dispatch_thresholds(tmp_path):
    defaults = envs.cpu_dispatch_defaults()
    p = _table(tmp_path / "t.json", cpu_dispatch={"tokens_f32_min_m": 4, "tokens_bf16_min_m": None,
                                                  "pairs_bf16_min_m": 64})
    policy.set_table(p)
    s = envs.cpu_dispatch_settings()
    assert (s["tokens_f32_min_m"], s["pairs_bf16_min_m"], s["slab_rows"]) == (4, 64, defaults["slab_rows"])
    assert policy.table_in_use() == str(p)
    if AVX512:
        assert _ext._C.cpu_spmm_kernel(8, 1024, "float32")[0] == "tokens"
    policy.set_table(None)  # back to the default file (none here): the built-in thresholds again
    assert policy.table_in_use() == policy.BUILTIN
    s = envs.cpu_dispatch_settings()
    assert {k: s[k] for k in defaults} == defaults


@needs_ext
def test_policy_table_from_the_environment_variable_is_applied_on_first_use(monkeypatch, tmp_path):
    p = _table(tmp_path / "env.json", cpu_dispatch={"slab_rows": 128})
    monkeypatch.setenv(policy.ENV_TABLE, str(p))
    policy.set_table(None)
    assert policy.table_in_use() == str(p)
    assert envs.cpu_dispatch_settings()["slab_rows"] == 128


@pytest.mark.parametrize("cd, msg", [
    ({"tokens": 4}, "field 'cpu_dispatch.tokens' is not a CPU dispatch threshold; known: "),
    ({"pairs_bf16_min_m": 0}, "field 'cpu_dispatch.pairs_bf16_min_m' must be a positive integer"),
    ({"pairs_bf16_min_m": True}, "field 'cpu_dispatch.pairs_bf16_min_m' must be a positive integer"),
    ({"slab_rows": None}, "field 'cpu_dispatch.slab_rows' must be a positive integer \\(got null\\)"),
    ([1, 2], "field 'cpu_dispatch' must be an object"),
])
def test_policy_table_cpu_dispatch_is_validated(tmp_path, cd, msg):
    if "not a CPU dispatch threshold" in msg and not _ext.available():
        pytest.skip("names are checked against the extension's thresholds")
    p = _table(tmp_path / "bad.json", cpu_dispatch=cd)
    with pytest.raises(policy.PolicyError, match=re.escape(str(p)) + ": " + msg):
        policy.load_table(p)


@needs_ext
def test_write_table_keeps_and_merges_cpu_dispatch(tmp_path):
    p = tmp_path / "w.json"
    policy.write_table([], p, cpu_dispatch={"tokens_f32_min_m": 48})
    policy.write_table([{"arch": "cpu", "dtype": "float32", "n": 64, "k": 64, "m": 1, "kernel": "spmm24"}], p,
                       cpu_dispatch={"pairs_u8_min_m": 16})
    t = policy.load_table(p)
    assert t.cpu_dispatch == {"tokens_f32_min_m": 48, "pairs_u8_min_m": 16}
    assert t.lookup("cpu", "float32", 64, 64, 1) == "spmm24"


def test_choose_kernel_takes_the_table_explicitly():
    t = policy.table_from_entries([{"arch": "cpu", "dtype": "float32", "n": 64, "k": 64, "m": 1,
                                    "kernel": "dense_fallback"}])
    kw = dict(device_type="cpu", arch="cpu", dtype="float32", n=64, k=64, m=1, has_cslt=False,
              has_cuda_spmm24=False)
    assert policy.choose_kernel(**kw) == "spmm24"  # the active table: none here
    assert policy.choose_kernel(**kw, table=t) == "dense_fallback"
    assert policy.choose_kernel(**kw, table=t, forced="spmm24") == "spmm24"
    with policy.override("dense_fallback"):
        assert policy.choose_kernel(**kw) == "dense_fallback"
        assert policy.choose_kernel(**kw, forced=None) == "spmm24"


# ------------------------------------------------------------------------------------------------ cuSPARSELt rule


@needs_ext
def test_cslt_structured_multiple_from_cpp():
    f = _ext._C.cslt_structured_multiple
    assert (f(1), f(2), f(4), f(8)) == (32, 16, 0, 0)


# ------------------------------------------------------------------------------------------------ doctor, bench


def test_doctor_json_has_the_environment_section(monkeypatch):
    monkeypatch.setenv("SPARSEKERN_CACHE", "/tmp/sk-cache")
    buf = io.StringIO()
    diagnostics.doctor(as_json=True, file=buf)
    env = json.loads(buf.getvalue())["environment"]
    rows = {v["name"]: v for v in env["variables"]}
    assert set(rows) == set(envs.VARIABLES)
    assert all({"name", "value", "default", "source"} <= set(v) for v in rows.values())
    assert rows["SPARSEKERN_CACHE"]["source"] == "environment" and rows["SPARSEKERN_CACHE"]["value"] == "/tmp/sk-cache"
    assert env["policy_table"] == "built-in defaults"
    if _ext.available():
        assert env["cpu_dispatch"] == envs.cpu_dispatch_settings()
        assert env["cpu_features"]["best_isa"] in ("avx512", "avx2", "scalar")


def test_doctor_text_prints_the_environment(monkeypatch, tmp_path):
    p = _table(tmp_path / "doc.json")
    monkeypatch.setenv(policy.ENV_TABLE, str(p))
    policy.set_table(None)
    monkeypatch.setenv("SPARSEKERN_CSLT_MAX_PLANS", "zero")
    buf = io.StringIO()
    rep = diagnostics.doctor(file=buf)
    text = buf.getvalue()
    assert f"policy table       {p}" in text
    for name in envs.VARIABLES:
        assert name in text
    assert any("SPARSEKERN_CSLT_MAX_PLANS=zero is not understood" in pr for pr in rep.problems)
    if _ext.available():
        assert "CPU dispatch       isa " in text and "slab_rows=256" in text


def test_doctor_reports_an_unreadable_policy_table(monkeypatch, tmp_path):
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    monkeypatch.setenv(policy.ENV_TABLE, str(p))
    policy.set_table(None)
    rep = diagnostics.collect()
    assert rep.environment["policy_table"].startswith("unreadable: ")
    assert any("policy table cannot be used" in pr for pr in rep.problems)


@needs_ext
def test_bench_gemm_prints_and_records_the_policy_table(tmp_path, capsys):
    from sparsekern.cli import main as cli_main

    out = tmp_path / "gemm"
    rc = cli_main(["bench", "gemm", "--device", "cpu", "--shapes", "64x128", "--m", "1", "--dtype", "fp32",
                   "--contenders", "dense,sk_spmm24", "--warmup", "1", "--iters", "2", "--min-iters", "1",
                   "--threads", "1", "--out", str(out), "--no-plot"])
    assert rc == 0
    assert "policy table in use: built-in defaults" in capsys.readouterr().err
    env = json.loads((out / "gemm.json").read_text())["env"]
    assert env["policy_table"] == "built-in defaults"
    assert env["cpu_dispatch"] == envs.cpu_dispatch_settings()
    assert "SPARSEKERN_POLICY_TABLE" in env["sparsekern_env"]


def test_data_cache_dir_reads_the_registry(monkeypatch, tmp_path):
    from sparsekern import data

    monkeypatch.setenv("SPARSEKERN_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.setenv("SPARSEKERN_CACHE", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.cache_dir() == tmp_path / "xdg" / "sparsekern"



@needs_ext
def test_a_huge_bad_value_is_not_echoed_whole(monkeypatch):
    # issue 16: a 100 kB SPARSEKERN_CPU_ISA was echoed whole in the error
    huge = "x" * 100_000
    got = _child({"SPARSEKERN_CPU_ISA": huge}, _CHILD)
    assert len(got["spmm"]) < 600 and "xxx..." in got["spmm"]
    with pytest.raises(RuntimeError) as info:
        with envs.cpu_dispatch(layout=huge):
            pass
    assert len(str(info.value)) < 600 and "..." in str(info.value)
    monkeypatch.setenv("SPARSEKERN_CSLT_MAX_PLANS", huge)
    with pytest.raises(envs.EnvError) as info:
        envs.get("SPARSEKERN_CSLT_MAX_PLANS")
    assert len(str(info.value)) < 600
