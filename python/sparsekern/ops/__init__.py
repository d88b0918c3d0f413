"""Typed Python wrappers of the torch ops (torch.ops.sparsekern.*) and their fake kernels.

core.py     N:M prune / check, portable 2:4 compress / decompress, CPU 2:4 matmul, per-token quantisation
cslt.py     cuSPARSELt compress and matmul (CUDA)
prune.py    calibration statistics, Wanda and SparseGPT kernels
"""

from . import core, cslt, prune  # noqa: F401  (importing registers the fake kernels)
