"""Core N:M / 2:4 ops: prune_nm, nm_violation / is_nm, compress_24 / decompress_24, quantize_per_token.

Every op is checked against an independent plain-PyTorch reference written below (the readable spec). Masks, checks,
codes and round trips are exact; quantisation is exact too (same formula, same IEEE operations).
"""

from __future__ import annotations

import pytest
import torch

import sparsekern  # noqa: F401  (loads the extension)
from sparsekern import weight
from sparsekern import _ext
from sparsekern.weight import Compressed24
from sparsekern.ops import core

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}")

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ALL_24_DTYPES = FLOAT_DTYPES + [torch.int8, torch.float8_e4m3fn, torch.float8_e5m2]


# ------------------------------------------------------------------------------------------------ references
def ref_prune_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the m - n largest scores per aligned group of m along the last dim; ties keep the lower index.

    A stable descending sort keeps equal scores in index order, so the first m - n sorted positions are exactly
    the kept ones."""
    g = scores.double().reshape(-1, m)
    order = torch.sort(g, dim=1, descending=True, stable=True).indices
    mask = torch.zeros_like(g, dtype=torch.bool)
    mask.scatter_(1, order[:, : m - n], True)
    return mask.reshape(scores.shape)


def ref_first_violation(w: torch.Tensor, n: int, m: int):
    nz = (w.reshape(-1, w.shape[-1]).float() != 0).reshape(-1, w.shape[-1] // m, m).sum(-1)
    bad = (nz > m - n).nonzero()
    return None if bad.numel() == 0 else (int(bad[0, 0]), int(bad[0, 1]))


def ref_codes(w: torch.Tensor) -> torch.Tensor:
    """Pattern codes per nm.h: kept positions = the non-zeros, filled up to two with the lowest zero positions."""
    rows, cols = w.shape
    nz = (w.float() != 0).reshape(rows, cols // 4, 4)
    codes = torch.zeros(rows, cols // 4, dtype=torch.int64)
    for r in range(rows):
        for g in range(cols // 4):
            kept = [j for j in range(4) if nz[r, g, j]]
            kept += [j for j in range(4) if j not in kept][: 2 - len(kept)]
            kept.sort()
            codes[r, g] = kept[0] | (kept[1] << 2)
    if codes.shape[1] % 2:
        codes = torch.cat([codes, torch.zeros(rows, 1, dtype=torch.int64)], 1)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def random_24(rows: int, cols: int, dtype: torch.dtype, sparse_groups: bool = True) -> torch.Tensor:
    """A random 2:4 tensor whose groups hold 2 non-zeros, and (sparse_groups) some groups with 1 or 0."""
    w = torch.randn(rows, cols, dtype=torch.float64) + 0.25  # no accidental zeros
    mask = ref_prune_mask(torch.rand(rows, cols), 2, 4)
    if sparse_groups:
        mask &= torch.rand(rows, cols) > 0.15
    w = (w * mask) * (8 if dtype in (torch.int8,) else 1)
    if dtype == torch.int8:
        return w.round().clamp(-127, 127).to(torch.int8)
    return w.to(dtype)


# ------------------------------------------------------------------------------------------------ prune_nm
PRUNE_CASES = [(shape, nm) for shape in [(1, 4), (7, 12), (33, 64), (3, 5, 24), (2, 64)]
               for nm in [(2, 4), (1, 4), (3, 4), (4, 8), (0, 4), (4, 4), (16, 32)] if shape[-1] % nm[1] == 0]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,nm", PRUNE_CASES)
def test_prune_nm_matches_reference(dtype, shape, nm):
    n, m = nm
    w = torch.randn(shape).to(dtype)
    pruned, mask = core.prune_nm(w, n, m)
    want = ref_prune_mask(w.abs(), n, m)
    assert torch.equal(mask, want)
    assert torch.equal(pruned, torch.where(want, w, torch.zeros_like(w)))
    assert pruned.dtype == dtype and pruned.shape == w.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prune_nm_ties_keep_lower_index(dtype):
    # Small integers: many exact ties in |w|.
    w = torch.randint(-2, 3, (17, 32)).to(dtype)
    for n, m in [(2, 4), (4, 8), (3, 8)]:
        _, mask = core.prune_nm(w, n, m)
        assert torch.equal(mask, ref_prune_mask(w.abs(), n, m))
    # A hand-built group: |w| = (1, 3, 3, 1): keep positions 1 and 2; (2, 2, 2, 2): keep 0 and 1.
    _, mask = core.prune_nm(torch.tensor([[1.0, -3.0, 3.0, 1.0, 2.0, -2.0, 2.0, 2.0]]), 2, 4)
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]


@pytest.mark.parametrize("score_dtype", [torch.float32, torch.float64])
def test_prune_nm_with_scores(score_dtype):
    w = torch.randn(9, 40)
    scores = torch.rand(9, 40, dtype=score_dtype)
    pruned, mask = core.prune_nm(w, 2, 4, scores)
    want = ref_prune_mask(scores, 2, 4)
    assert torch.equal(mask, want)
    assert torch.equal(pruned, w * want)


def test_prune_nm_float64_scores_do_not_tie_in_float32():
    # Two scores equal in float32 but not in float64: the larger (index 1) must be kept over index 0... by value.
    w = torch.ones(1, 4, dtype=torch.float64)
    scores = torch.tensor([[1.0, 1.0 + 1e-12, 0.0, 0.5]], dtype=torch.float64)
    _, mask = core.prune_nm(w, 3, 4, scores)
    assert mask.tolist() == [[False, True, False, False]]


def test_prune_nm_non_contiguous_input():
    w = torch.randn(16, 24).t()  # [24, 16], non-contiguous
    pruned, mask = core.prune_nm(w, 2, 4)
    assert torch.equal(mask, ref_prune_mask(w.abs(), 2, 4))
    assert torch.equal(pruned, w * mask)


def test_prune_nm_inf_is_largest_magnitude():
    w = torch.tensor([[0.5, float("-inf"), 2.0, 1.0, float("inf"), float("inf"), float("inf"), 0.0]])
    pruned, mask = core.prune_nm(w, 2, 4)
    assert mask.tolist() == [[False, True, True, False, True, True, False, False]]
    assert pruned[0, 1] == float("-inf") and pruned[0, 6] == 0


def test_prune_nm_nan_error_names_position():
    w = torch.randn(2, 3, 8)
    w[1, 2, 5] = float("nan")
    w[1, 2, 6] = float("nan")
    with pytest.raises(RuntimeError, match=r"w holds NaN at index \(1, 2, 5\)"):
        core.prune_nm(w, 2, 4)
    scores = torch.rand(2, 3, 8)
    scores[0, 1, 3] = float("nan")
    with pytest.raises(RuntimeError, match=r"scores holds NaN at index \(0, 1, 3\)"):
        core.prune_nm(torch.randn(2, 3, 8), 2, 4, scores)


def test_prune_nm_errors():
    with pytest.raises(RuntimeError, match=r"last dimension of w \(10\) must be a multiple of m=4"):
        core.prune_nm(torch.randn(3, 10), 2, 4)
    with pytest.raises(RuntimeError, match="w has unsupported dtype Int; supported: float32"):
        core.prune_nm(torch.ones(2, 4, dtype=torch.int32), 2, 4)
    with pytest.raises(RuntimeError, match=r"n \(the number pruned per group\) must satisfy 0 <= n <= m"):
        core.prune_nm(torch.randn(2, 4), 5, 4)
    with pytest.raises(RuntimeError, match=r"m must be in \[1, 32\]"):
        core.prune_nm(torch.randn(2, 64), 2, 64)
    with pytest.raises(RuntimeError, match=r"scores must have w's shape"):
        core.prune_nm(torch.randn(2, 8), 2, 4, torch.rand(2, 4))


@pytest.mark.cuda
def test_prune_nm_device_mismatch_error():
    with pytest.raises(RuntimeError, match="scores is on cuda:0 but w is on cpu"):
        torch.ops.sparsekern.prune_nm(torch.randn(2, 8), 2, 4, torch.rand(2, 8, device="cuda"))


# ------------------------------------------------------------------------------------------------ nm_violation
@pytest.mark.parametrize("dtype", ALL_24_DTYPES + [torch.bool])
def test_nm_violation_matches_reference(dtype):
    for shape in [(5, 16), (3, 2, 12), (64, 36)]:
        w = random_24(shape[0] * (shape[1] if len(shape) == 3 else 1), shape[-1], torch.float32)
        w = w.reshape(shape)
        assert core.nm_violation(w.to(dtype)) is None and core.is_nm(w.to(dtype))
        # Break one group (and a later one); the first in row-major order is reported.
        flat = w.reshape(-1, shape[-1]).clone()
        r, g = flat.shape[0] // 2, shape[-1] // 4 - 1
        flat[r, 4 * g: 4 * g + 4] = torch.tensor([1.0, 1.0, 1.0, 0.0])
        flat[-1, 0:4] = 1.0
        bad = flat.reshape(shape).to(dtype)
        assert core.nm_violation(bad) == ref_first_violation(bad, 2, 4) == (r, g)
        assert not core.is_nm(bad)


def test_nm_violation_general_nm_nan_and_negative_zero():
    w = torch.tensor([[1.0, 0.0, -0.0, 0.0, 0.0, 0.0, 0.0, 2.0]])
    assert core.is_nm(w, 3, 4) and core.is_nm(w, 6, 8)
    assert core.nm_violation(w, 7, 8) == (0, 0)
    w[0, 1] = float("nan")  # NaN is a non-zero
    assert core.nm_violation(w, 3, 4) == (0, 0)
    w = torch.randn(6, 16)
    pruned, _ = core.prune_nm(w, 4, 8)
    assert core.is_nm(pruned, 4, 8)
    assert core.nm_violation(pruned, 2, 4) == ref_first_violation(pruned, 2, 4)


def test_nm_violation_errors():
    with pytest.raises(RuntimeError, match=r"last dimension of w \(6\) must be a multiple of m=4"):
        core.nm_violation(torch.randn(2, 6))


# ------------------------------------------------------------------------------------------------ compress / decompress
@pytest.mark.parametrize("dtype", ALL_24_DTYPES)
@pytest.mark.parametrize("shape", [(1, 4), (3, 12), (17, 40), (64, 128), (5, 20)])
def test_compress_decompress_round_trip_and_codes(dtype, shape):
    w = random_24(*shape, dtype)
    c = weight.compress_24(w)
    assert c.values.shape == (shape[0], shape[1] // 2) and c.values.dtype == dtype
    assert c.codes.shape == (shape[0], (shape[1] + 7) // 8) and c.codes.dtype == torch.uint8
    assert torch.equal(c.codes, ref_codes(w))
    # values = the entries at the coded positions, in column order
    codes = c.codes.long()
    per_group = torch.stack([codes & 0xF, codes >> 4], -1).reshape(shape[0], -1)[:, : shape[1] // 4]
    cols = torch.stack([per_group & 3, per_group >> 2], -1) + 4 * torch.arange(shape[1] // 4)[None, :, None]
    expect_vals = torch.gather(w.view(torch.uint8) if w.element_size() == 1 else w, 1, cols.reshape(shape[0], -1))
    got_vals = c.values.view(torch.uint8) if w.element_size() == 1 else c.values
    assert torch.equal(got_vals, expect_vals)
    back = c.decompress()
    assert back.dtype == dtype
    # exact by value (float conversion is exact for every dtype here; a dropped -0.0 comes back as +0.0)
    assert torch.equal(back.double(), w.double())


def test_compress_non_contiguous_and_negative_zero():
    w = random_24(24, 16, torch.float32).t().contiguous().t()  # non-contiguous view of a 2:4 tensor [24, 16]
    assert not w.is_contiguous()
    c = weight.compress_24(w)
    assert torch.equal(c.decompress(), w)
    z = torch.tensor([[-0.0, 0.0, 0.0, -0.0, 0.0, 3.0, -0.0, 0.0]])
    c = weight.compress_24(z)
    assert c.codes.tolist() == [[4 | (4 << 4)]]  # both groups keep (0, 1): the non-zero, then the lowest zeros
    assert bool(torch.signbit(c.decompress()[0, 0]))  # a kept -0.0 stays -0.0 (dropped ones come back +0.0)
    assert torch.equal(c.decompress(), z)


def test_compress_error_names_row_and_group():
    w = random_24(6, 24, torch.float32)
    w[4, 12:16] = torch.tensor([1.0, 2.0, 0.0, 3.0])
    with pytest.raises(RuntimeError, match=r"not 2:4 sparse: row 4, group 3 \(columns 12..15\) holds 3 non-zeros"):
        weight.compress_24(w)
    with pytest.raises(RuntimeError, match=r"number of columns of w \(10\) must be a multiple of 4"):
        torch.ops.sparsekern.compress_24(torch.zeros(2, 10))
    with pytest.raises(RuntimeError, match="w has unsupported dtype Int"):
        torch.ops.sparsekern.compress_24(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="must be 2-D"):
        weight.compress_24(torch.zeros(2, 2, 8))


def test_decompress_errors():
    c = weight.compress_24(random_24(3, 24, torch.float32))
    ops = torch.ops.sparsekern
    bad = c.codes.clone()
    bad[2, 1] = (bad[2, 1] & 0x0F) | (5 << 4)  # group 3 of row 2: code 5 = (1, 1)
    with pytest.raises(RuntimeError, match=r"codes row 2, group 3 holds 5, which is not a valid 2:4 pattern code"):
        ops.decompress_24(c.values, bad, 24)
    with pytest.raises(RuntimeError, match=r"values must be \[rows, cols/2\] = \[3, 14\]"):
        ops.decompress_24(c.values, c.codes, 28)
    with pytest.raises(RuntimeError, match=r"codes must be \[rows, ceil\(cols/8\)\] = \[3, 3\]"):
        ops.decompress_24(c.values, c.codes[:, :2], 24)
    with pytest.raises(RuntimeError, match="codes must be uint8"):
        ops.decompress_24(c.values, c.codes.to(torch.int8), 24)
    with pytest.raises(RuntimeError, match=r"cols \(26\) must be a non-negative multiple of 4"):
        ops.decompress_24(c.values, c.codes, 26)
    # The padding nibble of an odd group count is ignored, whatever it holds.
    c5 = weight.compress_24(random_24(2, 20, torch.float32))
    codes = c5.codes.clone()
    codes[:, -1] |= 0xF0
    assert torch.equal(ops.decompress_24(c5.values, codes, 20), c5.decompress())


@pytest.mark.parametrize("dtype", ALL_24_DTYPES)
def test_decompress_large_odd_shape_threaded(dtype):
    # Odd group count per row (cols % 8 == 4) and a row count that does not divide into the threads' chunks:
    # every row, chunk edge and the padding nibble must round-trip bit for bit.
    torch.manual_seed(3)
    rows, cols = 1031, 1020
    w = random_24(rows, cols, dtype)
    c = weight.compress_24(w)
    back = torch.ops.sparsekern.decompress_24(c.values, c.codes, cols)
    assert back.dtype == dtype
    assert torch.equal(back.double(), w.double())  # exact by value (a dropped -0.0 comes back as +0.0)
    # Invalid codes in several rows: the first in row-major order is the one reported, however rows are split.
    bad = c.codes.clone()
    bad[1000, 3] = (bad[1000, 3] & 0x0F) | (3 << 4)  # row 1000, group 7: code 3 = (3, 0)
    bad[300, 127] = (bad[300, 127] & 0xF0) | 0x0F  # row 300, group 254 (the last, low nibble): code 15 = (3, 3)
    bad[300, 127] |= 0xF0  # the padding nibble next to it stays ignored
    with pytest.raises(RuntimeError, match=r"codes row 300, group 254 holds 15, which is not a valid 2:4 pattern"):
        torch.ops.sparsekern.decompress_24(c.values, bad, cols)


@pytest.mark.cuda
def test_decompress_device_mismatch_error():
    c = weight.compress_24(random_24(3, 24, torch.float32))
    with pytest.raises(RuntimeError, match="codes is on cuda:0 but values is on cpu"):
        torch.ops.sparsekern.decompress_24(c.values, c.codes.cuda(), 24)


def test_compressed24_container():
    w = random_24(8, 24, torch.bfloat16)
    c = weight.compress_24(w)
    assert c.shape == (8, 24) and c.dtype == torch.bfloat16 and c.format_version == 1
    assert c.nbytes == 8 * 12 * 2 + 8 * 3
    c2 = Compressed24.from_state_dict(c.state_dict("layer."), "layer.")
    assert torch.equal(c2.decompress(), w)
    assert torch.equal(c.to("cpu").decompress(), w)
    with pytest.raises(ValueError, match="format_version 2 is not supported"):
        Compressed24(c.values, c.codes, c.shape, format_version=2)
    with pytest.raises(ValueError, match=r"values must be \[rows, cols/2\] = \[8, 14\]"):
        Compressed24(c.values, c.codes, (8, 28))
    with pytest.raises(ValueError, match="format_version' is missing"):
        Compressed24.from_state_dict({"values": c.values, "codes": c.codes, "shape": torch.tensor([8, 24])})


# ------------------------------------------------------------------------------------------------ quantize_per_token
def ref_quantize(x: torch.Tensor, dtype: torch.dtype):
    qmax = 127.0 if dtype == torch.int8 else 448.0
    xf = x.float()
    amax = xf.abs().amax(dim=1)
    tiny = torch.finfo(torch.float32).smallest_normal * 2.0 ** -23  # 2^-149, the smallest positive float
    scale = torch.where(amax > 0, (amax / qmax).clamp_min(tiny), torch.ones_like(amax))
    q = (xf / scale[:, None]).clamp(-qmax, qmax)
    q = q.round().to(torch.int8) if dtype == torch.int8 else q.to(dtype)
    return q, scale


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
def test_quantize_per_token_matches_reference(xdtype, qdtype):
    for M, K in [(1, 8), (3, 100), (33, 256)]:
        x = (torch.randn(M, K) * torch.rand(M, 1) * 10).to(xdtype)
        x[0, : K // 2] = 0.0
        if M > 2:
            x[2] = 0.0  # an all-zero row: scale 1, q 0
        q, scale = core.quantize_per_token(x, qdtype)
        q_ref, scale_ref = ref_quantize(x, qdtype)
        assert torch.equal(scale, scale_ref)
        assert torch.equal(q.view(torch.int8), q_ref.view(torch.int8))
        # and it is a quantisation: error within half a step (int8) / e4m3's relative precision
        err = (q.float() * scale[:, None] - x.float()).abs()
        step = scale[:, None] * (0.5 if qdtype == torch.int8 else 448 * 2**-4)
        assert bool((err <= step * 1.0001).all())


def test_quantize_per_token_errors():
    x = torch.randn(4, 8)
    x[2, 3] = float("inf")
    with pytest.raises(RuntimeError, match="row 2 of x holds Inf or NaN"):
        core.quantize_per_token(x)
    with pytest.raises(RuntimeError, match="dtype must be int8 or float8_e4m3fn"):
        core.quantize_per_token(torch.randn(2, 8), torch.int32)
    with pytest.raises(RuntimeError, match="x has unsupported dtype Double"):
        core.quantize_per_token(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"x must be 2-D \[M, K\]"):
        core.quantize_per_token(torch.randn(8))


# ------------------------------------------------------------------------------------------------ opcheck
OPCHECK_CASES = [
    ("prune_nm", lambda: (torch.randn(6, 16), 2, 4, None)),
    ("prune_nm", lambda: (torch.randn(2, 3, 16, dtype=torch.bfloat16), 4, 8, torch.rand(2, 3, 16))),
    ("nm_violation", lambda: (random_24(5, 16, torch.float32), 2, 4)),
    ("compress_24", lambda: (random_24(5, 20, torch.float16),)),
    ("decompress_24", lambda: (*torch.ops.sparsekern.compress_24(random_24(7, 24, torch.float32)), 24)),
    ("quantize_per_token", lambda: (torch.randn(5, 24), torch.int8)),
    ("quantize_per_token", lambda: (torch.randn(3, 16, dtype=torch.bfloat16), torch.float8_e4m3fn)),
]


@pytest.mark.parametrize("name,make", OPCHECK_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(OPCHECK_CASES)])
def test_opcheck(name, make):
    torch.library.opcheck(getattr(torch.ops.sparsekern, name).default, make())


@pytest.mark.parametrize("qdtype", [torch.int8, torch.float8_e4m3fn])
def test_quantize_per_token_denormal_rows_stay_finite(qdtype):
    # amax / qmax underflowed to 0 here: x = [[1e-45, 0, 0, 0]] gave scale 0 and q = [448, nan, nan, nan] (issue 16)
    x = torch.tensor([[1e-45, 0.0, 0.0, 0.0], [3e-39, -1e-40, 0.0, 2e-45], [1.0, -2.0, 0.5, 0.0]])
    q, scale = core.quantize_per_token(x, qdtype)
    rq, rscale = ref_quantize(x, qdtype)
    assert torch.all(scale > 0) and torch.isfinite(q.float()).all()
    assert torch.equal(scale, rscale) and torch.equal(q.float(), rq.float())
    assert q[0, 1:].float().abs().sum() == 0  # zeros stay zero


def test_float64_values_below_float_range_count_as_non_zero():
    # a float64 1e-300 is not zero: converting to float32 first made it so, and a group with three such values passed
    w = torch.zeros(2, 8, dtype=torch.float64)
    w[1, 4:7] = torch.tensor([1e-300, -2e-310, 5e-46], dtype=torch.float64)
    assert core.nm_violation(w) == (1, 1) and not core.is_nm(w)
    with pytest.raises(RuntimeError, match="row 1, group 1"):
        weight.compress_24(w)
    w[1, 6] = 0
    c = weight.compress_24(w)
    assert torch.equal(c.decompress(), w)  # the kept tiny values round-trip exactly


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_per_token_same_on_every_isa(xdtype):
    # The AVX-512 int8 rows (float32 / bfloat16 input) and the portable loop give identical q and scale; K values
    # next to the 16-lane width, tails, zero rows, a denormal row, ties at .5 steps.
    from sparsekern import envs

    for M, K in [(1, 4), (5, 15), (4, 16), (3, 17), (7, 100), (33, 576)]:
        x = (torch.randn(M, K) * torch.rand(M, 1) * 10).to(xdtype)
        x[0, : K // 2] = 0.0
        if M > 2:
            x[2] = 0.0
        if M > 3:
            x[3] = torch.arange(K).to(xdtype) * 0.5 - K / 4  # halves: round-half-even decides
        q, scale = core.quantize_per_token(x, torch.int8)
        with envs.cpu_dispatch(isa="scalar"):
            q_s, scale_s = core.quantize_per_token(x, torch.int8)
        q_ref, scale_ref = ref_quantize(x, torch.int8)
        assert torch.equal(scale, scale_s) and torch.equal(q, q_s), (M, K)
        assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref), (M, K)
    bad = torch.randn(40, 33).to(xdtype)
    bad[17, 32] = float("nan")
    with pytest.raises(RuntimeError, match="row 17 of x holds Inf or NaN"):
        core.quantize_per_token(bad, torch.int8)
