"""Per-iteration split of the refit's ADMM loop (prune/refit.py): the GEMM against the elementwise updates, the
six-pass form of the updates (Z = (V + U) M; U += V - Z; T = B + rho (Z - U)) and the fused three-pass form
prune/refit.py runs (S = V + U; T = B + S rho (2M - 1); U = S (1 - M)).

    PYTHONPATH=python python bench/refit_split.py

Median of 7 x 5 iterations per part, float32, torch's default threads, on the shapes of SmolLM2-135M's linears.
"""
import time

import torch


def median_ms(fn) -> float:
    fn()
    ts = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(5):
            fn()
        ts.append((time.perf_counter() - t) / 5)
    return sorted(ts)[3] * 1e3


def main() -> None:
    torch.manual_seed(0)
    for rows, cols in ((576, 1536), (1536, 576), (576, 576)):
        V, U, B = (torch.randn(rows, cols) for _ in range(3))
        Z, T = torch.empty_like(V), torch.empty_like(V)
        A = torch.randn(cols, cols)
        M = (torch.rand(rows, cols) > 0.5).float()
        signed, keep_out = M * 2 - 1, 1 - M

        def gemm():
            torch.mm(T, A, out=V)

        def six_pass():
            torch.add(V, U, out=Z).mul_(M)
            U.add_(V).sub_(Z)
            torch.sub(Z, U, out=T).add_(B)

        def three_pass():
            U.add_(V)
            torch.addcmul(B, U, signed, out=T)
            U.mul_(keep_out)

        g, e6, e3 = median_ms(gemm), median_ms(six_pass), median_ms(three_pass)
        print(f"{rows}x{cols}: GEMM {g:.2f} ms; elementwise six-pass {e6:.2f} ms ({100 * e6 / (g + e6):.0f}% of the "
              f"iteration), fused three-pass {e3:.2f} ms ({100 * e3 / (g + e3):.0f}%)")


if __name__ == "__main__":
    main()
