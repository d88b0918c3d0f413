#!/usr/bin/env python3
"""Run every sparsekern CUDA op once on small inputs, with light correctness checks: the workload that
bench/gpu_validate.sh runs under compute-sanitizer (memcheck on all ops, racecheck on our own kernels).

Small on purpose: under the sanitizer each kernel runs 10-100x slower. The real correctness tests are the `cuda`
tests in tests/; this only has to touch every kernel with odd and aligned sizes.

Usage: python bench/cuda_smoke.py [--ops all|own|cslt]   (exit 1 when an op fails, 0 otherwise; ops without a
CUDA kernel in this build are listed as skipped)
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

import torch  # noqa: E402

DEV = "cuda"


def has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op}", "CUDA")


def ref_prune_24(w: torch.Tensor) -> torch.Tensor:
    g = w.float().reshape(w.shape[0], -1, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    return (w.reshape(g.shape) * keep).reshape(w.shape)


def close(y: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    err = (y.double() - ref.double()).abs().max().item() / max(ref.double().abs().max().item(), 1e-30)
    if not err <= tol:
        raise AssertionError(f"{what}: max rel error {err:.3g} > {tol:g}")


def smoke_core(rows: int, cols: int, m: int) -> None:
    ops = torch.ops.sparsekern
    w = torch.randn(rows, cols, device=DEV, dtype=torch.float16)
    if has_cuda_kernel("prune_nm"):
        pruned, mask = ops.prune_nm(w, 2, 4)
        assert torch.equal(pruned, ref_prune_24(w)), "prune_nm differs from the topk reference"
        assert torch.equal(mask, pruned != 0), "prune_nm mask differs from the kept entries"
    w24 = ref_prune_24(w)
    if has_cuda_kernel("nm_violation"):
        assert ops.nm_violation(w24, 2, 4).tolist() == [-1, -1], "nm_violation flags a 2:4 weight"
    if has_cuda_kernel("compress_24"):
        values, codes = ops.compress_24(w24)
        if has_cuda_kernel("decompress_24"):
            assert torch.equal(ops.decompress_24(values, codes, cols), w24), "compress/decompress round trip"
        if has_cuda_kernel("spmm_24"):
            x = torch.randn(m, cols, device=DEV, dtype=torch.float16)
            close(ops.spmm_24(x, values, codes), x.double() @ w24.double().t(), 1e-2, "spmm_24 fp16")
    if has_cuda_kernel("quantize_per_token"):
        x = torch.randn(m, cols, device=DEV, dtype=torch.bfloat16)
        q, s = ops.quantize_per_token(x, torch.int8)
        err = (q.float() * s[:, None] - x.float()).abs()
        assert bool((err <= s[:, None] * 0.5 + 1e-2).all()), "quantize_per_token error above half a step"


def smoke_skinny(rows: int, cols: int, m: int, dtype: torch.dtype) -> None:
    """spmm_24's decode kernel (M <= 16): split-K on a narrow N, the element-wise path for K % 32 != 0, int8."""
    ops = torch.ops.sparsekern
    if not has_cuda_kernel("spmm_24") or not has_cuda_kernel("compress_24"):
        raise LookupError("spmm_24 / compress_24 have no CUDA kernel in this build")
    w24 = ref_prune_24(torch.randn(rows, cols, device=DEV))
    x = torch.randn(m, cols, device=DEV)
    if dtype == torch.int8:
        w24, x = (w24 * 40).round().clamp(-127, 127), (x * 40).round().clamp(-127, 127)
    values, codes = ops.compress_24(w24.to(dtype))
    y = ops.spmm_24(x.to(dtype), values, codes, None, None, None, "none", torch.float32)
    ref = x.to(dtype).double() @ w24.to(dtype).double().t()
    if dtype == torch.int8:
        assert torch.equal(y.double(), ref), "spmm_24 int8 (decode kernel) is not exact"
    else:
        close(y, ref, 1e-2, f"spmm_24 decode kernel {dtype}")


def smoke_prune(rows: int, cols: int) -> None:
    ops = torch.ops.sparsekern
    x = torch.randn(2, 8, cols, device=DEV)  # [B, T, C] calibration batch
    if has_cuda_kernel("hessian_update_"):
        H = torch.zeros(cols, cols, device=DEV)
        ops.hessian_update_(H, x, 0, 2)
        xf = x.reshape(-1, cols).double()
        close(H, 2.0 / 2 * xf.t() @ xf, 1e-4, "hessian_update_")
    if has_cuda_kernel("act_scale_update_"):
        s = torch.zeros(cols, device=DEV)
        ops.act_scale_update_(s, x, 0, 2)
        assert torch.isfinite(s).all(), "act_scale_update_ produced non-finite values"
    if has_cuda_kernel("wanda_prune"):
        w = torch.randn(rows, cols, device=DEV)
        pruned, mask = ops.wanda_prune(w, torch.rand(cols, device=DEV) + 0.1, 2, 4, 0.5)
        nnz = (pruned.reshape(rows, -1, 4) != 0).sum(-1)
        assert bool((nnz <= 2).all()), "wanda_prune 2:4 result keeps more than 2 of 4"
    if has_cuda_kernel("sparsegpt_prune_block_"):
        bs = 32
        w1 = torch.randn(rows, bs, device=DEV)
        a = torch.randn(bs, bs, device=DEV, dtype=torch.float64)
        h = a @ a.t() + bs * torch.eye(bs, device=DEV, dtype=torch.float64)
        hinv1 = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
        err, loss, mask = ops.sparsegpt_prune_block_(w1, hinv1, 2, 4, None, None, None, 0)
        assert torch.isfinite(err).all() and torch.isfinite(loss).all(), "sparsegpt_prune_block_ non-finite"


def smoke_cslt(n: int, k: int, m: int) -> None:
    ops = torch.ops.sparsekern
    if not (has_cuda_kernel("cslt_compress") and has_cuda_kernel("cslt_linear")):
        raise LookupError("no CUDA kernel")
    for dt in (torch.float16, torch.bfloat16):
        w = ref_prune_24(torch.randn(n, k, device=DEV, dtype=dt))
        buf = ops.cslt_compress(w)
        x = torch.randn(m, k, device=DEV, dtype=dt)
        close(ops.cslt_linear(x, buf, n, k), x.double() @ w.double().t(), 1e-2, f"cslt_linear {dt}")
    wi = ref_prune_24(torch.randint(-8, 8, (n, k), device=DEV, dtype=torch.int8).float()).to(torch.int8)
    xi = torch.randint(-8, 8, (m, k), device=DEV, dtype=torch.int8)
    y = ops.cslt_linear(xi, ops.cslt_compress(wi), n, k, out_dtype=torch.bfloat16)
    close(y, xi.double() @ wi.double().t(), 1e-2, "cslt_linear int8 -> bf16")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ops", choices=("all", "own", "cslt"), default="all",
                    help="own: our kernels only (racecheck); cslt: the cuSPARSELt wrapper only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("cuda_smoke: no CUDA GPU visible", file=sys.stderr)
        return 2
    import sparsekern  # noqa: F401  (loads the extension and registers the ops)
    from sparsekern import _ext

    _ext.require_cuda("bench/cuda_smoke.py")
    torch.manual_seed(0)
    cases = []
    if args.ops in ("all", "own"):
        cases += [("core 64x128 M=8", lambda: smoke_core(64, 128, 8)),
                  ("core 33x100 M=3 (odd)", lambda: smoke_core(33, 100, 3)),
                  ("prune 48x64", lambda: smoke_prune(48, 64)),
                  ("decode 1031x4096 M=1 bf16 (split-K)", lambda: smoke_skinny(1031, 4096, 1, torch.bfloat16)),
                  ("decode 40x1000 M=16 int8 (element-wise loads)", lambda: smoke_skinny(40, 1000, 16, torch.int8))]
    if args.ops in ("all", "cslt"):
        cases += [("cslt 64x128 M=16", lambda: smoke_cslt(64, 128, 16)),
                  ("cslt 96x256 M=1", lambda: smoke_cslt(96, 256, 1))]
    failed = 0
    for name, fn in cases:
        try:
            fn()
            torch.cuda.synchronize()
            print(f"ok    {name}")
        except LookupError as e:
            print(f"skip  {name}: {e}")
        except Exception:  # noqa: BLE001 - report every case, then fail at the end
            failed += 1
            print(f"FAIL  {name}\n{traceback.format_exc()}")
    print(f"cuda_smoke: {len(cases) - failed}/{len(cases)} cases passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
