"""sparsify(model) / densify(model): selection, report, strict refusal leaving the model bit-identical, atomicity,
Hugging Face models (tiny random Llama and GPT-2 built here; no downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.convert import SparsifyError, densify, sparsify
from sparsekern.linear import SparseLinear


def prune_24_ref(w: torch.Tensor) -> torch.Tensor:
    """Oracle 2:4 magnitude pruning in plain PyTorch: keep the two largest |w| of every aligned group of 4."""
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    keep = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)
    return (g * mask).reshape(n, k)


def prune_model_ref(model: nn.Module, skip=("lm_head",)) -> None:
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for name, m in model.named_modules():
            if any(s in name for s in skip):
                continue
            if isinstance(m, nn.Linear):
                m.weight.copy_(prune_24_ref(m.weight))
            elif isinstance(m, Conv1D):
                m.weight.copy_(prune_24_ref(m.weight.t()).t())


def snapshot(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bit_identical(model: nn.Module, before: dict, types: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert {n: type(m) for n, m in model.named_modules()} == types


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.blocks = nn.ModuleList([nn.ModuleDict({"up": nn.Linear(32, 64), "down": nn.Linear(64, 32)})
                                     for _ in range(2)])
        self.lm_head = nn.Linear(32, 50, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["down"](torch.relu(b["up"](h)))
        return self.lm_head(h)


def pruned_net() -> Net:
    net = Net().eval()
    prune_model_ref(net, skip=())
    return net


def test_sparsify_report_and_outputs():
    net = pruned_net()
    ids = torch.randint(0, 50, (2, 7))
    dense_out = net(ids)
    report = sparsify(net)
    assert report.converted == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    assert report.skipped == {"lm_head": "excluded"}
    # 4 float32 weights of 32*64 elements: dense 4 bytes each; compressed half the values + 1 code byte per 8.
    assert report.bytes_before == 4 * 32 * 64 * 4
    assert report.bytes_after == 2 * (64 * 16 * 4 + 64 * 4) + 2 * (32 * 32 * 4 + 32 * 8)
    assert "4 layer(s) converted" in str(report) and "skipped lm_head: excluded" in str(report)
    assert isinstance(net.blocks[0]["up"], SparseLinear) and type(net.lm_head) is nn.Linear
    torch.testing.assert_close(net(ids), dense_out, rtol=1e-5, atol=1e-5)


def test_strict_refuses_and_leaves_model_bit_identical():
    net = pruned_net()
    with torch.no_grad():
        net.blocks[1]["up"].weight.normal_()  # one dense layer
    before, types = snapshot(net), {n: type(m) for n, m in net.named_modules()}
    with pytest.raises(SparsifyError, match=r"1 included layer\(s\) are not 2:4: blocks\.1\.up \(not 2:4: row 0, "
                                            r"group \d+ has \d non-zeros\).*The model is unchanged") as info:
        sparsify(net)
    assert list(info.value.layers) == ["blocks.1.up"]
    assert_bit_identical(net, before, types)


def test_non_strict_skips_with_reason():
    net = pruned_net()
    with torch.no_grad():
        net.blocks[1]["up"].weight.normal_()
    report = sparsify(net, strict=False)
    assert "blocks.1.up" not in report.converted and report.skipped["blocks.1.up"].startswith("not 2:4: row ")
    assert type(net.blocks[1]["up"]) is nn.Linear and isinstance(net.blocks[1]["down"], SparseLinear)


def test_in_features_not_multiple_of_4_named():
    model = nn.Sequential(nn.Linear(30, 8), nn.Linear(8, 4))
    with pytest.raises(SparsifyError, match=r"0 \(in_features = 30 is not a multiple of 4\)"):
        sparsify(model, exclude=())
    report = sparsify(model, exclude=(), strict=False)
    assert report.converted == []
    assert report.skipped["0"] == "in_features = 30 is not a multiple of 4"
    assert report.skipped["1"].startswith("not 2:4: row 0, group ")  # a random dense layer


def test_include_exclude_patterns():
    net = pruned_net()
    report = sparsify(net, include=["up"], exclude=["blocks.1.*"])
    assert report.converted == ["blocks.0.up"]
    assert report.skipped == {"blocks.0.down": "not included", "blocks.1.up": "excluded",
                              "blocks.1.down": "excluded", "lm_head": "not included"}  # exclude replaced
    net2 = pruned_net()
    assert sparsify(net2, include=lambda name, m: m.out_features == 32, exclude=None).converted == \
        ["blocks.0.down", "blocks.1.down"]


def test_tied_weight_skipped():
    net = pruned_net()
    head = nn.Linear(32, 32, bias=False)
    net.blocks[0]["tied"] = head
    net.blocks[1]["tied"] = head  # one module (and Parameter) in two places
    shared = nn.Linear(32, 32)
    with torch.no_grad():
        shared.weight.copy_(prune_24_ref(torch.randn(32, 32)))
    net.extra = shared
    net.extra2 = nn.Linear(32, 32)
    net.extra2.weight = shared.weight  # a Parameter shared by two modules
    report = sparsify(net, strict=False)
    assert "tied" in report.skipped["extra"] and "tied" in report.skipped["extra2"]


def test_failure_midway_leaves_model_unchanged(monkeypatch):
    net = pruned_net()
    before, types = snapshot(net), {n: type(m) for n, m in net.named_modules()}
    real = SparseLinear.from_linear
    calls = []

    def flaky(linear, **kw):
        calls.append(kw.get("name"))
        if len(calls) == 3:
            raise RuntimeError("simulated failure while compressing the third layer")
        return real(linear, **kw)

    monkeypatch.setattr(SparseLinear, "from_linear", staticmethod(flaky))
    with pytest.raises(RuntimeError, match="simulated failure"):
        sparsify(net)
    assert len(calls) == 3
    assert_bit_identical(net, before, types)


def test_densify_is_inverse():
    net = pruned_net()
    ids = torch.randint(0, 50, (2, 5))
    before = snapshot(net)
    sparsify(net, quant=None)
    names = densify(net)
    assert names == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    assert not any(isinstance(m, SparseLinear) for m in net.modules())
    after = net.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    net(ids)


def test_quant_sparsify_report_bytes():
    net = pruned_net()
    report = sparsify(net, quant="int8")
    # int8 values (1 byte) + codes + one float32 scale per output channel
    assert report.bytes_after == 2 * (64 * 16 + 64 * 4 + 64 * 4) + 2 * (32 * 32 + 32 * 8 + 32 * 4)
    assert all(net.blocks[i][n].quant == "int8" for i in range(2) for n in ("up", "down"))


# ------------------------------------------------------------------------------------------------- Hugging Face


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    prune_model_ref(model)
    return model


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    model = GPT2LMHeadModel(cfg).eval()
    prune_model_ref(model)
    return model


def test_llama_greedy_generation_identical_after_sparsify():
    model = tiny_llama()
    ids = torch.tensor([[1, 17, 42, 5, 88, 23]])
    gen = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits_dense = model(ids).logits
        dense_tokens = model.generate(ids, **gen)
    report = sparsify(model)
    assert len(report.converted) == 2 * 7  # q, k, v, o, gate, up, down per layer; lm_head excluded
    assert report.skipped == {"lm_head": "excluded"}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, logits_dense, rtol=1e-4, atol=1e-4)
        sparse_tokens = model.generate(ids, **gen)
    assert sparse_tokens.shape == (1, 26)
    assert torch.equal(sparse_tokens, dense_tokens)


@pytest.mark.slow
def test_compile_fullgraph_sparsified_llama():
    # The whole HF model with 14 SparseLinear layers traces as one graph (aot_eager: fake kernels, no C++ build).
    torch._dynamo.reset()
    model = tiny_llama()
    sparsify(model)
    ids = torch.tensor([[1, 17, 42, 5, 88, 23]])
    with torch.no_grad():
        ref = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(ids).logits, ref)


def test_gpt2_conv1d_sparsify_and_densify():
    from transformers.pytorch_utils import Conv1D

    model = tiny_gpt2()
    ids = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        ref = model(ids).logits
    report = sparsify(model)
    assert len(report.converted) == 2 * 4  # c_attn, c_proj (attn), c_fc, c_proj (mlp)
    assert isinstance(model.transformer.h[0].attn.c_attn, SparseLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
    densify(model)
    assert type(model.transformer.h[0].mlp.c_fc) is Conv1D
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=1e-5, atol=1e-5)


def test_lazy_top_level_names():
    assert sparsekern.sparsify is sparsify and sparsekern.densify is densify
    assert sparsekern.SparseLinear is SparseLinear


def test_sparsify_dense_cache_option():
    from sparsekern.ops.core import prune_nm

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.copy_(prune_nm(m.weight, 2, 4)[0])
    rep = sparsify(model, exclude=(), dense_cache=True)
    assert rep.converted == ["0", "2"]
    assert all(isinstance(model[i], SparseLinear) and model[i].dense_weight_cache is not None for i in (0, 2))
    fresh = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="dense_cache=True is for unquantised layers"):
        sparsify(fresh, exclude=(), quant="int8", dense_cache=True)
    assert isinstance(fresh[0], nn.Linear)


# ------------------------------------------------------------------ structural skips (issue 16)
class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


def _prune_all(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(sparsekern.prune_nm(m.weight, 2, 4)[0])
    return model


def test_sparsify_skips_linear_subclasses_unless_allowed():
    torch.manual_seed(0)
    model = _prune_all(nn.Sequential(_ScaledLinear(16, 8), nn.ReLU(), nn.Linear(8, 4)))
    x = torch.randn(3, 16)
    ref = model(x)
    report = sparsify(model, exclude=())
    assert report.converted == ["2"] and "subclass of nn.Linear" in report.skipped["0"]
    assert isinstance(model[0], _ScaledLinear)
    torch.testing.assert_close(model(x), ref)  # outputs unchanged: the subclass's own forward is still there
    report = sparsify(model, exclude=(), allow_subclasses=True)
    assert report.converted == ["0"] and isinstance(model[0], SparseLinear)


def test_sparsify_never_converts_a_linear_whose_parent_reads_its_weight():
    torch.manual_seed(0)
    layer = _prune_all(nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ref = layer(x)
    report = sparsify(layer, exclude=(), allow_subclasses=True)
    assert report.converted == []
    for name in ("self_attn.out_proj", "linear1", "linear2"):
        assert "reads the weight tensor directly" in report.skipped[name]
    assert "MultiheadAttention" in report.skipped["self_attn.out_proj"]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)  # runs (it used to fail on .weight)
