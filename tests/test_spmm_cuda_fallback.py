"""spmm_24's CUDA kernel must agree with the CPU kernel, which is itself tested against an fp64 reference in
test_spmm_cpu.py: decompress + GEMM + fused post-op for M > 16 and float32, the decode kernel (spmm_24_skinny.cu,
tested on its own in test_skinny24.py) for M <= 16 in fp16 / bf16. Runs on a GPU machine only (cuda marker)."""

import pytest
import torch

import sparsekern

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,N,K", [(1, 24, 36), (33, 40, 64), (100, 16, 128)])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_cuda_spmm_matches_cpu(dtype, M, N, K, activation):
    w, _ = sparsekern.prune_nm(torch.randn(N, K).to(dtype))
    values, codes = torch.ops.sparsekern.compress_24(w)
    x = torch.randn(M, K).to(dtype)
    bias, alpha, rs = torch.randn(N), torch.rand(N) + 0.5, torch.rand(M) + 0.5
    cpu = torch.ops.sparsekern.spmm_24(x, values, codes, bias, alpha, rs, activation, None)
    gpu = torch.ops.sparsekern.spmm_24(x.cuda(), values.cuda(), codes.cuda(), bias.cuda(), alpha.cuda(), rs.cuda(),
                                       activation, None)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(gpu.cpu().float(), cpu.float(), rtol=tol, atol=tol)


def test_cuda_spmm_int8_is_exact():
    w = sparsekern.prune_nm(torch.randint(-127, 128, (48, 256), dtype=torch.int8))[0]
    values, codes = torch.ops.sparsekern.compress_24(w)
    x = torch.randint(-127, 128, (7, 256), dtype=torch.int8)
    ref = x.long() @ w.long().t()
    gpu = torch.ops.sparsekern.spmm_24(x.cuda(), values.cuda(), codes.cuda(), None, None, None, "none", None)
    assert gpu.dtype == torch.int32 and torch.equal(gpu.cpu().long(), ref)


def test_cuda_spmm_opcheck():
    w, _ = sparsekern.prune_nm(torch.randn(32, 64, dtype=torch.float16))
    values, codes = torch.ops.sparsekern.compress_24(w)
    x = torch.randn(5, 64, dtype=torch.float16)
    torch.library.opcheck(torch.ops.sparsekern.spmm_24.default,
                          (x.cuda(), values.cuda(), codes.cuda(), None, None, None, "relu", None))
