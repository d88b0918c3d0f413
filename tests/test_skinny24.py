"""The small-M (decode) 2:4 kernel: spmm_24 on CUDA for M = 1..16 (csrc/cuda/spmm_24_skinny.cu).

Spec: y = x @ W^T, W given in the portable format, then spmm_24's epilogue. The plain-PyTorch reference computes it
in float64 from the decompressed weight. The kernel's decoding, work partition and order of operations are
device-free code (csrc/core/skinny24.h) that the CPU emulation op `_spmm_24_skinny_emulate` runs too: the CPU tests
check the emulation against the float64 reference on every run (every M, odd N, K not a multiple of 128, every
code), and the cuda tests check that the kernel's sums equal the emulation's bit for bit, and the epilogues, graphs
and unaligned operands.

Tolerance (float16 / bfloat16 inputs, float32 accumulation): |y - y_ref| <= K * 2^-24 * sum_k |x_k w_k| per
output (at most K/2 + ~5 roundings of a float32 sum of the K/2 kept products, Higham's gamma_n, with room); int8
is exact (int32 sums of int8 products).
"""

from __future__ import annotations

import pytest
import torch

import sparsekern  # noqa: F401  (loads the ops)
from sparsekern.ops import core

DTYPES = [torch.bfloat16, torch.float16, torch.int8]


def _weight(n: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=gen)
    w, _ = core.prune_nm(w, 2, 4)  # keeps the two largest |w| of every group of 4
    if dtype == torch.int8:
        return (w * 40).round().clamp(-127, 127).to(torch.int8)
    return w.to(dtype)


def _x(m: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    return torch.randn(m, k, generator=gen).to(dtype)


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.double() @ w.double().t()


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.shape[1] * 2.0 ** -24 * (x.double().abs() @ w.double().abs().t())


def _check(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    ref = _reference(x, w)
    if x.dtype == torch.int8:
        assert got.dtype == torch.int32 and torch.equal(got.long(), ref.long())
    else:
        err = (got.double().cpu() - ref).abs()
        bound = _bound(x, w)
        assert bool((err <= bound).all()), float((err / bound.clamp_min(1e-300)).max())


def _emulate(x, values, codes, sms):
    return torch.ops.sparsekern._spmm_24_skinny_emulate(x, values, codes, sms)


# ------------------------------------------------------------------ CPU: the shared logic, on every run


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [4, 28, 36, 100, 1000, 1024, 1056, 3076])
def test_emulation_equals_the_float64_reference_for_every_m(dtype, k):
    gen = torch.Generator().manual_seed(k)
    n = 37  # odd: a partial last block of 8 rows
    w = _weight(n, k, dtype, gen)
    values, codes = core.compress_24(w)
    for m in range(1, 17):
        x = _x(m, k, dtype, gen)
        _check(_emulate(x, values, codes, 132), x, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulation_split_k_plans_agree(dtype):
    """The same sums for every split-K plan (SM counts 1 to 1000 give ksplit 1..8): within the bound, int8 equal."""
    gen = torch.Generator().manual_seed(1)
    n, k = 24, 16384
    w = _weight(n, k, dtype, gen)
    values, codes = core.compress_24(w)
    x = _x(3, k, dtype, gen)
    plans = set()
    for sms in (1, 2, 8, 64, 1000):
        plans.add(tuple(torch.ops.sparsekern._skinny24_plan(n, k, sms)))
        got = _emulate(x, values, codes, sms)
        _check(got, x, w)
    assert {p[0] for p in plans} >= {1, 8}, plans


def test_emulation_is_exact_on_a_selection_matrix():
    """W with one 1 per row (2:4 trivially): y[m, n] = x[m, pos(n)] exactly, for every kept slot and code."""
    gen = torch.Generator().manual_seed(2)
    k = 1000
    n = 300
    pos = torch.randint(0, k, (n,), generator=gen)
    w = torch.zeros(n, k)
    w[torch.arange(n), pos] = 1.0
    for dtype in (torch.bfloat16, torch.float16):
        values, codes = core.compress_24(w.to(dtype))
        x = torch.randn(16, k, generator=gen).to(dtype)
        got = _emulate(x, values, codes, 132)
        assert torch.equal(got, x.float()[:, pos])


def test_every_pattern_code_is_decoded():
    """All six 2:4 codes (kept positions i0 < i1) in one weight, checked position by position against the dense
    weight through a one-hot x: the decoding of both nibbles of a code byte."""
    pairs = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    k = 4 * 36  # 36 groups: every code in the low and the high nibble, in several units
    w = torch.zeros(6, k)
    for r in range(6):
        for g in range(k // 4):
            i0, i1 = pairs[(r + g) % 6]
            w[r, 4 * g + i0], w[r, 4 * g + i1] = 1 + g, -(2 + r)
    values, codes = core.compress_24(w.to(torch.bfloat16))
    seen = {int(b) & 0xF for b in codes.flatten()} | {int(b) >> 4 for b in codes.flatten()}
    assert seen == {i0 | i1 << 2 for i0, i1 in pairs}
    eye = torch.eye(k, dtype=torch.bfloat16)
    for start in range(0, k, 16):  # M = 16 one-hot rows at a time: y = the dense weight's columns
        got = _emulate(eye[start:start + 16], values, codes, 132)
        assert torch.equal(got, w[:, start:start + 16].t())


def test_plan_rules():
    plan = lambda n, k, sms: tuple(torch.ops.sparsekern._skinny24_plan(n, k, sms))  # noqa: E731
    assert plan(4096, 4096, 132) == (1, 4)  # 512 row blocks fill 132 SMs: no split
    assert plan(1024, 4096, 132) == (2, 2)  # 128 blocks: split while each range keeps >= 2 steps
    assert plan(1024, 28672, 132) == (4, 7)
    assert plan(8, 100, 132) == (1, 1)  # K below one step
    for n in (1, 8, 100, 1024, 8192):
        for k in (4, 1024, 4096, 14336, 28672):
            ks, sps = plan(n, k, 132)
            steps = -(-k // 1024)
            assert 1 <= ks <= 8 and (ks - 1) * sps < steps <= ks * sps  # contiguous ranges, none empty


def test_emulation_bad_input():
    v, c = core.compress_24(torch.zeros(4, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="multiple of 4"):
        _emulate(torch.zeros(1, 6, dtype=torch.bfloat16), v, c, 1)
    with pytest.raises(RuntimeError, match=r"values must be \[N, K/2\]"):
        _emulate(torch.zeros(1, 12, dtype=torch.bfloat16), v, c, 1)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or int8"):
        _emulate(torch.zeros(1, 8), v.float(), c, 1)


# ------------------------------------------------------------------ CUDA: the kernel


def _sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [4, 28, 36, 48, 100, 1000, 1040, 1056, 4096, 14336])
def test_kernel_sums_equal_the_emulation_bit_for_bit(dtype, k):
    """K < 32 (partial units only), K % 32 != 0 (element-wise weight loads) with 128-bit activation staging (48,
    1040 for int8), aligned K, split-K (N = 1031 at 14336)."""
    gen = torch.Generator().manual_seed(k)
    n = 37 if k < 14336 else 1031
    w = _weight(n, k, dtype, gen)
    values, codes = core.compress_24(w)
    vd, cd = values.cuda(), codes.cuda()
    out_dtype = torch.int32 if dtype == torch.int8 else torch.float32
    for m in range(1, 17):
        x = _x(m, k, dtype, gen)
        got = core.spmm_24(x.cuda(), vd, cd, out_dtype=out_dtype).cpu()
        want = _emulate(x, values, codes, _sms())
        assert torch.equal(got, want), (m, float((got.double() - want.double()).abs().max()))
        _check(got, x, w)


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 8])
def test_kernel_single_and_one_block_of_rows(n):
    gen = torch.Generator().manual_seed(n)
    for dtype in DTYPES:
        w = _weight(n, 4096, dtype, gen)
        values, codes = core.compress_24(w)
        x = _x(16, 4096, dtype, gen)
        out_dtype = torch.int32 if dtype == torch.int8 else torch.float32
        got = core.spmm_24(x.cuda(), values.cuda(), codes.cuda(), out_dtype=out_dtype).cpu()
        assert torch.equal(got, _emulate(x, values, codes, _sms()))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1056, 8192])  # one range; split-K (the epilogue in the second kernel)
def test_kernel_default_output_and_epilogues(dtype, k):
    gen = torch.Generator().manual_seed(3)
    n = 45
    w = _weight(n, k, dtype, gen)
    values, codes = core.compress_24(w)
    vd, cd = values.cuda(), codes.cuda()
    alpha = torch.rand(n, generator=gen) + 0.5
    bias = torch.randn(n, generator=gen)
    for m in (1, 5, 16):
        x = _x(m, k, dtype, gen)
        rs = torch.rand(m, generator=gen) + 0.5
        sums = _emulate(x, values, codes, _sms()).double()
        plain = core.spmm_24(x.cuda(), vd, cd)
        assert plain.dtype == dtype and torch.equal(plain.cpu(), sums.float().to(dtype))
        for act in ("none", "relu", "gelu"):
            got = core.spmm_24(x.cuda(), vd, cd, bias=bias.cuda(), alpha=alpha.cuda(), row_scale=rs.cuda(),
                               activation=act, out_dtype=torch.float32).cpu()
            want = sums * alpha.double()[None, :] * rs.double()[:, None] + bias.double()[None, :]
            want = {"none": want, "relu": want.clamp_min(0),
                    "gelu": torch.nn.functional.gelu(want)}[act]
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), act


@pytest.mark.cuda
def test_kernel_int8_w8a8_epilogue_and_outputs():
    gen = torch.Generator().manual_seed(4)
    n, k = 40, 4096
    w = _weight(n, k, torch.int8, gen)
    values, codes = core.compress_24(w)
    vd, cd = values.cuda(), codes.cuda()
    x = _x(7, k, torch.int8, gen)
    exact = _reference(x, w)
    assert torch.equal(core.spmm_24(x.cuda(), vd, cd).cpu().long(), exact.long())  # int32, exact
    wscale = torch.rand(n, generator=gen) * 0.01
    xscale = torch.rand(7, generator=gen) * 0.01
    got = core.spmm_24(x.cuda(), vd, cd, alpha=wscale.cuda(), row_scale=xscale.cuda(), out_dtype=torch.bfloat16)
    want = (exact.float() * wscale[None, :] * xscale[:, None]).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got.cpu(), want)
    small = torch.full((n,), 1e-3)
    q = core.spmm_24(x.cuda(), vd, cd, alpha=small.cuda(), out_dtype=torch.int8).cpu()
    assert torch.equal(q, (exact.float() * small[None, :]).round().clamp(-128, 127).to(torch.int8))
    bias = torch.randn(n, generator=gen)
    for act in ("relu", "gelu"):
        got = core.spmm_24(x.cuda(), vd, cd, bias=bias.cuda(), alpha=wscale.cuda(), row_scale=xscale.cuda(),
                           activation=act, out_dtype=torch.float32).cpu()
        want = exact * wscale.double()[None, :] * xscale.double()[:, None] + bias.double()[None, :]
        want = want.clamp_min(0) if act == "relu" else torch.nn.functional.gelu(want)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5), act
    with pytest.raises(RuntimeError, match="could overflow the int32 accumulator"):
        big = torch.zeros(1, 262144, dtype=torch.int8, device="cuda")
        v, c = core.compress_24(torch.zeros(2, 262144, dtype=torch.int8, device="cuda"))
        core.spmm_24(big, v, c)


@pytest.mark.cuda
def test_kernel_on_unaligned_operands_takes_the_elementwise_path():
    """Storage offsets that break the 16-byte alignment of the values, then of x (activation staging element by
    element), then the 4-byte alignment of the codes: the same sums as the emulation."""
    gen = torch.Generator().manual_seed(5)
    n, k = 17, 1024
    w = _weight(n + 1, k, torch.bfloat16, gen)
    values, codes = core.compress_24(w)
    big = torch.empty(n * k // 2 + 1, dtype=torch.bfloat16, device="cuda")
    big[1:] = values[1:].reshape(-1).cuda()
    vu = big[1:].view(n, k // 2)  # offset by 2 bytes
    assert vu.data_ptr() % 16 != 0
    cu = codes[1:].cuda()
    x = _x(3, k, torch.bfloat16, gen)
    want = _emulate(x, values[1:], codes[1:], _sms())
    got = core.spmm_24(x.cuda(), vu, cu, out_dtype=torch.float32).cpu()
    assert torch.equal(got, want)
    xb = torch.empty(3 * k + 8, dtype=torch.bfloat16, device="cuda")
    xu = xb[1:1 + 3 * k].view(3, k)
    xu.copy_(x.cuda())
    assert xu.data_ptr() % 16 != 0
    got = core.spmm_24(xu, values[1:].cuda(), codes[1:].cuda(), out_dtype=torch.float32).cpu()
    assert torch.equal(got, want)
    cb = torch.empty(codes[1:].numel() + 1, dtype=torch.uint8, device="cuda")
    cb[1:] = codes[1:].reshape(-1).cuda()
    cu2 = cb[1:].view(n, -1)
    assert cu2.data_ptr() % 4 != 0
    got = core.spmm_24(x.cuda(), values[1:].cuda(), cu2, out_dtype=torch.float32).cpu()
    assert torch.equal(got, want)


@pytest.mark.cuda
def test_kernel_is_exact_on_a_selection_matrix():
    gen = torch.Generator().manual_seed(6)
    k = 4096
    pos = torch.randint(0, k, (300,), generator=gen)
    w = torch.zeros(300, k)
    w[torch.arange(300), pos] = 1.0
    values, codes = core.compress_24(w.to(torch.float16))
    for m in range(1, 17):
        x = torch.randn(m, k, generator=gen).to(torch.float16)
        got = core.spmm_24(x.cuda(), values.cuda(), codes.cuda()).cpu()
        assert torch.equal(got, x[:, pos])


@pytest.mark.cuda
def test_kernel_replays_in_a_cuda_graph():
    gen = torch.Generator().manual_seed(7)
    n, k = 1024, 4096  # split-K (two kernels) on an H100 / A100
    w = _weight(n, k, torch.bfloat16, gen)
    values, codes = core.compress_24(w)
    vd, cd = values.cuda(), codes.cuda()
    x = _x(1, k, torch.bfloat16, gen).cuda()
    alpha = torch.rand(n, device="cuda")
    core.spmm_24(x, vd, cd, alpha=alpha)  # warm-up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = core.spmm_24(x, vd, cd, alpha=alpha)
    for _ in range(3):
        x.copy_(_x(1, k, torch.bfloat16, gen).cuda())
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, core.spmm_24(x, vd, cd, alpha=alpha))


# ------------------------------------------------------------------ the goals of the GPU run (bench/decode_goals.py)


def _goals_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "decode_goals.py"
    spec = importlib.util.spec_from_file_location("decode_goals", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _rec(contender, n, k, m, dtype, us, gbps=None):
    return {"contender": contender, "shape": f"{n}x{k}", "n": n, "k": k, "m": m, "dtype": dtype, "status": "ok",
            "median_us": us, "gbps": gbps}


def test_decode_goals_are_computed_from_the_same_run():
    g = _goals_module()
    recs = []
    for (n, k) in [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (8192, 8192)]:
        for m in (1, 2, 16):
            recs.append(_rec("dense", n, k, m, "bf16", 20.0))
            recs.append(_rec("sk_spmm24", n, k, m, "bf16", 12.0 if m == 1 else 19.0, gbps=2400.0))
            recs.append(_rec("sk_spmm24", n, k, m, "int8", 7.0))
    recs.append(_rec("sk_spmm24", 1024, 4096, 16, "bf16", 25.0) | {"status": "failed"})  # ignored: not ok
    res = g.goals({"records": recs}, copy_gbps=3000.0)["goals"]
    assert res["m1_8b_vs_dense"]["met"] and res["m1_8b_vs_dense"]["min"] == pytest.approx(20 / 12)
    assert len(res["m1_8b_vs_dense"]["points"]) == 4  # the 70B shape is not an 8B shape
    assert res["never_below_dense"]["met"] and len(res["never_below_dense"]["points"]) == 15
    assert res["m1_bandwidth"]["met"] and res["m1_bandwidth"]["min"] == pytest.approx(0.8)
    assert res["m1_int8_vs_dense"]["met"] and res["m1_int8_vs_dense"]["min"] == pytest.approx(20 / 7)
    recs.append(_rec("sk_spmm24", 4096, 4096, 4, "bf16", 21.0))
    recs.append(_rec("dense", 4096, 4096, 4, "bf16", 20.0))
    res = g.goals({"records": recs}, copy_gbps=None)["goals"]
    assert res["never_below_dense"]["met"] is False and res["never_below_dense"]["min"] == pytest.approx(20 / 21)
    assert res["m1_bandwidth"]["met"] is None  # no copy bandwidth measured: not claimed either way
