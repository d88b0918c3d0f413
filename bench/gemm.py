#!/usr/bin/env python3
"""Thin wrapper: `python bench/gemm.py ARGS` == `sparsekern bench gemm ARGS` from a source checkout."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from sparsekern.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", "gemm", *sys.argv[1:]]))
