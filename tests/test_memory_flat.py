"""Memory flatness (issue 16): creating, running and dropping SparseLinear layers, and compressing / decompressing
weights, many times over does not grow the process.

After a warm-up (allocator pools, lazily built tables, the first call of each kernel), CYCLES = 2000 more cycles may
grow the resident set (/proc/self/statm) by at most 20 MB. Each cycle builds a layer from a 2:4 weight of 32-128 K
entries (float32 / bfloat16 / float16, every fifth int8), runs it (and its backward for float32), compresses /
decompresses the weight and quantises the input: a leak of one such weight per cycle would be 60-500 MB, of 10 KB
per cycle 20 MB (an injected 10 KB leak fails it). About 5 s.
"""

from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

from sparsekern import _ext

pytestmark = [
    pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}"),
    pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc/self/statm (Linux)"),
]

if _ext.available():
    from sparsekern.linear import SparseLinear
    from sparsekern.ops import core
    from sparsekern.weight import Sparse24Weight, sparse_linear

CYCLES = 2000
WARMUP = 100
BOUND_MB = 20.0


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _weights(g: torch.Generator) -> list[torch.Tensor]:
    """Pruned 2:4 weights the cycles draw from (pruned once: the cycles measure the layer's life, not prune_nm)."""
    return [core.prune_nm(torch.randn(n, k, generator=g), 2, 4)[0] for n, k in ((96, 256), (130, 128), (64, 512))]


def _cycle(i: int, g: torch.Generator, weights: list[torch.Tensor]) -> None:
    dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
    w = weights[i % len(weights)]
    n, k = w.shape
    lin = torch.nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(w)
    layer = SparseLinear.from_linear(lin.to(dtype), quant="int8" if i % 5 == 0 else None)
    x = torch.randn(1 + i % 37, k, generator=g).to(dtype)
    with torch.no_grad():
        layer(x)
    xr = x.float().requires_grad_(True) if layer.quant is None and dtype == torch.float32 else None
    if xr is not None:  # the autograd path keeps and frees its saved tensors too
        layer(xr).sum().backward()
    w24 = Sparse24Weight.from_dense(w.to(dtype))
    dense = w24.decompress()
    sparse_linear(x[:3], w24)
    values, codes = core.compress_24(dense)
    core.decompress_24(values, codes, k)
    core.quantize_per_token(x.float())
    del layer, lin, x, xr, w24, dense, values, codes


@pytest.fixture
def one_thread():
    # Leaks do not depend on the thread count; one intra-op thread keeps the cycles fast on a loaded 2-core machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_create_forward_destroy_cycles_keep_memory_flat(one_thread):
    g = torch.Generator().manual_seed(0)
    weights = _weights(g)
    for i in range(WARMUP):
        _cycle(i, g, weights)
    gc.collect()
    before = rss_mb()
    peak_growth = 0.0
    for i in range(WARMUP, WARMUP + CYCLES):
        _cycle(i, g, weights)
        if i % 50 == 0:
            gc.collect()
            peak_growth = max(peak_growth, rss_mb() - before)
    gc.collect()
    growth = rss_mb() - before
    print(f"{CYCLES} cycles after {WARMUP} warm-up: RSS {before:.1f} MB -> {before + growth:.1f} MB "
          f"({growth:+.2f} MB, largest sample {peak_growth:+.2f} MB)", file=sys.stderr)
    assert growth < BOUND_MB, f"RSS grew by {growth:.1f} MB over {CYCLES} cycles (bound {BOUND_MB} MB)"
