#!/usr/bin/env python
"""Pruning benchmark: sparsekern's fused Wanda / SparseGPT against the reference-structured PyTorch loops.
Same as `sparsekern bench prune`; the code is python/sparsekern/bench/prune.py. The numbers in docs/pruning.md come
from `flock /tmp/sk-bench.lock python bench/prune_bench.py --methods wanda,sparsegpt --repeats 5` (the lock keeps
timing runs of several people on one machine apart; both sides get the same page policy, --thp both|none)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from sparsekern.bench.prune import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
