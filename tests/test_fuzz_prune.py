"""Property-based tests of the pruning engine: the ops (sparsekern.ops.prune) and the algorithms (sparsekern.prune).

Every pruned output must satisfy its N:M pattern exactly (is_nm, and exactly m - n kept per group), every mask must
agree with its weight, and the statistics and selections must match float64 / exact references (the loop-structured
oracles of test_prune_oracles.py where they are fast enough, vectorised or float64 forms of them otherwise).
Budget and long mode: tests/fuzz_support.py, docs/fuzzing.md.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import event, given, note
from hypothesis import strategies as st

from fuzz_support import fuzz_threads  # noqa: F401  (autouse: one intra-op thread)
from fuzz_support import GROUPS, NM, SEEDS, SIZES, fuzz, generator, make_values, nm_keep_reference
from sparsekern import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}")

if _ext.available():
    import sparsekern.prune as P
    from sparsekern.ops import core
    from sparsekern.ops import prune as ops
    from test_prune_oracles import act_scale_oracle, hessian_oracle, wanda_oracle

CLEAN_ERRORS = (RuntimeError, ValueError, TypeError)
HALF_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _batches(g, count_shapes, cols, dtype, style):
    """Activation batches [B, T, C] (B sequences) or [T, C] (one sequence), some non-contiguous."""
    out = []
    for b, t, strided in count_shapes:
        shape = (t, cols) if b == 0 else (b, t, cols)
        x = make_values(g, shape, torch.float64, style)
        x = x * torch.pow(2.0, torch.randint(-6, 7, (cols,), generator=g).double())  # per-feature scales
        x = x.to(dtype)
        if strided:
            x = torch.cat([x, x], dim=-1)[..., ::2]
        out.append(x)
    return out


BATCH_SHAPES = st.lists(st.tuples(st.integers(0, 3), st.integers(1, 9), st.booleans()), min_size=1, max_size=3)


# ---------------------------------------------------------------------------------------------------- statistics
@fuzz(800)
@given(seed=SEEDS, cols=SIZES, shapes=BATCH_SHAPES, dtype=st.sampled_from(HALF_DTYPES),
       style=st.sampled_from(["normal", "ties", "sparse"]), start=st.integers(0, 5))
def test_hessian_and_act_scale_updates_match_float64_references(seed, cols, shapes, dtype, style, start):
    g = generator(seed)
    xs = _batches(g, shapes, cols, dtype, style)
    H = torch.full((cols, cols), float("nan"))  # first call (nsamples = 0): the old content is ignored
    s = torch.full((cols,), float("nan"))
    n = 0
    prior = []
    if start:  # a running statistic that already saw `start` sequences
        prior = [make_values(g, (start, 3, cols), torch.float32)]
        ops.hessian_update_(H, prior[0], 0, start)
        ops.act_scale_update_(s, prior[0], 0, start)
        n = start
    for x in xs:
        b = x.shape[0] if x.dim() == 3 else 1
        ops.hessian_update_(H, x, n, b)
        ops.act_scale_update_(s, x, n, b)
        n += b
    ref_h = hessian_oracle(prior + [x.double() for x in xs])
    ref_s = act_scale_oracle(prior + [x.double() for x in xs])
    # float32 accumulation of at most a few dozen tokens against float64 (test_prune_stats.py's 1e-5)
    rtol = 1e-5
    assert torch.isfinite(H).all() and torch.isfinite(s).all()
    assert torch.equal(H, H.t())
    assert torch.allclose(H.double(), ref_h, rtol=rtol, atol=rtol * ref_h.abs().max().item())
    assert torch.allclose(s.double(), ref_s, rtol=rtol, atol=rtol * ref_s.abs().max().item())
    assert bool((s >= 0).all()) and bool((torch.diagonal(H) >= 0).all())


# ---------------------------------------------------------------------------------------------------- wanda
def _wanda_reference(w, s, n, m, sparsity):
    """(pruned, keep): test_prune_oracles.wanda_oracle, with its N:M per-group loop replaced by the vectorised
    stable-sort form (same rule: the metric float32 |w| * sqrt(s), ties keep the lower column)."""
    if m == 0:
        return wanda_oracle(w, s, n, m, sparsity)
    metric = torch.abs(w).float() * torch.sqrt(s.float()).reshape(1, -1)
    keep = nm_keep_reference(metric, n, m)
    return torch.where(keep, w, torch.zeros_like(w)), keep


@st.composite
def pattern_case(draw, allow_unstructured=True):
    if allow_unstructured and draw(st.integers(0, 3)) == 0:
        return 0, 0, draw(st.sampled_from([0.1, 0.25, 0.5, 0.6, 0.75, 0.9]))
    n, m = draw(NM)
    return n, m, n / m


@fuzz(1000)
@given(seed=SEEDS, rows=SIZES, groups=GROUPS, pat=pattern_case(), dtype=st.sampled_from(HALF_DTYPES),
       style=st.sampled_from(["normal", "ties", "sparse", "wide"]), zero_scales=st.booleans())
def test_wanda_prune_matches_reference(seed, rows, groups, pat, dtype, style, zero_scales):
    n, m, sparsity = pat
    g = generator(seed)
    cols = groups * (m or 4)
    w = make_values(g, (rows, cols), dtype, style)
    s = make_values(g, (cols,), torch.float32, "ties" if style == "ties" else "normal").abs()
    if zero_scales:
        s[torch.rand(cols, generator=g) < 0.3] = 0  # dead input features
    pruned, keep = ops.wanda_prune(w, s, n, m, sparsity)
    ref_w, ref_keep = _wanda_reference(w, s, n, m, sparsity)
    assert pruned.dtype == w.dtype and keep.dtype == torch.bool
    assert torch.equal(keep, ref_keep)
    assert torch.equal(pruned, ref_w)
    if m:
        assert core.is_nm(pruned, n, m) and bool((keep.view(rows, -1, m).sum(-1) == m - n).all())
    else:
        assert bool((keep.sum(1) == cols - int(cols * sparsity)).all())
    # the algorithm's entry point: the same selection through sparsekern.prune.wanda
    r = P.wanda(w, s, f"{n}:{m}" if m else sparsity)
    assert torch.equal(r.mask, keep) and torch.equal(r.weight, pruned) and r.loss is None


@fuzz(1000)
@given(seed=SEEDS, rows=SIZES, groups=GROUPS, pat=pattern_case(), dtype=st.sampled_from(HALF_DTYPES),
       style=st.sampled_from(["normal", "ties", "sparse", "wide"]))
def test_magnitude_matches_prune_nm_and_threshold_rule(seed, rows, groups, pat, dtype, style):
    n, m, sparsity = pat
    g = generator(seed)
    cols = groups * (m or 4)
    w = make_values(g, (rows, cols), dtype, style)
    w0 = w.clone()
    r = P.magnitude(w, f"{n}:{m}" if m else sparsity)
    assert torch.equal(w, w0)  # the input is not modified
    assert r.weight.dtype == w.dtype and r.mask.dtype == torch.bool and r.loss is None
    assert torch.equal(r.weight, torch.where(r.mask, w, torch.zeros_like(w)))
    if m:
        pruned, mask = core.prune_nm(w, n, m)
        assert torch.equal(r.mask, mask) and torch.equal(r.weight, pruned)
        assert core.is_nm(r.weight, n, m) and bool((r.mask.view(rows, -1, m).sum(-1) == m - n).all())
    else:
        a = w.double().abs().flatten()
        thresh = torch.sort(a).values[int(a.numel() * sparsity)]
        assert torch.equal(r.mask, w.double().abs() > thresh)


# ---------------------------------------------------------------------------------------------------- sparsegpt
def sparsegpt_reference64(w, H, n, m, sparsity, blocksize, percdamp=0.01, bits=None):
    """test_prune_oracles.sparsegpt_oracle (the reference's column loop) in float64 throughout, so that a float64
    run of sparsekern.prune.sparsegpt can be compared with it mask for mask."""
    W = w.clone().double()
    H = H.clone().double()
    rows, cols = W.shape
    quant = None
    if bits:
        maxq = 2**bits - 1
        zeros = torch.zeros(rows, dtype=torch.float64)
        xmin, xmax = torch.minimum(W.min(1)[0], zeros), torch.maximum(W.max(1)[0], zeros)
        both = (xmin == 0) & (xmax == 0)
        xmin[both], xmax[both] = -1, +1
        scale = (xmax - xmin) / maxq
        quant = (scale.unsqueeze(1), torch.round(-xmin / scale).unsqueeze(1), maxq)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    losses = torch.zeros(rows, dtype=torch.float64)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if m == 0:
            tmp = W1**2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            mask1 = tmp <= torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w_, d = W1[:, i], Hinv1[i, i]
            if m > 0 and i % m == 0:
                tmp = W1[:, i:i + m] ** 2 / torch.diag(Hinv1)[i:i + m].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, n, dim=1, largest=False)[1], True)
            q = torch.where(mask1[:, i], torch.zeros_like(w_), w_)
            if quant is not None:
                sc, zr, mq = quant
                q = (sc * (torch.clamp(torch.round(q.unsqueeze(1) / sc) + zr, 0, mq) - zr)).flatten()
            Q1[:, i] = q
            losses += (w_ - q) ** 2 / d**2 / 2
            err1 = (w_ - q) / d
            W1[:, i:] -= err1.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, keep, losses


def _hessian(g, cols, tokens, dead):
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64)
    x = x * torch.pow(2.0, torch.randint(-3, 4, (cols,), generator=g).double())
    if dead:
        x[:, torch.rand(cols, generator=g) < 0.15] = 0  # dead input features: diag(H) == 0
    return 2 / tokens * x.t() @ x


@st.composite
def sparsegpt_case(draw):
    n, m, sparsity = draw(pattern_case())
    groups = draw(st.integers(1, 16 if m <= 4 else 8))
    cols = groups * (m or 4)
    blocksize = draw(st.sampled_from([m or 4, 2 * (m or 4), 8 * (m or 4), 128]))
    if m and blocksize % m:
        blocksize = m
    return dict(n=n, m=m, sparsity=sparsity, cols=cols, blocksize=blocksize, rows=draw(st.integers(1, 24)),
                tokens=draw(st.integers(1, 48)), dead=draw(st.booleans()), seed=draw(SEEDS),
                bits=draw(st.sampled_from([None, None, 8, 4])), dtype=draw(st.sampled_from(HALF_DTYPES)))


def _check_pruned(r, w, n, m, sparsity):
    rows, cols = w.shape
    assert r.weight.dtype == w.dtype and r.weight.shape == w.shape and r.mask.dtype == torch.bool
    assert bool(torch.isfinite(r.weight.float()).all()) and bool(torch.isfinite(r.loss).all())
    assert bool((r.loss >= 0).all())
    assert bool(((r.weight != 0) <= r.mask).all()), "a pruned position holds a non-zero weight"
    if m:
        assert core.is_nm(r.weight, n, m)
        assert bool((r.mask.view(rows, -1, m).sum(-1) == m - n).all())


@fuzz(600)
@given(case=sparsegpt_case())
def test_sparsegpt_float64_matches_reference_and_nm_is_exact(case):
    n, m, sparsity, bits = case["n"], case["m"], case["sparsity"], case["bits"]
    g = generator(case["seed"])
    rows, cols = case["rows"], case["cols"]
    H = _hessian(g, cols, case["tokens"], case["dead"])
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    pattern = f"{n}:{m}" if m else sparsity
    quant = {None: None, 8: "int8-minmax", 4: "int4"}[bits]
    w0, H0 = w.clone(), H.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a retry with more damping warns; the reference does not
        try:
            r = P.sparsegpt(w, H, pattern, blocksize=case["blocksize"], quant=quant)
        except RuntimeError as exc:  # not positive definite even with 1000x damping: a clear error, no result
            assert "positive definite" in str(exc)
            event("Hessian refused")
            return
    assert torch.equal(w, w0) and torch.equal(H, H0)
    _check_pruned(r, w, n, m, sparsity)
    if bits is None:
        ref_w, ref_keep, ref_loss = sparsegpt_reference64(w, H, n, m, sparsity, case["blocksize"])
    else:
        ref_w, ref_keep, ref_loss = sparsegpt_reference64(w, H, n, m, sparsity, case["blocksize"], bits=bits)
    if not torch.equal(r.mask, ref_keep):
        # Dead input features (diag(H) == 0) hold zero weights: an exact tie, which the reference's torch.topk breaks
        # its own way. Any other difference is a wrong selection. The two choices give the same weights and losses.
        dead = torch.diagonal(H) == 0
        differ = (r.mask != ref_keep).any(0)
        assert bool(dead[differ].all()), f"masks differ outside the dead columns: {differ.nonzero().flatten()}"
        event("mask differs from the reference only in dead columns (zero-weight ties)")
    scale = max(ref_w.abs().max().item(), 1e-300)
    assert (r.weight - ref_w).abs().max().item() <= 1e-7 * scale
    assert torch.allclose(r.loss, ref_loss, rtol=1e-7, atol=1e-12 * max(ref_loss.abs().max().item(), 1.0))


@fuzz(400)
@given(case=sparsegpt_case())
def test_sparsegpt_low_precision_keeps_the_pattern(case):
    n, m, sparsity = case["n"], case["m"], case["sparsity"]
    g = generator(case["seed"])
    H = _hessian(g, case["cols"], case["tokens"], case["dead"]).float()
    w = make_values(g, (case["rows"], case["cols"]), case["dtype"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            r = P.sparsegpt(w, H, f"{n}:{m}" if m else sparsity, blocksize=case["blocksize"])
        except RuntimeError as exc:
            assert "positive definite" in str(exc)
            return
    _check_pruned(r, w, n, m, sparsity)


@fuzz(800)
@given(seed=SEEDS, rows=SIZES, nm=NM, groups=st.integers(1, 8), dtype=st.sampled_from([torch.float32, torch.float64]),
       unstructured=st.booleans(), quant=st.booleans(), offset=st.integers(0, 8))
def test_sparsegpt_block_op_invariants(seed, rows, nm, groups, dtype, unstructured, quant, offset):
    n, m = (0, 0) if unstructured else nm
    bs = groups * (nm[1] if not unstructured else 4)
    g = generator(seed)
    A = torch.randn(bs, bs, generator=g, dtype=torch.float64)
    U = torch.linalg.cholesky(A @ A.t() + bs * torch.eye(bs, dtype=torch.float64), upper=True).to(dtype)
    big = make_values(g, (rows, bs + offset + 3), dtype)
    before = big.clone()
    w1 = big[:, offset:offset + bs]  # a column slice with contiguous rows, updated in place
    orig = w1.clone()
    prune_mask = (torch.rand(rows, bs, generator=g) < 0.5) if unstructured else None
    qscale = qzero = None
    maxq = 0
    if quant:
        qscale, qzero, maxq = P.minmax_quantizer(orig, 8)
    err, loss, keep = ops.sparsegpt_prune_block_(w1, U, n, m, prune_mask, qscale, qzero, maxq)
    assert err.shape == (rows, bs) and loss.shape == (rows,) and keep.shape == (rows, bs) and keep.dtype == torch.bool
    assert torch.equal(big[:, :offset], before[:, :offset]) and torch.equal(big[:, offset + bs:],
                                                                            before[:, offset + bs:])
    assert bool(torch.isfinite(w1).all()) and bool(torch.isfinite(err).all()) and bool((loss >= 0).all())
    assert bool(((w1 != 0) <= keep).all()), "a pruned position holds a non-zero weight"
    if unstructured:
        assert torch.equal(keep, ~prune_mask)
    else:
        assert core.is_nm(w1, n, m) and bool((keep.view(rows, -1, m).sum(-1) == m - n).all())
    if quant:  # the kept values lie on the quantiser's grid
        codes = w1 / qscale[:, None] + qzero[:, None]
        assert torch.allclose(codes, codes.round(), atol=1e-3)


# ---------------------------------------------------------------------------------------------------- bad inputs
def _valid_prune_call(op, g, rows, groups):
    cols = 4 * groups
    if op == "hessian_update_":
        return dict(H=torch.zeros(cols, cols), x=make_values(g, (2, 3, cols), torch.float32), nsamples=0, batch=2)
    if op == "act_scale_update_":
        return dict(s=torch.zeros(cols), x=make_values(g, (2, 3, cols), torch.float32), nsamples=0, batch=2)
    if op == "wanda_prune":
        return dict(w=make_values(g, (rows, cols), torch.float32), act_scale=torch.rand(cols, generator=g), n=2, m=4,
                    sparsity=0.0)
    A = torch.randn(cols, cols, generator=g)
    U = torch.linalg.cholesky(A @ A.t() + cols * torch.eye(cols), upper=True)
    return dict(w1=make_values(g, (rows, cols), torch.float32), hinv1=U, n=2, m=4, prune_mask=None, qscale=None,
                qzero=None, maxq=0)


PRUNE_OPS = ["hessian_update_", "act_scale_update_", "wanda_prune", "sparsegpt_prune_block_"]


def _break_prune(op, call, breaker, draw):
    tensors = [k for k, v in call.items() if isinstance(v, torch.Tensor)]
    if breaker == "to_meta":
        name = draw(st.sampled_from(tensors))
        call[name] = call[name].to("meta")
    elif breaker == "bad_dtype":
        name = draw(st.sampled_from(tensors))
        call[name] = call[name].to(draw(st.sampled_from([torch.int32, torch.bool, torch.int64, torch.uint8])))
    elif breaker == "bad_shape":
        name = draw(st.sampled_from(tensors))
        t = call[name]
        how = draw(st.sampled_from(["drop_col", "rank"]))
        if how == "rank" and name != "x":
            call[name] = t.reshape(-1) if t.dim() > 1 else t.reshape(1, 1, -1)
        else:
            call[name] = torch.cat([t, t.narrow(-1, 0, 1)], -1)
    elif breaker == "bad_counts":
        if op in ("hessian_update_", "act_scale_update_"):
            call["nsamples"], call["batch"] = draw(st.sampled_from([(-1, 2), (0, 0), (0, -3), (2**62, 2**62),
                                                                    (2**63 - 1, 1)]))
        elif op == "wanda_prune":  # m = 7 never divides the width 4 * groups (groups <= 5)
            call["n"], call["m"], call["sparsity"] = draw(st.sampled_from([(5, 4, 0.0), (-1, 4, 0.0), (2, 7, 0.0),
                                                                           (0, 0, 1.5), (0, 0, -0.1), (2, 64, 0.0)]))
        else:
            call["n"], call["m"] = draw(st.sampled_from([(5, 4), (-1, 4), (2, 7), (2, 64)]))
    elif breaker == "non_finite":
        name = {"hessian_update_": "x", "act_scale_update_": "x", "wanda_prune": "w",
                "sparsegpt_prune_block_": "hinv1"}[op]
        t = call[name].clone()
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(st.sampled_from([float("nan"), float("inf")]))
        call[name] = t


PRUNE_BREAKERS = {
    "hessian_update_": ["to_meta", "bad_dtype", "bad_shape", "bad_counts"],
    "act_scale_update_": ["to_meta", "bad_dtype", "bad_shape", "bad_counts"],
    "wanda_prune": ["to_meta", "bad_dtype", "bad_shape", "bad_counts", "non_finite"],
    "sparsegpt_prune_block_": ["to_meta", "bad_dtype", "bad_shape", "bad_counts"],
}
_ORDER = ["to_meta", "bad_dtype", "bad_shape", "bad_counts", "non_finite"]


@fuzz(1200)
@given(op=st.sampled_from(PRUNE_OPS), seed=SEEDS, rows=st.integers(1, 9), groups=st.integers(1, 5), data=st.data())
def test_bad_pruning_inputs_raise_a_clean_error(op, seed, rows, groups, data):
    call = _valid_prune_call(op, generator(seed), rows, groups)
    breakers = data.draw(st.lists(st.sampled_from(PRUNE_BREAKERS[op]), min_size=1, max_size=3, unique=True),
                         label="breakers")
    for b in sorted(breakers, key=_ORDER.index, reverse=True):  # values first, dtype and device last
        _break_prune(op, call, b, data.draw)
    event(f"{op}: {'+'.join(sorted(breakers))}")
    note({k: (f"{v.dtype} {list(v.shape)} {v.device}" if isinstance(v, torch.Tensor) else v) for k, v in call.items()})
    try:
        out = getattr(ops, op)(**call)
    except CLEAN_ERRORS as exc:
        assert str(exc).strip()
        return
    raise AssertionError(f"{op} accepted an invalid call and returned {type(out).__name__}")


@fuzz(600)
@given(seed=SEEDS, rows=st.integers(1, 6), groups=st.integers(1, 4), data=st.data(),
       which=st.sampled_from(["magnitude", "wanda", "sparsegpt"]))
def test_bad_algorithm_arguments_raise_value_error(seed, rows, groups, data, which):
    # Arguments the algorithms document as invalid: a bad pattern, K not divisible by m, a non-2-D or non-floating
    # weight, NaN / Inf, a mismatched act_scale / hessian.
    g = generator(seed)
    cols = 4 * groups
    w = make_values(g, (rows, cols), torch.float32)
    s = torch.rand(cols, generator=g)
    H = _hessian(g, cols, 8, False).float()
    pattern = "2:4"
    bad = data.draw(st.sampled_from(["pattern", "divisible", "rank", "int_weight", "nan", "scale_shape", "neg_scale"]))
    if bad == "pattern":
        pattern = data.draw(st.sampled_from(["5:4", "2:x", "0:4", "4:4", "1.5", "0", "-0.5", "2:64", "", "2:4:8",
                                             True, 1.0, None]))
    elif bad == "divisible":
        w, s, H = w[:, :-1], s[:-1], H[:-1, :-1]
    elif bad == "rank":
        w = w.reshape(-1)
    elif bad == "int_weight":
        w = w.to(torch.int32)
    elif bad == "nan":
        w = w.clone()
        w.view(-1)[data.draw(st.integers(0, w.numel() - 1))] = data.draw(st.sampled_from([float("nan"),
                                                                                        float("inf")]))
        pattern = data.draw(st.sampled_from(["2:4", 0.5]))
    elif bad == "scale_shape":
        s, H = s[:-1], H[:-1]
        if which == "magnitude":
            pattern = "3:4:1"
    elif bad == "neg_scale":
        s = -s - 1
        H = -H - torch.eye(cols)
        if which == "magnitude":
            pattern = "nope"
    note(f"{which} {bad} pattern={pattern!r}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            if which == "magnitude":
                out = P.magnitude(w, pattern)
            elif which == "wanda":
                out = P.wanda(w, s, pattern)
            else:
                out = P.sparsegpt(w, H, pattern)
        except (ValueError, RuntimeError) as exc:
            assert str(exc).strip()
            return
    raise AssertionError(f"{which} accepted {bad} and returned {type(out).__name__}")
