"""Shared test setup.

- `cuda` marker: the test needs a CUDA GPU with sparse tensor cores (sm80+) and the CUDA build of the extension;
  it is skipped cleanly otherwise (checked here at run time, never at collection/import time).
- DEVICES: parametrize over it for tests that run on every available device; it always contains "cpu".
- Every test starts from a fixed seed (autouse fixture), so failures reproduce.
- SPARSEKERN_CPU_CALIBRATE=0 for the whole suite (kernel choices never depend on timing), except where a test turns it
  on; SPARSEKERN_POLICY_TABLE names a file that does not exist (the user cache's table is not read).
- SPARSEKERN_REQUIRE_CUDA=1 (sparsekern.envs): a GPU run must not pass by skipping. Every `cuda` test that cannot
  run fails with the reason, every skip of a `cuda` test (or any skip whose reason is a missing GPU / CUDA build)
  becomes a failure, and a session that ran no `cuda` test at all fails.
"""

from __future__ import annotations

import os
import re
import tempfile

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


# Kernel choices must not depend on timing: first-use calibration of CPU layers (sparsekern.calibrate) is off for the
# suite; tests/test_calibrate.py turns it on where it is the subject (monkeypatch.setenv).
os.environ["SPARSEKERN_CPU_CALIBRATE"] = "0"
# Nor on the machine's history: the user-cache policy table (~/.cache/sparsekern/policy.json, written by a benchmark or
# by calibration in another process) is not read; the suite starts from the built-in defaults (a file that does not
# exist). Tests about the table files set their own (monkeypatch).
os.environ["SPARSEKERN_POLICY_TABLE"] = os.path.join(tempfile.mkdtemp(prefix="sparsekern-tests-"), "no-policy.json")

CUDA_OK, CUDA_WHY = _cuda_ready()
DEVICES = ["cpu"] + (["cuda"] if CUDA_OK else [])


def _require_cuda() -> bool:
    from sparsekern import envs

    return bool(envs.get("SPARSEKERN_REQUIRE_CUDA"))


REQUIRE_CUDA = _require_cuda()
_GPU_SKIP = re.compile(r"cuda|gpu|cusparselt|sm\d\d", re.IGNORECASE)
_cuda_ran = {"passed": 0, "cuda_items": 0}


def pytest_collection_modifyitems(config, items):
    _cuda_ran["cuda_items"] = sum(1 for item in items if "cuda" in item.keywords)
    if CUDA_OK:
        return
    if REQUIRE_CUDA:
        return  # pytest_runtest_setup fails them, naming why
    skip = pytest.mark.skip(reason=f"cuda test skipped: {CUDA_WHY}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    if REQUIRE_CUDA and not CUDA_OK and "cuda" in item.keywords:
        pytest.fail(f"SPARSEKERN_REQUIRE_CUDA=1 but this cuda test cannot run: {CUDA_WHY}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if "cuda" in item.keywords and report.when == "call" and report.passed:
        _cuda_ran["passed"] += 1
    if not (REQUIRE_CUDA and report.skipped):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if "cuda" in item.keywords or _GPU_SKIP.search(reason):
        report.outcome = "failed"
        report.longrepr = f"SPARSEKERN_REQUIRE_CUDA=1: a GPU test may not skip ({reason})"


def pytest_sessionfinish(session, exitstatus):
    if REQUIRE_CUDA and _cuda_ran["cuda_items"] and _cuda_ran["passed"] == 0 and session.exitstatus == 0:
        session.exitstatus = 1


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


@pytest.fixture(autouse=True)
def _intra_op_threads():
    # A test that changes the process's intra-op thread count (e.g. an in-process `bench gemm --threads 1`) must not
    # change the numerics of the tests after it: the count is restored after every test.
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
