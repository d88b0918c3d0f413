"""The pruning benchmark's reference-structured implementations compute what sparsekern computes (so the speed-up
it prints compares equal work), and the command runs end to end on a tiny shape."""

from __future__ import annotations

import argparse
import json

import torch

import sparsekern.prune as P
from sparsekern.bench import prune as bench
from test_prune_oracles import hessian_oracle, realistic_activations


def test_bench_references_agree_with_sparsekern():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(33, 64, generator=g) * 0.02
    x = realistic_activations(2, 40, 64)
    H = hessian_oracle([x]).float()
    s = (x.reshape(-1, 64) ** 2).sum(0) / 2
    assert torch.equal(bench.reference_wanda(w, s, 2, 4), P.wanda(w, s, "2:4").weight)
    ref_w, ref_loss = bench.reference_sparsegpt(w, H, 2, 4, blocksize=32)
    r = P.sparsegpt(w, H, "2:4", blocksize=32)
    assert torch.equal(ref_w != 0, r.weight != 0)
    assert ((ref_w - r.weight).norm() / ref_w.norm()).item() < 1e-5


def test_bench_command_writes_json(tmp_path, capfd):
    # The default page policy (--thp both) runs the measurement in a child process started with PyTorch's
    # huge-page allocator switch, so both sides' tensors get the same pages; the JSON records what it saw.
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "prune.json"
    args = parser.parse_args(["--shapes", "24x64", "--devices", "cpu", "--repeats", "1", "--json", str(out)])
    assert bench.run(args) == 0
    doc = json.loads(out.read_text())
    assert [(r["method"], r["shape"]) for r in doc["results"]] == [("sparsegpt", "24x64"), ("wanda", "24x64")]
    assert all(r["ours_s"] > 0 and r["reference_s"] > 0 for r in doc["results"])
    assert doc["thp"] == "both"
    assert doc["page_env"] == {"THP_MEM_ALLOC_ENABLE": "1", "SPARSEKERN_NO_HUGEPAGE_HINT": None}
    printed = capfd.readouterr().out
    assert "speedup" in printed and "--thp both for both sides" in printed


def test_bench_page_policy_none_reaches_both_sides(tmp_path, monkeypatch):
    # --thp none: no huge-page request from PyTorch's allocator (the reference) nor from the Wanda kernel (ours),
    # even when the caller's environment asks for them.
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    out = tmp_path / "prune.json"
    assert bench.main(["--shapes", "8x16", "--methods", "wanda", "--repeats", "1", "--thp", "none",
                       "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["thp"] == "none"
    assert doc["page_env"] == {"THP_MEM_ALLOC_ENABLE": "0", "SPARSEKERN_NO_HUGEPAGE_HINT": "1"}


def test_bench_child_command_line_reproduces_the_arguments():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    argv = ["--shapes", "24x64,8x16", "--methods", "wanda", "--pattern", "4:8", "--repeats", "2", "--budget", "1.5",
            "--devices", "cpu", "--threads", "1", "--thp", "none", "--json", "/tmp/x.json"]
    args = parser.parse_args(argv)
    assert vars(parser.parse_args(bench._argv_of(args))) == vars(args)
    defaults = parser.parse_args([])
    assert vars(parser.parse_args(bench._argv_of(defaults))) == vars(defaults)
