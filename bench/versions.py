#!/usr/bin/env python3
"""Record what a GPU run ran on: GPU, driver, torch, CUDA (torch's and nvcc's), cuSPARSELt (torch's, the wheel's,
the one sparsekern was built with), Python, git commit. Writes JSON (--out) and prints it. Never fails on a
missing fact: it is recorded as null."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))


def _cmd(*cmd: str) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _dist(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON file to write")
    args = ap.parse_args()
    import torch

    from sparsekern.bench import environment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = environment.capture(device)
    nvcc = _cmd(os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"), "--version") or _cmd(
        "nvcc", "--version")
    info.update({
        "nvcc": nvcc.splitlines()[-1] if nvcc else None,
        "nvidia_smi": _cmd("nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                           "--format=csv,noheader"),
        "cusparselt_wheel": _dist("nvidia-cusparselt-cu13") or _dist("nvidia-cusparselt-cu12"),
        "packages": {p: _dist(p) for p in ("torch", "pytest", "jsonschema", "matplotlib", "ninja", "pybind11",
                                          "transformers")},
        "torch_cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST"),
    })
    text = json.dumps(info, indent=1, default=str)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
