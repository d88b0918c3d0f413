"""W8A8 (INT8, FP8 E4M3) SparseLinear: weight quantisation per output channel, per-token activation quantisation by
the op, scales in the epilogue; accuracy against the dequantised reference and against the unquantised layer.

Tolerances: against the *dequantised* fp64 reference (same q_w, s_w, q_x, s_x as the layer) the only error left is
the kernel's fp32 epilogue and the rounding to the output dtype: 1e-5 * max|y| for float32 outputs, one output-dtype
ulp at max|y| (2^-7 bf16, 2^-10 fp16) otherwise. Against the unquantised sparse layer the quantisation error itself
is measured and reported (docs/sparselinear.md quotes the numbers printed here).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsekern import quant as skquant
from sparsekern.linear import SparseLinear

OUT_TOL = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def random_24(n: int, k: int, dtype=torch.float32) -> torch.Tensor:
    w = torch.randn(n, k, dtype=torch.float64)
    keep = torch.rand(n, k // 4, 4).argsort(dim=-1)[..., :2]
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    return (w * mask).to(dtype)


def linear_24(k: int, n: int, bias=True, dtype=torch.float32) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(random_24(n, k, dtype))
        if bias:
            lin.bias.copy_(torch.randn(n, dtype=torch.float64).to(dtype))
    return lin


# ------------------------------------------------------------------------------------------------- weight quantiser


def test_int8_weight_quantiser_spec():
    w = random_24(19, 40)
    w[3] = 0  # an all-zero row
    q, s = skquant.quantize_weight(w, "int8")
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s.shape == (19,)
    assert bool(((w == 0) <= (q == 0)).all())  # zeros stay zeros (a kept value may round to 0: still 2:4)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    nonzero_rows = torch.ones(19, dtype=torch.bool)
    nonzero_rows[3] = False
    # every non-zero row uses the full range: its largest |w| maps to 127 exactly
    assert torch.equal(q[nonzero_rows].abs().amax(1), torch.full((18,), 127, dtype=torch.int8))
    assert s[3] == 1.0
    # symmetric rounding to nearest: |w - q*s| <= s/2 (+ float32 rounding of the division)
    err = (w.double() - q.double() * s.double()[:, None]).abs()
    assert bool((err <= s.double()[:, None] * (0.5 + 1e-6)).all())
    torch.testing.assert_close(s.double(), w.double().abs().amax(1).where(nonzero_rows, torch.tensor(127.0)) / 127)


def test_fp8_weight_quantiser_spec():
    w = random_24(16, 32)
    q, s = skquant.quantize_weight(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    assert bool(((w == 0) <= (q.float() == 0)).all())
    assert torch.equal(q.float().abs().amax(1), torch.full((16,), 448.0))
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for values in the normal range (>= 2^-6)
    r = w.double() / s.double()[:, None]
    normal = r.abs() >= 2 ** -6
    rel = ((q.double() - r).abs() / r.abs().clamp_min(1e-30))[normal]
    assert float(rel.max()) <= 2 ** -4


def test_quant_name_checked():
    with pytest.raises(ValueError, match=r"quant must be None, 'int8' or 'fp8'; got 'int4'"):
        SparseLinear.from_linear(linear_24(16, 8), quant="int4")


# ------------------------------------------------------------------------------------------------- the op


@pytest.mark.parametrize("quant", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_per_token_op_spec(quant, dtype):
    x = torch.randn(37, 52, dtype=torch.float64).to(dtype)
    x[5] = 0
    q, s = skquant.quantize_activation(x, quant)
    assert q.dtype == skquant.quant_dtype(quant) and s.dtype == torch.float32 and s.shape == (37,)
    qmax = skquant.QMAX[quant]
    absmax = x.float().abs().amax(1)
    ref_s = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    torch.testing.assert_close(s, ref_s, rtol=1e-6, atol=0)
    r = x.double() / s.double()[:, None]
    if quant == "int8":
        assert bool(((q.double() - r).abs() <= 0.5 + 1e-5).all())
    else:
        normal = r.abs() >= 2 ** -6
        assert float(((q.double() - r).abs() / r.abs().clamp_min(1e-30))[normal].max()) <= 2 ** -4
    assert bool((q[5].float() == 0).all()) and s[5] == 1.0


@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_opcheck_quant_kernels(quant):
    qdt = skquant.quant_dtype(quant)
    x = torch.randn(9, 36)
    torch.library.opcheck(torch.ops.sparsekern.quantize_per_token.default, (x, qdt))
    if quant == "int8":  # spmm_24's int8 path with per-channel alpha and per-token row_scale
        q, s = skquant.quantize_activation(x, quant)
        w = random_24(12, 36)
        wq, ws = skquant.quantize_weight(w, quant)
        values, codes = torch.ops.sparsekern.compress_24(wq)
        torch.library.opcheck(torch.ops.sparsekern.spmm_24.default,
                              (q, values, codes, torch.randn(12), ws, s, "none", torch.float32))


# ------------------------------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("quant", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_w8a8_layer_matches_dequantised_reference(quant, dtype, bias, device):
    if device == "cuda" and quant == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs an sm89+ GPU")
    lin = linear_24(68, 24, bias, dtype).to(device)  # 68/8 is not whole: odd group count
    layer = SparseLinear.from_linear(lin, quant=quant)
    assert layer.values.dtype == skquant.quant_dtype(quant) and layer.weight_scale.dtype == torch.float32
    for shape in [(1, 68), (33, 68), (2, 3, 68)]:
        x = torch.randn(*shape, dtype=torch.float64).to(dtype=dtype, device=device)
        y = layer(x)
        assert y.dtype == dtype and y.shape == (*shape[:-1], 24)
        x2 = x.reshape(-1, 68)
        qx, sx = skquant.quantize_activation(x2, quant)
        w_deq = layer.dense_weight().double()  # q_w * s_w
        ref = (qx.double() * sx.double()[:, None]) @ w_deq.t()
        if bias:
            ref = ref + layer.bias.double()
        err = (y.reshape(-1, 24).double() - ref).abs().max().item()
        assert err <= OUT_TOL[dtype] * ref.abs().max().item() * 2, f"{quant} {dtype}: max error {err:.3g}"


@pytest.mark.parametrize("quant,bound", [("int8", 0.02), ("fp8", 0.08)])
def test_quantisation_error_vs_unquantised_sparse_layer(quant, bound, capsys):
    # The number users ask for: how far is the W8A8 layer from the float sparse layer it replaces?
    lin = linear_24(512, 256)
    sparse = SparseLinear.from_linear(lin)
    qlayer = SparseLinear.from_linear(lin, quant=quant)
    x = torch.randn(64, 512)
    y, yq = sparse(x), qlayer(x)
    rel = ((yq - y).norm() / y.norm()).item()
    with capsys.disabled():
        print(f"\n[W8A8 {quant}] relative error vs unquantised sparse layer (K=512, N=256, M=64, randn): {rel:.4f}")
    assert rel < bound
    assert rel > 0  # the quantised path really quantises


def test_w8a8_grad_x_uses_dequantised_weight():
    lin = linear_24(32, 16)
    layer = SparseLinear.from_linear(lin, quant="int8")
    x = torch.randn(5, 32, requires_grad=True)
    gy = torch.randn(5, 16)
    layer(x).backward(gy)
    torch.testing.assert_close(x.grad.double(), gy.double() @ layer.dense_weight().double(), rtol=1e-5, atol=1e-5)


def test_dtype_move_keeps_quantised_storage():
    layer = SparseLinear.from_linear(linear_24(32, 16), quant="fp8")
    values, scale = layer.values.clone(), layer.weight_scale.clone()
    layer = layer.to(torch.bfloat16)  # fp8 counts as floating for .to(dtype): must not be converted
    assert layer.values.dtype == torch.float8_e4m3fn and torch.equal(layer.values.view(torch.uint8),
                                                                     values.view(torch.uint8))
    assert layer.weight_scale.dtype == torch.float32 and torch.equal(layer.weight_scale, scale)
    assert layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_to_linear_of_quantised_layer_is_dequantised_weight():
    lin = linear_24(32, 16)
    layer = SparseLinear.from_linear(lin, quant="int8")
    back = layer.to_linear()
    q, s = skquant.quantize_weight(lin.weight.detach(), "int8")
    torch.testing.assert_close(back.weight.detach(), q.float() * s[:, None], rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- unsupported arch


def _fake_gpu(monkeypatch, cap, name):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_fp8_on_sm80_refused(monkeypatch):
    _fake_gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    with pytest.raises(skquant.QuantUnsupportedError,
                       match=r"quant='fp8' needs a GPU of compute capability sm89 or newer \(FP8 tensor cores\); "
                             r"cuda:0 is sm80 \(NVIDIA A100"):
        skquant.check_quant_supported("fp8", "cuda:0")
    skquant.check_quant_supported("int8", "cuda:0")  # int8 is fine on sm80


def test_int8_below_sm80_refused(monkeypatch):
    _fake_gpu(monkeypatch, (7, 5), "Tesla T4")
    with pytest.raises(skquant.QuantUnsupportedError, match=r"quant='int8' needs .* sm80 or newer.*sm75 \(Tesla T4\)"):
        skquant.check_quant_supported("int8", "cuda:0")


def test_quant_on_other_device_type_refused():
    with pytest.raises(skquant.QuantUnsupportedError, match="supported on cpu and cuda devices, not mps"):
        skquant.check_quant_supported("int8", "mps")


@pytest.mark.cuda
@pytest.mark.parametrize("quant", ["int8", "fp8"])
def test_w8a8_cuda_matches_cpu(quant):
    if quant == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs sm89+")
    lin = linear_24(128, 64, dtype=torch.bfloat16)
    layer = SparseLinear.from_linear(lin, quant=quant)
    x = torch.randn(33, 128, dtype=torch.bfloat16)
    y_cpu = layer(x)
    y_gpu = layer.cuda()(x.cuda()).cpu()
    err = (y_gpu.double() - y_cpu.double()).abs().max().item()
    assert err <= 2 * OUT_TOL[torch.bfloat16] * y_cpu.double().abs().max().item()
