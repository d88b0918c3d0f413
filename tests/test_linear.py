"""SparseLinear: numerics against nn.Linear, autograd through x, device/dtype moves, dispatch policy, torch.compile,
bad inputs.

Tolerance policy (written once, used below): a SparseLinear output is compared with an fp64 reference computed from
the same pruned weight; its max error may be at most 2x PyTorch's own F.linear error in the same dtype against that
reference, plus a floor of FLOOR[dtype] * max|y| (F.linear can be exact by luck on tiny shapes).
Exact equality where exactness is defined: to_linear() weights, dtype moves of the compressed form, kernels chosen.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import policy
from sparsekern.linear import NotTwoFourError, SparseLinear

FLOOR = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _isolated_policy(tmp_path, monkeypatch):
    # Never read a policy table a benchmark left in ~/.cache on this machine: every test starts from the defaults.
    monkeypatch.setenv(policy.ENV_TABLE, str(tmp_path / "no-policy.json"))
    policy.set_table(None)
    yield
    policy.set_table(None)


def random_24(n: int, k: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A random [n, k] weight with exactly two non-zeros in every aligned group of 4 along k (random positions),
    built without any sparsekern code: the oracle's own 2:4 construction."""
    w = torch.randn(n, k, dtype=torch.float64)
    keep = torch.rand(n, k // 4, 4).argsort(dim=-1)[..., :2]  # two random positions per group
    mask = torch.zeros(n, k // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(n, k)
    return (w * mask).to(dtype=dtype, device=device)


def linear_24(k: int, n: int, bias=True, dtype=torch.float32) -> nn.Linear:
    lin = nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(random_24(n, k, dtype))
        if bias:
            lin.bias.copy_(torch.randn(n, dtype=torch.float64).to(dtype))
    return lin


def assert_close_to_ref(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    ref = F.linear(x.double(), w.double(), b.double() if b is not None else None)
    torch_err = (F.linear(x, w, b).double() - ref).abs().max().item()
    err = (y.double() - ref).abs().max().item()
    bound = 2 * torch_err + FLOOR[x.dtype] * ref.abs().max().item()
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g} (F.linear's own error {torch_err:.3g})"


# ------------------------------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(20, 36), (64, 128)])  # odd sizes (36/8 is not whole: an odd group count) + aligned
@pytest.mark.parametrize("bias", [True, False])
def test_matches_linear_2d_and_3d(dtype, n, k, bias, device):
    # device: cpu always; cuda on a GPU machine (conftest), where (64, 128) 16-bit runs cuSPARSELt and the odd
    # shape the fallback the policy picks for it.
    lin = linear_24(k, n, bias, dtype).to(device)
    layer = SparseLinear.from_linear(lin)
    for shape in [(1, k), (3, k), (33, k), (2, 5, k)]:
        x = torch.randn(*shape, dtype=torch.float64).to(dtype=dtype, device=device)
        y = layer(x)
        assert y.shape == (*shape[:-1], n) and y.dtype == dtype and y.device == x.device
        assert_close_to_ref(y.reshape(-1, n), x.reshape(-1, k), lin.weight.detach(),
                            lin.bias.detach() if bias else None)


def test_non_contiguous_input():
    lin = linear_24(32, 24)
    layer = SparseLinear.from_linear(lin)
    x = torch.randn(32, 7).t()  # [7, 32], stride (1, 7)
    assert not x.is_contiguous()
    assert_close_to_ref(layer(x), x.contiguous(), lin.weight.detach(), lin.bias.detach())


def test_from_gpt2_conv1d_transposes():
    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(nf=24, nx=40)  # weight [in=40, out=24]
    with torch.no_grad():
        conv.weight.copy_(random_24(24, 40).t())  # 2:4 along in_features = dim 0 of the Conv1D weight
        conv.bias.normal_()
    layer = SparseLinear.from_linear(conv)
    assert (layer.in_features, layer.out_features, layer.weight_layout) == (40, 24, "conv1d")
    x = torch.randn(2, 5, 40)
    assert_close_to_ref(layer(x).reshape(-1, 24), x.reshape(-1, 40), conv.weight.detach().t(), conv.bias.detach())
    back = layer.to_linear()
    assert type(back) is Conv1D and torch.equal(back.weight, conv.weight) and torch.equal(back.bias, conv.bias)


@pytest.mark.parametrize("bias", [True, False])
def test_to_linear_is_exact(bias):
    lin = linear_24(44, 12, bias)
    back = SparseLinear.from_linear(lin).to_linear()
    assert type(back) is nn.Linear
    assert torch.equal(back.weight, lin.weight)
    assert (back.bias is None) == (not bias)
    if bias:
        assert torch.equal(back.bias, lin.bias)


def test_compressed_size_and_storage():
    lin = linear_24(64, 32, dtype=torch.float16)
    layer = SparseLinear.from_linear(lin)
    assert layer.values.shape == (32, 32) and layer.values.dtype == torch.float16
    assert layer.codes.shape == (32, 8) and layer.codes.dtype == torch.uint8
    assert layer.weight_nbytes() == 32 * 32 * 2 + 32 * 8  # 56.25% of the dense 4096 bytes
    assert layer.device_nbytes() == layer.weight_nbytes()  # no cuSPARSELt buffer on the CPU
    # The weight is never a Parameter: an optimizer over model.parameters() cannot touch it.
    assert list(layer.parameters()) == []
    assert {n for n, _ in layer.named_buffers()} == {"values", "codes", "bias"}


def test_dtype_moves_keep_codes_exact():
    lin = linear_24(48, 16)
    layer = SparseLinear.from_linear(lin)
    codes = layer.codes.clone()
    half = layer.half()
    assert half.values.dtype == torch.float16 and half.bias.dtype == torch.float16
    assert torch.equal(half.codes, codes)
    ref = SparseLinear.from_linear(linear_24(48, 16).half())  # independent layer, only to compare the storage
    assert ref.values.dtype == half.values.dtype
    assert torch.equal(half.to_linear().weight, lin.weight.detach().half())
    assert half.to(torch.bfloat16).values.dtype == torch.bfloat16


def test_bias_kept_in_compute_dtype_no_per_call_cast(monkeypatch):
    # An unquantised layer's bias always has the weight's (= the input's) dtype, so the forward hands the stored
    # buffer to the kernel as is: no cast, no copy per call. Holds after dtype moves and loads of another dtype.
    seen = []
    real = torch.ops.sparsekern.spmm_24

    def spy(x2, values, codes, bias, *rest):
        seen.append(bias)
        return real(x2, values, codes, bias, *rest)

    monkeypatch.setattr(torch.ops.sparsekern, "spmm_24", spy)
    layer = SparseLinear.from_linear(linear_24(48, 16))
    sd32 = layer.state_dict()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        layer = layer.to(dtype)
        assert layer.bias.dtype == dtype
        layer.load_state_dict(sd32)  # a float32 checkpoint: cast once on load, to the layer's dtype
        assert layer.bias.dtype == dtype and layer.state_dict()["bias"].dtype == dtype
        seen.clear()
        with torch.no_grad():
            layer(torch.randn(3, 48, dtype=dtype))
        assert len(seen) == 1 and seen[0] is layer.bias
    assert layer.state_dict().keys() == sd32.keys()


# ------------------------------------------------------------------------------------------------- autograd


def test_grad_x_matches_dense_and_weight_frozen(device):
    lin = linear_24(36, 20).to(device)
    layer = SparseLinear.from_linear(lin)
    x = torch.randn(2, 7, 36, device=device, requires_grad=True)
    gy = torch.randn(2, 7, 20, device=device)
    layer(x).backward(gy)
    ref = (gy.double().reshape(-1, 20) @ lin.weight.detach().double()).reshape(2, 7, 36)
    torch.testing.assert_close(x.grad.double(), ref, rtol=1e-5, atol=1e-5)
    assert all(not b.requires_grad for b in layer.buffers())


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient and is not a double")
def test_gradcheck_grad_x():
    # float32 kernel: finite differences of a function linear in x are exact up to rounding, so a large eps keeps
    # the numerical gradient accurate (error ~ 1e-7 * |y| / eps).
    layer = SparseLinear.from_linear(linear_24(16, 8))
    x = torch.randn(3, 16, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-2, atol=1e-3, rtol=1e-3, nondet_tol=1e-5)


def test_lora_style_finetune_keeps_24():
    # A trainable adapter next to a frozen SparseLinear: the optimizer sees only the adapter.
    base = SparseLinear.from_linear(linear_24(32, 32))
    before = base.dense_weight().clone()
    lora_a = nn.Linear(32, 4, bias=False)
    lora_b = nn.Linear(4, 32, bias=False)
    opt = torch.optim.AdamW(list(base.parameters()) + list(lora_a.parameters()) + list(lora_b.parameters()), lr=0.1)
    for _ in range(3):
        x = torch.randn(8, 32)
        loss = (base(x) + lora_b(lora_a(x))).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(base.dense_weight(), before)
    assert bool(((base.dense_weight() != 0).reshape(32, 8, 4).sum(-1) <= 2).all())  # still 2:4


# ------------------------------------------------------------------------------------------------- policy


def test_kernel_for_default_on_cpu():
    layer = SparseLinear.from_linear(linear_24(32, 16))
    assert [layer.kernel_for(m) for m in (1, 7, 4096)] == ["spmm24"] * 3


def test_policy_table_written_read_and_used(tmp_path):
    path = tmp_path / "policy.json"
    lin = linear_24(32, 16)
    layer = SparseLinear.from_linear(lin)
    policy.write_table([{"arch": "cpu", "dtype": "float32", "n": 16, "k": 32, "m": 8, "kernel": "dense_fallback",
                         "timings_us": {"spmm24": 5.0, "dense": 3.0}},
                        {"arch": "cpu", "dtype": "float32", "n": 16, "k": 32, "m": 1024, "kernel": "cpu_spmm"}],
                       path)
    doc = json.loads(path.read_text())
    assert doc["format"] == "sparsekern-policy" and doc["version"] == 1
    assert {e["kernel"] for e in doc["entries"]} == {"dense_fallback", "spmm24"}  # alias normalised
    try:
        policy.set_table(path)
        # bucket 8 covers 5..8; nearest measured bucket decides elsewhere (log2 distance).
        assert [layer.kernel_for(m) for m in (5, 8, 9, 100, 2000)] == \
            ["dense_fallback", "dense_fallback", "dense_fallback", "spmm24", "spmm24"]
        x = torch.randn(6, 32)
        assert_close_to_ref(layer(x), x, lin.weight.detach(), lin.bias.detach())  # runs the dense fallback
        # merge keeps the other entries and replaces the same bucket
        policy.write_table([{"arch": "cpu", "dtype": "float32", "n": 16, "k": 32, "m": 7, "kernel": "spmm24"}],
                           path)
        policy.set_table(path)
        assert layer.kernel_for(8) == "spmm24" and len(json.loads(path.read_text())["entries"]) == 2
    finally:
        policy.set_table(None)


def test_default_table_file_is_read_and_refreshed(tmp_path, monkeypatch):
    monkeypatch.setenv(policy.ENV_TABLE, str(tmp_path / "default.json"))
    policy.set_table(None)
    layer = SparseLinear.from_linear(linear_24(32, 16))
    assert layer.kernel_for(2) == "spmm24"  # no file yet: the default
    assert policy.write_table([{"arch": "cpu", "dtype": "float32", "n": 16, "k": 32, "m": 2,
                                "kernel": "dense_fallback"}]) == tmp_path / "default.json"
    assert layer.kernel_for(2) == "dense_fallback"  # the file written in this process is picked up


def test_policy_override_and_unrunnable_choice_falls_back():
    lin = linear_24(32, 16)
    layer = SparseLinear.from_linear(lin)
    with policy.override("dense_fallback"):
        assert layer.kernel_for(4) == "dense_fallback"
        x = torch.randn(4, 32)
        assert_close_to_ref(layer(x), x, lin.weight.detach(), lin.bias.detach())
    assert layer.kernel_for(4) == "spmm24"
    layer.set_kernel("cslt")  # cuSPARSELt cannot run on the CPU: the safe default is used instead
    assert layer.kernel_for(4) == "spmm24"
    layer.set_kernel(None)


def test_policy_cuda_choices_without_gpu():
    # choose_kernel is pure: the CUDA rules are checked here with the layer's facts given explicitly.
    def pick(m, has_cslt, has_spmm, table=None, override=None):
        policy.set_table(table if table is not None else policy.PolicyTable())
        try:
            return policy.choose_kernel(device_type="cuda", arch="sm90", dtype="float16", n=4096, k=4096, m=m,
                                        has_cslt=has_cslt, has_cuda_spmm24=has_spmm, layer_override=override)
        finally:
            policy.set_table(None)

    assert pick(1, True, False) == "cslt"
    assert pick(1, False, True) == "spmm24"
    assert pick(1, False, False) == "dense_fallback"  # e.g. a shape cuSPARSELt refuses, no CUDA spmm24 built
    table = policy.table_from_entries([{"arch": "sm90", "dtype": "float16", "n": 4096, "k": 4096, "m": 8,
                                        "kernel": "decode24"},
                                       {"arch": "sm90", "dtype": "float16", "n": 4096, "k": 4096, "m": 512,
                                        "kernel": "cslt"}])
    assert [pick(m, True, True, table) for m in (1, 8, 64, 4096)] == ["spmm24", "spmm24", "cslt", "cslt"]
    assert pick(4, True, False, table) == "cslt"  # measured spmm24 is not built here: the default instead
    assert pick(4096, True, True, table, override="dense_fallback") == "dense_fallback"
    assert policy.choose_kernel(device_type="cuda", arch="sm80", dtype="float16", n=4096, k=4096, m=8,
                                has_cslt=True, has_cuda_spmm24=True) == "cslt"  # other arch: not measured


def test_policy_bad_inputs(tmp_path):
    with pytest.raises(policy.PolicyError, match="unknown kernel 'fast'"):
        policy.normalize_kernel("fast")
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"format": "sparsekern-policy", "version": 99, "entries": []}))
    with pytest.raises(policy.PolicyError, match="version 99"):
        policy.load_table(bad)
    with pytest.raises(policy.PolicyError, match=r"lacks field\(s\) \['kernel'\]"):
        policy.write_table([{"arch": "cpu", "dtype": "float32", "n": 1, "k": 4, "m": 1}], tmp_path / "q.json")
    assert [policy.m_bucket(m) for m in (1, 2, 3, 16, 17, 10 ** 6)] == [1, 2, 4, 16, 32, policy.MAX_BUCKET]


# ------------------------------------------------------------------------------------------------- torch.compile


def test_compile_fullgraph_no_graph_breaks():
    torch._dynamo.reset()
    model = nn.Sequential(SparseLinear.from_linear(linear_24(32, 48)), nn.GELU(),
                          SparseLinear.from_linear(linear_24(48, 16)))
    x = torch.randn(5, 32)
    expected = model(x)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    # aot_eager runs the fake kernels through AOTAutograd (what inductor sees) without a C++ compile on CI.
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, rtol=0, atol=0)
    x3 = torch.randn(2, 3, 32)  # another batch shape and a 3-D input: recompiles at most, never breaks
    torch.testing.assert_close(compiled(x3), model(x3), rtol=0, atol=0)
    xg = torch.randn(3, 32, requires_grad=True)
    compiled(xg).sum().backward()
    xr = xg.detach().clone().requires_grad_()
    model(xr).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad)


# ------------------------------------------------------------------------------------------------- bad inputs


def test_not_24_weight_names_layer_row_group():
    lin = linear_24(32, 8)
    with torch.no_grad():
        lin.weight[5, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])  # row 5, group 2: three non-zeros
    with pytest.raises(NotTwoFourError, match=r"blocks\.3\.fc: weight is not 2:4.*row 5, group 2 \(columns 8\.\.11\) "
                                              r"has 3 non-zeros"):
        SparseLinear.from_linear(lin, name="blocks.3.fc")


def test_in_features_not_multiple_of_4():
    with pytest.raises(ValueError, match=r"in_features = 30 is not a multiple of 4"):
        SparseLinear.from_linear(nn.Linear(30, 8))
    with pytest.raises(ValueError, match=r"in_features = 6 is not a multiple of 4"):
        SparseLinear(6, 8)


def test_wrong_input():
    layer = SparseLinear.from_linear(linear_24(32, 8))
    with pytest.raises(ValueError, match=r"input has 31 features.*in_features = 32"):
        layer(torch.randn(2, 31))
    with pytest.raises(TypeError, match=r"holds a torch.float32 weight but the input is torch.float16"):
        layer(torch.randn(2, 32, dtype=torch.float16))


def test_unsupported_weight_dtype_and_layer_type():
    with pytest.raises(ValueError, match="weight dtype torch.float64 is not supported"):
        SparseLinear.from_linear(nn.Linear(8, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="expected nn.Linear or transformers Conv1D, got Conv2d"):
        SparseLinear.from_linear(nn.Conv2d(4, 4, 1))


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
def test_cuda_move_recompresses_and_matches():
    lin = linear_24(128, 64, dtype=torch.float16)
    layer = SparseLinear.from_linear(lin).cuda()
    assert layer.values.is_cuda and layer.codes.is_cuda
    assert layer.cslt_buffer is not None and layer.kernel_for(256) == "cslt"
    assert layer.device_nbytes() == layer.weight_nbytes() + layer.cslt_buffer.numel()
    x = torch.randn(37, 128, dtype=torch.float16, device="cuda")
    w = lin.weight.detach().cuda()
    b = lin.bias.detach().cuda()
    for m in (1, 37):
        assert_close_to_ref(layer(x[:m]), x[:m], w, b)
    back = layer.cpu()
    assert back.cslt_buffer is None and torch.equal(back.to_linear().weight, lin.weight)


@pytest.mark.cuda
def test_cuda_graph_capture():
    lin = linear_24(128, 64, dtype=torch.float16)
    layer = SparseLinear.from_linear(lin).cuda()
    x = torch.randn(16, 128, dtype=torch.float16, device="cuda")
    layer(x)  # warm-up: plan creation happens outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = layer(x)
    x.copy_(torch.randn_like(x))
    g.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)


@pytest.mark.cuda
def test_cuda_compile_reduce_overhead():
    lin = linear_24(128, 64, dtype=torch.float16)
    model = nn.Sequential(SparseLinear.from_linear(lin), nn.ReLU()).cuda()
    x = torch.randn(8, 128, dtype=torch.float16, device="cuda")
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        y = compiled(x)
    torch.testing.assert_close(y, model(x))


# ------------------------------------------------------------------------------------------------- CPU dense paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_dense_fallback_panels_match_reference(monkeypatch, dtype, bias):
    # Tiny panels (16 rows) so a 37-row weight runs as 3 panels, the last one partial.
    from sparsekern import linear as linear_mod

    monkeypatch.setattr(linear_mod, "_PANEL_BYTES", 16 * 64 * dtype.itemsize)
    lin = linear_24(64, 37, bias=bias, dtype=dtype)
    layer = SparseLinear.from_linear(lin)
    layer.set_kernel("dense_fallback")
    x = torch.randn(11, 64, dtype=torch.float64).to(dtype)
    y = layer(x)
    assert y.shape == (11, 37) and y.dtype == dtype
    assert_close_to_ref(y, x, lin.weight.detach(), lin.bias.detach() if bias else None)


def test_dense_cache_builds_uses_and_drops_the_copy():
    lin = linear_24(64, 40)
    w, b = lin.weight.detach(), lin.bias.detach()
    plain = SparseLinear.from_linear(lin)
    cached = SparseLinear.from_linear(lin, dense_cache=True)
    assert plain.dense_weight_cache is None and not plain.dense_cache
    assert torch.equal(cached.dense_weight_cache, w)
    assert "dense_weight_cache" not in cached.state_dict()  # never saved
    assert cached.device_nbytes() == cached.weight_nbytes() + w.numel() * w.element_size()
    assert "dense_cache=True" in repr(cached)
    # Default policy (no table): the 2:4 kernel up to M = 2048, the dense copy above (policy.CPU_DENSE_CACHE_MIN_M).
    assert [cached.kernel_for(m) for m in (1, 16, 256, 2048, 2049, 8192)] == ["spmm24"] * 4 + ["dense_cached"] * 2
    assert [plain.kernel_for(m) for m in (1, 4096)] == ["spmm24", "spmm24"]
    x = torch.randn(2050, 64)
    assert torch.equal(cached(x), F.linear(x, w, b))  # the dense layer's own computation
    assert_close_to_ref(cached(x[:3]), x[:3], w, b)
    # Forcing the cached kernel on a layer without a copy runs the same dense math by decompression.
    plain.set_kernel("dense_cached")
    assert plain.kernel_for(256) == "dense_fallback"
    assert_close_to_ref(plain(x), x, w, b)
    # Autograd through x on the dense path.
    xg = x.clone().requires_grad_(True)
    cached(xg).sum().backward()
    assert torch.allclose(xg.grad, torch.ones(2050, 40) @ w, atol=1e-5)
    cached.set_dense_cache(False)
    assert cached.dense_weight_cache is None and cached.kernel_for(256) == "spmm24"
    cached.set_dense_cache(True)
    assert torch.equal(cached.dense_weight_cache, w)


def test_dense_cache_follows_loads_and_dtype_moves():
    a, other = linear_24(32, 12), linear_24(32, 12)
    layer = SparseLinear.from_linear(a, dense_cache=True)
    layer.load_state_dict(SparseLinear.from_linear(other).state_dict())
    assert torch.equal(layer.dense_weight_cache, other.weight.detach())
    layer.to(torch.bfloat16)
    assert layer.dense_weight_cache.dtype == torch.bfloat16
    assert torch.equal(layer.dense_weight_cache, other.weight.detach().bfloat16())


def test_dense_cache_refused_for_quantised_layers():
    lin = linear_24(32, 12)
    with pytest.raises(ValueError, match="dense_cache=True is for unquantised layers"):
        SparseLinear.from_linear(lin, quant="int8", dense_cache=True)
    layer = SparseLinear.from_linear(lin, quant="int8")
    with pytest.raises(ValueError, match="dense_cache=True is for unquantised layers"):
        layer.set_dense_cache(True)
    assert layer.dense_weight_cache is None


def test_policy_table_choice_for_layers_with_a_dense_copy(tmp_path):
    entries = [{"arch": "cpu", "dtype": "float32", "n": 40, "k": 64, "m": 256, "kernel": "dense_fallback",
                "kernel_dense_cache": "dense_cached"},
               {"arch": "cpu", "dtype": "float32", "n": 40, "k": 64, "m": 16, "kernel": "spmm24"}]
    path = policy.write_table(entries, tmp_path / "p.json", merge=False)
    policy.set_table(path)
    lin = linear_24(64, 40)
    plain, cached = SparseLinear.from_linear(lin), SparseLinear.from_linear(lin, dense_cache=True)
    assert plain.kernel_for(256) == "dense_fallback" and cached.kernel_for(256) == "dense_cached"
    # No cached choice at m = 16: both take "kernel" (the table overrides the default's M > 64 rule too).
    assert plain.kernel_for(16) == "spmm24" and cached.kernel_for(16) == "spmm24"
    assert policy.load_table(path).entries()[-1]["kernel_dense_cache"] == "dense_cached"
    bad = [{"arch": "cpu", "dtype": "float32", "n": 40, "k": 64, "m": 1, "kernel": "dense_cached"}]
    with pytest.raises(policy.PolicyError, match="'kernel' must be runnable by every layer"):
        policy.write_table(bad, tmp_path / "q.json")
    (tmp_path / "r.json").write_text(json.dumps({"format": "sparsekern-policy", "version": 1, "entries": bad}))
    with pytest.raises(policy.PolicyError, match="belongs in 'kernel_dense_cache'"):
        policy.load_table(tmp_path / "r.json")
