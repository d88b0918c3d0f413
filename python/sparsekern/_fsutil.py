"""Atomic file and folder writes: the one place sparsekern writes anything a reader might see half-done.

Every writer (checkpoints, policy tables, cuSPARSELt search results, benchmark results, `sparsekern prune --out`)
goes through these, so the rule is written once: write to a hidden temporary sibling in the same folder (same
filesystem, so the rename is atomic), then rename it over the target. An interrupted write leaves the target as it
was and no temporary behind (the temporary is removed on any exception, KeyboardInterrupt included).

Imports nothing from sparsekern (a leaf module any layer may use).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat as _stat
import uuid
from pathlib import Path
from typing import Callable


def _tmp_sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], *, overwrite: bool = True) -> Path:
    """Call ``write(tmp)`` to produce a file or a folder at ``tmp`` (a fresh hidden sibling of ``path``), then put it
    at ``path`` atomically. An existing ``path`` is replaced only when ``overwrite`` (else FileExistsError, before
    ``write`` runs); an existing folder is moved aside first and deleted only once the new one is in place (restored
    if the rename fails), so no moment leaves ``path`` missing or half-written. Returns ``path``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "tmp")
    try:
        write(tmp)
        is_dir = lambda p: p.is_dir() and not p.is_symlink()  # noqa: E731
        if is_dir(path) or (is_dir(tmp) and (path.exists() or path.is_symlink())):
            # rename() cannot replace a folder, nor put a folder over a file: move the old one aside first.
            old = _tmp_sibling(path, "old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            _remove(old)
        else:
            os.replace(tmp, path)  # a file (or nothing) at path: rename over it is atomic
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
    return path


def atomic_update_folder(path: str | os.PathLike, write: Callable[[Path], None], *,
                         last: Callable[[str], bool] = lambda name: False,
                         stale: Callable[[str], bool] = lambda name: False) -> Path:
    """Call ``write(tmp)`` to fill a fresh hidden sibling folder ``tmp``, then move its files into the folder ``path``
    one rename at a time (files for which ``last(name)`` holds after the others), and delete the files of ``path``
    for which ``stale(name)`` holds that the new set lacks. Other files of ``path`` are kept. Each file is therefore
    either its old or its new version, never partly written; a failure in ``write`` leaves ``path`` untouched. A
    missing ``path`` is created by one rename of the whole folder. Returns ``path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path, "tmp")
    try:
        write(tmp)
        if not path.exists():
            os.replace(tmp, path)
            return path
        new = sorted(p.name for p in tmp.iterdir())
        for name in sorted(new, key=lambda n: (last(n), n)):
            os.replace(tmp / name, path / name)
        for old in path.iterdir():
            if old.is_file() and stale(old.name) and old.name not in new:
                old.unlink()
        return path
    finally:
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to the file ``path`` atomically (see atomic_write)."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding=encoding) as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to the file ``path`` atomically (see atomic_write)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


# ------------------------------------------------------------------------------------------------- reading

MAX_JSON_BYTES = 64 << 20  # configs, metadata, policy tables: a few kB in practice; a cap keeps /dev/zero harmless


class FileRefused(ValueError):
    """A file sparsekern was asked to read is not a regular file, is too large, or is not what it should be."""


def check_regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is an existing regular file (a FIFO, device or folder would block or mislead a
    reader), else FileRefused / FileNotFoundError naming `what` and the path."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    if not _stat.S_ISREG(st.st_mode):
        kind = "a folder" if _stat.S_ISDIR(st.st_mode) else "a FIFO" if _stat.S_ISFIFO(st.st_mode) else \
            "a device or socket"
        raise FileRefused(f"{what} {path} is {kind}, not a regular file; refusing to read it")
    return path


def read_json(path: str | os.PathLike, what: str, *, max_bytes: int = MAX_JSON_BYTES):
    """Parse the JSON document in `path` (a regular file of at most max_bytes, UTF-8). Errors name `what`, the
    path and the problem (FileRefused, a ValueError)."""
    path = check_regular_file(path, what)
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileRefused(f"{what} {path} is larger than {max_bytes} bytes; refusing to read it")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FileRefused(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        where = "it is empty" if not text.strip() else f"line {exc.lineno}, column {exc.colno}: {exc.msg}"
        raise FileRefused(f"{what} {path} is not valid JSON ({where})") from None
    except RecursionError:
        raise FileRefused(f"{what} {path} nests too deeply to be a sparsekern file") from None


# ------------------------------------------------------------------------------------------------- planning a write


def check_output_path(path: str | os.PathLike, *, what: str, overwrite: bool = False, kind: str = "any",
                      need_bytes: int = 0) -> Path:
    """Everything that would make a later atomic_write(path) fail, checked before the work that produces it.

    what: how the user named it (e.g. "--out"); kind: "dir", "file" or "any" (what will be written there);
    need_bytes: a plausible size of what will be written (0 = unknown). Raises FileRefused naming `what`, the path and
    the rule: an empty path, an existing target without overwrite (or of the wrong kind), an ancestor that is a file,
    a folder that cannot be written, or less free space than need_bytes. Returns the path."""
    if path is None or str(path) == "":
        raise FileRefused(f"{what} is empty; give a path")
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise FileRefused(f"{what} {path} exists; pass --overwrite to replace it")
        if kind == "file" and path.is_dir():
            raise FileRefused(f"{what} {path} is a folder; a file is written there")
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise FileRefused(f"{what} {path}: {parent} is a file, so no folder can be made there")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise FileRefused(f"{what} {path}: {parent} is not writable")
    if need_bytes:
        import shutil as _shutil

        free = _shutil.disk_usage(parent).free
        if free < need_bytes:
            raise FileRefused(f"{what} {path}: {free / 2**20:,.0f} MiB free on {parent}, about "
                              f"{need_bytes / 2**20:,.0f} MiB needed")
    return path
