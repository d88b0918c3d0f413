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
        if path.is_dir() and not path.is_symlink():
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
