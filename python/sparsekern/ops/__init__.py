"""Typed Python wrappers of the torch ops (torch.ops.sparsekern.*) and their fake kernels.

core.py     N:M prune / check, portable 2:4 compress / decompress, 2:4 matmul (spmm_24), per-token quantisation
cslt.py     cuSPARSELt compress and matmul (CUDA)
prune.py    calibration statistics, Wanda and SparseGPT kernels

This layer imports nothing from the modules built on it (sparsekern.weight, linear, ...); those call these wrappers,
never torch.ops.sparsekern.* directly. Each wrapper has its op's name.

When the compiled extension is missing, the op schemas do not exist, so the fake-kernel registrations in these
modules are skipped (the wrappers still import, and raise ExtensionMissingError with the reason when called).
"""

import contextlib

import torch

from .. import _ext


@contextlib.contextmanager
def _fake_registration_disabled():
    real = torch.library.register_fake

    def skip(op, fn=None, /, **kwargs):
        return (lambda f: f) if fn is None else fn

    torch.library.register_fake = skip
    try:
        yield
    finally:
        torch.library.register_fake = real


with contextlib.nullcontext() if _ext.available() else _fake_registration_disabled():
    from . import core, cslt, prune  # noqa: F401,E402  (importing registers the fake kernels)

from .core import ACTIVATIONS  # noqa: E402  (the one list of fused epilogue activations)
