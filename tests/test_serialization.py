"""state_dict / torch.save / safetensors / save_pretrained round trips (exact), loading dense 2:4 checkpoints into
SparseLinear, compressed-tensors sparse-24-bitmask checkpoints, and every refusal leaving the model unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import sparsekern
from sparsekern import serialization as ser
from sparsekern.convert import densify, sparsify
from sparsekern.linear import CheckpointError, SparseLinear


def prune_24_ref(w: torch.Tensor) -> torch.Tensor:
    """Oracle 2:4 magnitude pruning in plain PyTorch: keep the two largest |w| of every aligned group of 4."""
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    keep = g.abs().topk(2, dim=-1).indices
    return (g * torch.zeros_like(g, dtype=torch.bool).scatter_(-1, keep, True)).reshape(n, k)


def pruned_mlp(dtype=torch.float32) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(36, 64), nn.ReLU(), nn.Linear(64, 20, bias=False)).to(dtype)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.copy_(prune_24_ref(m.weight))
    return model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def tiny_llama(tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and "lm_head" not in name:
                m.weight.copy_(prune_24_ref(m.weight))
    return model


# ------------------------------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("quant", [None, "int8", "fp8"])
def test_state_dict_contents_and_torch_save_round_trip(tmp_path, quant):
    model = pruned_mlp()
    sparsify(model, exclude=(), quant=quant)
    sd = model.state_dict()
    want = {"0.values", "0.codes", "0.bias", "0.shape", "0.format_version", "2.values", "2.codes", "2.shape",
            "2.format_version"}
    if quant:
        want |= {"0.weight_scale", "2.weight_scale"}
    assert set(sd) == want
    assert sd["0.shape"].tolist() == [64, 36] and sd["0.format_version"].tolist() == [1]
    # the same layout as the portable format's own state_dict: Compressed24 reads a layer's entries
    c = sparsekern.weight.Sparse24Weight.from_state_dict(sd, "0.")
    assert c.shape == (64, 36) and torch.equal(c.codes, sd["0.codes"])
    torch.save(sd, tmp_path / "sd.pt")
    fresh = pruned_mlp()
    with torch.no_grad():
        for m in fresh:
            if isinstance(m, nn.Linear):
                m.weight.mul_(2)  # different weights: the load must replace them
    sparsify(fresh, exclude=(), quant=quant)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt"))
    for k, v in sd.items():
        got = fresh.state_dict()[k]
        assert got.dtype == v.dtype and torch.equal(got.view(torch.uint8) if got.dtype.itemsize == 1 else got,
                                                    v.view(torch.uint8) if v.dtype.itemsize == 1 else v), k
    x = torch.randn(5, 36)
    assert torch.equal(fresh(x), model(x))


def test_dense_24_state_dict_loads_into_sparse_model():
    dense = pruned_mlp()
    sparse = pruned_mlp()
    sparsify(sparse, exclude=())
    sparse.load_state_dict(dense.state_dict())  # keys "0.weight", "0.bias", "2.weight": compressed on load
    x = torch.randn(4, 36)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(sparse[0].to_linear().weight, dense[0].weight)


def test_dense_non_24_state_dict_refused_unchanged():
    sparse = pruned_mlp()
    sparsify(sparse, exclude=())
    before = snapshot(sparse)
    bad = pruned_mlp().state_dict()
    bad["2.weight"][3, 4:8] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(CheckpointError, match=r"model is unchanged\):\n  2: weight is not 2:4 along in_features: "
                                              r"row 3, group 1 \(columns 4\.\.7\) has 4 non-zeros"):
        ser.load_state_dict(sparse, bad)
    assert_unchanged(sparse, before)


def test_unknown_format_version_refused_unchanged(tmp_path):
    model = pruned_mlp()
    sparsify(model, exclude=())
    before = snapshot(model)
    sd = snapshot(model)
    sd["2.format_version"] = torch.tensor([7])
    with pytest.raises(CheckpointError, match=r"2: unknown 2:4 format version \[7\]"):
        ser.load_state_dict(model, sd)
    assert_unchanged(model, before)
    # torch's own load_state_dict path reports it too, and a layer it refuses is not changed
    with pytest.raises(RuntimeError, match=r"unknown 2:4 format version \[7\]"):
        model.load_state_dict(sd)
    assert_unchanged(model, before)


@pytest.mark.parametrize("key,tensor,msg", [
    ("0.values", lambda sd: sd["0.values"][:, :10], r"0: values has shape \(64, 10\), expected \(64, 18\)"),
    ("0.codes", lambda sd: sd["0.codes"][:-1], r"0: codes must be uint8 of shape \(64, 5\)"),
    ("0.shape", lambda sd: torch.tensor([64, 40]), r"0: checkpoint weight shape \[64, 40\] != layer shape"),
    ("0.codes", lambda sd: torch.full_like(sd["0.codes"], 0x33), r"invalid pattern code 3"),
    ("0.bias", lambda sd: sd["0.bias"][:-1], r"0: bias has shape \(63,\), expected \(64,\)"),
])
def test_truncated_or_mismatched_tensors_refused_unchanged(key, tensor, msg):
    model = pruned_mlp()
    sparsify(model, exclude=())
    before = snapshot(model)
    sd = snapshot(model)
    sd["2.values"] = sd["2.values"] * 3  # a valid change to an earlier-checked layer: must not be applied either
    sd[key] = tensor(sd)
    with pytest.raises(CheckpointError, match=msg):
        ser.load_state_dict(model, sd)
    assert_unchanged(model, before)


def test_missing_and_quant_mismatch_refused():
    model = pruned_mlp()
    sparsify(model, exclude=())
    sd = snapshot(model)
    del sd["0.codes"]
    with pytest.raises(CheckpointError, match=r"0: state dict lacks 0\.codes"):
        ser.load_state_dict(model, sd)
    q = pruned_mlp()
    sparsify(q, exclude=(), quant="int8")
    with pytest.raises(CheckpointError, match=r"checkpoint values are torch.int8 \(quant='int8'\) but the layer has "
                                              r"quant=None"):
        ser.load_state_dict(model, q.state_dict())


def test_non_strict_load_skips_absent_layers():
    model = pruned_mlp()
    sparsify(model, exclude=())
    before = snapshot(model)
    other = pruned_mlp()
    sparsify(other, exclude=())
    partial = {k: v for k, v in other.state_dict().items() if k.startswith("2.")}
    with pytest.raises(CheckpointError, match=r"0: the state dict has no weight for this layer \(expected 0\.values"):
        ser.load_state_dict(model, partial)
    assert_unchanged(model, before)
    ser.load_state_dict(model, partial, strict=False)
    assert torch.equal(model[0].values, before["0.values"]) and torch.equal(model[2].values, other[2].values)


def test_safetensors_round_trip_and_truncated_file(tmp_path):
    model = pruned_mlp(torch.bfloat16)
    sparsify(model, exclude=(), quant="int8")
    path = tmp_path / "m.safetensors"
    ser.save_safetensors(model, path)
    fresh = pruned_mlp(torch.bfloat16)
    sparsify(fresh, exclude=(), quant="int8")
    with torch.no_grad():
        fresh[0].bias.add_(1)
    ser.load_safetensors(fresh, path)
    x = torch.randn(3, 36, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), model(x))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    before = snapshot(fresh)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        ser.load_safetensors(fresh, cut)
    assert_unchanged(fresh, before)


# ------------------------------------------------------------------------------------------------- save_pretrained


@pytest.mark.parametrize("quant", [None, "int8"])
def test_save_pretrained_from_pretrained_llama_identical(tmp_path, quant):
    model = tiny_llama()
    sparsify(model, quant=quant)
    out = sparsekern.save_pretrained(model, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "sparsekern" and qc["format_version"] == 2 and len(qc["layers"]) == 14
    assert qc["layers"]["model.layers.1.mlp.down_proj"] == {
        "in_features": 128, "out_features": 64, "bias": False, "dtype": "float32", "quant": quant,
        "weight_layout": "linear"}
    loaded = sparsekern.from_pretrained(out)
    assert type(loaded) is type(model) and not loaded.training
    assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) == 14
    assert all(m.quant == quant for m in loaded.modules() if isinstance(m, SparseLinear))
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def write_v1_folder(model, directory, user=None):
    """The folder layout sparsekern wrote before format version 2 (sparsekern_config.json beside config.json and
    one model.safetensors with per-tensor CRC-32s), still read by sparsekern.from_pretrained."""
    directory.mkdir()
    model.config.architectures = [type(model).__name__]
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(cfg))
    tied = ser.save_safetensors(model, directory / "model.safetensors")
    layers = {name: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
                     "dtype": "float32", "quant": m.quant, "weight_layout": m.weight_layout}
              for name, m in model.named_modules() if isinstance(m, SparseLinear)}
    meta = {"format": "sparsekern", "format_version": 1, "sparsekern_version": "0.1.0", "portable_format_version": 1,
            "dtype": "float32", "layers": layers, "tied": tied}
    if user is not None:
        meta["user"] = user
    (directory / "sparsekern_config.json").write_text(json.dumps(meta))
    return directory


def test_v1_folder_still_loads_and_resaves_as_v2(tmp_path):
    model = tiny_llama()
    sparsify(model)
    v1 = write_v1_folder(model, tmp_path / "v1", user={"from": "v1"})
    loaded = sparsekern.from_pretrained(v1)
    assert sum(isinstance(m, SparseLinear) for m in loaded.modules()) == 14
    assert loaded.sparsekern_metadata == {"from": "v1"}
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        loaded.save_pretrained(tmp_path / "v2")  # transformers' own save: the current format
        from transformers import AutoModelForCausalLM

        again = AutoModelForCausalLM.from_pretrained(tmp_path / "v2")
        assert again.sparsekern_metadata == {"from": "v1"}
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_from_pretrained_dtype_override(tmp_path):
    model = tiny_llama()
    sparsify(model)
    out = sparsekern.save_pretrained(model, tmp_path / "ckpt")
    loaded = sparsekern.from_pretrained(out, dtype=torch.bfloat16)
    q = loaded.model.layers[0].self_attn.q_proj
    assert q.values.dtype == torch.bfloat16 and loaded.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(q.to_linear().weight, model.model.layers[0].self_attn.q_proj.to_linear().weight.bfloat16())
    # The reference: the dense pruned model loaded by transformers in bfloat16 (its rotary tables stay float32, unlike
    # model.to(bfloat16)), then sparsified: the same values cast once, the same kernels.
    from transformers import AutoModelForCausalLM

    densify(model)
    model.save_pretrained(tmp_path / "dense")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.bfloat16)
    sparsify(ref)
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref(ids).logits)


def tiny_gpt2_24():
    """A tiny GPT-2 (tied head) whose Conv1D weights ([in, out]) are 2:4 along in_features."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "Conv1D":
                m.weight.copy_(prune_24_ref(m.weight.t()).t())
    return model


def test_save_pretrained_tied_gpt2_identical(tmp_path):
    model = tiny_gpt2_24()
    sparsify(model)
    out = sparsekern.save_pretrained(model, tmp_path / "gpt2")
    loaded = sparsekern.from_pretrained(out)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_save_pretrained_refuses_existing_dir_unless_overwrite(tmp_path):
    model = tiny_llama()
    sparsify(model)
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "keep.txt").write_text("old")
    with pytest.raises(FileExistsError, match=r"ckpt exists; pass overwrite=True"):
        sparsekern.save_pretrained(model, target)
    assert (target / "keep.txt").exists()
    sparsekern.save_pretrained(model, target, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_pretrained_user_metadata_round_trip(tmp_path):
    model = tiny_llama()
    sparsify(model)
    user = {"method": "wanda", "nsamples": 8, "ppl": 12.5, "kept_dense": ["lm_head"], "nested": {"a": None}}
    out = sparsekern.save_pretrained(model, tmp_path / "ckpt", metadata=user)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["metadata"] == user and len(qc["layers"]) == 14
    loaded = sparsekern.from_pretrained(out)
    assert loaded.sparsekern_metadata == user
    # The metadata was for that save: the model's own (none) is unchanged, and a save without it records null.
    assert model.sparsekern_metadata is None
    plain = sparsekern.save_pretrained(model, tmp_path / "plain")
    assert json.loads((plain / "config.json").read_text())["quantization_config"]["metadata"] is None
    assert sparsekern.from_pretrained(plain).sparsekern_metadata is None
    # A loaded model keeps its metadata through a plain re-save.
    again = sparsekern.save_pretrained(loaded, tmp_path / "again")
    assert sparsekern.from_pretrained(again).sparsekern_metadata == user


@pytest.mark.parametrize("bad, msg", [
    ({"t": torch.zeros(2)}, r"metadata is not JSON-serialisable \(Object of type Tensor"),
    ({"s": {1, 2}}, r"metadata is not JSON-serialisable \(Object of type set"),
    ("method=wanda", r"metadata must be a dict \(JSON-serialisable\) or None, not str"),
])
def test_save_pretrained_bad_metadata_refused_before_writing(tmp_path, bad, msg):
    model = tiny_llama()
    sparsify(model)
    target = tmp_path / "sub" / "ckpt"
    with pytest.raises(TypeError, match=msg):
        sparsekern.save_pretrained(model, target, metadata=bad)
    assert list(tmp_path.iterdir()) == []  # not even the parent folder or a temporary sibling
    # An existing checkpoint is left as it was, even with overwrite=True.
    sparsekern.save_pretrained(model, target, metadata={"v": 1})
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(TypeError, match=msg):
        sparsekern.save_pretrained(model, target, metadata=bad, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in target.parent.iterdir()] == ["ckpt"]


def test_save_pretrained_circular_metadata_refused(tmp_path):
    model = tiny_llama()
    sparsify(model)
    bad: dict = {}
    bad["self"] = bad
    with pytest.raises(TypeError, match=r"save_pretrained: metadata is not JSON-serialisable \(Circular"):
        sparsekern.save_pretrained(model, tmp_path / "ckpt", metadata=bad)
    assert list(tmp_path.iterdir()) == []


def test_from_pretrained_unknown_version_and_truncated(tmp_path):
    model = tiny_llama()
    sparsify(model)
    out = sparsekern.save_pretrained(model, tmp_path / "ckpt")
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["format_version"] = 3
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"unknown sparsekern format_version 3; this sparsekern .* reads "
                                              r"version 2 \(upgrade sparsekern"):
        sparsekern.from_pretrained(out)
    cfg["quantization_config"]["format_version"] = 2
    cfg_path.write_text(json.dumps(cfg))
    st = out / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        sparsekern.from_pretrained(out)
    # the earlier layout's own version check
    v1 = write_v1_folder(model, tmp_path / "v1")
    meta = json.loads((v1 / "sparsekern_config.json").read_text())
    meta["format_version"] = 7
    (v1 / "sparsekern_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"unknown format version 7; this sparsekern .* reads version 1"):
        sparsekern.from_pretrained(v1)


# ------------------------------------------------------------------------------------------------- compressed-tensors


# Loading compressed-tensors checkpoints (unquantised and W8A8, refusals, truncation) through transformers is
# tested in tests/test_hf_compressed_tensors.py, on folders built with compressed-tensors' own config classes.


def test_compressed_tensors_export_round_trip(tmp_path):
    model = tiny_llama()
    sparsify(model)
    out = ser.save_compressed_tensors(model, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert cfg["quantization_config"]["sparsity_config"]["ignore"] == ["lm_head"]
    from safetensors.torch import load_file

    t = load_file(str(out / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert t[q + ".shape"].flatten().tolist() == [64, 64] and t[q + ".bitmask"].shape == (64, 8)
    # the oracle: the bitmask unpacks (little-endian bits) to the non-zero pattern of the weight, 2 per group
    dense = model.model.layers[0].self_attn.q_proj.dense_weight()
    mask = torch.from_numpy(np.unpackbits(t[q + ".bitmask"].numpy(), axis=-1, bitorder="little")).bool()
    assert bool(((dense != 0) <= mask).all()) and bool((mask.reshape(64, 16, 4).sum(-1) == 2).all())
    assert torch.equal(t[q + ".compressed"], dense[mask].reshape(64, 32))
    loaded = sparsekern.from_pretrained(out)
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    qmodel = tiny_llama()
    sparsify(qmodel, quant="int8")
    with pytest.raises(ValueError, match="quantised SparseLinear layers cannot be exported"):
        ser.save_compressed_tensors(qmodel, tmp_path / "q")
    assert not (tmp_path / "q").exists()
