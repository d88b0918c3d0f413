"""Shared test setup.

- `cuda` marker: the test needs a CUDA GPU with sparse tensor cores (sm80+) and the CUDA build of the extension;
  it is skipped cleanly otherwise (checked here at run time, never at collection/import time).
- DEVICES: parametrize over it for tests that run on every available device; it always contains "cpu".
- Every test starts from a fixed seed (autouse fixture), so failures reproduce.
"""

from __future__ import annotations

import pytest
import torch


def _cuda_ready() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible"
    major, _ = torch.cuda.get_device_capability()
    if major < 8:
        return False, "GPU below sm80 (no sparse tensor cores)"
    from sparsekern import _ext

    if not _ext.available():
        return False, f"extension not loaded: {_ext.load_error()}"
    if not _ext.build_info().get("with_cuda"):
        return False, "extension built CPU-only"
    return True, ""


CUDA_OK, CUDA_WHY = _cuda_ready()
DEVICES = ["cpu"] + (["cuda"] if CUDA_OK else [])


def pytest_collection_modifyitems(config, items):
    if CUDA_OK:
        return
    skip = pytest.mark.skip(reason=f"cuda test skipped: {CUDA_WHY}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    # A test that takes a `device` argument runs on every available device, and its cuda instance is marked.
    if "device" in metafunc.fixturenames and not any(m.name == "parametrize" and "device" in m.args[0]
                                                      for m in metafunc.definition.iter_markers()):
        metafunc.parametrize(
            "device", [pytest.param(d, marks=[pytest.mark.cuda] if d == "cuda" else []) for d in ["cpu", "cuda"]]
        )


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
