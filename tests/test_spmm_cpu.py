"""The CPU 2:4 GEMM (op spmm_24, wrapper sparse_linear) against a float64 reference, on every SIMD path this CPU runs.

Tolerance policy (written once, here):
- int8 x int8 with int32 output and no epilogue: exact.
- floating inputs: max |ours - ref64| <= 2 * max |torch - ref64| + eps(out_dtype) * max |ref64|, where torch is
  PyTorch's own F.linear (+ the same epilogue) in the same dtype on the decompressed weight: "no worse than twice
  PyTorch's own error", with a floor of one output ulp at the output's scale for cases PyTorch happens to get exact.
- int8 inputs with a floating epilogue: |ours - ref64| <= 2 * eps(out_dtype) * |ref64| + 1e-6 * max |ref64|
  (the accumulator is exact; only the fp32 epilogue and the final rounding err).
Each SIMD path is forced with sparsekern.envs.cpu_dispatch(isa=..., layout=rows|pairs|tokens), the run-time form
of SPARSEKERN_CPU_ISA / SPARSEKERN_CPU_SPMM_LAYOUT (which the extension reads once, at load); paths this CPU cannot
run, and dtypes a family has no kernel for (the row-pair kernels exist for bfloat16 with AVX512_BF16 and for int8
only), are reported as skipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sparsekern  # noqa: F401
from sparsekern import _ext, envs, weight
from sparsekern.ops import core

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}")


from cpuinfo import FLAGS as _FLAGS  # noqa: E402  (tests/cpuinfo.py: /proc/cpuinfo, independent of the library)
_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
# avx512-base: the AVX-512 kernels of CPUs without AVX512_BF16 / AVX512_VNNI (bf16 widened to fp32, int8 by vpmaddwd)
_ISA_NEEDS = {"scalar": set(), "avx2": {"avx2", "fma", "f16c"}, "avx512-base": _AVX512, "avx512": _AVX512}
# Each ISA runs its row kernels (K in the vector lanes; SPARSEKERN_CPU_SPMM_LAYOUT=rows); the AVX-512 ones also run
# the row-pair kernels (two weight rows per vector, K-blocked; layout=pairs) and the token-lane kernels (16 activation
# rows in the lanes; layout=tokens), forced for every M.
_PATHS = [(isa, "rows") for isa in _ISA_NEEDS] + [(isa, fam) for fam in ("pairs", "tokens")
                                                   for isa in ("avx512-base", "avx512")]
ISAS = [
    pytest.param(f"{isa}+{layout}",
                 marks=[] if _ISA_NEEDS[isa] <= _FLAGS else
                 [pytest.mark.skip(reason=f"CPU lacks {sorted(_ISA_NEEDS[isa] - _FLAGS)}")])
    for isa, layout in _PATHS
]


@pytest.fixture(params=ISAS)
def isa(request):
    name, layout = request.param.split("+")
    with envs.cpu_dispatch(isa=name, layout=layout):
        yield request.param


def has_kernel(isa: str, dtype: torch.dtype) -> bool:
    """Whether the forced path `isa` ("name+layout") has a kernel for weights of `dtype`: the row-pair family exists
    for int8 and, with AVX512_BF16 (the "avx512" name), for bfloat16."""
    name, layout = isa.split("+")
    if layout != "pairs" or dtype == torch.int8:
        return True
    return dtype == torch.bfloat16 and name == "avx512" and "avx512_bf16" in _FLAGS


def need_kernel(isa: str, dtype: torch.dtype) -> None:
    if not has_kernel(isa, dtype):
        pytest.skip(f"{isa}: no row-pair kernel for {dtype} (they exist for int8, and bfloat16 with AVX512_BF16)")


def random_pruned(n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.int8:
        w = torch.randint(-127, 128, (n, k), dtype=torch.int16)
        w = torch.where(w == 0, torch.ones_like(w), w)
        mag = w.abs().float() + torch.rand(n, k)  # tie-free scores
        return core.prune_nm(w.float(), 2, 4, mag)[0].to(torch.int8)
    return core.prune_nm(torch.randn(n, k, dtype=torch.float32).to(dtype), 2, 4)[0]


def random_x(m: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-127, 128, (m, k), dtype=torch.int8)
    return torch.randn(m, k).to(dtype)


def reference(x, w, bias=None, alpha=None, row_scale=None, activation="none"):
    y = x.double() @ w.double().t()
    if row_scale is not None:
        y = y * row_scale.double()[:, None]
    if alpha is not None:
        y = y * alpha.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    return y


def torch_same_dtype(x, w, bias=None, alpha=None, row_scale=None, activation="none"):
    """PyTorch's own computation in x's dtype: the error budget of the policy."""
    y = F.linear(x, w)
    if row_scale is not None:
        y = y * row_scale.to(y.dtype)[:, None]
    if alpha is not None:
        y = y * alpha.to(y.dtype)[None, :]
    if bias is not None:
        y = y + bias.to(y.dtype)
    if activation == "relu":
        y = torch.relu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    return y


def assert_close_policy(ours, x, w, out_dtype=None, **epi):
    ref = reference(x, w, **epi)
    out_dtype = out_dtype or x.dtype
    scale = ref.abs().max().item()
    # Floor: two ulps of the largest output. The fused epilogue rounds up to three more times after the dot product
    # (row_scale * alpha * acc + bias, each <= half an ulp); one ulp was too tight where PyTorch's own error happened
    # to be small: on an Intel Xeon (MKL) avx2 fp32 with bias + alpha + row_scale + relu measured 9.10e-6 against a
    # bound of 2 x 2.45e-6 + 4.14e-6 = 9.05e-6 (scale 34.8), with the code before and after issue 15 alike.
    floor = 2 * torch.finfo(out_dtype).eps * scale
    err = (ours.double() - ref).abs().max().item()
    if x.dtype == torch.int8:
        tol = (2 * torch.finfo(out_dtype).eps * ref.abs() + 1e-6 * scale)
        assert bool(((ours.double() - ref).abs() <= tol).all()), f"int8 epilogue error {err}"
        return
    torch_err = (torch_same_dtype(x, w, **epi).double() - ref).abs().max().item()
    assert err <= 2 * torch_err + floor, f"error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:.3g}"


FLOAT_TYPES = [torch.float32, torch.bfloat16, torch.float16]
M_SIZES = [1, 2, 3, 8, 16, 33, 256]


@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize("M", M_SIZES)
@pytest.mark.parametrize("K", [4, 100, 320])
def test_float_matches_reference(isa, dtype, M, K):
    need_kernel(isa, dtype)
    N = 37  # odd: partial register / thread tiles
    w = random_pruned(N, K, dtype)
    c = weight.compress_24(w)
    x = random_x(M, K, dtype)
    y = weight.sparse_linear(x, c)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close_policy(y, x, w)


@pytest.mark.parametrize("M", M_SIZES)
@pytest.mark.parametrize("K", [4, 100, 320])
def test_int8_exact(isa, M, K):
    N = 37
    w = random_pruned(N, K, torch.int8)
    x = random_x(M, K, torch.int8)
    y = weight.sparse_linear(x, weight.compress_24(w))
    assert y.dtype == torch.int32
    assert torch.equal(y.long(), x.long() @ w.long().t())


@pytest.mark.parametrize("dtype", FLOAT_TYPES + [torch.int8])
@pytest.mark.parametrize("activation", [None, "relu", "gelu"])
def test_epilogue(isa, dtype, activation):
    need_kernel(isa, dtype)
    M, N, K = 5, 45, 132
    w = random_pruned(N, K, dtype)
    x = random_x(M, K, dtype)
    c = weight.compress_24(w)
    bias = torch.randn(N)
    alpha = torch.rand(N) + 0.5
    row_scale = torch.rand(M) + 0.5
    if dtype == torch.int8:
        alpha, row_scale = alpha / 2000, row_scale / 10
    act = activation or "none"
    out_dtype = torch.float32 if dtype == torch.int8 else None
    for kw in [dict(bias=bias), dict(alpha=alpha), dict(bias=bias, alpha=alpha, row_scale=row_scale), {}]:
        y = weight.sparse_linear(x, c, activation=activation, out_dtype=out_dtype, **kw)
        assert_close_policy(y, x, w, out_dtype=out_dtype, activation=act, **kw)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_out_dtype_float(isa, out_dtype):
    need_kernel(isa, torch.bfloat16)
    x = random_x(7, 64, torch.bfloat16)
    w = random_pruned(19, 64, torch.bfloat16)
    bias = torch.randn(19)
    y = weight.sparse_linear(x, weight.compress_24(w), bias=bias, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    ref = reference(x, w, bias=bias)
    # fp32 accumulation and epilogue, one rounding to out_dtype: half an ulp plus the fp32 accumulation error
    tol = torch.finfo(out_dtype).eps * ref.abs() + 1e-5 * ref.abs().max()
    assert bool(((y.double() - ref).abs() <= tol).all())


def test_int8_out_dtypes(isa):
    M, N, K = 6, 23, 96
    x, w = random_x(M, K, torch.int8), random_pruned(N, K, torch.int8)
    c = weight.compress_24(w)
    acc = x.long() @ w.long().t()
    # int8 out: round-half-even of the fp32 epilogue, saturated
    alpha = torch.full((N,), 1 / 64)
    y8 = weight.sparse_linear(x, c, alpha=alpha, out_dtype=torch.int8)
    want = torch.round(acc.double() / 64).clamp(-128, 127).to(torch.int8)
    assert y8.dtype == torch.int8 and torch.equal(y8, want)
    # int32 out with an epilogue: the rounded fp32 result
    y32 = weight.sparse_linear(x, c, bias=torch.full((N,), 0.25), out_dtype=torch.int32)
    assert torch.equal(y32.long(), torch.round(acc.double() + 0.25).long())
    for od in (torch.bfloat16, torch.float16):
        y = weight.sparse_linear(x, c, out_dtype=od)
        assert torch.equal(y, acc.to(torch.float32).to(od))


def test_identity_reproduces_weight_exactly(isa):
    for dtype in FLOAT_TYPES:
        if not has_kernel(isa, dtype):
            continue
        w = random_pruned(24, 40, dtype)
        y = weight.sparse_linear(torch.eye(40, dtype=dtype), weight.compress_24(w))
        assert torch.equal(y, w.t())
    w = random_pruned(24, 40, torch.int8)
    y = weight.sparse_linear(torch.eye(40, dtype=torch.int8), weight.compress_24(w))
    assert torch.equal(y, w.t().int())


@pytest.mark.parametrize("dtype", FLOAT_TYPES + [torch.int8])
def test_non_contiguous_and_3d_input(isa, dtype):
    need_kernel(isa, dtype)
    K, N = 64, 33
    w = random_pruned(N, K, dtype)
    c = weight.compress_24(w)
    big = random_x(9, 2 * K, dtype)
    x = big[:, ::2]  # strided columns
    assert not x.is_contiguous()
    y = weight.sparse_linear(x, c)
    assert torch.equal(y, weight.sparse_linear(x.contiguous(), c))
    xt = random_x(K, 5, dtype).t()  # transposed
    assert torch.equal(weight.sparse_linear(xt, c), weight.sparse_linear(xt.contiguous(), c))
    x3 = random_x(2 * 3 * 4, K, dtype).reshape(2, 3, 4, K)
    y3 = weight.sparse_linear(x3, c)
    assert y3.shape == (2, 3, 4, N)
    assert torch.equal(y3.reshape(-1, N), weight.sparse_linear(x3.reshape(-1, K), c))


def test_all_isas_agree_on_int8_and_on_bit_patterns():
    # Exact int8 results must be identical across paths; float paths differ only by summation order.
    K, N, M = 200, 21, 4
    w = random_pruned(N, K, torch.int8)
    x = random_x(M, K, torch.int8)
    c = weight.compress_24(w)
    outs = []
    for isa, layout in _PATHS:
        if _ISA_NEEDS[isa] <= _FLAGS:
            with envs.cpu_dispatch(isa=isa, layout=layout):
                outs.append(weight.sparse_linear(x, c))
    assert len(outs) >= 1 and all(torch.equal(o, outs[0]) for o in outs)


_AVX512_HERE = _ISA_NEEDS["avx512"] <= _FLAGS


def check_forced_path(isa_name, layout, dtype, *, N, K, M, activation):
    """One shape on a forced ISA + kernel family: int8 exact; floats within the policy, plain (float32 out) and with
    a bias and an activation (out in x's dtype)."""
    with envs.cpu_dispatch(isa=isa_name, layout=layout):
        _check_path(dtype, N=N, K=K, M=M, activation=activation)


def _check_path(dtype, *, N, K, M, activation):
    w = random_pruned(N, K, dtype)
    x = random_x(M, K, dtype)
    c = weight.compress_24(w)
    if dtype == torch.int8:
        assert torch.equal(weight.sparse_linear(x, c).long(), x.long() @ w.long().t())
        return
    y = weight.sparse_linear(x, c, out_dtype=torch.float32)
    assert_close_policy(y, x, w, out_dtype=torch.float32)
    bias = torch.randn(N)
    yb = weight.sparse_linear(x, c, bias=bias, activation=activation)
    assert_close_policy(yb, x, w, bias=bias, activation=activation)


@pytest.mark.skipif(not _AVX512_HERE, reason="token-lane kernels need AVX-512")
@pytest.mark.parametrize("isa_name", ["avx512", "avx512-base"])
@pytest.mark.parametrize("dtype", FLOAT_TYPES + [torch.int8])
@pytest.mark.parametrize("M", [17, 64, 130])
def test_token_lanes_multi_tile_and_chunk(isa_name, dtype, M):
    # Several token tiles (64 rows each; the last one partial, with fewer than 4 blocks of 16), a K that spans more
    # than one table chunk (256 groups) and has an odd group count (1028 / 4 = 257), rows not a multiple of 4.
    check_forced_path(isa_name, "tokens", dtype, N=37, K=1028, M=M, activation="relu")


@pytest.mark.skipif(not _AVX512_HERE, reason="row-pair kernels need AVX-512")
@pytest.mark.parametrize("isa_name", ["avx512", "avx512-base"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("K", [1028, 2052, 3000, 36])
@pytest.mark.parametrize("M", [17, 80, 130])
def test_row_pairs_k_blocks_and_tiles(isa_name, dtype, K, M):
    # The row-pair kernels walk K in blocks of 1024 columns with a partial last chunk riding in the last block:
    # K = 1028 (one block + the 4-column tail), 2052 (two blocks + tail), 3000 (three blocks, a 24-column tail), 36
    # (one whole chunk + tail); several 64-row activation tiles with partial 8-row blocks; N odd (a last pair with one
    # row) and not a multiple of the 32-row thread tile.
    if not has_kernel(f"{isa_name}+pairs", dtype):
        pytest.skip(f"{isa_name}: no row-pair kernel for {dtype}")
    check_forced_path(isa_name, "pairs", dtype, N=45, K=K, M=M, activation="gelu")


@pytest.mark.skipif(not _AVX512_HERE, reason="row-pair kernels need AVX-512")
@pytest.mark.parametrize("isa_name", ["avx512", "avx512-base"])
def test_int8_row_pairs_extremes_and_long_k(isa_name):
    # int8 row pairs: with VNNI + VBMI (the "avx512" name on this CPU) x is stored as x + 128 and multiplied by
    # vpdpbusd, the kernel subtracting 128 x the row's value sum; int8's extremes (-128, 127) on both sides must stay
    # exact. Beyond K = 65792 that kernel's int32 bound is not guaranteed, so the int16-pair kernel runs instead.
    with envs.cpu_dispatch(isa=isa_name, layout="pairs"):
        _check_int8_extremes()


def _check_int8_extremes():
    gen = torch.Generator().manual_seed(7)
    for K, N, M in [(4096 + 36, 9, 83), (65796, 3, 81)]:
        ext = torch.tensor([-128, 127], dtype=torch.int8)
        w = ext[torch.randint(0, 2, (N, K), generator=gen)]
        keep = core.prune_nm(torch.rand(N, K, generator=gen), 2, 4)[0] != 0  # a random 2:4 pattern
        w = torch.where(keep, w, torch.zeros_like(w))
        x = ext[torch.randint(0, 2, (M, K), generator=gen)]
        y = weight.sparse_linear(x, weight.compress_24(w))
        assert torch.equal(y.long(), x.long() @ w.long().t()), f"K = {K}"


@pytest.mark.skipif(not (_AVX512_HERE and "avx512_bf16" in _FLAGS), reason="bf16 row-pair kernels need AVX512_BF16")
def test_bf16_kernel_choice_by_m():
    # bf16 with AVX512_BF16: the rows family runs the one-row-per-vector kernels below M = 8 and the unblocked
    # row-pair kernels from M = 8; the pairs family the K-blocked row-pair kernels. Both row-pair kernels add each row's
    # products in the same order (parking a partial sum between K blocks does not round), so they agree bit for bit;
    # the one-row kernels add in another order, so for a long K their float32 sums differ in the last bits.
    K, N = 2048, 24
    w = random_pruned(N, K, torch.bfloat16)
    c = weight.compress_24(w)
    x = random_x(256, K, torch.bfloat16)

    def run(layout, m):
        with envs.cpu_dispatch(layout=layout):
            return weight.sparse_linear(x[:m], c, out_dtype=torch.float32)

    few, many, blocked = run("rows", 4), run("rows", 8), run("pairs", 8)
    assert torch.equal(many, blocked), "the unblocked and K-blocked row-pair kernels disagree"
    assert not torch.equal(few, many[:4]), "rows at M = 4 and M = 8 gave bit-identical sums: no kernel switch"
    assert_close_policy(few, x[:4], w, out_dtype=torch.float32)
    with envs.cpu_dispatch(amx_bf16_min_m=None):  # the AMX family (CPUs with AMX) has its own tests
        for m in (1, 4, 16, 80, 256):
            assert torch.equal(run("auto", m), run("rows" if m < 80 else "pairs", m)), f"auto at M = {m}"


@pytest.mark.skipif(not _AVX512_HERE, reason="token-lane kernels need AVX-512")
def test_auto_layout_switches_to_token_lanes_at_larger_m():
    # Row and token kernels sum the kept products in different orders, so for a long K their float32 results differ
    # in the last bits; auto must give exactly one of them: rows for a few rows, token lanes for many.
    K, N = 2048, 24
    w = random_pruned(N, K, torch.float32)
    c = weight.compress_24(w)
    for M, expect in [(1, "rows"), (4, "rows"), (256, "tokens")]:
        x = random_x(M, K, torch.float32)
        outs = {}
        for layout in ("rows", "tokens", "auto"):
            with envs.cpu_dispatch(layout=layout):
                outs[layout] = weight.sparse_linear(x, c)
        assert not torch.equal(outs["rows"], outs["tokens"]), "the two layouts gave bit-identical sums"
        assert torch.equal(outs["auto"], outs[expect]), f"M = {M}: auto did not run the {expect} kernels"


def test_forcing_an_isa_changes_the_code_that_runs():
    # Each path sums the kept products in its own order (scalar: sequential; avx2: 8 lanes; avx512-base: 16 fp32
    # lanes; avx512: bf16 pair dot products), so with a long K the float32 results differ in the last bits between
    # paths while each stays within the tolerance: proof that the variable really switches kernels.
    K, N, M = 1024, 16, 3
    w = random_pruned(N, K, torch.bfloat16)
    x = random_x(M, K, torch.bfloat16)
    c = weight.compress_24(w)
    outs = {}
    for isa, need in _ISA_NEEDS.items():
        if need <= _FLAGS:
            with envs.cpu_dispatch(isa=isa):
                outs[isa] = weight.sparse_linear(x, c, out_dtype=torch.float32)
            assert_close_policy(outs[isa], x, w, out_dtype=torch.float32)
    names = sorted(outs)
    for a in names:
        for b in names:
            if a < b:
                assert not torch.equal(outs[a], outs[b]), f"{a} and {b} gave bit-identical float32 sums"


@pytest.mark.parametrize("dtype", FLOAT_TYPES + [torch.int8])
@pytest.mark.parametrize("M", [257, 600])
def test_large_m_runs_in_row_slabs(dtype, M):
    # M > 256 runs as slabs of 256 activation rows (the last one partial); the per-row epilogue input (row_scale)
    # must follow its rows into each slab.
    K, N = 200, 37
    w = random_pruned(N, K, dtype)
    x = random_x(M, K, dtype)
    c = weight.compress_24(w)
    if dtype == torch.int8:
        assert torch.equal(weight.sparse_linear(x, c).long(), x.long() @ w.long().t())
    row_scale = torch.rand(M) + 0.5
    bias = torch.randn(N)
    alpha = (torch.rand(N) + 0.5) / (2000 if dtype == torch.int8 else 1)
    out_dtype = torch.float32 if dtype == torch.int8 else None
    y = weight.sparse_linear(x, c, bias=bias, alpha=alpha, row_scale=row_scale, activation="relu", out_dtype=out_dtype)
    assert y.shape == (M, N)
    assert_close_policy(y, x, w, out_dtype=out_dtype, bias=bias, alpha=alpha, row_scale=row_scale, activation="relu")


def test_empty_shapes():
    c = weight.compress_24(random_pruned(5, 8, torch.float32))
    assert weight.sparse_linear(torch.randn(0, 8), c).shape == (0, 5)
    c0 = weight.compress_24(torch.zeros(5, 0))
    y = weight.sparse_linear(torch.randn(3, 0), c0, bias=torch.arange(5.0))
    assert torch.equal(y, torch.arange(5.0).expand(3, 5))


def test_errors():
    ops = torch.ops.sparsekern
    w = random_pruned(6, 16, torch.float32)
    c = weight.compress_24(w)
    x = torch.randn(3, 16)
    with pytest.raises(RuntimeError, match=r"K = x.size\(1\) \(18\) must be a multiple of 4"):
        ops.spmm_24(torch.randn(3, 18), c.values, c.codes)
    with pytest.raises(RuntimeError, match=r"values must be \[N, K/2\] with K = x.size\(1\) = 20"):
        ops.spmm_24(torch.randn(3, 20), c.values, c.codes)
    with pytest.raises(RuntimeError, match=r"codes must be \[N, ceil\(K/8\)\] = \[6, 2\]"):
        ops.spmm_24(x, c.values, c.codes[:, :1])
    with pytest.raises(RuntimeError, match="values dtype BFloat16 must equal x dtype Float"):
        ops.spmm_24(x, c.values.bfloat16(), c.codes)
    with pytest.raises(RuntimeError, match="x has unsupported dtype Double"):
        ops.spmm_24(x.double(), c.values.double(), c.codes)
    with pytest.raises(RuntimeError, match=r"bias must be 1-D \[N\] = \[6\]"):
        ops.spmm_24(x, c.values, c.codes, torch.randn(5))
    with pytest.raises(RuntimeError, match=r"row_scale must be 1-D \[M\] = \[3\]"):
        ops.spmm_24(x, c.values, c.codes, None, None, torch.randn(4))
    with pytest.raises(RuntimeError, match="out_dtype Int is not supported for Float inputs"):
        ops.spmm_24(x, c.values, c.codes, out_dtype=torch.int32)
    with pytest.raises(RuntimeError, match='activation must be "none", "relu" or "gelu"'):
        ops.spmm_24(x, c.values, c.codes, activation="tanh")
    with pytest.raises(ValueError, match="activation must be one of None, 'relu', 'gelu'"):
        weight.sparse_linear(x, c, activation="silu")
    with pytest.raises(ValueError, match=r"x's last dim \(12\) must equal the weight's in_features \(16\)"):
        weight.sparse_linear(torch.randn(2, 12), c)
    with pytest.raises(ValueError, match="the weight is on cpu but x is on meta"):
        weight.sparse_linear(torch.randn(2, 16, device="meta"), c)
    # A forced setting that is not understood (or that this CPU cannot run) is refused where it is set; at load (the
    # environment variables) it is kept and refused by the first call with the same message (tests/test_envs.py).
    with pytest.raises(RuntimeError, match="SPARSEKERN_CPU_SPMM_LAYOUT=columns is not understood; use auto \\(default\\), "
                       "rows, pairs or tokens"):
        with envs.cpu_dispatch(layout="columns"):
            ops.spmm_24(x, c.values, c.codes)
    if _ISA_NEEDS["avx2"] <= _FLAGS:
        with envs.cpu_dispatch(layout="tokens", isa="avx2"):
            with pytest.raises(RuntimeError, match="LAYOUT=tokens needs the AVX-512 kernels"):
                ops.spmm_24(x, c.values, c.codes)
    if _AVX512_HERE:
        with envs.cpu_dispatch(layout="pairs", isa="avx512"):
            with pytest.raises(RuntimeError, match=r"LAYOUT=pairs needs the AVX-512 kernels and bfloat16 \(with "
                               r"AVX512_BF16\) or int8 weights"):
                ops.spmm_24(x, c.values, c.codes)  # float32 weights: no row-pair kernel
    with pytest.raises(RuntimeError, match="SPARSEKERN_CPU_ISA=sse9 is not understood; use avx512, avx512-base"):
        with envs.cpu_dispatch(isa="sse9"):
            ops.spmm_24(x, c.values, c.codes)
    if not _ISA_NEEDS["avx512"] <= _FLAGS:
        with pytest.raises(RuntimeError, match="this CPU does not support it"):
            with envs.cpu_dispatch(isa="avx512"):
                ops.spmm_24(x, c.values, c.codes)


@pytest.mark.cuda
def test_device_mismatch_error():
    c = weight.compress_24(random_pruned(6, 16, torch.float16))
    with pytest.raises(RuntimeError, match="values is on cuda:0 but x is on cpu"):
        torch.ops.sparsekern.spmm_24(torch.randn(3, 16).half(), c.values.cuda(), c.codes)


OPCHECK_CASES = [
    lambda: (torch.randn(3, 32), *torch.ops.sparsekern.compress_24(random_pruned(9, 32, torch.float32))),
    lambda: (torch.randn(5, 40, dtype=torch.bfloat16),
             *torch.ops.sparsekern.compress_24(random_pruned(7, 40, torch.bfloat16)), torch.randn(7), torch.rand(7),
             torch.rand(5), "gelu", torch.float32),
    lambda: (random_x(4, 64, torch.int8), *torch.ops.sparsekern.compress_24(random_pruned(11, 64, torch.int8)), None,
             torch.rand(11), torch.rand(4), "relu", torch.bfloat16),
    lambda: (random_x(4, 64, torch.int8), *torch.ops.sparsekern.compress_24(random_pruned(11, 64, torch.int8))),
]


@pytest.mark.parametrize("make", OPCHECK_CASES)
def test_opcheck(make):
    torch.library.opcheck(torch.ops.sparsekern.spmm_24.default, make())
