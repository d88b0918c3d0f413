"""Policy tables that are malformed, not files, or huge: a PolicyError naming the file, the field and the rule —
and a broken table found implicitly in the user cache never breaks SparseLinear (issue 16)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import sparsekern
from sparsekern import _ext, policy

pytestmark = pytest.mark.skipif(not _ext.available(), reason="needs the compiled extension")


def _doc(entries):
    return {"format": "sparsekern-policy", "version": 1, "entries": entries}


GOOD = {"arch": "cpu", "dtype": "float32", "n": 8, "k": 16, "m": 4, "kernel": "spmm24"}


@pytest.mark.parametrize("doc,msg", [
    (_doc([1, 2]), r"every entry must be an object with arch, dtype, n, k, m, kernel; got 1"),
    (_doc([dict(GOOD, n=float("inf"))]), r"'n' must be a positive integer below 2\^40, got inf"),
    (_doc([dict(GOOD, m="16")]), r"'m' must be a positive integer"),
    (_doc([dict(GOOD, arch=3)]), r"'arch' must be a string"),
    (_doc([dict(GOOD, kernel="turbo")]), r"unknown kernel 'turbo'"),
    ({"format": "sparsekern-policy", "version": 1, "entries": {"a": 1}}, r"'entries' must be a list"),
    ([1, 2, 3], r"field 'format' must be 'sparsekern-policy'"),
])
def test_malformed_tables_name_file_field_and_rule(tmp_path, doc, msg):
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(policy.PolicyError, match=msg) as info:
        policy.load_table(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("content,msg", [
    (b"", r"is not valid JSON \(it is empty\)"),
    (b"\xff\xfe", r"is not UTF-8 text"),
    (b"[" * 50000 + b"]" * 50000, r"nests too deeply"),
])
def test_unparseable_tables(tmp_path, content, msg):
    path = tmp_path / "policy.json"
    path.write_bytes(content)
    with pytest.raises(policy.PolicyError, match=msg):
        policy.load_table(path)


def test_fifo_and_device_tables_are_refused_not_read(tmp_path):
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.json")
        with pytest.raises(policy.PolicyError, match="is a FIFO, not a regular file"):
            policy.load_table(tmp_path / "fifo.json")
    with pytest.raises(policy.PolicyError, match="is a device or socket"):
        policy.load_table("/dev/zero")


def test_broken_table_in_the_user_cache_warns_and_does_not_break_layers(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "sparsekern").mkdir(parents=True)
    (cache / "sparsekern" / "policy.json").write_text('{"format": "sparsekern-policy", "version": 1, "entries": 3}')
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.delenv("SPARSEKERN_POLICY_TABLE", raising=False)
    policy.set_table(None)
    try:
        with pytest.warns(RuntimeWarning, match="ignoring the policy table in the user cache"):
            lin = torch.nn.Linear(16, 8)
            with torch.no_grad():
                lin.weight.copy_(sparsekern.prune_nm(lin.weight)[0])
            layer = sparsekern.SparseLinear.from_linear(lin)
        x = torch.randn(2, 16)
        torch.testing.assert_close(layer(x), lin(x))
        assert policy.table_in_use() == policy.BUILTIN
        rep = sparsekern.doctor()
        assert any("policy table in the user cache is ignored" in p for p in rep.problems)
    finally:
        policy._state.broken_default = None
        policy.set_table(None)


def test_a_broken_table_named_explicitly_is_an_error(tmp_path, monkeypatch):
    path = tmp_path / "p.json"
    path.write_text("{")
    monkeypatch.setenv("SPARSEKERN_POLICY_TABLE", str(path))
    policy.set_table(None)
    try:
        with pytest.raises(policy.PolicyError, match="is not valid JSON"):
            policy.active_table()
    finally:
        monkeypatch.delenv("SPARSEKERN_POLICY_TABLE")
        policy.set_table(None)
