#!/usr/bin/env python
"""Pruning benchmark: sparsekern's fused Wanda / SparseGPT against the reference-structured PyTorch loops.
Same as `sparsekern bench prune`; the code is python/sparsekern/bench/prune.py. Example (the numbers in
docs/pruning.md): python bench/prune_bench.py --shapes 4096x4096 --repeats 3 --json bench/results/prune-cpu.json"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from sparsekern.bench.prune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
