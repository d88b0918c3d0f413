"""sparsekern._fsutil: the one atomic writer and the checks made before a write (no extension needed)."""

from __future__ import annotations

import os

import pytest

from sparsekern._fsutil import FileRefused, atomic_write, atomic_write_text, check_output_path, read_json


def _siblings(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


@pytest.mark.parametrize("old", ["file", "dir", None])
@pytest.mark.parametrize("new", ["file", "dir"])
def test_atomic_write_replaces_any_kind_and_leaves_nothing_behind(tmp_path, old, new):
    target = tmp_path / "out"
    if old == "file":
        target.write_text("old")
    elif old == "dir":
        target.mkdir()
        (target / "keep").write_text("old")

    def write(tmp):
        if new == "dir":
            tmp.mkdir()
            (tmp / "a").write_text("new")
        else:
            tmp.write_text("new")

    atomic_write(target, write, overwrite=True)
    assert (target / "a").read_text() == "new" if new == "dir" else target.read_text() == "new"
    assert _siblings(tmp_path) == ["out"]  # no hidden .tmp / .old left (issue 16: a .old-<uuid> file was)


def test_interrupted_write_keeps_the_old_target_and_no_temporary(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep").write_text("old")

    def crash(tmp):
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash, overwrite=True)
    assert (target / "keep").read_text() == "old" and _siblings(tmp_path) == ["out"]


def test_existing_target_needs_overwrite(tmp_path):
    atomic_write_text(tmp_path / "f", "1")
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        atomic_write(tmp_path / "f", lambda t: t.write_text("2"), overwrite=False)
    assert (tmp_path / "f").read_text() == "1"


def test_check_output_path_rules(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileRefused, match="--out is empty"):
        check_output_path("", what="--out")
    with pytest.raises(FileRefused, match="is a file, so no folder can be made there"):
        check_output_path(tmp_path / "file" / "sub" / "out", what="--out")
    with pytest.raises(FileRefused, match="exists; pass --overwrite"):
        check_output_path(tmp_path / "file", what="--out")
    with pytest.raises(FileRefused, match="MiB free on"):
        check_output_path(tmp_path / "new", what="--out", need_bytes=2 ** 62)
    assert check_output_path(tmp_path / "a" / "b", what="--out") == tmp_path / "a" / "b"


def test_read_json_refuses_non_regular_and_oversized_files(tmp_path):
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo")
        with pytest.raises(FileRefused, match="is a FIFO, not a regular file"):
            read_json(tmp_path / "fifo", "policy table")
    with pytest.raises(FileRefused, match="is a device or socket"):
        read_json("/dev/zero", "policy table")
    big = tmp_path / "big.json"
    big.write_text("[" + "1," * 100 + "1]")
    with pytest.raises(FileRefused, match="larger than 64 bytes"):
        read_json(big, "policy table", max_bytes=64)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(FileRefused, match="nests too deeply"):
        read_json(deep, "policy table")
