"""The re-run of a pruned block: block l+1's inputs are block l's outputs *after* pruning.

So block l+1 is calibrated on the outputs of the pruned blocks 0..l, as in the references. The re-run can compute
the just-pruned 2:4 linears through sparsekern's own 2:4 GEMM instead of their dense forward
(rerun_kernel="sparse"), or decide per weight shape by timing both (rerun_kernel="auto", choose_rerun_kernel);
the model itself is never changed (sparse_forwards).
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .capture import Chunk, run_block
from .report import PruneReport
from .structure import weight_matrix

# A 5% margin keeps timing noise from flipping the choice (and the last bits of the results).
SPARSE_RERUN_MARGIN = 0.95


def fp32_rounding_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Worst-case rounding error of one float32 dot product of length K, for each output: K * 2^-24 * sum |x||w|
    (Higham's gamma_K); two such results may differ by twice that, which is what this returns."""
    return 2 * w.shape[1] * 2.0 ** -24 * (x.abs().double() @ w.abs().double().t())


def probe_sparse_rerun(w: torch.Tensor, rows: int, timer_reps: int = 3) -> dict:
    """Time F.linear against sparsekern's spmm_24 for one exactly 2:4 weight w [N, K] at `rows` input rows
    (float32 inputs from a seeded generator), and check that the two agree within float32 rounding.
    Returns {"dense_s", "sparse_s", "agree", "max_err_over_bound"}; min over `timer_reps` interleaved runs."""
    from .. import weight as w24

    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, w.shape[1], generator=gen, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
    c = w24.compress_24(w.detach().contiguous())
    yd = torch.nn.functional.linear(x, w)
    ys = w24.sparse_linear(x, c)
    ratio = float(((ys.double() - yd.double()).abs() / fp32_rounding_bound(x, w).clamp_min(1e-30)).max())
    dense, sparse = [], []
    for _ in range(timer_reps):
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        dense.append(time.perf_counter() - t)
        t = time.perf_counter()
        w24.sparse_linear(x, c)
        sparse.append(time.perf_counter() - t)
    return {"dense_s": min(dense), "sparse_s": min(sparse), "agree": ratio <= 1.0, "max_err_over_bound": ratio}


def choose_rerun_kernel(w: torch.Tensor, rows: int) -> tuple[str, dict]:
    """rerun_kernel="auto" for one weight shape: ("sparse" | "dense", the probe's numbers).

    Measured, not looked up in sparsekern.policy: the policy answers another question. It picks a kernel for a
    SparseLinear, whose only weight is the compressed one ("dense_fallback" there means decompressing first), from
    a table measured per (arch, dtype, N, K, M bucket), falling back to built-in defaults. Here the dense weight is
    already in memory, the candidates are the layer's own dense forward and spmm_24 on a compressed copy, the row
    count is the re-run's exact batch_size x seqlen, and the sparse result must also *agree* with the dense one
    within float32 rounding (the re-run feeds the next block's calibration). One probe per weight shape per run
    (a few GEMMs) answers all three on the machine at hand.
    """
    probe = probe_sparse_rerun(w.detach(), rows)
    faster = probe["sparse_s"] < SPARSE_RERUN_MARGIN * probe["dense_s"]
    return ("sparse" if faster and probe["agree"] else "dense"), probe


class RerunKernels:
    """Which re-run kernel each just-pruned linear uses, decided once per weight shape "NxK dtype" and recorded in
    report.rerun_choices (and report.rerun_probes for "auto")."""

    def __init__(self, rerun_kernel: str, pattern: str, device: torch.device, calib_dtype: torch.dtype | None,
                 rows: int, report: PruneReport):
        self.rerun_kernel, self.pattern, self.device, self.calib_dtype = rerun_kernel, pattern, device, calib_dtype
        self.rows, self.report = rows, report

    def use_sparse(self, m: nn.Module) -> bool:
        """Whether the re-run runs this (just pruned) linear through spmm_24."""
        if self.rerun_kernel == "dense" or self.pattern != "2:4":
            return False
        w = weight_matrix(m)
        key = f"{w.shape[0]}x{w.shape[1]} {str(w.dtype).removeprefix('torch.')}"
        choices = self.report.rerun_choices
        if key not in choices:
            if self.rerun_kernel == "sparse":
                choices[key] = "sparse"
            elif self.device.type != "cpu" or self.calib_dtype not in (None, torch.float32):
                choices[key] = "dense"  # auto measures CPU float forwards only
            else:
                choices[key], self.report.rerun_probes[key] = choose_rerun_kernel(w, self.rows)
        return choices[key] == "sparse"

    def sparse_ones(self, mods: Iterable[nn.Module]) -> list[nn.Module]:
        return [m for m in mods if self.use_sparse(m)]


def _sparse_forward(compressed, bias, x):
    from .. import weight as w24

    return w24.sparse_linear(x, compressed, bias)


@contextlib.contextmanager
def sparse_forwards(modules: Iterable[nn.Module]):
    """While active, the given linears (nn.Linear or Conv1D whose weight is exactly 2:4 along in_features) run
    through sparsekern's 2:4 GEMM on a compressed copy of their weight instead of their dense forward. The
    modules are not changed: an instance attribute `forward` shadows the class's and is removed on exit (forward
    hooks still fire, `module(x)` is unchanged for the caller)."""
    patched = []
    try:
        for m in modules:
            if "forward" in m.__dict__:
                continue  # someone else (e.g. accelerate) wraps this instance's forward: leave it dense
            from .. import weight as w24

            c = w24.compress_24(weight_matrix(m).detach().contiguous())
            m.forward = functools.partial(_sparse_forward, c, m.bias)
            patched.append(m)
        yield patched
    finally:
        for m in patched:
            del m.forward


def rerun_block(layer: nn.Module, chunks: Sequence[Chunk], hidden: Sequence[torch.Tensor],
                pruned: Mapping[str, nn.Module], kernels: RerunKernels, context: Callable) -> list[torch.Tensor]:
    """Block l+1's inputs: run the pruned block on every chunk, its just-pruned linears `pruned` (name -> module)
    through the kernel `kernels` picks, under `context()` (the calibration autocast)."""
    with context(), sparse_forwards(kernels.sparse_ones(pruned.values())):
        return run_block(layer, chunks, hidden, keep=True)
