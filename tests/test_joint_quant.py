"""SparseGPT's joint quantisation on the grid SparseLinear's W8A8 kernels store (sparsekern.quant), and carrying that
grid to sparsify so that nothing is re-rounded.

- the e4m3 rounding of csrc/core/prune.h (reached through the block op with maxq = -1) equals torch's
  float8_e4m3fn cast bit for bit; the int8 selector (qzero = 127, maxq = 254) is clamp(round(w / s), -127, 127)
  exactly; the min-max grid (maxq = 2^bits - 1) is unchanged;
- sparsegpt(quant="int8" | "fp8") returns weights on the grid (scale fitted on the weight before pruning, returned
  in PruneResult.scale), "int8-minmax" / "int4" keep the reference's min-max grid;
- attach_weight_grid + sparsify: the SparseLinear stores the optimised codes and scale (float32 and bfloat16 models);
  a weight changed after pruning warns and gets a fresh scale; a grid of another quant is ignored.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import sparsekern.prune as P
from sparsekern.convert import sparsify
from sparsekern.linear import SparseLinear
from sparsekern.ops import prune as ops
from sparsekern.quant import (
    attach_weight_grid,
    fit_weight_scale,
    quantize_weight,
    quantize_weight_on_grid,
    weight_grid,
)
from test_prune_oracles import hessian_oracle, realistic_activations, sparsegpt_oracle

FP8 = torch.float8_e4m3fn


def _layer(rows, cols, seed=0, tokens=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    x = realistic_activations(4, tokens, cols, seed=seed)
    return w, hessian_oracle([x]).float()


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The IEEE bits of a float32 tensor, with -0 read as +0 (a -0 weight and a +0 one are the same weight)."""
    return (t.float() + 0.0).view(torch.int32)


def _block_quantise(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, device) -> torch.Tensor:
    """The block op's quantiser alone: one column (bs = 1, Hinv1 = [[1]]), so every row is one quantised value."""
    w1 = x.reshape(-1, 1).to(device).clone()
    hinv = torch.ones(1, 1, dtype=x.dtype, device=device)
    ops.sparsegpt_prune_block_(w1, hinv, 0, 0, None, scale.to(device, x.dtype), zero.to(device, x.dtype), maxq)
    return w1.flatten().cpu()


def _e4m3_probe_values() -> torch.Tensor:
    """float32 values covering every e4m3 binade and the subnormals, exact ties and their neighbours, 448 and
    beyond, signed zeros, float32 subnormals."""
    g = torch.Generator().manual_seed(11)
    e4m3 = torch.arange(0, 256, dtype=torch.uint8).view(FP8).float()
    e4m3 = e4m3[torch.isfinite(e4m3)].unique()
    pos = e4m3[e4m3 >= 0]
    mids = (pos[1:] + pos[:-1]) / 2  # exact in float32: every tie of the rounding, subnormal and normal
    ulp = torch.nextafter(mids, torch.full_like(mids, float("inf"))) - mids
    near = torch.cat([mids, mids + ulp, mids - ulp, torch.nextafter(pos, torch.zeros_like(pos))])
    # random magnitudes over every float32 exponent from 2^-140 (float32 subnormals) to 2^9, random mantissas
    expo = torch.randint(-140, 10, (20000,), generator=g).float()
    rnd = torch.rand(20000, generator=g).add_(1.0) * torch.exp2(expo)
    edge = torch.tensor([448.0, 447.9, 448.1, 456.0, 460.0, 464.0, 470.0, 480.0, 1e6, 2.0**-6, 2.0**-9, 2.0**-10,
                         3 * 2.0**-11, 1e-45, 0.0, -0.0])
    v = torch.cat([e4m3, near, rnd, edge])
    return torch.cat([v, -v])


# ---------------------------------------------------------------- the kernels' quantisers


def test_e4m3_rounding_matches_torch_cast_bit_for_bit(device):
    x = _e4m3_probe_values()
    ref = x.clamp(-448, 448).to(FP8).float()
    one = torch.ones(x.numel())
    got = _block_quantise(x, one, torch.zeros_like(one), -1, device)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))  # signed zeros included
    # with per-row scales: q = s * e4m3(clamp(x / s, -448, 448)), each step rounded as torch rounds it
    g = torch.Generator().manual_seed(12)
    s = torch.exp2(torch.randint(-12, 4, (x.numel(),), generator=g).float()) * (1 + torch.rand(x.numel(), generator=g))
    ref_s = (x / s).clamp(-448, 448).to(FP8).float() * s
    got_s = _block_quantise(x, s, torch.zeros_like(s), -1, device)
    assert torch.equal(got_s.view(torch.int32), ref_s.view(torch.int32))


def test_e4m3_rounding_in_float64(device):
    # The float64 kernel rounds a double once, directly: equal to the cast for every float32-representable value,
    # and a double just above a tie rounds up (a cast through float32 would lose the excess and round to even).
    x = _e4m3_probe_values()
    one = torch.ones(x.numel(), dtype=torch.float64)
    got = _block_quantise(x.double(), one, torch.zeros_like(one), -1, device)
    assert torch.equal(got, x.clamp(-448, 448).to(FP8).double())
    ties = torch.tensor([1.0625, 2.0**-9 * 2.5, 0.5 + 2.0**-5], dtype=torch.float64)  # 1+1/16, 2.5 * 2^-9, ...
    above = ties * (1 + 2.0**-40)
    one = torch.ones(3, dtype=torch.float64)
    got = _block_quantise(above, one, torch.zeros_like(one), -1, device)
    assert torch.equal(got, torch.tensor([1.125, 3 * 2.0**-9, 0.5 + 2.0**-4], dtype=torch.float64))
    assert torch.equal(above.to(FP8).double(), torch.tensor([1.0, 2 * 2.0**-9, 0.5], dtype=torch.float64))


def test_int8_selector_is_the_symmetric_grid(device):
    # clamp(round(r) + 127, 0, 254) - 127 == clamp(round(r), -127, 127) for every float r, ties and far-out values
    # included, so the min-max kernel with zero = 127, maxq = 254 is the int8 W8A8 grid exactly.
    g = torch.Generator().manual_seed(13)
    r = torch.cat([torch.randn(20000, generator=g) * 100, torch.arange(-300, 301).float() + 0.5,
                   torch.arange(-300, 301).float(), torch.tensor([1e30, -1e30, 2.0**24 + 2, -(2.0**24) - 2])])
    assert torch.equal(torch.clamp(torch.round(r) + 127, 0, 254) - 127, torch.clamp(torch.round(r), -127, 127))
    x = torch.randn(20000, generator=g) * 0.05
    s = x.abs().max() / 127 * (0.5 + torch.rand(20000, generator=g))  # some values fall outside the row's range
    x[:1201] = (torch.arange(-600, 601).float() + 0.5) * s[:1201]  # x / s exactly at (or next to) a tie
    ref = s * torch.clamp(torch.round(x / s), -127, 127)
    got = _block_quantise(x, s, torch.full_like(s, 127.0), 254, device)
    assert torch.equal(_bits(got), _bits(ref))


@pytest.mark.parametrize("bits", [8, 4])
def test_minmax_grid_is_unchanged(device, bits):
    # existing callers (maxq = 2^bits - 1): scale * (clamp(round(x / scale) + zero, 0, maxq) - zero), bit for bit
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(64, 16, generator=g) * 0.03
    scale, zero, maxq = P.minmax_quantizer(W, bits)
    x = (W + torch.randn(64, 16, generator=g) * 0.01).t().reshape(-1)  # 16 values per row, some out of range
    sc, zr = scale.repeat(16), zero.repeat(16)
    ref = sc * (torch.clamp(torch.round(x / sc) + zr, 0, maxq) - zr)
    got = _block_quantise(x, sc, zr, maxq, device)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))


def test_block_op_maxq_rule():
    w1 = torch.randn(4, 4)
    U = torch.eye(4)
    s = torch.ones(4)
    for bad in (0, -2):
        with pytest.raises(RuntimeError, match=r"maxq must be 2\^bits - 1 >= 1 \(min-max grid\) or -1 \(fp8"):
            ops.sparsegpt_prune_block_(w1.clone(), U, 2, 4, None, s, s, bad)
    with pytest.raises(RuntimeError, match="qscale and qzero must be given together"):
        ops.sparsegpt_prune_block_(w1.clone(), U, 2, 4, None, s, None, -1)


# ---------------------------------------------------------------- sparsegpt on the deployed grids


def _on_int8_grid(weight, scale):
    k = torch.round(weight.float() / scale[:, None])
    assert k.abs().max() <= 127
    return torch.equal(_bits((k * scale[:, None]).to(weight.dtype)), _bits(weight))


def _on_fp8_grid(weight, scale):
    e = weight.float() / scale[:, None]  # a bfloat16 weight at +-448 * s may read as 448.0x
    assert e.abs().max() <= (448 if weight.dtype == torch.float32 else 448 * (1 + 2.0**-8))
    return torch.equal(_bits((e.clamp(-448, 448).to(FP8).float() * scale[:, None]).to(weight.dtype)), _bits(weight))


@pytest.mark.parametrize("quant", ["int8", "fp8"])
@pytest.mark.parametrize("pattern", ["2:4", 0.5])
def test_sparsegpt_result_lies_on_the_deployed_grid(device, quant, pattern):
    w, H = _layer(29, 64, seed=3)
    w[5] = 0  # an all-zero row: scale 1, as quantize_weight
    r = P.sparsegpt(w.to(device), H.to(device), pattern, blocksize=32, quant=quant)
    assert r.quant == quant and r.scale.dtype == torch.float32 and r.scale.device == r.weight.device
    # the scale is fitted on the weight before pruning, exactly as quantize_weight fits it
    assert torch.equal(r.scale.cpu(), quantize_weight(w, quant)[1]) and r.scale[5] == 1
    weight, scale = r.weight.cpu(), r.scale.cpu()
    assert _on_int8_grid(weight, scale) if quant == "int8" else _on_fp8_grid(weight, scale)
    assert ((weight != 0) <= r.mask.cpu()).all()
    if pattern == "2:4":
        assert (r.mask.view(29, -1, 4).sum(-1) == 2).all()
    # the layer objective (W - Q) H (W - Q)^T stays near plain SparseGPT's (measured: +1% int8, +10-25% fp8)
    plain = P.sparsegpt(w.to(device), H.to(device), pattern, blocksize=32).weight.cpu()
    err = lambda v: torch.trace((v - w) @ H @ (v - w).t()).item()  # noqa: E731
    assert err(plain) <= err(weight) < (1.05 if quant == "int8" else 1.4) * err(plain)


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_sparsegpt_grid_in_low_and_double_precision(quant):
    w, H = _layer(16, 64, seed=6)
    rb = P.sparsegpt(w.bfloat16(), H, "2:4", blocksize=32, quant=quant)
    assert rb.weight.dtype == torch.bfloat16 and torch.equal(rb.scale, fit_weight_scale(w.bfloat16(), quant))
    assert _on_int8_grid(rb.weight, rb.scale) if quant == "int8" else _on_fp8_grid(rb.weight, rb.scale)
    rd = P.sparsegpt(w.double(), H.double(), "2:4", blocksize=32, quant=quant)
    assert rd.weight.dtype == torch.float64 and rd.scale.dtype == torch.float32
    # float64: q = s * code exactly (the float32 scale times an 8-bit code is exact in double)
    codes = rd.weight / rd.scale.double()[:, None]
    assert torch.equal(codes, codes.round()) if quant == "int8" else torch.equal(codes.float().to(FP8).double(), codes)


@pytest.mark.parametrize("quant,bits", [("int8-minmax", 8), ("int4", 4)])
def test_sparsegpt_minmax_grids_keep_the_reference_behaviour(device, quant, bits):
    w, H = _layer(29, 64, seed=bits)
    ref_w, ref_keep, ref_loss = sparsegpt_oracle(w, H, 2, 4, 0.0, blocksize=32, bits=bits)
    r = P.sparsegpt(w.to(device), H.to(device), "2:4", blocksize=32, quant=quant)
    assert r.scale is None and r.quant is None
    assert torch.equal(r.mask.cpu(), ref_keep)
    assert ((r.weight.cpu() - ref_w).norm() / ref_w.norm()).item() <= 1e-5
    scale, zero, maxq = P.minmax_quantizer(w.float(), bits)
    codes = r.weight.cpu() / scale[:, None] + zero[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert codes.round().min() >= 0 and codes.round().max() <= maxq


def test_prune_result_stays_a_three_field_tuple_for_old_callers():
    r = P.PruneResult(torch.zeros(2, 4), torch.ones(2, 4, dtype=torch.bool), None)
    assert r.scale is None and r.quant is None
    weight, mask, loss = r[:3]
    assert loss is None
    r = P.sparsegpt(*_layer(8, 32), "2:4", blocksize=16)
    assert r.scale is None and r.quant is None


def test_invalid_quant_names_raise():
    w, H = _layer(8, 32)
    with pytest.raises(ValueError, match=r"quant must be None or one of 'int8', 'fp8', 'int8-minmax', 'int4', "
                                         r"got 'int3'"):
        P.sparsegpt(w, H, "2:4", quant="int3")
    lin = nn.Linear(32, 8)
    with pytest.raises(ValueError, match=r"quant must be None, 'int8' or 'fp8'; got 'int4'"):
        attach_weight_grid(lin, "int4", torch.ones(8))
    with pytest.raises(ValueError, match=r"quant must be None, 'int8' or 'fp8'; got 'int8-minmax'"):
        quantize_weight_on_grid(lin.weight, "int8-minmax", torch.ones(8))


# ---------------------------------------------------------------- the grid carried to sparsify


def _prune_model(model, quant, hessians, attach=True):
    results = {}
    for name, lin in model.named_modules():
        if isinstance(lin, nn.Linear):
            r = P.sparsegpt(lin.weight.detach(), hessians[name].to(lin.weight.device), "2:4", blocksize=32,
                            quant=quant)
            with torch.no_grad():
                lin.weight.copy_(r.weight)
            if attach:
                attach_weight_grid(lin, r.quant, r.scale)
            results[name] = r
    return results


def _model_and_hessians(dtype, device):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32)).to(device, dtype)
    hessians = {"0": _layer(48, 64, seed=7)[1], "2": _layer(32, 48, seed=8)[1]}
    return model, hessians


def _expected_codes(weight, scale, quant):
    r = weight.float() / scale[:, None]
    return r.round().clamp(-127, 127) if quant == "int8" else r.clamp(-448, 448).to(FP8).float()


def _sparsify_device(quant, device):
    # fp8 W8A8 layers need sm89+ on a GPU; below that the layers are built on the CPU (fp8 is emulated there)
    if device == "cuda" and quant == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        return "cpu"
    return device


@pytest.mark.parametrize("quant", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparsify_stores_the_optimised_codes_and_scale(device, quant, dtype):
    model, hessians = _model_and_hessians(dtype, device)
    results = _prune_model(model, quant, hessians)
    lin = model[0]
    q0, s0 = weight_grid(lin)
    assert q0 == quant and torch.equal(s0, results["0"].scale)
    assert not any("grid" in k for k in lin.state_dict())  # a plain attribute, never in the state dict
    # the grid matters: a scale fitted from the final weights is another one (what sparsify did before)
    assert not torch.equal(quantize_weight(lin.weight.detach(), quant)[1], results["0"].scale)
    model = model.to(_sparsify_device(quant, device))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = sparsify(model, quant=quant)
    assert report.converted == ["0", "2"]
    for name, r in results.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, SparseLinear) and layer.quant == quant
        w24 = layer.weight24
        assert torch.equal(w24.scale.cpu().view(torch.int32), r.scale.cpu().view(torch.int32))
        codes = w24.decompress().cpu().float()
        assert torch.equal(codes, _expected_codes(r.weight.cpu(), r.scale.cpu(), quant))
        dense = layer.dense_weight().cpu()  # float32: codes * scale
        if dtype == torch.float32:
            assert torch.equal(_bits(dense), _bits(r.weight.cpu()))  # the optimised weight, bit for bit
        else:
            assert torch.equal(_bits(dense.to(dtype)), _bits(r.weight.cpu()))


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_weight_changed_after_pruning_warns_and_refits(quant):
    model, hessians = _model_and_hessians(torch.float32, "cpu")
    _prune_model(model, quant, hessians)
    with torch.no_grad():
        w = model[0].weight
        r, c = (w != 0).nonzero()[3].tolist()
        w[r, c] += 1e-3  # fine-tuned after pruning: off the grid
    fresh = quantize_weight(model[0].weight.detach(), quant)
    with pytest.warns(UserWarning, match=rf"0: ignoring the {quant} grid recorded by attach_weight_grid: the weight "
                                         r"is no longer on it"):
        sparsify(model, quant=quant)
    w24 = model[0].weight24
    assert torch.equal(w24.scale, fresh[1])  # a freshly fitted scale, as without a recorded grid
    assert torch.equal(w24.decompress().float(), fresh[0].float())


def test_grid_of_another_quant_is_ignored_and_grids_are_checked():
    model, hessians = _model_and_hessians(torch.float32, "cpu")
    _prune_model(model, "fp8", hessians)
    plain = [SparseLinear.from_linear(model[i], quant="int8") for i in (0, 2)]  # recorded fp8 grid: ignored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(model, quant="int8")
    for i, p in zip((0, 2), plain):
        assert torch.equal(model[i].weight24.scale, p.weight24.scale)
        assert torch.equal(model[i].weight24.values, p.weight24.values)
    lin = nn.Linear(16, 8)
    with pytest.raises(ValueError, match=r"attach_weight_grid: scale must be a floating tensor \[out_features\] = "
                                         r"\[8\]"):
        attach_weight_grid(lin, "int8", torch.ones(16))
    with pytest.raises(ValueError, match="finite and > 0"):
        attach_weight_grid(lin, "int8", torch.zeros(8))
    attach_weight_grid(lin, "int8", torch.ones(8, dtype=torch.float64))
    assert weight_grid(lin)[1].dtype == torch.float32
    attach_weight_grid(lin, None)
    assert weight_grid(lin) is None


def test_quantize_weight_on_grid_rule():
    s = torch.tensor([0.01, 0.02])
    k = torch.tensor([[3.0, -127.0, 0.0, 5.0], [100.0, 0.0, -1.0, 2.0]])
    w = k * s[:, None]
    q, scale, ok = quantize_weight_on_grid(w, "int8", s)
    assert ok and q.dtype == torch.int8 and torch.equal(q.float(), k) and torch.equal(scale, s)
    # bfloat16: the grid point rounded to bfloat16 is on the grid; the codes are recovered
    q, _, ok = quantize_weight_on_grid(w.bfloat16(), "int8", s)
    assert ok and torch.equal(q.float(), k)
    w2 = w.clone()
    w2[0, 0] = torch.nextafter(w2[0, 0], torch.tensor(1.0))  # one ulp off
    assert not quantize_weight_on_grid(w2, "int8", s)[2]
    assert not quantize_weight_on_grid(w * 2, "int8", s)[2]  # clamped at 127: off the grid
