"""The command line refuses a request it cannot carry out before doing any work: one line on stderr naming the argument
and the rule, exit status 2; internal errors keep their traceback and exit 1 (issue 16's reproducers, one each)."""

from __future__ import annotations

import os
import time

import pytest

from sparsekern import _ext
from sparsekern.cli import main

pytestmark = pytest.mark.skipif(not _ext.available(), reason="needs the compiled extension")


def run(capsys, *argv):
    t0 = time.perf_counter()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err
    return rc, err, time.perf_counter() - t0


def test_pattern_that_the_sparsekern_format_cannot_hold_fails_in_under_a_second(capsys, tmp_path):
    rc, err, dt = run(capsys, "prune", "--pattern", "4:8", "--out", tmp_path / "out")
    assert rc == 2 and dt < 1.0
    assert "--pattern 4:8 cannot be saved in the sparsekern format" in err and "add --dense" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    rc, err, _ = run(capsys, "prune", "--pattern", "0.5", "--out", tmp_path / "out")
    assert rc == 2 and "add --dense" in err


@pytest.mark.parametrize("setup,what", [
    (lambda tmp: [(tmp / "afile").write_text("x"), tmp / "afile" / "out"][1], "is a file, so no folder can be made"),
    (lambda tmp: "", "--out is empty"),
])
def test_unusable_out_paths_fail_before_loading(capsys, tmp_path, setup, what):
    out = setup(tmp_path)
    rc, err, dt = run(capsys, "prune", "--method", "magnitude", "--out", out)
    assert rc == 2 and what in err and dt < 1.0 and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0 and not os.path.ismount("/proc"), reason="needs a read-only folder")
def test_read_only_out_parent_fails_before_loading(capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root): the read-only rule cannot be observed")
        rc, err, _ = run(capsys, "prune", "--method", "magnitude", "--out", ro / "out")
        assert rc == 2 and "is not writable" in err
    finally:
        ro.chmod(0o755)


@pytest.mark.parametrize("argv,what", [
    (["prune", "--skip-sensitive", "-3"], "--skip-sensitive: must be >= 0, got -3"),
    (["prune", "--device", "tpu"], "'tpu' is not a device; use cpu, cuda or cuda:N"),
    (["prune", "--device", "meta"], "sparsekern runs on cpu or cuda devices, not meta"),
    (["prune", "--device", "banana"], "'banana' is not a device"),
    (["eval", "--eval-tokens", "0"], "--eval-tokens: must be >= 1"),
    (["prune", "--nsamples", "x"], "--nsamples: must be an integer"),
    (["prune", "--pattern", "2:2"], "pattern '2:2'"),
])
def test_bad_arguments_are_usage_errors(capsys, argv, what):
    rc, err, dt = run(capsys, *argv)
    assert rc == 2 and what in err and dt < 2.0


def test_missing_model_or_text_fails_before_loading(capsys, tmp_path):
    rc, err, _ = run(capsys, "prune", "--model", tmp_path / "nope", "--method", "magnitude")
    assert rc == 2 and "no such directory" in err
    rc, err, _ = run(capsys, "eval", "--text", tmp_path / "nope.txt")
    assert rc == 2 and "--text" in err and "no such file" in err


def test_corrupt_model_folder_and_non_utf8_text_are_user_errors(capsys, tmp_path):
    bad = tmp_path / "model"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    rc, err, _ = run(capsys, "eval", "--model", bad)
    assert rc == 2 and "could not be loaded" in err and "Traceback" not in err
    text = tmp_path / "t.txt"
    text.write_bytes(b"\xff\xfe\x00 not utf-8 \xc3\x28")
    from sparsekern import data

    with pytest.raises(data.DataError, match="is not UTF-8 text"):
        data.load_text(str(text))


def test_dense_and_quant_together_is_a_usage_error(capsys, tmp_path):
    rc, err, _ = run(capsys, "prune", "--dense", "--quant", "int8", "--out", tmp_path / "o")
    assert rc == 2 and "cannot be combined with --quant" in err


def test_internal_errors_keep_their_traceback_and_exit_1(monkeypatch):
    import sparsekern.pipeline_cli as pc

    def boom(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pc, "_check_plan", boom)
    with pytest.raises(ZeroDivisionError):  # not swallowed into a one-line "user error"
        main(["prune", "--method", "magnitude"])


def test_bench_outputs_are_checked_before_measuring(capsys, tmp_path):
    f = tmp_path / "results.json"
    f.write_text("{}")
    rc, err, dt = run(capsys, "bench", "gemm", "--device", "cpu", "--shapes", "64x64", "--m", "1", "--out", f)
    assert rc == 2 and "--out" in err and "is a file" in err and dt < 2.0
    rc, err, _ = run(capsys, "bench", "gemm", "--device", "cpu", "--shapes", "64x64", "--m", "1",
                     "--policy", f / "policy.json")
    assert rc == 2 and "--policy" in err and "is a file, so no folder can be made" in err
    assert f.read_text() == "{}"


def test_bench_refuses_absurd_shapes_before_allocating(capsys):
    rc, err, dt = run(capsys, "bench", "gemm", "--device", "cpu", "--shapes", "1x4000000x4000000")
    assert rc == 2 and "at most 2,147,483,648 (2^31) per operand" in err and dt < 2.0
