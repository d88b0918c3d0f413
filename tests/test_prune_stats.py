"""Calibration statistics (HessianStats / ActScaleStats, ops hessian_update_ / act_scale_update_) against the
references' running-mean update done in float64 (test_prune_oracles.py). Tolerance: 1e-5 relative (float32
accumulation of a few hundred tokens against float64)."""

from __future__ import annotations

import pytest
import torch

import sparsekern.prune as P
from sparsekern.ops import prune as ops
from test_prune_oracles import act_scale_oracle, hessian_oracle, realistic_activations

RTOL = 1e-5


def _batches(cols):
    # [B, T, C] batches of different B (B counts sequences), then a [T, C] one (one sequence)
    return [realistic_activations(2, 7, cols, seed=1), realistic_activations(3, 7, cols, seed=2),
            realistic_activations(1, 7, cols, seed=3)[0]]


@pytest.mark.parametrize("cols", [5, 64, 130])
def test_hessian_stats_match_reference_update(device, cols):
    st = P.HessianStats(cols, device)
    for x in _batches(cols):
        st.add(x.to(device))
    ref = hessian_oracle(_batches(cols))
    assert st.nsamples == 6
    assert torch.allclose(st.value.cpu().double(), ref, rtol=RTOL, atol=RTOL * ref.abs().max().item())


@pytest.mark.parametrize("cols", [191, 192, 200, 577])
def test_hessian_update_on_the_upper_panels_is_complete_and_symmetric(device, cols):
    # From 192 columns on, the CPU kernel computes only the upper block-triangle of X^T X (column panels) and
    # mirrors it: H must still be the full running mean, exactly symmetric (CPU), after every call. Odd widths
    # give a ragged last panel; 191 is the last width done as one full GEMM. The first call's beta = 0 ignores
    # whatever H held (NaN here), as the op promises.
    H = torch.full((cols, cols), float("nan"), device=device)
    n = 0
    seen = []
    for x in _batches(cols):
        b = x.shape[0] if x.dim() == 3 else 1
        ops.hessian_update_(H, x.to(device), n, b)
        n += b
        seen.append(x)
        ref = hessian_oracle(seen)
        got = H.cpu().double()
        if device == "cpu":  # the CPU kernel's promise (it mirrors); the CUDA kernel makes none
            assert torch.equal(H, H.t())
        assert torch.allclose(got, ref, rtol=RTOL, atol=RTOL * ref.abs().max().item())


@pytest.mark.parametrize("cols", [5, 64, 300])
def test_act_scale_stats_match_reference_update(device, cols):
    st = P.ActScaleStats(cols, device)
    for x in _batches(cols):
        st.add(x.to(device))
    ref = act_scale_oracle(_batches(cols))
    assert st.nsamples == 6
    assert torch.allclose(st.value.cpu().double(), ref, rtol=RTOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stats_accept_half_inputs(device, dtype):
    x = realistic_activations(2, 9, 48).to(dtype)
    h, s = P.HessianStats(48, device), P.ActScaleStats(48, device)
    h.add(x.to(device))
    s.add(x.to(device))
    assert torch.allclose(h.value.cpu().double(), hessian_oracle([x.float()]), rtol=RTOL, atol=1e-3)
    assert torch.allclose(s.value.cpu().double(), act_scale_oracle([x.float()]), rtol=RTOL)


def test_stats_from_forward_hooks():
    lin = torch.nn.Linear(32, 8)
    h, s = P.HessianStats(32), P.ActScaleStats(32)
    handles = [h.attach(lin), s.attach(lin)]
    xs = [realistic_activations(1, 10, 32, seed=i) for i in range(3)]
    with torch.no_grad():
        for x in xs:
            lin(x)
    for hd in handles:
        hd.remove()
    assert h.nsamples == s.nsamples == 3
    assert torch.allclose(h.value.double(), hessian_oracle(xs), rtol=RTOL, atol=1e-3)
    assert torch.allclose(s.value.double(), act_scale_oracle(xs), rtol=RTOL)


def test_update_reads_float32_input_in_place():
    # "usable from a forward hook without extra copies": a float32 batch with contiguous rows is not copied. A
    # strided view (every second feature) is fine too and gives the same result as its contiguous copy.
    x = realistic_activations(2, 6, 64)
    H1 = torch.empty(32, 32)
    ops.hessian_update_(H1, x[..., ::2], 0, 2)
    H2 = torch.empty(32, 32)
    ops.hessian_update_(H2, x[..., ::2].contiguous(), 0, 2)
    assert torch.allclose(H1, H2, rtol=1e-6)


def test_stats_bad_inputs():
    st = P.HessianStats(16)
    with pytest.raises(ValueError, match=r"x must be \[B, T, C\] or \[T, C\] with C = 16"):
        st.add(torch.randn(3, 15))
    with pytest.raises(ValueError, match=r"x must be \[B, T, C\] or \[T, C\] with C = 16"):
        P.ActScaleStats(16).add(torch.randn(16))
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        P.HessianStats(0)
    with pytest.raises(RuntimeError, match="H must be square"):
        ops.hessian_update_(torch.zeros(16, 8), torch.randn(4, 16), 0, 1)
    with pytest.raises(RuntimeError, match=r"x must be \[..., C\] with C = 16"):
        ops.act_scale_update_(torch.zeros(16), torch.randn(4, 8), 0, 1)
    with pytest.raises(RuntimeError, match="batch .* must be >= 1"):
        ops.act_scale_update_(torch.zeros(16), torch.randn(4, 16), 0, 0)
    with pytest.raises(RuntimeError, match="the statistic must be float32"):
        ops.hessian_update_(torch.zeros(16, 16, dtype=torch.float64), torch.randn(4, 16), 0, 1)


@pytest.mark.parametrize("name", ["hessian_update_", "act_scale_update_"])
def test_opcheck_stats_updates(device, name):
    x = realistic_activations(2, 5, 24).to(device)
    stat = torch.rand(24, 24, device=device) if name == "hessian_update_" else torch.rand(24, device=device)
    torch.library.opcheck(getattr(torch.ops.sparsekern, name).default, (stat, x, 3, 2))


def test_update_ops_refuse_empty_and_overflowing_counts():
    # issue 16: C = 0 and nsamples + batch >= 2^63 were accepted
    from sparsekern.ops import prune as pops

    with pytest.raises(RuntimeError, match="hessian_update_: the statistic has C = 0 columns"):
        pops.hessian_update_(torch.zeros(0, 0), torch.zeros(3, 0), 0, 1)
    with pytest.raises(RuntimeError, match="act_scale_update_: the statistic has C = 0 columns"):
        pops.act_scale_update_(torch.zeros(0), torch.zeros(3, 0), 0, 1)
    with pytest.raises(RuntimeError, match="nsamples \\+ batch must stay below 2\\^63"):
        pops.hessian_update_(torch.zeros(4, 4), torch.randn(3, 4), 2 ** 63 - 2, 2)
    H = torch.zeros(4, 4)
    pops.hessian_update_(H, torch.randn(3, 4), 2 ** 62, 1)  # large but representable counts still work
    assert torch.isfinite(H).all()
