"""Pruning across torch.distributed ranks (pipeline/dist.py; `torchrun -m sparsekern prune`), on CPUs with gloo.

Oracle: the one-process run of the same pruning. Each rank runs with one intra-op thread, and so does the oracle
(BLAS may split a dot product differently with another thread count; pipeline/sums.py): the pruned weights (hence
the masks) must then be identical bit for bit on every rank and equal to the oracle's, for 2 and 3 ranks. The report
must show the split (samples per rank, linears per rank). Failures: a rank killed or failing, ranks started with
different arguments, a write error on the writing rank -- every rank ends with an error naming the cause, within the
timeout, and no output folder is left.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sparsekern
from sparsekern.pipeline import PipelineError, prune_checkpoint, prune_model

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from test_lowmem import _assert_same_checkpoint  # noqa: E402
from test_pipeline import _llama  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKER = HERE / "dist_worker.py"
# the installed package (CI tests the wheel) and this folder (test_pipeline's model builder)
PYTHONPATH = os.pathsep.join([str(Path(sparsekern.__file__).parents[1]), str(HERE)])
NSAMPLES, SEQLEN, SEED = 8, 32, 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, world: int, port: int) -> dict:
    return dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=PYTHONPATH)


GROUP_TIMEOUT = 120  # the process group's timeout in the workers


def _launch(tmp: Path, spec: dict, world: int, timeout: float = 300):
    """Run dist_worker.py on `world` ranks; returns ([(returncode, stderr)] per rank, wall seconds). stderr goes to
    files (a pipe read one rank after the other could fill up and block a rank while its peer waits for it)."""
    spec = dict({"calib": [NSAMPLES, SEQLEN, SEED], "timeout": GROUP_TIMEOUT}, **spec)
    stamp = time.monotonic_ns()
    path = tmp / f"spec-{stamp}.json"
    path.write_text(json.dumps(spec))
    port = _free_port()
    logs = [tmp / f"rank{r}-{stamp}.err" for r in range(world)]
    t0 = time.monotonic()
    procs = []
    for r in range(world):
        with open(logs[r], "w") as err:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(path)], env=_env(r, world, port),
                                          stdout=subprocess.DEVNULL, stderr=err))
    try:
        for p in procs:
            p.wait(timeout=max(1.0, timeout - (time.monotonic() - t0)))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [(p.returncode, log.read_text(errors="replace")) for p, log in zip(procs, logs)], time.monotonic() - t0


def _calib():
    return torch.randint(3, 128, (NSAMPLES, SEQLEN), generator=torch.Generator().manual_seed(SEED))


class _one_thread:
    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "src"
    _llama(3).save_pretrained(path, max_shard_size="60KB")
    return path


def _oracle(src: Path, options: dict):
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    calib = None if options["method"] == "magnitude" else _calib()
    with _one_thread():
        rep = prune_model(model, calib, progress=False, **options)
    from sparsekern.quant import weight_grid

    grids = {name: weight_grid(m) for name, m in model.named_modules() if weight_grid(m) is not None}
    return model.state_dict(), rep, grids


def _check_split(rep: dict, world: int, nlinears: int, nsamples: int) -> None:
    assert rep["world_size"] == world and rep["backend"] == "gloo"
    ranks = rep["ranks"]
    assert [r["rank"] for r in ranks] == list(range(world))
    if nsamples:  # contiguous, disjoint, covering [0, nsamples), none empty
        bounds = [r["samples"] for r in ranks]
        assert bounds[0][0] == 0 and bounds[-1][1] == nsamples
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])) and all(b > a for a, b in bounds)
    names = [n for r in ranks for n in r["linears"]]
    assert len(names) == len(set(names)) == nlinears  # each linear pruned by exactly one rank
    assert all(r["linears"] for r in ranks)  # every rank did some of the pruning
    assert {row["name"]: row["rank"] for row in rep["linears"]} == {n: r["rank"] for r in ranks for n in r["linears"]}


@pytest.mark.parametrize("options,world", [
    (dict(method="sparsegpt"), 2),
    (dict(method="sparsegpt"), 3),
    (dict(method="wanda"), 2),
    (dict(method="magnitude"), 2),
    (dict(method="sparsegpt", true_sequential=True), 2),  # the single paused pass, a pruning step per group
    (dict(method="wanda", true_sequential=True, single_pass=False), 2),
    (dict(method="sparsegpt", quant="int8"), 2),  # the W8A8 grid goes with each weight
    (dict(method="sparsegpt", refit="admm", refit_iters=3, refit_cg_iters=2), 2),
    (dict(method="sparsegpt", pattern="0.5"), 2),
])
def test_ranks_prune_exactly_what_one_process_prunes(src, tmp_path, options, world):
    options = dict(options, batch_size=2)  # 4 batches: 2 + 2 on 2 ranks, 1 + 1 + 2 on 3
    want, want_rep, want_grids = _oracle(src, options)
    assert bool(want_grids) == bool(options.get("quant"))
    out = tmp_path / "out"
    results, _ = _launch(tmp_path, {"src": str(src), "mode": "memory", "out": str(out), "options": options}, world)
    assert [rc for rc, _ in results] == [0] * world, [e[-2000:] for _, e in results]
    for r in range(world):
        got = torch.load(out / f"rank{r}.pt")
        assert got.keys() == want.keys()
        bad = [k for k in want if not torch.equal(got[k], want[k])]
        assert not bad, (r, bad[:5])
        grids = torch.load(out / f"rank{r}-grids.pt")  # W8A8 grids: the attribute every rank must have too
        assert grids.keys() == want_grids.keys()
        assert all(grids[k][0] == want_grids[k][0] and torch.equal(grids[k][1].cpu(), want_grids[k][1].cpu())
                   for k in want_grids), r
    rep = json.loads((out / "report.json").read_text())
    assert [(row["name"], row["loss"], row["sparsity"]) for row in rep["linears"]] == \
        [(row.name, row.loss, row.sparsity) for row in want_rep.linears]
    _check_split(rep, world, len(want_rep.linears), 0 if options["method"] == "magnitude" else NSAMPLES)


def test_ranks_low_memory_write_the_one_process_checkpoint(src, tmp_path):
    options = dict(method="sparsegpt", batch_size=2, quant="int8")
    with _one_thread():
        prune_checkpoint(src, tmp_path / "ref", _calib(), progress=False, **options)
    out = tmp_path / "out"
    results, _ = _launch(tmp_path, {"src": str(src), "mode": "lowmem", "out": str(out), "options": options}, 2)
    assert [rc for rc, _ in results] == [0, 0], [e[-2000:] for _, e in results]
    _assert_same_checkpoint(tmp_path / "ref", out / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["ckpt", "report.json"]  # rank 0 wrote it, no temp folder
    rep = json.loads((out / "report.json").read_text())
    assert rep["low_memory"] and rep["world_size"] == 2


def _dead_or_failed(results, timeout: float, wall: float) -> None:
    """Every rank ended with an error, within the process group's timeout (a deadline of the spec, with room for
    the start-up of a loaded machine; not a speed claim)."""
    assert all(rc != 0 for rc, _ in results), results
    assert wall < timeout + 60, f"ranks took {wall:.0f} s to give up (timeout {timeout} s)"


@pytest.mark.parametrize("mode", ["memory", "lowmem"])
def test_a_rank_killed_mid_run_ends_the_others_with_an_error(src, tmp_path, mode):
    out = tmp_path / "out"
    spec = {"src": str(src), "mode": mode, "out": str(out), "options": dict(method="sparsegpt", batch_size=2),
            "fault": {"rank": 1, "kind": "die", "block": 1}}
    results, wall = _launch(tmp_path, spec, 2)
    _dead_or_failed(results, GROUP_TIMEOUT, wall)
    assert results[1][0] == -9  # SIGKILL
    assert "RankFailed" in results[0][1] and "lost the other ranks" in results[0][1], results[0][1][-2000:]
    assert not (out / "ckpt").exists() and not (out / "report.json").exists()
    if out.exists():  # no temporary folder of rank 0's output left either
        assert list(out.iterdir()) == [], list(out.iterdir())


def test_a_rank_failing_mid_run_is_reported_by_every_rank(src, tmp_path):
    out = tmp_path / "out"
    spec = {"src": str(src), "mode": "lowmem", "out": str(out), "options": dict(method="wanda", batch_size=2),
            "fault": {"rank": 1, "kind": "raise", "block": 2}}
    results, wall = _launch(tmp_path, spec, 2)
    _dead_or_failed(results, GROUP_TIMEOUT, wall)
    assert "RuntimeError: injected failure in block 2" in results[1][1]
    assert "failed on rank 1 (RuntimeError: injected failure in block 2)" in results[0][1], results[0][1][-2000:]
    assert not out.exists() or list(out.iterdir()) == []


def test_a_write_error_on_the_writing_rank_leaves_nothing_and_ends_every_rank(src, tmp_path):
    out = tmp_path / "out"
    spec = {"src": str(src), "mode": "lowmem", "out": str(out), "options": dict(method="sparsegpt", batch_size=2),
            "fault": {"rank": 0, "kind": "enospc", "block": 1}}  # the second shard fails to write
    results, wall = _launch(tmp_path, spec, 2)
    _dead_or_failed(results, GROUP_TIMEOUT, wall)
    assert "No space left on device" in results[0][1]
    assert "failed on rank 0" in results[1][1] and "No space left on device" in results[1][1], results[1][1][-2000:]
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("rank_options,field", [
    ({"1": {"method": "wanda"}}, "option method"),
    ({"1": {"pattern": "4:8"}}, "option pattern"),
    ({"1": {"nsamples": 6}}, "calibration ids"),
])
def test_ranks_started_with_different_arguments_refuse_to_run(src, tmp_path, rank_options, field):
    spec = {"src": str(src), "mode": "memory", "out": str(tmp_path / "out"),
            "options": dict(method="sparsegpt", batch_size=2), "rank_options": rank_options}
    results, wall = _launch(tmp_path, spec, 2)
    _dead_or_failed(results, GROUP_TIMEOUT, wall)
    for _, err in results:
        assert "the ranks were started with different arguments" in err and field in err, err[-2000:]
    assert not (tmp_path / "out" / "rank0.pt").exists()


def test_too_few_calibration_batches_for_the_ranks(src, tmp_path):
    spec = {"src": str(src), "mode": "memory", "out": str(tmp_path / "out"),
            "options": dict(method="sparsegpt", batch_size=8)}
    results, wall = _launch(tmp_path, spec, 2)
    _dead_or_failed(results, GROUP_TIMEOUT, wall)
    for _, err in results:
        assert "make 1 batch(es) for 2 ranks" in err, err[-2000:]


def test_low_memory_on_a_pickle_checkpoint_is_refused_on_every_rank(tmp_path):
    src = tmp_path / "bin"
    model = _llama(2)
    model.save_pretrained(src)
    (src / "model.safetensors").unlink()
    torch.save(model.state_dict(), src / "pytorch_model.bin")  # a pickle checkpoint, no safetensors
    results, wall = _launch(tmp_path, {"src": str(src), "mode": "lowmem", "out": str(tmp_path / "out"),
                                       "options": dict(method="wanda", batch_size=2)}, 2)
    _dead_or_failed(results, GROUP_TIMEOUT, wall)
    for _, err in results:
        assert "low_memory needs a safetensors checkpoint folder" in err, err[-2000:]
    assert not (tmp_path / "out" / "ckpt").exists()


def test_permute_and_auto_rerun_are_refused_across_ranks(src, tmp_path):
    for options, msg in ((dict(permute=True), "permute across ranks is not supported"),
                         (dict(rerun_kernel="auto"), "rerun_kernel='auto' decides by timing")):
        spec = {"src": str(src), "mode": "memory", "out": str(tmp_path / "out"),
                "options": dict(method="wanda", batch_size=2, **options)}
        results, wall = _launch(tmp_path, spec, 2)
        _dead_or_failed(results, GROUP_TIMEOUT, wall)
        assert all(msg in err for _, err in results), [e[-1500:] for _, e in results]


@pytest.mark.cuda
def test_ranks_on_the_gpu_prune_what_one_gpu_process_prunes(src, tmp_path):
    """Both ranks on GPU 0 with gloo (NCCL needs a GPU per rank): statistics and weights travel through the CPU.
    cuBLAS and the statistics kernels are deterministic for one GPU and shape, so the weights must match the
    one-process GPU run bit for bit."""
    options = dict(method="sparsegpt", batch_size=2, device="cuda")
    want, _, _ = _oracle(src, options)
    out = tmp_path / "out"
    results, _ = _launch(tmp_path, {"src": str(src), "mode": "memory", "out": str(out), "options": options}, 2)
    assert [rc for rc, _ in results] == [0, 0], [e[-2000:] for _, e in results]
    for r in range(2):
        got = torch.load(out / f"rank{r}.pt", map_location="cpu")
        bad = [k for k in want if not torch.equal(got[k], want[k].cpu())]
        assert not bad, (r, bad[:5])


def test_distributed_true_needs_a_process_group():
    model = _llama(1)
    with pytest.raises(PipelineError, match="distributed=True needs an initialised torch.distributed process group"):
        prune_model(model, _calib(), method="wanda", distributed=True, progress=False)
    with pytest.raises(PipelineError, match="distributed .* must be None"):
        prune_model(model, _calib(), method="wanda", distributed="yes", progress=False)


def test_cli_refuses_what_cannot_run_across_ranks(tmp_path, monkeypatch, capsys):
    from sparsekern.cli import main

    with pytest.raises(SystemExit) as exc:  # argparse, before anything is loaded
        main(["prune", "--model", "bundled", "--dist-timeout", "0"])
    assert exc.value.code == 2 and "--dist-timeout: must be >= 1, got 0" in capsys.readouterr().err

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for extra, msg in ((["--eval-tokens", "512"], "--eval-tokens is not supported across ranks"),
                       (["--skip-sensitive", "2"], "--skip-sensitive is not supported across ranks"),
                       (["--rerun-kernel", "auto"], "--rerun-kernel auto is not supported across ranks")):
        assert main(["prune", "--model", "bundled", "--nsamples", "4", *extra]) == 2
        err = capsys.readouterr().err
        assert msg in err and "(rank 1 of 2)" in err, err


# ------------------------------------------------------------------ the command line under torchrun, bundled model


def _torchrun_prune(out: Path, nproc: int, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
           str(_free_port()), "-m", "sparsekern", "prune", "--model", "bundled", "--method", "sparsegpt",
           "--pattern", "2:4", "--nsamples", "16", "--out", str(out), "--json", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=PYTHONPATH)
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    return proc, time.monotonic() - t0


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.slow
def test_torchrun_two_ranks_bundled_model_equals_one_process(tmp_path):
    one, t1 = _torchrun_prune(tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two, t2 = _torchrun_prune(tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert a.keys() == b.keys()
    # values, pattern codes (the masks) and dense tensors, bit for bit
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]
    assert any(k.endswith(".codes") for k in a)
    doc = json.loads(two.stdout)  # one JSON document: only rank 0 printed
    assert doc["world_size"] == 2
    _check_split(doc["report"], 2, len(doc["report"]["linears"]), 16)
    assert json.loads(one.stdout)["world_size"] == 1
    print(f"\nbundled sparsegpt 2:4, 16 x 512: 1 rank {t1:.1f} s, 2 ranks {t2:.1f} s (whole torchrun command)")
