"""Sparse24Weight: the one owner of a 2:4 weight (sparsekern.weight). Reference: plain PyTorch (decompression by
index arithmetic, float64 products); exact where the format defines exactness."""

from __future__ import annotations

import pickle

import pytest
import torch

import sparsekern
from sparsekern import _ext
from sparsekern.weight import CheckpointError, Compressed24, Sparse24Weight, codes_violation

pytestmark = pytest.mark.skipif(not _ext.available(), reason="needs the compiled extension")


def random_24(rows, cols, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    keep = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(rows, cols // 4, 4, dtype=torch.bool).scatter_(-1, keep, True).reshape(rows, cols)
    return (w * mask).to(dtype)


def ref_decompress(values, codes, cols):
    """The format's spec in index arithmetic: group g keeps columns 4g + (code & 3) and 4g + (code >> 2)."""
    rows = values.shape[0]
    out = torch.zeros(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for g in range(cols // 4):
            code = (int(codes[r, g // 2]) >> (4 * (g % 2))) & 0xF
            out[r, 4 * g + (code & 3)] = float(values[r, 2 * g])
            out[r, 4 * g + (code >> 2)] = float(values[r, 2 * g + 1])
    return out


@pytest.mark.parametrize("rows,cols", [(1, 4), (3, 36), (8, 64), (17, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_from_dense_round_trip_is_exact(rows, cols, dtype):
    w = random_24(rows, cols, dtype, seed=rows * cols)
    w24 = Sparse24Weight.from_dense(w)
    assert w24.shape == (rows, cols) and w24.dtype == dtype and w24.quant is None
    assert torch.equal(w24.decompress(), w)
    assert torch.equal(ref_decompress(w24.values, w24.codes, cols), w.double())
    assert w24.nbytes == rows * cols // 2 * w.element_size() + w24.codes.numel()


def test_quantised_weight_holds_its_scale():
    w = random_24(12, 40, seed=3)
    w24 = Sparse24Weight.from_dense(w, "int8")
    assert w24.quant == "int8" and w24.values.dtype == torch.int8 and w24.scale.shape == (12,)
    deq = w24.dense()
    # per-row symmetric int8: every kept value within half a step of the float weight
    assert torch.all((deq - w).abs() <= w24.scale[:, None] / 2 + 1e-7)
    assert w24.nbytes == 12 * 20 + w24.codes.numel() + 12 * 4
    sd = w24.state_dict("l.")
    assert list(sd) == ["l.values", "l.codes", "l.weight_scale", "l.shape", "l.format_version"]
    back = Sparse24Weight.from_state_dict(sd, "l.")
    assert back.quant == "int8" and torch.equal(back.scale, w24.scale) and torch.equal(back.values, w24.values)


def test_from_dense_names_the_bad_group():
    w = random_24(4, 16, seed=1)
    w[2, 4:8] = 1.0
    with pytest.raises(sparsekern.linear.NotTwoFourError, match=r"layer\.x: .*row 2, group 1 \(columns 4\.\.7\) has 4"):
        Sparse24Weight.from_dense(w, name="layer.x")


@pytest.mark.parametrize("bad_code", [0, 1, 3, 5, 15])
def test_constructor_rejects_invalid_pattern_codes(bad_code):
    w24 = Sparse24Weight.from_dense(random_24(5, 24, seed=2))
    codes = w24.codes.clone()
    codes[3, 1] = (codes[3, 1] & 0xF0) | bad_code  # group 2 of row 3
    with pytest.raises(ValueError, match=rf"codes\[3\] group 2 holds the invalid pattern code {bad_code}"):
        Sparse24Weight(w24.values, codes, w24.shape)
    assert codes_violation(w24.codes, 24) is None


def test_padding_nibble_must_be_zero():
    w24 = Sparse24Weight.from_dense(random_24(2, 20, seed=4))  # 5 groups: the last byte's high nibble is padding
    codes = w24.codes.clone()
    codes[1, -1] |= 0x40
    with pytest.raises(ValueError, match="padding nibble"):
        Compressed24(w24.values, codes, w24.shape)


def test_state_dict_layout_is_the_layers():
    lin = torch.nn.Linear(36, 8)
    with torch.no_grad():
        lin.weight.copy_(random_24(8, 36, seed=5))
    layer = sparsekern.SparseLinear.from_linear(lin)
    sd = layer.state_dict()
    assert list(sd) == ["values", "codes", "bias", "shape", "format_version"]
    mine = layer.weight24.state_dict(bias=layer.bias)
    assert list(mine) == list(sd) and all(torch.equal(mine[k], sd[k]) for k in sd)
    with pytest.raises(CheckpointError, match="format_version' is missing"):
        Sparse24Weight.from_state_dict({k: v for k, v in sd.items() if k != "format_version"})


def test_layer_shares_its_tensors_with_its_weight_and_adopts_replaced_buffers():
    lin = torch.nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(random_24(8, 16, seed=6))
    layer = sparsekern.SparseLinear.from_linear(lin)
    assert layer.weight24.values is layer.values and layer.weight24.codes is layer.codes
    other = Sparse24Weight.from_dense(random_24(8, 16, seed=7))
    layer._buffers["values"], layer._buffers["codes"] = other.values, other.codes  # as a device-map loader does
    assert torch.equal(layer.weight24.decompress(), other.decompress())
    assert torch.equal(layer.dense_weight(), other.decompress())


def test_pickle_never_carries_the_cuslt_buffer():
    w24 = Sparse24Weight.from_dense(random_24(4, 32, torch.float16, seed=8))
    w24._cslt, w24._cslt_tag = torch.zeros(3, dtype=torch.uint8), ("cuda:0", "sm90", "0.8.1")  # as if built on a GPU
    back = pickle.loads(pickle.dumps(w24))
    assert back.cslt is None and back.cslt_tag is None and torch.equal(back.decompress(), w24.decompress())


def test_cpu_weight_has_no_cuslt_buffer_and_says_why():
    w24 = Sparse24Weight.from_dense(random_24(32, 32, torch.float16, seed=9))
    assert "cuSPARSELt runs on CUDA devices" in w24.cslt_unsupported()
    assert w24.build_cslt() is None
    with pytest.raises(ValueError, match="cuSPARSELt runs on CUDA devices"):
        w24.build_cslt(required=True)
    assert w24.kernel_for(1) == "spmm24" and w24.kernel_for(4096) == "spmm24"


def test_sparse_linear_checks_every_tensor_device():
    w24 = sparsekern.compress_24(random_24(3, 8, seed=10))
    x = torch.randn(2, 8)
    for kw in ({"bias": torch.zeros(3, device="meta")}, {"row_scale": torch.ones(2, device="meta")},
               {"alpha": torch.ones(3, device="meta")}):
        with pytest.raises(ValueError, match="is on meta but x is on cpu"):
            sparsekern.sparse_linear(x, w24, **kw)


def test_sparse_linear_matches_a_float64_reference():
    w = random_24(19, 44, seed=11)
    x = torch.randn(3, 5, 44, generator=torch.Generator().manual_seed(12))
    bias = torch.randn(19)
    y = sparsekern.sparse_linear(x, sparsekern.compress_24(w), bias, activation="relu")
    ref = torch.relu(x.double() @ w.double().t() + bias.double())
    # fp32 accumulation of K = 44 products: within 2x torch's own fp32 error against float64
    torch_err = (torch.relu(x @ w.t() + bias).double() - ref).abs().max()
    assert (y.double() - ref).abs().max() <= 2 * torch_err + 1e-6


def test_pickled_layer_drops_the_arch_specific_buffer_and_rebuilds_for_its_device():
    # torch.save(model) / torch.load(map_location=...) on another GPU must not reuse a buffer made for another arch
    # (issue 17, finding 6). On the CPU: a stand-in buffer is dropped, the weight and outputs survive exactly.
    import io

    lin = torch.nn.Linear(32, 16)
    with torch.no_grad():
        lin.weight.copy_(random_24(16, 32, seed=13))
    layer = sparsekern.SparseLinear.from_linear(lin, dense_cache=True)
    fake = torch.zeros(7, dtype=torch.uint8)
    layer._buffers["cslt_buffer"] = fake
    layer.weight24._cslt, layer.weight24._cslt_tag = fake, ("cuda:0", "sm80", "0.8.1")
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    back = torch.load(buf, weights_only=False)
    assert back.cslt_buffer is None and back.weight24.cslt is None and back.weight24.cslt_tag is None
    assert back.dense_weight_cache is not None  # derived data rebuilt where the layer landed
    assert back.weight24.values is back.values
    x = torch.randn(3, 32)
    assert torch.equal(back(x), layer(x))


@pytest.mark.parametrize("cap,dtype,ok", [
    ((7, 5), torch.float16, False), ((7, 0), torch.int8, False), ((8, 0), torch.float16, True),
    ((8, 6), torch.float8_e4m3fn, False), ((8, 9), torch.float8_e4m3fn, True), ((9, 0), torch.bfloat16, True),
])
def test_cuslt_capability_rule(cap, dtype, ok):
    # a T4 (sm75) or V100 (sm70) must fall back to the portable-format kernels, not fail in cslt_compress
    # (issue 17, finding 5); the rule is a pure function, so the CPU tests it
    from sparsekern.ops import cslt

    why = cslt.capability_reason(cap, dtype)
    assert (why is None) == ok
    if not ok:
        assert f"sm{cap[0]}{cap[1]}" in why


def test_raw_ops_refuse_real_and_meta_tensors_mixed():
    # the dispatcher routes a call mixing CPU and meta tensors to the fake kernels (issue 16's reproducer): they
    # must refuse, not return uninitialised memory
    x, vals = torch.ones(2, 8), torch.randn(3, 4)
    codes = torch.full((3, 1), 0x84, dtype=torch.uint8)
    with pytest.raises(ValueError, match="spmm_24: bias is on meta but x is on cpu"):
        torch.ops.sparsekern.spmm_24(x, vals, codes, torch.zeros(3, device="meta"))
    with pytest.raises(ValueError, match="decompress_24: codes is on meta but values is on cpu"):
        torch.ops.sparsekern.decompress_24(vals, codes.to("meta"), 8)
    with pytest.raises(ValueError, match="prune_nm: scores is on meta but w is on cpu"):
        torch.ops.sparsekern.prune_nm(torch.randn(2, 8), 2, 4, torch.randn(2, 8, device="meta"))
    # all-meta stays legal (shape propagation)
    y = torch.ops.sparsekern.spmm_24(x.to("meta"), vals.to("meta"), codes.to("meta"))
    assert y.device.type == "meta" and y.shape == (2, 3)


@pytest.mark.parametrize("key,bad,msg", [
    ("values", lambda t: t.to("meta"), "is on the meta device"),
    ("values", lambda t: t.to_sparse(), "is a torch.sparse_coo tensor"),
    ("codes", lambda t: t.tolist(), "is a list, not a tensor"),
    ("format_version", lambda t: torch.tensor([1.0]), "format_version must be an integer tensor"),
])
def test_state_dict_entries_that_hold_no_usable_data_are_refused(key, bad, msg):
    # issue 16: meta tensors, sparse COO values and a float format_version were accepted, then failed in forward
    sd = Sparse24Weight.from_dense(random_24(4, 16, seed=14)).state_dict("l.")
    sd["l." + key] = bad(sd["l." + key])
    with pytest.raises(CheckpointError, match=msg):
        Sparse24Weight.from_state_dict(sd, "l.")
