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


def test_bench_command_writes_json(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "prune.json"
    args = parser.parse_args(["--shapes", "24x64", "--devices", "cpu", "--repeats", "1", "--json", str(out)])
    assert bench.run(args) == 0
    doc = json.loads(out.read_text())
    assert [(r["method"], r["shape"]) for r in doc["results"]] == [("sparsegpt", "24x64"), ("wanda", "24x64")]
    assert all(r["ours_s"] > 0 and r["reference_s"] > 0 for r in doc["results"])
    assert "speedup" in capsys.readouterr().out
