"""Per-iteration split of the refit's ADMM loop (prune/refit.py): the GEMM against the elementwise updates.

    PYTHONPATH=python python bench/refit_split.py

Median of 7 x 5 iterations per part, float32, torch's default threads, on the shapes of SmolLM2-135M's linears.
"""
import time

import torch

torch.manual_seed(0)
for rows, cols in ((576, 1536), (1536, 576), (576, 576)):
    V = torch.randn(rows, cols); U = torch.randn(rows, cols); B = torch.randn(rows, cols); Z = torch.empty_like(V); T = torch.empty_like(V)
    A = torch.randn(cols, cols); Mf = (torch.rand(rows, cols) > 0.5).float()
    def gemm():
        torch.mm(T, A, out=V)
    def elem():
        torch.add(V, U, out=Z); Z.mul_(Mf); U.add_(V).sub_(Z); torch.sub(Z, U, out=T).mul_(1.0).add_(B)
    for f in (gemm, elem): f()
    res = {}
    for name, f in (("gemm", gemm), ("elem", elem)):
        ts = []
        for _ in range(7):
            t = time.perf_counter(); [f() for _ in range(5)]; ts.append((time.perf_counter() - t) / 5)
        res[name] = sorted(ts)[3] * 1e3
    print(f"{rows}x{cols}: GEMM {res['gemm']:.2f} ms, elementwise {res['elem']:.2f} ms per iteration ({100*res['elem']/(res['gemm']+res['elem']):.0f}% of the iteration)")
