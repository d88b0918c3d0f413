"""What a benchmark ran on: device, arch, library versions and the git commit, recorded in every result file.

Every field is best effort: a fact that cannot be found is null, never an exception (the GPU machines have no
package registry and may lack nvidia-smi on PATH or a git checkout).
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

import torch

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_commit(repo: str = _REPO) -> str | None:
    """HEAD of the checkout this package runs from, with "-dirty" when tracked files are modified."""
    return _run(["git", "describe", "--always", "--dirty", "--abbrev=40"], cwd=repo)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def arch_of(device: str) -> str:
    """'sm90' for an H100, 'cpu-avx512' for an AVX-512 CPU: the key the policy table is measured per."""
    d = torch.device(device)
    if d.type == "cuda":
        major, minor = torch.cuda.get_device_capability(d)
        return f"sm{major}{minor}"
    return "cpu-" + torch.backends.cpu.get_cpu_capability().lower()


def _cusparselt_torch() -> str | None:
    try:
        if not torch.backends.cusparselt.is_available():
            return None
        v = int(torch.backends.cusparselt.version())  # CUSPARSELT_VERSION = major*1000 + minor*100 + patch
        return f"{v // 1000}.{v // 100 % 10}.{v % 100}"
    except Exception:  # noqa: BLE001 - version probing must never fail a run
        return None


def policy_table_in_use() -> str:
    """The policy table SparseLinear dispatches by in this process (a path, or "built-in defaults"); a table that
    cannot be read is reported as such, never raised."""
    try:
        from .. import policy

        return policy.table_in_use()
    except Exception as e:  # noqa: BLE001 - a broken table must not stop a benchmark from recording why
        return f"unreadable: {e}"


def capture(device: str) -> dict:
    from .. import __version__, _ext, envs

    d = torch.device(device)
    info = _ext.build_info()
    env = {
        "device": d.type,
        "device_name": torch.cuda.get_device_name(d) if d.type == "cuda" else cpu_name(),
        "arch": arch_of(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cusparselt_torch": _cusparselt_torch(),
        "cusparselt_sparsekern": info.get("cusparselt_version"),
        "driver": None,
        "python": platform.python_version(),
        "sparsekern": __version__,
        "extension": {
            "available": _ext.available(),
            "with_cuda": bool(info.get("with_cuda", False)),
            "error": _ext.load_error(),
        },
        "git_commit": git_commit(),
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        # 1/5/15-minute load averages when the run started: on a shared machine, the context of every CPU number
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        # what steers kernel choice: the policy table in use, the C++ CPU dispatch settings, SPARSEKERN_* variables set
        "policy_table": policy_table_in_use(),
        "cpu_dispatch": envs.cpu_dispatch_settings() or None,
        "sparsekern_env": {r["name"]: os.environ[r["name"]] for r in envs.describe() if r["source"] == "environment"},
    }
    if d.type == "cuda":
        drv = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["driver"] = drv.splitlines()[0].strip() if drv else None
    return env
