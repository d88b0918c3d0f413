"""CUDA side of the core ops and the cuSPARSELt wrapper (sparsekern.ops.cslt).

Every kernel is checked against an independent plain-PyTorch reference written below (float64 where useful):
exact equality where exactness is defined (masks, codes, round trips, quantisation codes, a GEMM against an identity
matrix, integer-valued products), otherwise the written tolerance `assert_matches_reference` (no worse than twice
PyTorch's own dense error in the same precision against the float64 reference, plus one unit in the last place of the
output dtype, plus GELU's approximation allowance when cuSPARSELt fuses it).

Tests marked `cuda` need a GPU (sm80+) and the CUDA build; they skip cleanly elsewhere (tests/conftest.py). The
unmarked tests exercise the host-side parts (argument rules, fake kernels, search-file persistence) on any machine.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch
import torch.nn.functional as F

from sparsekern import _ext
from sparsekern.ops import cslt

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"extension not loaded: {_ext.load_error()}")
needs_cuda_build = pytest.mark.skipif(
    not _ext.build_info().get("with_cuda", False), reason="extension built CPU-only (no cuSPARSELt part)"
)

M_SIZES = [1, 3, 16, 33, 100, 512]
GELU_ALLOWANCE = 6e-4  # |F.gelu(erf) - F.gelu(tanh)| <= 4.8e-4 over the reals; cuSPARSELt's fused GELU may be either
ops = torch.ops.sparsekern


# ------------------------------------------------------------------------------------------------ references
def ref_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the m - n largest of every aligned group of m along the last dim; ties keep the lower index."""
    s = scores.double().reshape(-1, m)
    order = torch.sort(-s, dim=-1, stable=True).indices  # stable: equal scores stay in index order
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep.scatter_(1, order[:, : m - n], True)
    return keep.reshape(scores.shape)


def ref_first_violation(w: torch.Tensor, n: int, m: int) -> tuple[int, int]:
    k = w.shape[-1]
    counts = (w.reshape(-1, k).float() != 0).reshape(-1, k // m, m).sum(-1)
    bad = (counts > m - n).nonzero()
    return (-1, -1) if bad.numel() == 0 else (int(bad[0, 0]), int(bad[0, 1]))


def ref_compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable format v1: values [rows, cols/2], codes uint8 [rows, ceil(cols/8)] (group 2b low nibble, 2b+1 high;
    a group with < 2 non-zeros fills its slots with the lowest zero positions; an odd last high nibble is 0)."""
    rows, cols = w.shape
    nz = (w.float() != 0).reshape(rows, cols // 4, 4)
    # Rank positions: non-zeros first, then zeros, each in index order; the first two are the kept slots.
    key = (~nz).to(torch.int64) * 4 + torch.arange(4)
    idx = torch.sort(key, dim=-1).indices[..., :2].sort(dim=-1).values  # i0 < i1
    raw = w.view(torch.uint8) if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else w  # gather lacks fp8
    values = torch.gather(raw.reshape(rows, cols // 4, 4), 2, idx).reshape(rows, cols // 2).view(w.dtype)
    code = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)
    if code.shape[1] % 2:
        code = torch.cat([code, torch.zeros(rows, 1, dtype=torch.uint8)], dim=1)
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    return values, packed


def ref_quantize(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantisation with IEEE float32 division, emulated exactly through float64 (a float32
    quotient rounded from the float64 one is the correctly rounded float32 quotient)."""
    qmax = 127.0 if dtype == torch.int8 else 448.0
    xf = x.float().cpu()
    amax = xf.abs().amax(dim=1)
    scale = torch.where(amax > 0, (amax.double() / qmax).float(), torch.ones_like(amax))
    v = (xf.double() / scale.double()[:, None]).float()
    if dtype == torch.int8:
        q = v.round().clamp(-127, 127).to(torch.int8)
    else:
        q = v.clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale


def ref_linear(x, w, bias=None, alpha=None, row_scale=None, activation="none"):
    """float64 y = act(row_scale[:, None] * alpha[None, :] * (x @ w^T) + bias) on the CPU."""
    y = x.double().cpu() @ w.double().cpu().t()
    if alpha is not None:
        y = y * alpha.double().cpu()[None, :]
    if row_scale is not None:
        y = y * row_scale.double().cpu()[:, None]
    if bias is not None:
        y = y + bias.double().cpu()[None, :]
    if activation == "relu":
        y = F.relu(y)
    elif activation == "gelu":
        y = F.gelu(y)
    return y


def rand_24(n: int, k: int, dtype: torch.dtype, device: str, gen: torch.Generator) -> torch.Tensor:
    """A 2:4 weight [n, k] with no zero among its kept values (magnitude pruning by the reference)."""
    if dtype in (torch.int8, torch.float8_e4m3fn):
        vals = torch.randint(1, 5, (n, k), generator=gen) * (torch.randint(0, 2, (n, k), generator=gen) * 2 - 1)
        w = vals.float() + torch.rand(n, k, generator=gen) * 0.1  # break ties for the reference selection
        keep = ref_keep_mask(w.abs(), 2, 4)
        return (vals * keep).to(dtype).to(device)
    w = torch.randn(n, k, generator=gen)
    w = torch.where(w.abs() < 1e-3, torch.full_like(w, 0.5), w)
    return (w * ref_keep_mask(w.abs(), 2, 4)).to(dtype).to(device)


def ulp(dtype: torch.dtype, magnitude: float) -> float:
    return torch.finfo(dtype).eps * max(magnitude, 1.0)


def assert_matches_reference(y, ref, torch_y=None, activation="none", ulps=1.0, extra=0.0):
    """The tolerance policy: y within 2x PyTorch's own error (torch_y: the dense layer in the same precision) of the
    float64 reference, plus `ulps` units in the last place of y's dtype at the reference's magnitude (4 where the
    result went through several float32 roundings and no PyTorch twin exists), plus GELU's allowance (cuSPARSELt's
    fused GELU may be the tanh form), plus `extra` for a documented additional rounding."""
    ref = ref.double()
    err = (y.double().cpu() - ref).abs().max().item() if y.numel() else 0.0
    tol = ulps * ulp(y.dtype, ref.abs().max().item() if ref.numel() else 1.0) + extra
    if torch_y is not None and torch_y.numel():
        tol += 2 * (torch_y.double().cpu() - ref).abs().max().item()
    if activation == "gelu":
        tol += GELU_ALLOWANCE
    assert err <= tol, f"max error {err:.3g} > tolerance {tol:.3g}"


def cuda_capability() -> tuple[int, int]:
    return torch.cuda.get_device_capability()


# ================================================================================================ host-side (no GPU)
def test_compressed_nbytes_without_a_gpu_is_the_formula_lower_bound():
    # with a GPU it is cuSPARSELt's own size query (test_compress_size_is_cuslt_query below)
    if torch.cuda.is_available() and _ext.available() and _ext.build_info().get("with_cuda"):
        pytest.skip("a GPU answers the size query here")
    assert cslt.formula_nbytes(32, 64, torch.float16) == 32 * 64 * 2 * 9 // 16
    assert cslt.compressed_nbytes(32, 64, torch.float16) == 32 * 64 * 2 * 9 // 16
    assert cslt.compressed_nbytes(32, 64, torch.bfloat16) == 2304
    assert cslt.compressed_nbytes(64, 96, torch.int8) == 64 * 96 * 10 // 16
    assert cslt.compressed_nbytes(64, 96, torch.float8_e4m3fn) == 3840


@pytest.mark.parametrize(
    "shape,dtype,match",
    [
        ((64,), torch.float16, "w must be 2-D"),
        ((32, 64), torch.float32, "must be float16, bfloat16, int8 or float8_e4m3fn"),
        ((32, 24), torch.float16, r"k \(in_features\) = 24 must be a positive multiple of 16"),
        ((40, 64), torch.bfloat16, r"n \(out_features\) = 40 must be a positive multiple of 16"),
        ((64, 48), torch.int8, r"k \(in_features\) = 48 must be a positive multiple of 32"),
    ],
)
def test_compress_rejects_bad_shapes_and_dtypes(shape, dtype, match):
    w = torch.zeros(shape, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        cslt.cslt_compress(w)


def _meta_args(dtype=torch.float16, M=5, n=32, k=64):
    x = torch.empty(M, k, dtype=dtype, device="meta")
    c = torch.empty(cslt.compressed_nbytes(n, k, dtype), dtype=torch.uint8, device="meta")
    return x, c, n, k


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(activation="tanh"), 'activation must be "none", "relu" or "gelu"'),
        (dict(out_dtype=torch.int8), "out_dtype for torch.float16 inputs must be float16, bfloat16 or float32"),
        (dict(bias=torch.zeros(31)), r"bias must be 1-D \[n = 32\]"),
        (dict(alpha=torch.zeros(32, dtype=torch.int32)), "alpha must be floating point"),
        (dict(row_scale=torch.zeros(4)), r"row_scale must have x's leading shape \(5,\)"),
    ],
)
def test_linear_rejects_bad_arguments(kwargs, match):
    x, c, n, k = _meta_args()
    with pytest.raises(ValueError, match=match):
        cslt.cslt_linear(x, c, n, k, **kwargs)


def test_linear_rejects_a_buffer_of_another_shape_or_dtype():
    x, _, n, k = _meta_args()
    wrong = torch.empty(cslt.compressed_nbytes(n, k // 2, torch.float16), dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match=r"compressed must be the uint8 buffer .* \[32, 64\] torch.float16 weight "
                                         r"\(at least"):
        cslt.cslt_linear(x, wrong, n, k)  # a buffer too small for the weight
    with pytest.raises(ValueError, match=r"x's last dim \(64\) must equal k = 128"):
        cslt.cslt_linear(x, wrong, n, 2 * k)
    with pytest.raises(ValueError, match="x must be float16, bfloat16, int8 or float8_e4m3fn"):
        cslt.cslt_linear(x.float(), wrong, n, k)


def test_float8_output_needs_a_fully_fused_epilogue():
    x, c, n, k = _meta_args(torch.float8_e4m3fn, n=64, k=64)
    with pytest.raises(ValueError, match="float8_e4m3fn output needs everything in cuSPARSELt's epilogue"):
        cslt.cslt_linear(x, c, n, k, row_scale=torch.ones(5), out_dtype=torch.float8_e4m3fn)


def test_cpu_tensors_are_refused_with_the_reason():
    w = torch.zeros(32, 64, dtype=torch.float16)
    if _ext.build_info().get("with_cuda", False):
        with pytest.raises(ValueError, match="w must be a CUDA tensor"):
            cslt.cslt_compress(w)
    else:
        with pytest.raises(_ext.ExtensionMissingError, match="needs the CUDA build of sparsekern"):
            cslt.cslt_compress(w)


@needs_ext
@pytest.mark.parametrize(
    "dtype,out_dtype,expected",
    [
        (torch.float16, None, torch.float16),
        (torch.bfloat16, torch.float32, torch.float32),
        (torch.int8, None, torch.int32),
        (torch.int8, torch.bfloat16, torch.bfloat16),
        (torch.float8_e4m3fn, None, torch.float32),
        (torch.float8_e4m3fn, torch.float8_e4m3fn, torch.float8_e4m3fn),
    ],
)
def test_fake_kernels_give_shape_and_dtype(dtype, out_dtype, expected):
    x, c, n, k = _meta_args(dtype, M=7, n=64, k=96 if dtype in (torch.int8, torch.float8_e4m3fn) else 80)
    c = torch.empty(cslt.compressed_nbytes(n, k, dtype), dtype=torch.uint8, device="meta")
    x = torch.empty(7, k, dtype=dtype, device="meta")
    y = ops.cslt_linear(x, c, n, k, None, None, None, "none", out_dtype)
    assert y.shape == (7, n) and y.dtype == expected and y.device.type == "meta"
    packed = ops.cslt_compress(torch.empty(n, k, dtype=dtype, device="meta"))
    assert packed.shape == (cslt.compressed_nbytes(n, k, dtype),) and packed.dtype == torch.uint8


def test_search_file_must_be_a_sparsekern_search_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"format": "something-else", "version": 1, "records": []}))
    with pytest.raises(ValueError, match="not a sparsekern cuSPARSELt search file"):
        cslt.load_search_results(p)
    p.write_text(json.dumps({"format": "sparsekern-cslt-search", "version": 99, "records": []}))
    with pytest.raises(ValueError, match="search file version 99; this sparsekern reads version 1"):
        cslt.load_search_results(p)
    p.write_text(json.dumps({"format": "sparsekern-cslt-search", "version": 1, "records": {"a": 1}}))
    with pytest.raises(ValueError, match="'records' must be a list of objects"):
        cslt.load_search_results(p)


def _record(gpu="Some GPU", m=16, alg_id=3):
    return {
        "gpu": gpu, "cusparselt": "0.8.1", "m": m, "n": 64, "k": 128, "in_dtype": "Half", "d_dtype": "Half",
        "c_dtype": "Half", "bias": "none", "activation": "none", "alpha_vector": False, "alg_id": alg_id,
        "max_alg_id": 7, "split_k": 1, "split_k_mode": 1, "split_k_buffers": 1,
    }


@needs_cuda_build
def test_search_results_round_trip_through_json(tmp_path):
    cslt.clear_search_results()
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"format": "sparsekern-cslt-search", "version": 1,
                               "records": [_record(m=16), _record(gpu="Other GPU", m=32, alg_id=5)]}))
    assert cslt.load_search_results(src) == 2
    got = sorted(cslt.search_results(), key=lambda r: r["m"])
    assert [r["alg_id"] for r in got] == [3, 5] and got[1]["gpu"] == "Other GPU"
    out = tmp_path / "out.json"
    out.write_text(json.dumps({"format": "sparsekern-cslt-search", "version": 1, "records": [_record(m=64, alg_id=1)]}))
    assert cslt.save_search_results(out) == 3  # merged with what the file held
    doc = json.loads(out.read_text())
    assert sorted(r["m"] for r in doc["records"]) == [16, 32, 64]
    cslt.clear_search_results()
    assert cslt.search_results() == []


@needs_cuda_build
def test_runtime_version_names_the_loaded_library():
    v = cslt.runtime_version()
    assert v.count(".") == 2 and all(p.isdigit() for p in v.split(".")), v
    assert tuple(int(p) for p in v.split(".")) >= (0, 8, 0)


# ================================================================================================ core ops on CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("with_scores", [False, True])
def test_prune_nm_cuda_matches_reference_and_cpu(n, m, dtype, with_scores):
    gen = torch.Generator().manual_seed(1)
    for shape in [(37, 64), (3, 5, 8 * m)]:
        w = torch.randn(shape, generator=gen).to(dtype)
        scores = torch.rand(shape, generator=gen) if with_scores else None
        pruned, mask = ops.prune_nm(w.cuda(), n, m, None if scores is None else scores.cuda())
        want = ref_keep_mask(w.abs() if scores is None else scores, n, m)
        assert torch.equal(mask.cpu(), want)
        assert torch.equal(pruned.cpu(), torch.where(want, w, torch.zeros_like(w)))
        cpu_pruned, cpu_mask = ops.prune_nm(w, n, m, scores)
        assert torch.equal(mask.cpu(), cpu_mask) and torch.equal(pruned.cpu(), cpu_pruned)


@pytest.mark.cuda
def test_prune_nm_cuda_ties_keep_the_lower_index_and_inf_is_largest():
    w = torch.tensor([[1.0, -1.0, 1.0, 1.0, 0.5, float("inf"), -2.0, 0.25]], device="cuda")
    _, mask = ops.prune_nm(w, 2, 4)
    assert mask.cpu().tolist() == [[True, True, False, False, False, True, True, False]]


@pytest.mark.cuda
def test_prune_nm_cuda_rejects_nan_naming_its_index():
    w = torch.randn(3, 8, device="cuda")
    w[1, 6] = float("nan")
    with pytest.raises(RuntimeError, match=r"w holds NaN at index \(1, 6\)"):
        ops.prune_nm(w, 2, 4)
    with pytest.raises(RuntimeError, match=r"the last dim of w \(8\) must be a multiple of m = 3"):
        ops.prune_nm(torch.randn(3, 8, device="cuda"), 1, 3)


@pytest.mark.cuda
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_nm_violation_cuda_finds_the_first_bad_group(n, m):
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(41, 16 * m, generator=gen).half()
    w = w * ref_keep_mask(w.abs(), n, m)
    assert ops.nm_violation(w.cuda(), n, m).cpu().tolist() == [-1, -1]
    bad = w.clone()
    bad[30, 5 * m: 6 * m] = 1.0  # group 5 of row 30
    bad[7, 9 * m: 10 * m] = -1.0  # group 9 of row 7: the first in row-major order
    got = ops.nm_violation(bad.cuda(), n, m).cpu().tolist()
    assert got == [7, 9] == list(ref_first_violation(bad, n, m))
    assert got == ops.nm_violation(bad, n, m).tolist()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("cols", [12, 64, 100])
def test_compress_24_cuda_round_trip_and_codes(dtype, cols):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(9, cols, generator=gen) * 4
    w = w * ref_keep_mask(w.abs(), 2, 4)
    w[2, :4] = 0  # a group with no non-zero
    w[3, 4:8] = torch.tensor([0.0, 0.0, 0.0, 3.0])  # a group with one
    w = w.to(dtype)
    values, codes = ops.compress_24(w.cuda())
    ref_values, ref_codes = ref_compress_24(w)
    assert torch.equal(codes.cpu(), ref_codes)
    assert torch.equal(values.cpu().float(), ref_values.float())
    back = ops.decompress_24(values, codes, cols)
    assert back.dtype == dtype and torch.equal(back.cpu().float(), w.float())
    cpu_values, cpu_codes = ops.compress_24(w)
    assert torch.equal(codes.cpu(), cpu_codes) and torch.equal(values.cpu().float(), cpu_values.float())


@pytest.mark.cuda
def test_compress_24_cuda_names_the_first_bad_row_and_group():
    w = torch.zeros(8, 32, device="cuda", dtype=torch.float16)
    w[5, 8:11] = 1.0
    w[6, 0:4] = 1.0
    with pytest.raises(RuntimeError, match=r"w is not 2:4 sparse: row 5, group 2 \(columns 8..11\)"):
        ops.compress_24(w)


@pytest.mark.cuda
def test_decompress_24_cuda_rejects_an_invalid_code():
    values = torch.ones(2, 8, device="cuda")
    codes = torch.full((2, 2), 0x44, dtype=torch.uint8, device="cuda")  # code 4 = positions (0, 1): valid
    codes[1, 0] = 0x04 | (0x5 << 4)  # row 1, group 1: code 5 = (1, 1), invalid
    with pytest.raises(RuntimeError, match=r"codes row 1, group 1 holds an invalid pattern code"):
        ops.decompress_24(values, codes, 16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_per_token_cuda_is_exact(dtype, xdtype):
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(37, 1000, generator=gen) * torch.rand(37, 1, generator=gen) * 10).to(xdtype)
    x[5] = 0  # an all-zero row: scale 1, q 0
    q, scale = ops.quantize_per_token(x.cuda(), dtype)
    ref_q, ref_scale = ref_quantize(x, dtype)
    assert torch.equal(scale.cpu(), ref_scale)
    assert torch.equal(q.cpu().view(torch.uint8), ref_q.view(torch.uint8))
    cpu_q, cpu_scale = ops.quantize_per_token(x, dtype)
    assert torch.equal(q.cpu().view(torch.uint8), cpu_q.view(torch.uint8)) and torch.equal(scale.cpu(), cpu_scale)


@pytest.mark.cuda
def test_quantize_per_token_cuda_marks_non_finite_rows_with_nan_scale():
    x = torch.randn(3, 64, device="cuda")
    x[1, 7] = float("inf")
    q, scale = ops.quantize_per_token(x, torch.int8)
    assert torch.isnan(scale[1]) and torch.isfinite(scale[[0, 2]]).all()
    assert (q[1] == 0).all()


# ================================================================================================ cuSPARSELt
DTYPES = [torch.float16, torch.bfloat16, torch.int8, torch.float8_e4m3fn]


def _skip_unsupported(dtype):
    if dtype == torch.float8_e4m3fn and cuda_capability() < (8, 9):
        pytest.skip("float8_e4m3fn needs sm89+")


def _nk(dtype):
    return (64, 96) if dtype in (torch.int8, torch.float8_e4m3fn) else (48, 80)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cslt_identity_reproduces_the_pruned_weight_exactly(dtype):
    _skip_unsupported(dtype)
    n, k = _nk(dtype)
    gen = torch.Generator().manual_seed(5)
    w = rand_24(n, k, dtype, "cuda", gen)
    c = cslt.cslt_compress(w)
    eye = torch.eye(k).to(dtype).cuda()
    out = {torch.int8: torch.int32, torch.float8_e4m3fn: torch.float32}.get(dtype, dtype)
    y = cslt.cslt_linear(eye, c, n, k, out_dtype=out)
    assert y.shape == (k, n) and y.dtype == out
    assert torch.equal(y.cpu(), w.t().cpu().to(out))


@pytest.mark.cuda
@pytest.mark.parametrize("M", M_SIZES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_cslt_linear_16bit_matches_fp64_reference(M, dtype, with_bias, activation):
    n, k = 64, 128
    gen = torch.Generator().manual_seed(6)
    w = rand_24(n, k, dtype, "cuda", gen)
    x = torch.randn(M, k, generator=gen).to(dtype).cuda()
    bias = (torch.randn(n, generator=gen)).to(dtype).cuda() if with_bias else None
    y = cslt.cslt_linear(x, cslt.cslt_compress(w), n, k, bias=bias, activation=activation)
    assert y.shape == (M, n) and y.dtype == dtype
    torch_y = F.linear(x, w, bias)
    torch_y = {"relu": F.relu, "gelu": F.gelu}.get(activation, lambda t: t)(torch_y)
    assert_matches_reference(y, ref_linear(x, w, bias, activation=activation), torch_y, activation)


@pytest.mark.cuda
@pytest.mark.parametrize("M", M_SIZES)
@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("epilogue", ["plain", "alpha_bias_relu", "alpha_bias16_gelu"])
def test_cslt_linear_int8_matches_reference(M, out_dtype, epilogue):
    n, k = 64, 96
    gen = torch.Generator().manual_seed(7)
    w = rand_24(n, k, torch.int8, "cuda", gen)
    x = torch.randint(-8, 9, (M, k), generator=gen).to(torch.int8).cuda()
    kwargs, alpha, bias, act = {}, None, None, "none"
    if epilogue != "plain":
        alpha = (torch.rand(n, generator=gen) * 0.05).cuda()
        bias_dtype = torch.float32 if epilogue == "alpha_bias_relu" else torch.float16  # fused / post-op bias
        bias = torch.randn(n, generator=gen).to(bias_dtype).cuda()
        act = "relu" if epilogue == "alpha_bias_relu" else "gelu"
        kwargs = dict(alpha=alpha, bias=bias, activation=act)
    y = cslt.cslt_linear(x, cslt.cslt_compress(w), n, k, out_dtype=out_dtype, **kwargs)
    assert y.shape == (M, n) and y.dtype == out_dtype
    ref = ref_linear(x, w, bias, alpha, activation=act)
    if epilogue == "plain" and out_dtype == torch.int32:
        assert torch.equal(y.cpu().long(), ref.round().long())  # exact int32 accumulation
    elif out_dtype in (torch.int8, torch.int32):
        want = ref.round() if out_dtype == torch.int32 else ref.round().clamp(-128, 127)
        # one unit for a float32 rounding of alpha * acc at a .5 boundary, plus GELU's allowance
        assert (y.cpu().double() - want).abs().max().item() <= 1.0 + (GELU_ALLOWANCE if act == "gelu" else 0)
    else:
        assert_matches_reference(y, ref, activation=act, ulps=4)


@pytest.mark.cuda
@pytest.mark.parametrize("M", M_SIZES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_cslt_linear_fp8_integer_valued_products_are_exact(M, out_dtype):
    _skip_unsupported(torch.float8_e4m3fn)
    n, k = 64, 96
    gen = torch.Generator().manual_seed(8)
    w = rand_24(n, k, torch.float8_e4m3fn, "cuda", gen)
    x = torch.randint(-2, 3, (M, k), generator=gen).float().to(torch.float8_e4m3fn).cuda()
    y = cslt.cslt_linear(x, cslt.cslt_compress(w), n, k, out_dtype=out_dtype)
    ref = ref_linear(x.float(), w.float())  # integers, exact in fp32 accumulation
    # The one rounding left is the output conversion (round to nearest even), the same as PyTorch's cast.
    assert torch.equal(y.cpu().float(), ref.float().to(out_dtype).float())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,out_dtype", [(torch.int8, torch.float16), (torch.int8, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("M", [1, 33, 100])
def test_cslt_linear_row_scale_is_applied_per_token(dtype, out_dtype, M):
    n, k = 64, 96 if dtype == torch.int8 else 80
    gen = torch.Generator().manual_seed(9)
    xf = torch.randn(M, k, generator=gen).cuda()
    if dtype == torch.int8:
        x, row_scale = ops.quantize_per_token(xf, torch.int8)
    else:
        x, row_scale = xf.to(dtype), (torch.rand(M, generator=gen) + 0.5).cuda()
    w = rand_24(n, k, dtype, "cuda", gen)
    alpha = (torch.rand(n, generator=gen) * 0.1 + 0.01).cuda()
    bias = torch.randn(n, generator=gen).to(out_dtype).cuda()
    y = cslt.cslt_linear(x, cslt.cslt_compress(w), n, k, bias=bias, alpha=alpha, row_scale=row_scale, activation="relu",
                    out_dtype=out_dtype)
    ref = ref_linear(x, w, bias, alpha, row_scale, "relu")
    assert y.dtype == out_dtype and y.shape == (M, n)
    # 16-bit inputs: cuSPARSELt writes alpha * (x @ W^T) in x's dtype before the post-op scales it per token: one
    # more rounding of that product (scaled by row_scale <= 1.5).
    extra = 0.0
    if dtype != torch.int8:
        extra = 1.5 * ulp(dtype, ref_linear(x, w, None, alpha).abs().max().item())
    assert_matches_reference(y, ref, ulps=4, extra=extra)


@pytest.mark.cuda
def test_cslt_linear_3d_and_non_contiguous_inputs():
    n, k = 64, 128
    gen = torch.Generator().manual_seed(10)
    w = rand_24(n, k, torch.float16, "cuda", gen)
    c = cslt.cslt_compress(w)
    x3 = torch.randn(2, 7, k, generator=gen).half().cuda()
    y3 = cslt.cslt_linear(x3, c, n, k)
    assert y3.shape == (2, 7, n)
    assert torch.equal(y3, cslt.cslt_linear(x3.reshape(14, k).contiguous(), c, n, k).reshape(2, 7, n))
    wide = torch.randn(33, 2 * k, generator=gen).half().cuda()
    x_nc = wide[:, ::2]
    assert not x_nc.is_contiguous()
    assert torch.equal(cslt.cslt_linear(x_nc, c, n, k), cslt.cslt_linear(x_nc.contiguous(), c, n, k))
    x_t = torch.randn(k, 5, generator=gen).half().cuda().t()  # transposed view
    assert torch.equal(cslt.cslt_linear(x_t, c, n, k), cslt.cslt_linear(x_t.contiguous(), c, n, k))


@pytest.mark.cuda
def test_cslt_second_call_of_a_cached_shape_builds_nothing():
    n, k = 64, 128
    gen = torch.Generator().manual_seed(11)
    w = rand_24(n, k, torch.float16, "cuda", gen)
    c, bias = cslt.cslt_compress(w), torch.randn(n, generator=gen).half().cuda()
    x = torch.randn(37, k, generator=gen).half().cuda()
    cslt.cslt_linear(x, c, n, k, bias=bias, activation="relu")
    before = cslt.cache_stats()
    y = cslt.cslt_linear(x, c, n, k, bias=bias, activation="relu")
    after = cslt.cache_stats()
    assert after["descriptors_created"] == before["descriptors_created"]
    assert after["plans_created"] == before["plans_created"]
    assert after["hits"] == before["hits"] + 1 and after["misses"] == before["misses"]
    cslt.cslt_linear(torch.randn(300, k, generator=gen).half().cuda(), c, n, k, bias=bias, activation="relu")
    assert cslt.cache_stats()["misses"] == after["misses"] + 1  # another M is another plan
    assert_matches_reference(y, ref_linear(x, w, bias, activation="relu"), F.relu(F.linear(x, w, bias)))


@pytest.mark.cuda
def test_cslt_linear_is_cuda_graph_capturable():
    n, k = 64, 128
    gen = torch.Generator().manual_seed(12)
    w = rand_24(n, k, torch.float16, "cuda", gen)
    c, bias = cslt.cslt_compress(w), torch.randn(n, generator=gen).half().cuda()
    x = torch.randn(5, k, generator=gen).half().cuda()
    # Warm up on the default stream: plans are not keyed by stream, so the capture (on torch.cuda.graph's own side
    # stream) must find them and create nothing.
    eager = cslt.cslt_linear(cslt.cslt_linear(x, c, n, k, bias=bias)[:, :k // 2].repeat(1, 2), c, n, k, bias=bias)
    torch.cuda.synchronize()
    plans = cslt.cache_stats()["plans_created"]
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y1 = cslt.cslt_linear(x, c, n, k, bias=bias)
        out = cslt.cslt_linear(y1[:, :k // 2].repeat(1, 2), c, n, k, bias=bias)
    assert cslt.cache_stats()["plans_created"] == plans  # nothing was built inside the capture
    # Dropping every cached plan (host objects) must not free memory the graph replays into: workspaces are per call,
    # from the caching allocator, and the graph's private pool keeps them (issue 17, finding 2).
    cslt.clear_cache()
    x.copy_(torch.randn(5, k, generator=gen).half().cuda())
    g.replay()
    torch.cuda.synchronize()
    y_ref = cslt.cslt_linear(cslt.cslt_linear(x, c, n, k, bias=bias)[:, :k // 2].repeat(1, 2), c, n, k, bias=bias)
    assert torch.equal(out, y_ref)
    assert not torch.equal(out, eager)  # the replay really used the new input


@pytest.mark.cuda
def test_cslt_search_is_remembered_and_used():
    n, k, M = 64, 128, 48
    gen = torch.Generator().manual_seed(13)
    w = rand_24(n, k, torch.float16, "cuda", gen)
    c = cslt.cslt_compress(w)
    x = torch.randn(M, k, generator=gen).half().cuda()
    before = cslt.cache_stats()["searches"]
    rec = cslt.search(x, c, n, k)
    assert cslt.cache_stats()["searches"] == before + 1
    assert rec["m"] == M and rec["n"] == n and rec["k"] == k and 0 <= rec["alg_id"] <= rec["max_alg_id"]
    assert rec["gpu"] == torch.cuda.get_device_name() and rec["cusparselt"] == cslt.runtime_version()
    assert any(r == rec for r in cslt.search_results())
    y = cslt.cslt_linear(x, c, n, k)  # alg_id = -1: the searched algorithm
    assert_matches_reference(y, ref_linear(x, w), F.linear(x, w))
    # The record is really applied (this part fails if records were ignored): replace it by one naming an algorithm
    # id cuSPARSELt does not have; the alg_id = -1 plan is re-resolved against it and cuSPARSELt refuses it.
    bogus = dict(rec, alg_id=rec["max_alg_id"] + 1000)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/s.json"
        with open(path, "w") as f:
            json.dump({"format": "sparsekern-cslt-search", "version": 1, "records": [bogus]}, f)
        cslt.clear_search_results()
        cslt.load_search_results(path)
    try:
        with pytest.raises(RuntimeError, match="cuSPARSELt"):
            cslt.cslt_linear(x, c, n, k)
        assert_matches_reference(cslt.cslt_linear(x, c, n, k, alg_id=0), ref_linear(x, w), F.linear(x, w))
    finally:
        cslt.clear_search_results()
    y = cslt.cslt_linear(x, c, n, k)  # records gone: the default algorithm again
    assert_matches_reference(y, ref_linear(x, w), F.linear(x, w))


@pytest.mark.cuda
def test_cslt_explicit_algorithm_and_split_k_and_empty_input():
    n, k, M = 64, 256, 24
    gen = torch.Generator().manual_seed(16)
    w = rand_24(n, k, torch.float16, "cuda", gen)
    c = cslt.cslt_compress(w)
    x = torch.randn(M, k, generator=gen).half().cuda()
    # CONFIG_MAX_ID may be an exclusive bound: max - 1 is a valid id under either reading.
    max_alg = max(0, cslt.search(x, c, n, k)["max_alg_id"] - 1)
    ref, torch_y = ref_linear(x, w), F.linear(x, w)
    for alg_id, split_k in [(0, 1), (max_alg, 1), (0, 2)]:
        y = cslt.cslt_linear(x, c, n, k, alg_id=alg_id, split_k=split_k)
        # split-K adds its partial sums in another order: one more rounding allowed
        extra = ulp(torch.float16, ref.abs().max().item()) if split_k > 1 else 0.0
        assert_matches_reference(y, ref, torch_y, extra=extra)
    empty = cslt.cslt_linear(x[:0], c, n, k)
    assert empty.shape == (0, n) and empty.dtype == torch.float16
    stats = cslt.cache_stats()
    assert 0 < stats["entries"] <= stats["max_entries"]


@pytest.mark.cuda
def test_cslt_linear_from_several_threads():
    n, k = 64, 128
    gen = torch.Generator().manual_seed(14)
    w = rand_24(n, k, torch.bfloat16, "cuda", gen)
    c = cslt.cslt_compress(w)
    xs = [torch.randn(M, k, generator=gen).bfloat16().cuda() for M in (1, 17, 64, 200)]
    want = [cslt.cslt_linear(x, c, n, k) for x in xs]
    torch.cuda.synchronize()
    errors: list[BaseException] = []

    def work(i):
        try:
            for _ in range(5):
                y = cslt.cslt_linear(xs[i], c, n, k)
                torch.cuda.current_stream().synchronize()
                assert torch.equal(y, want[i])
        except BaseException as e:  # noqa: BLE001 - reported below with the thread's failure
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.cuda
def test_cslt_errors_name_the_rule():
    n, k = 64, 128
    w = torch.zeros(n, k, dtype=torch.float16, device="cuda")
    w[5, 8:11] = 1.0
    with pytest.raises(RuntimeError, match=r"w is not 2:4: row 5, group 2 \(columns 8..11\)"):
        cslt.cslt_compress(w)
    c = cslt.cslt_compress(torch.zeros(n, k, dtype=torch.float16, device="cuda"))
    x = torch.randn(3, k, device="cuda").half()
    with pytest.raises(ValueError, match="bias is on cpu but x is on cuda"):
        cslt.cslt_linear(x, c, n, k, bias=torch.zeros(n, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="bias is on cpu but x is on cuda"):  # the C++ op checks too
        ops.cslt_linear(x, c, n, k, torch.zeros(n, dtype=torch.float16), None, None, "none", None)
    with pytest.raises(RuntimeError, match="split_k must be >= 1"):
        ops.cslt_linear(x, c, n, k, None, None, None, "none", None, -1, 0)
    w8 = torch.zeros(64, 64, dtype=torch.float8_e4m3fn, device="cuda")
    if cuda_capability() < (8, 9):
        with pytest.raises(RuntimeError, match="float8_e4m3fn needs sm89 or newer"):
            cslt.cslt_compress(w8)
    else:
        assert cslt.cslt_compress(w8).numel() == cslt.compressed_nbytes(64, 64, torch.float8_e4m3fn)


# ------------------------------------------------------------------------------------------------ opcheck
def _opcheck_cases():
    gen = torch.Generator().manual_seed(15)
    w = rand_24(64, 128, torch.float16, "cuda", gen)
    x = torch.randn(33, 128, generator=gen).half().cuda()
    c = cslt.cslt_compress(w)
    bias, alpha = torch.randn(64, generator=gen).half().cuda(), torch.rand(64, generator=gen).cuda()
    rs = torch.rand(33, generator=gen).cuda()
    w8 = rand_24(64, 96, torch.int8, "cuda", gen)
    x8 = torch.randint(-5, 6, (17, 96), generator=gen).to(torch.int8).cuda()
    c8 = cslt.cslt_compress(w8)
    values, codes = ops.compress_24(w)
    return [
        (ops.cslt_compress.default, (w,)),
        (ops.cslt_compress.default, (w8,)),
        (ops.cslt_linear.default, (x, c, 64, 128)),
        (ops.cslt_linear.default, (x, c, 64, 128, bias, alpha, rs, "gelu", None, -1, 1)),
        (ops.cslt_linear.default, (x8, c8, 64, 96, None, alpha, None, "relu", torch.bfloat16)),
        (ops.prune_nm.default, (torch.randn(16, 64, generator=gen).cuda(), 2, 4)),
        (ops.prune_nm.default, (torch.randn(16, 64, generator=gen).cuda(), 4, 8, torch.rand(16, 64).cuda())),
        (ops.nm_violation.default, (w, 2, 4)),
        (ops.compress_24.default, (w,)),
        (ops.decompress_24.default, (values, codes, 128)),
        (ops.quantize_per_token.default, (x, torch.int8)),
    ]


@pytest.mark.cuda
def test_opcheck_every_cuda_op():
    for op, args in _opcheck_cases():
        torch.library.opcheck(op, args)


@pytest.mark.cuda
@pytest.mark.parametrize("n,k,dtype", [(16, 16, torch.float16), (16, 32, torch.bfloat16), (32, 32, torch.int8),
                                       (64, 128, torch.float16)])
def test_compress_size_is_the_cuslt_query_and_small_layers_run(n, k, dtype):
    # issue 17, finding 1: cuSPARSELt pads small matrices beyond the 9/16 (10/16) formula
    gen = torch.Generator().manual_seed(21)
    w = rand_24(n, k, dtype, "cuda", gen)
    c = cslt.cslt_compress(w)
    assert c.numel() == cslt.compressed_nbytes(n, k, dtype) >= cslt.formula_nbytes(n, k, dtype)
    x = (torch.randint(-3, 4, (3, k), generator=gen) if dtype == torch.int8 else torch.randn(3, k, generator=gen))
    x = x.to(dtype).cuda()
    out = torch.float32 if dtype == torch.int8 else None
    y = cslt.cslt_linear(x, c, n, k, out_dtype=out)
    ref = ref_linear(x.float(), w.float())
    if dtype == torch.int8:
        assert torch.equal(y.double().cpu(), ref)
    else:
        assert_matches_reference(y, ref, F.linear(x, w))


@pytest.mark.cuda
@pytest.mark.parametrize("out_dtype", [torch.int32, torch.int8, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["none", "gelu"])
def test_int8_bias_is_added_by_the_post_op_for_every_output(out_dtype, activation):
    # issue 17, findings 3 and 4: an int8 bias is never fused (its epilogue dtype is not documented), and int8 ->
    # int32 with a bias and GELU runs (plain product + post-op) instead of raising
    n, k, M = 64, 128, 9
    gen = torch.Generator().manual_seed(22)
    w = rand_24(n, k, torch.int8, "cuda", gen)
    c = cslt.cslt_compress(w)
    x = torch.randint(-4, 5, (M, k), generator=gen).to(torch.int8).cuda()
    bias = (torch.randn(n, generator=gen) * 8).cuda()
    y = cslt.cslt_linear(x, c, n, k, bias=bias, activation=activation, out_dtype=out_dtype)
    ref = ref_linear(x.float(), w.float(), bias, activation=activation)
    if out_dtype in (torch.int32, torch.int8):
        lo, hi = (-128, 127) if out_dtype == torch.int8 else (-2 ** 31, 2 ** 31 - 1)
        want = torch.round(ref).clamp(lo, hi)
        assert (y.double().cpu() - want).abs().max().item() <= 1  # round-half-even of float32 sums
    else:
        assert_matches_reference(y, ref, ulps=4.0, activation=activation)
