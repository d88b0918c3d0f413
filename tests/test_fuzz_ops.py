"""Property-based tests of the core ops (sparsekern.ops.core) and the 2:4 weight type (sparsekern.weight).

Each target draws fresh random data (odd sizes next to aligned ones, several value styles, never all zeros) and
checks it against a plain-PyTorch reference (float64 where it matters) or an exact invariant. Budget and long mode:
tests/fuzz_support.py, docs/fuzzing.md.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, note
from hypothesis import strategies as st

from fuzz_support import fuzz_threads  # noqa: F401  (autouse: one intra-op thread)
from fuzz_support import (FLOAT_DTYPES, GROUPS, NM, SEEDS, SIZES, STYLES, assert_close_spmm,
                          codes_valid_reference, first_nm_violation, fuzz, generator, make_values, nm_keep_reference,
                          random_24)
from sparsekern import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}")

if _ext.available():
    from sparsekern import envs, weight
    from sparsekern.ops import core
    from sparsekern.weight import CheckpointError, Sparse24Weight
    from test_core_ops import ref_quantize
    from test_spmm_cpu import reference

CLEAN_ERRORS = (RuntimeError, ValueError, TypeError)


def expect_clean_error(fn, *, types=CLEAN_ERRORS):
    """fn() must raise one of `types` with a message (not an empty one, not a Python internal such as KeyError)."""
    try:
        out = fn()
    except types as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return exc
    raise AssertionError(f"expected an error, got a result: {_describe(out)}")


def _describe(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"tensor {out.dtype} {list(out.shape)} on {out.device}"
    if isinstance(out, (tuple, list)):
        return "(" + ", ".join(_describe(o) for o in out) + ")"
    return repr(out)


# ---------------------------------------------------------------------------------------------------- prune_nm
@fuzz(1500)
@given(seed=SEEDS, lead=st.lists(st.integers(1, 4), max_size=2), rows=SIZES, groups=GROUPS, nm=NM,
       dtype=st.sampled_from(FLOAT_DTYPES), style=st.sampled_from(STYLES),
       scores=st.sampled_from([None, torch.float32, torch.float64, "w_dtype"]))
def test_prune_nm_matches_reference(seed, lead, rows, groups, nm, dtype, style, scores):
    n, m = nm
    g = generator(seed)
    shape = (*lead, rows, groups * m)
    w = make_values(g, shape, dtype, style)
    s = None
    if scores is not None:
        s = make_values(g, shape, dtype if scores == "w_dtype" else scores, "ties" if style == "ties" else "normal")
    pruned, mask = core.prune_nm(w, n, m, s)
    assert pruned.dtype == w.dtype and pruned.shape == w.shape and pruned.is_contiguous()
    assert mask.dtype == torch.bool and mask.shape == w.shape
    k = shape[-1]
    ref_scores = (w.double().abs() if s is None else s.double()).reshape(-1, k)
    keep = nm_keep_reference(ref_scores, n, m).reshape(shape)
    assert torch.equal(mask, keep), "kept positions differ from the stable-sort reference"
    assert torch.equal(pruned, torch.where(keep, w, torch.zeros_like(w)))
    assert core.is_nm(pruned, n, m)
    assert bool((mask.reshape(-1, k // m, m).sum(-1) == m - n).all())


@fuzz(400)
@given(seed=SEEDS, rows=SIZES, groups=GROUPS, nm=NM, dtype=st.sampled_from(FLOAT_DTYPES),
       in_scores=st.booleans(), count=st.integers(1, 4), three_d=st.booleans())
def test_prune_nm_nan_raises_naming_the_first_index(seed, rows, groups, nm, dtype, in_scores, count, three_d):
    n, m = nm
    g = generator(seed)
    shape = (2, rows, groups * m) if three_d else (rows, groups * m)
    w = make_values(g, shape, dtype)
    s = make_values(g, shape, torch.float32) if in_scores else None
    target = s if in_scores else w
    flat = target.view(-1)
    idx = torch.randint(0, flat.numel(), (count,), generator=g)
    flat[idx] = float("nan")
    first = int(idx.min())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), shape))
    exc = expect_clean_error(lambda: core.prune_nm(w, n, m, s))
    text = str(exc)
    assert "NaN" in text and ("scores" if in_scores else "w") in text, text
    assert str(where) in text, f"message does not name the first NaN {where}: {text}"


# ---------------------------------------------------------------------------------------------------- nm_violation
@fuzz(1200)
@given(seed=SEEDS, rows=SIZES, groups=GROUPS, nm=NM, style=st.sampled_from(STYLES + ["pruned", "one_extra"]),
       dtype=st.sampled_from(FLOAT_DTYPES + [torch.int8, torch.float8_e4m3fn, torch.int32]),
       lead=st.lists(st.integers(1, 3), max_size=1))
def test_nm_violation_matches_reference(seed, rows, groups, nm, style, dtype, lead):
    n, m = nm
    g = generator(seed)
    shape = (*lead, rows, groups * m)
    if style in ("pruned", "one_extra"):
        w = make_values(g, shape, torch.float64, "tiny" if dtype == torch.float64 else "normal")
        w2 = w.reshape(-1, shape[-1])
        keep = nm_keep_reference(w2.abs(), n, m)
        if style == "one_extra":  # exactly one group gets one non-zero too many
            r = int(torch.randint(0, w2.shape[0], (1,), generator=g))
            grp = int(torch.randint(0, groups, (1,), generator=g))
            dropped = (~keep[r, grp * m:(grp + 1) * m]).nonzero()
            keep[r, grp * m + int(dropped[0])] = True
        w = torch.where(keep, w2, torch.zeros_like(w2)).reshape(shape)
        w = w.to(dtype) if dtype != torch.float8_e4m3fn else w.clamp(-448, 448).to(dtype)
        if not dtype.is_floating_point:
            w = torch.where(keep.reshape(shape), torch.ones_like(w), w)  # integers: keep the pattern exact
    else:
        w = make_values(g, shape, dtype, style)
    got = core.nm_violation(w, n, m)
    assert got == first_nm_violation(w, n, m)
    assert core.is_nm(w, n, m) == (got is None)


# ---------------------------------------------------------------------------------------------------- compress
ROUND_TRIP_DTYPES = FLOAT_DTYPES + [torch.int8, torch.float8_e4m3fn]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Exactly equal values (float8 compared through float32, which holds every e4m3 value exactly)."""
    if a.dtype == torch.float8_e4m3fn:
        return torch.equal(a.float(), b.float())
    return torch.equal(a, b)


def _decompress_reference(values: torch.Tensor, codes: torch.Tensor, cols: int) -> torch.Tensor:
    """Dense [rows, cols] from the portable tensors, written from the format's definition (weight.py module doc)."""
    rows = values.shape[0]
    groups = cols // 4
    dtype = values.dtype
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[values.element_size()]
    values = values.view(bits)  # scatter the bit patterns (no scatter kernel for float8)
    out = torch.zeros(rows, cols, dtype=bits)
    nib = torch.stack((codes & 0xF, codes >> 4), dim=-1).reshape(rows, -1)[:, :groups].long()
    base = torch.arange(groups) * 4
    i0 = base + (nib & 3)
    i1 = base + (nib >> 2)
    out.scatter_(1, i0, values[:, 0::2])
    out.scatter_(1, i1, values[:, 1::2])
    return out.view(dtype)


@fuzz(1200)
@given(seed=SEEDS, rows=SIZES, groups=GROUPS, dtype=st.sampled_from(ROUND_TRIP_DTYPES),
       style=st.sampled_from(STYLES), quant=st.sampled_from([None, None, "int8", "fp8"]),
       prefix=st.sampled_from(["", "layer.", "a.b."]))
def test_compress_round_trips_exactly(seed, rows, groups, dtype, style, quant, prefix):
    g = generator(seed)
    cols = 4 * groups
    w = random_24(g, rows, cols, dtype, style)
    values, codes = core.compress_24(w)
    assert values.dtype == w.dtype and values.shape == (rows, cols // 2)
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == weight.codes_shape(rows, cols)
    assert codes_valid_reference(codes, cols)
    back = core.decompress_24(values, codes, cols)
    assert back.dtype == w.dtype and back.shape == w.shape
    assert _same(back, w)
    assert _same(_decompress_reference(values, codes, cols), w)
    # the weight type: from_dense / decompress / state_dict round trips
    if quant is not None and (not dtype.is_floating_point or dtype in (torch.float8_e4m3fn, torch.float64)):
        quant = None  # quantisation starts from a float32/16 weight
    if quant is not None and style in ("inf",):
        quant = None
    w24 = Sparse24Weight.from_dense(w, quant)
    if quant is None:
        assert _same(w24.decompress(), w)
    else:
        assert w24.quant == quant and w24.scale is not None
        assert core.is_nm(w24.decompress().float(), 2, 4)
    sd = w24.state_dict(prefix)
    assert set(sd) >= {prefix + k for k in ("values", "codes", "shape", "format_version")}
    again = Sparse24Weight.from_state_dict(sd, prefix)
    assert again.shape == (rows, cols) and again.values.dtype == w24.values.dtype
    assert torch.equal(again.codes, w24.codes)
    assert torch.equal(again.values.view(torch.uint8), w24.values.view(torch.uint8))
    if w24.scale is not None:
        assert torch.equal(again.scale, w24.scale)
    for t in sd.values():  # fresh copies: nothing shared with the dict
        assert all(t.data_ptr() != a.data_ptr() for a in (again.values, again.codes) if t.numel() and a.numel())


@fuzz(500)
@given(seed=SEEDS, rows=SIZES, groups=GROUPS, dtype=st.sampled_from(ROUND_TRIP_DTYPES), extra=st.integers(1, 3))
def test_compress_refuses_non_24_naming_the_first_group(seed, rows, groups, dtype, extra):
    g = generator(seed)
    cols = 4 * groups
    w = random_24(g, rows, cols, dtype)
    for _ in range(extra):  # fill every slot of a few random groups: 4 non-zeros
        r = int(torch.randint(0, rows, (1,), generator=g))
        c = 4 * int(torch.randint(0, groups, (1,), generator=g))
        w[r, c:c + 4] = torch.tensor([1, 2, 3, 4]).to(dtype)
    row, group = first_nm_violation(w, 2, 4)
    exc = expect_clean_error(lambda: core.compress_24(w))
    assert f"{row}" in str(exc) and f"{group}" in str(exc), str(exc)
    exc = expect_clean_error(lambda: Sparse24Weight.from_dense(w, name="layer.q"))
    assert "layer.q" in str(exc) and f"row {row}, group {group}" in str(exc), str(exc)


# ---------------------------------------------------------------------------------------------------- codes
@fuzz(1000)
@given(seed=SEEDS, rows=SIZES, groups=GROUPS, corrupt=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
                                                                  max_size=3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_invalid_code_bytes_are_refused(seed, rows, groups, corrupt, dtype):
    g = generator(seed)
    cols = 4 * groups
    w = random_24(g, rows, cols, dtype)
    c = Sparse24Weight.from_dense(w)
    codes = c.codes.clone()
    for pos, byte in corrupt:
        codes.view(-1)[pos % codes.numel()] = byte
    valid = codes_valid_reference(codes, cols)
    event(f"codes valid after corruption: {valid}")
    sd = {"values": c.values, "codes": codes, "shape": torch.tensor([rows, cols]),
          "format_version": torch.tensor([weight.FORMAT_VERSION])}
    if valid:
        for made in (Sparse24Weight(c.values, codes, (rows, cols)), Sparse24Weight.from_state_dict(sd)):
            dense = made.decompress()
            assert torch.equal(dense, _decompress_reference(c.values, codes, cols))
            x = make_values(g, (3, cols), dtype if dtype != torch.float64 else torch.float32)
            if dtype != torch.float64:
                y = weight.sparse_linear(x, made)
                assert y.shape == (3, rows)
        return
    exc = expect_clean_error(lambda: Sparse24Weight(c.values, codes, (rows, cols)), types=(ValueError,))
    assert "code" in str(exc)
    expect_clean_error(lambda: weight.Compressed24(c.values, codes, (rows, cols)), types=(ValueError,))
    expect_clean_error(lambda: Sparse24Weight.from_state_dict(sd), types=(CheckpointError,))
    used_valid = codes_valid_reference(_without_padding(codes, cols), cols)
    if not used_valid:  # the op reads the used nibbles only (a non-zero padding nibble is refused by the type above)
        expect_clean_error(lambda: core.decompress_24(c.values, codes, cols), types=(RuntimeError, ValueError))


def _without_padding(codes: torch.Tensor, cols: int) -> torch.Tensor:
    out = codes.clone()
    if (cols // 4) % 2:
        out[:, -1] &= 0xF
    return out


# ---------------------------------------------------------------------------------------------------- spmm_24
def _probe_paths() -> dict:
    """{dtype: [(isa, layout), ...]} the CPU dispatch accepts here (a forced path the CPU or the dtype cannot run is
    refused by the op with a message; those are not drawn)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int8):
        w = random_24(generator(0), 4, 8, dtype)
        c = Sparse24Weight.from_dense(w)
        x = make_values(generator(1), (2, 8), dtype)
        ok = []
        for isa in (None, "scalar", "avx2", "avx512-base", "avx512"):
            for layout in ("auto", "rows", "pairs", "tokens"):
                try:
                    with envs.cpu_dispatch(isa=isa, layout=layout):
                        weight.sparse_linear(x, c)
                    ok.append((isa, layout))
                except RuntimeError:
                    pass
        out[dtype] = ok
    return out


_PATHS = _probe_paths() if _ext.available() else {}
THRESHOLDS = ["rows_pair_bf16_min_m", "rows_pair_i8_min_m", "pairs_bf16_min_m", "pairs_i8_min_m", "pairs_u8_min_m",
              "tokens_f32_min_m", "tokens_bf16_min_m", "tokens_i8_min_m", "slab_rows"]


@st.composite
def spmm_case(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int8]))
    isa, layout = draw(st.sampled_from(_PATHS[dtype]))
    thresholds = {}
    if layout == "auto":
        thresholds = draw(st.dictionaries(st.sampled_from(THRESHOLDS), st.sampled_from([1, 2, 5, 16, 64, None]),
                                          max_size=3))
        if thresholds.get("slab_rows", 0) is None:
            thresholds["slab_rows"] = 7
    m = draw(st.one_of(SIZES, st.sampled_from([255, 256, 257, 300])))
    return dict(dtype=dtype, isa=isa, layout=layout, thresholds=thresholds, m=m, n=draw(SIZES),
                groups=draw(GROUPS), seed=draw(SEEDS),
                bias=draw(st.booleans()), alpha=draw(st.booleans()), row_scale=draw(st.booleans()),
                activation=draw(st.sampled_from([None, "none", "relu", "gelu"])),
                out_dtype=draw(st.sampled_from([None, torch.float32, torch.bfloat16, torch.float16]
                                               + ([torch.int32] if dtype == torch.int8 else []))),
                strided=draw(st.booleans()), lead=draw(st.booleans()))


@fuzz(1500)
@given(case=spmm_case())
def test_spmm_24_matches_float64_reference(case):
    dtype, m, n, k = case["dtype"], case["m"], case["n"], 4 * case["groups"]
    g = generator(case["seed"])
    w = random_24(g, n, k, dtype)
    c = Sparse24Weight.from_dense(w)
    x = make_values(g, (m, 2 * k if case["strided"] else k), dtype)
    if case["strided"]:
        x = x[:, ::2]  # a non-contiguous x
    epi = {}
    if case["bias"]:
        epi["bias"] = torch.randn(n, generator=g)
    if case["alpha"]:
        epi["alpha"] = torch.rand(n, generator=g) + 0.5
    if case["row_scale"]:
        epi["row_scale"] = torch.rand(m, generator=g) + 0.5
    if dtype == torch.int8:
        for key, div in (("alpha", 2000), ("row_scale", 10)):
            if key in epi:
                epi[key] = epi[key] / div
    out_dtype = case["out_dtype"]
    has_float_epi = bool(epi) or case["activation"] in ("relu", "gelu")
    if dtype == torch.int8 and has_float_epi and out_dtype in (None, torch.int32):
        out_dtype = torch.float32  # int32 output holds an exact, un-scaled accumulator only
    if dtype != torch.int8 and out_dtype == torch.int32:
        out_dtype = None
    if dtype == torch.int8 and out_dtype == torch.float16 and "alpha" not in epi:
        epi["alpha"] = (torch.rand(n, generator=g) + 0.5) / 2000  # int8 sums reach 2.6e6: scale into fp16's range
    with envs.cpu_dispatch(isa=case["isa"], layout=case["layout"], **case["thresholds"]):
        if case["lead"] and m % 2 == 0 and "row_scale" not in epi:
            y = weight.sparse_linear(x.reshape(2, m // 2, k), c, activation=case["activation"], out_dtype=out_dtype,
                                     **epi).reshape(m, n)
        else:
            y = weight.sparse_linear(x, c, activation=case["activation"], out_dtype=out_dtype, **epi)
    expect_dtype = out_dtype or (torch.int32 if dtype == torch.int8 else dtype)
    assert y.dtype == expect_dtype and y.shape == (m, n)
    act = case["activation"] or "none"
    if dtype == torch.int8 and expect_dtype == torch.int32:
        assert torch.equal(y.long(), x.long() @ w.long().t())  # exact int32 accumulation
    elif dtype == torch.int8 and expect_dtype == torch.int8:
        # exact accumulator, fp32 epilogue, then rounded half-to-even and saturated: the nearest integer to the
        # saturated float64 result, up to the epilogue's float32 rounding
        ref = reference(x, w, activation=act, **epi).clamp(-128, 127)
        tol = 0.5 + 4 * torch.finfo(torch.float32).eps * ref.abs() + 1e-6 * ref.abs().max()
        assert bool(((y.double() - ref).abs() <= tol).all()), float((y.double() - ref).abs().max())
    elif dtype == torch.int8 or expect_dtype == dtype:
        assert_close_spmm(y, x, w, out_dtype=expect_dtype, activation=act, **epi)
    else:
        # floating x, another floating out_dtype: fp32 accumulation and epilogue, one rounding to out_dtype. The same
        # policy (PyTorch's own error in x's dtype as the budget), its floor at out_dtype's precision. (The GELU
        # epilogue loses relative precision for pre-activations below -4 exactly as F.gelu does in float32:
        # 0.5 x (1 + erf(x / sqrt 2)) cancels; a per-element relative bound would fail both.)
        assert_close_spmm(y, x, w, out_dtype=expect_dtype, activation=act, **epi)


# ---------------------------------------------------------------------------------------------------- quantize
@fuzz(1200)
@given(seed=SEEDS, rows=SIZES, cols=SIZES, xdtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       qdtype=st.sampled_from([torch.int8, torch.float8_e4m3fn]),
       exps=st.lists(st.integers(-150, 120), min_size=1, max_size=4), zero_rows=st.booleans(),
       strided=st.booleans())
def test_quantize_per_token_matches_reference(seed, rows, cols, xdtype, qdtype, exps, zero_rows, strided):
    g = generator(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    # per-row magnitudes 2^e, from denormal to huge (clipped to the dtype's range)
    e = torch.tensor(exps, dtype=torch.float64)[torch.randint(0, len(exps), (rows, 1), generator=g)]
    x = x * torch.pow(2.0, e)
    fmax = torch.finfo(xdtype).max
    x = x.clamp(-fmax, fmax).to(xdtype)
    if zero_rows and rows > 1:
        x[torch.rand(rows, generator=g) < 0.3] = 0
    if not bool((x != 0).any()):
        x[0, 0] = 1
    if strided:
        x = torch.cat([x, x], dim=1)[:, ::2]
    q, scale = core.quantize_per_token(x, qdtype)
    q_ref, scale_ref = ref_quantize(x, qdtype)
    assert q.dtype == qdtype and scale.dtype == torch.float32 and q.shape == x.shape and scale.shape == (rows,)
    assert bool(torch.isfinite(scale).all()) and bool((scale > 0).all())
    assert bool(torch.isfinite(q.float()).all())
    assert torch.equal(scale, scale_ref), (scale - scale_ref).abs().max()
    assert torch.equal(q.view(torch.int8), q_ref.view(torch.int8))


# ---------------------------------------------------------------------------------------------------- devices
@fuzz(800)
@given(seed=SEEDS, rows=SIZES, groups=GROUPS, m=SIZES,
       devices=st.fixed_dictionaries({k: st.sampled_from(["cpu", "meta", None if k != "x" and k != "w" else "cpu"])
                                      for k in ("x", "w", "bias", "alpha", "row_scale")}))
def test_sparse_linear_mixed_devices_raise_value_error(seed, rows, groups, m, devices):
    g = generator(seed)
    cols = 4 * groups
    c = Sparse24Weight.from_dense(random_24(g, rows, cols, torch.float32))
    if devices["w"] == "meta":
        c = Sparse24Weight(c.values.to("meta"), c.codes.to("meta"), c.shape)
    x = make_values(g, (m, cols), torch.float32).to(devices["x"])
    kw = {}
    for name, size in (("bias", rows), ("alpha", rows), ("row_scale", m)):
        if devices[name] is not None:
            kw[name] = (torch.rand(size, generator=g) + 0.5).to(devices[name])
    used = {d for d in devices.values() if d is not None}
    note(f"devices {devices}")
    if len(used) > 1:
        exc = expect_clean_error(lambda: weight.sparse_linear(x, c, **kw), types=(ValueError,))
        assert "meta" in str(exc) and "cpu" in str(exc), str(exc)
        # the typed op wrapper and the raw op refuse it too (the raw op through the fake kernel's device check)
        args = (x, c.values, c.codes, kw.get("bias"), kw.get("alpha"), kw.get("row_scale"))
        expect_clean_error(lambda: core.spmm_24(*args), types=(ValueError,))
        expect_clean_error(lambda: torch.ops.sparsekern.spmm_24(*args, "none", None))
        return
    y = weight.sparse_linear(x, c, **kw)
    assert y.shape == (m, rows) and y.device == x.device
    if x.device.type == "cpu":
        assert_close_spmm(y, x, c.decompress(), **{k: v for k, v in kw.items()})


# ---------------------------------------------------------------------------------------------------- bad inputs
def _valid_core_call(op: str, g: torch.Generator, rows: int, groups: int, nm: tuple[int, int]) -> dict:
    """A valid call of `op` as {name: value}, in the raw op's argument order."""
    n, m = nm if op in ("prune_nm", "nm_violation") else (2, 4)
    k = groups * m
    if op == "prune_nm":
        return dict(w=make_values(g, (rows, k), torch.float32), n=n, m=m,
                    scores=make_values(g, (rows, k), torch.float32))
    if op == "nm_violation":
        return dict(w=make_values(g, (rows, k), torch.float32), n=n, m=m)
    if op == "compress_24":
        return dict(w=random_24(g, rows, k, torch.float32))
    c = Sparse24Weight.from_dense(random_24(g, rows, k, torch.float32))
    if op == "decompress_24":
        return dict(values=c.values, codes=c.codes, cols=k)
    if op == "spmm_24":
        mm = int(torch.randint(1, 9, (1,), generator=g))
        return dict(x=make_values(g, (mm, k), torch.float32), values=c.values, codes=c.codes,
                    bias=torch.randn(rows, generator=g), alpha=torch.rand(rows, generator=g),
                    row_scale=torch.rand(mm, generator=g), activation="none", out_dtype=None)
    if op == "quantize_per_token":
        return dict(x=make_values(g, (rows, k), torch.float32), dtype=torch.int8)
    raise AssertionError(op)


CORE_OPS = ["prune_nm", "nm_violation", "compress_24", "decompress_24", "spmm_24", "quantize_per_token"]
# breaker -> ops it applies to; each one makes the call invalid by the op's documented contract
BREAKERS = {
    "to_meta": CORE_OPS,  # one tensor argument (not all) moved to the meta device
    "bad_dtype": CORE_OPS,  # a tensor argument of a dtype the op does not take
    "bad_rank": ["compress_24", "decompress_24", "spmm_24", "quantize_per_token"],  # 2-D argument made 1-D or 3-D
    "bad_k": ["prune_nm", "nm_violation", "compress_24", "decompress_24", "spmm_24"],  # K not a multiple of m / 4
    "bad_nm": ["prune_nm", "nm_violation"],  # n > m, n < 0, m <= 0, m > 32
    "shape_mismatch": ["prune_nm", "decompress_24", "spmm_24"],  # two arguments that do not fit together
    "non_finite": ["quantize_per_token"],  # Inf / NaN where finite input is required
    "bad_activation": ["spmm_24"],
    "bad_out_dtype": ["spmm_24", "quantize_per_token"],
}
BAD_DTYPES = [torch.int32, torch.bool, torch.complex64, torch.int64, torch.uint8]


def _tensor_args(call: dict) -> list[str]:
    return [k for k, v in call.items() if isinstance(v, torch.Tensor)]


def _break(op: str, call: dict, breaker: str, data) -> None:
    draw = data.draw
    if breaker == "to_meta":
        names = _tensor_args(call)
        if len(names) < 2:
            return _break(op, call, "bad_dtype", data)
        name = draw(st.sampled_from(names), label="meta arg")
        call[name] = call[name].to("meta")
    elif breaker == "bad_dtype":
        name = draw(st.sampled_from(_tensor_args(call)), label="dtype arg")
        if op == "nm_violation":  # takes any real dtype; complex is not one
            call[name] = call[name].to(torch.complex64)
        elif name == "codes":
            call[name] = call[name].to(draw(st.sampled_from([torch.int32, torch.float32, torch.int8])))
        elif name in ("bias", "alpha", "row_scale"):
            call[name] = call[name].to(draw(st.sampled_from([torch.int32, torch.bool, torch.complex64])))
        else:
            call[name] = call[name].to(draw(st.sampled_from(BAD_DTYPES)))
    elif breaker == "bad_rank":
        name = {"compress_24": "w", "decompress_24": draw(st.sampled_from(["values", "codes"])),
                "spmm_24": draw(st.sampled_from(["x", "values", "codes"])), "quantize_per_token": "x"}[op]
        t = call[name]
        call[name] = t.reshape(-1) if draw(st.booleans()) else t.unsqueeze(0).expand(2, *t.shape)
    elif breaker == "bad_k":
        delta = draw(st.integers(1, 3))
        if op in ("prune_nm", "nm_violation"):
            if call["m"] < 2:
                call["m"] = 4
            w = call["w"]
            call["w"] = torch.cat([w, w[:, :1].expand(-1, delta)], 1) if w.shape[1] % call["m"] == 0 else w
            if call["w"].shape[1] % call["m"] == 0:
                call["w"] = call["w"][:, :-1] if call["w"].shape[1] > 1 else torch.ones(call["w"].shape[0], 1)
            if "scores" in call:
                call["scores"] = torch.ones_like(call["w"])
        elif op == "compress_24":
            call["w"] = torch.cat([call["w"], torch.zeros(call["w"].shape[0], delta)], 1)
        elif op == "decompress_24":
            call["cols"] = call["cols"] + delta if draw(st.booleans()) else -call["cols"] - delta
        else:  # spmm_24: x's K differs from the weight's
            call["x"] = torch.cat([call["x"], torch.ones(call["x"].shape[0], 4 * delta)], 1)
    elif breaker == "bad_nm":
        # the ops take 0 <= n <= m, 1 <= m <= 32 (csrc/cpu/core_ops.cpp); these break that
        m = draw(st.sampled_from([0, -4, 33, 64, 4]))
        n = draw(st.sampled_from([m + 1, -1, 9])) if m == 4 else draw(st.integers(-1, 4))
        call["n"], call["m"] = n, m
    elif breaker == "shape_mismatch":
        if op == "prune_nm":
            s = call["scores"]
            call["scores"] = s[:-1] if s.shape[0] > 1 else torch.cat([s, s])
        elif op == "decompress_24":
            name = draw(st.sampled_from(["values", "codes"]))
            t = call[name]
            call[name] = torch.cat([t, t[:1]]) if draw(st.booleans()) else torch.cat([t, t[:, :1]], 1)
        else:
            name = draw(st.sampled_from(["bias", "alpha", "row_scale", "codes", "values"]))
            t = call[name]
            call[name] = torch.cat([t, t[:1]])
    elif breaker == "non_finite":
        x = call["x"].clone()
        x.view(-1)[draw(st.integers(0, x.numel() - 1))] = draw(st.sampled_from([float("inf"), float("-inf"),
                                                                                  float("nan")]))
        call["x"] = x
    elif breaker == "bad_activation":
        call["activation"] = draw(st.sampled_from(["silu", "", "RELU", "gelu_tanh"]))
    elif breaker == "bad_out_dtype":
        if op == "spmm_24":
            call["out_dtype"] = draw(st.sampled_from([torch.int8, torch.int32, torch.float64, torch.bool]))
        else:
            call["dtype"] = draw(st.sampled_from([torch.int32, torch.float16, torch.uint8, torch.float32]))


def _call_typed(op: str, call: dict):
    if op == "nm_violation":
        return core.nm_violation(call["w"], call["n"], call["m"])
    if op == "spmm_24":
        return core.spmm_24(**call)
    return getattr(core, op)(**call)


@pytest.mark.filterwarnings("ignore:Casting complex values")
@fuzz(1500)
@given(op=st.sampled_from(CORE_OPS), seed=SEEDS, rows=st.integers(1, 9), groups=st.integers(1, 5), nm=NM,
       data=st.data(), raw=st.booleans())
def test_bad_inputs_raise_a_clean_error(op, seed, rows, groups, nm, data, raw):
    g = generator(seed)
    call = _valid_core_call(op, g, rows, groups, nm)
    breakers = data.draw(st.lists(st.sampled_from([b for b, ops in BREAKERS.items() if op in ops]), min_size=1,
                                  max_size=3, unique=True), label="breakers")
    for b in sorted(breakers, key=list(BREAKERS).index, reverse=True):  # values first, dtype and device last
        _break(op, call, b, data)
    event(f"{op}: {'+'.join(sorted(breakers))}")
    note({k: _describe(v) if isinstance(v, torch.Tensor) else v for k, v in call.items()})
    fn = (lambda: getattr(torch.ops.sparsekern, op)(*call.values())) if raw else (lambda: _call_typed(op, call))
    expect_clean_error(fn)


@fuzz(500)
@given(op=st.sampled_from(CORE_OPS), seed=SEEDS, rows=st.integers(1, 9), groups=st.integers(1, 5), nm=NM)
def test_all_meta_calls_give_the_real_shapes(op, seed, rows, groups, nm):
    # Fake (meta) kernels: outputs of the same shapes and dtypes as the real op, and no data.
    call = _valid_core_call(op, generator(seed), rows, groups, nm)
    real = getattr(torch.ops.sparsekern, op)(*call.values())
    meta = getattr(torch.ops.sparsekern, op)(*[v.to("meta") if isinstance(v, torch.Tensor) else v
                                               for v in call.values()])
    real = real if isinstance(real, tuple) else (real,)
    meta = meta if isinstance(meta, tuple) else (meta,)
    assert len(real) == len(meta)
    for r, mt in zip(real, meta):
        assert mt.device.type == "meta" and mt.dtype == r.dtype
        if op != "nm_violation":
            assert mt.shape == r.shape


# ---------------------------------------------------------------------------------------------------- findings
# The raw op and its wrapper trust the codes (documented in ops.core.spmm_24: validating per call would re-read the
# codes every decode step, and synchronise on CUDA); every entry point that builds a weight from outside data
# validates them once. This checks that rule where the public API meets invalid codes.
def test_invalid_codes_are_refused_where_compressed_data_enters():
    w = core.prune_nm(torch.randn(4, 64), 2, 4)[0].to(torch.bfloat16)
    values, codes = core.compress_24(w)
    codes[:] = 0xFF  # code 15 in every group: positions (3, 3), not a 2:4 pattern
    from sparsekern.weight import Sparse24Weight, codes_violation

    assert "invalid pattern code 15" in codes_violation(codes, 64)
    with pytest.raises(ValueError, match="invalid pattern code 15"):
        Sparse24Weight(values, codes, (4, 64))
    assert "trusted" in core.spmm_24.__doc__


def test_sparse_linear_validates_replaced_codes_buffer():
    from sparsekern.linear import SparseLinear

    lin = torch.nn.Linear(64, 4)
    with torch.no_grad():
        lin.weight.copy_(core.prune_nm(lin.weight, 2, 4)[0])
    layer = SparseLinear.from_linear(lin.to(torch.bfloat16))
    layer.codes = torch.full_like(layer.codes, 0xFF)  # what a device-map loader does, with corrupt data
    with pytest.raises(ValueError, match="code"):
        layer(torch.randn(3, 64).to(torch.bfloat16))
