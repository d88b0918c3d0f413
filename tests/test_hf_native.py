"""transformers-native loading and saving of sparsekern checkpoints (sparsekern.hf): AutoModelForCausalLM
.from_pretrained builds SparseLinear layers, model.save_pretrained writes the format, pipelines and generate work.

Oracles: the pruned model itself (logits and greedy tokens bit for bit after the round trip), and the dense model with
the same 2:4 weights (its logits within float32 tolerance)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern.convert import densify, sparsify
from sparsekern.linear import SparseLinear
from sparsekern.weight import CheckpointError

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from test_serialization import tiny_gpt2_24, tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# subprocesses import the sparsekern this test imported (the source tree, or the installed wheel in CI)
SPARSEKERN_PATH = str(Path(sparsekern.__file__).resolve().parents[1])


def _ids(vocab=96, shape=(2, 9), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, shape, generator=g)


def _n_sparse(model):
    return sum(isinstance(m, SparseLinear) for m in model.modules())


def _greedy(model, ids, n=6):
    return model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)


# ------------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("quant", [None, "int8"])
def test_prune_save_automodel_identical_logits_and_tokens(tmp_path, quant):
    model = tiny_llama()
    dense_ref = copy.deepcopy(model)  # the dense model with the same 2:4 weights
    sparsify(model, quant=quant)
    assert model.config.quantization_config.quant_method == "sparsekern" and model.hf_quantizer is not None
    model.save_pretrained(tmp_path / "ckpt")  # transformers' own method
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert _n_sparse(loaded) == 14 and type(loaded.lm_head) is nn.Linear
    assert {m.quant for m in loaded.modules() if isinstance(m, SparseLinear)} == {quant}
    ids = _ids()
    with torch.no_grad():
        got, want = loaded(ids).logits, model(ids).logits
        assert torch.equal(got, want)
        if quant is None:  # the dense model with the same 2:4 weights
            torch.testing.assert_close(got, dense_ref(ids).logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(_greedy(loaded, ids[:1]), _greedy(model, ids[:1]))
    # the same as sparsekern.from_pretrained, bit for bit
    with torch.no_grad():
        assert torch.equal(sparsekern.from_pretrained(tmp_path / "ckpt")(ids).logits, got)


def test_sharded_save_and_load(tmp_path):
    model = tiny_llama()
    sparsify(model)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    shards = [f for f in files if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in files and "model.safetensors" not in files
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    # a later unsharded save into the same folder removes the stale shards and index
    model.save_pretrained(tmp_path / "ckpt")
    left = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert left == ["config.json", "generation_config.json", "model.safetensors"]


def test_gpt2_conv1d_and_tied_head(tmp_path):
    model = tiny_gpt2_24()
    sparsify(model)
    model.save_pretrained(tmp_path / "gpt2")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2")
    assert _n_sparse(loaded) == 8 and loaded.lm_head.weight is loaded.transformer.wte.weight
    assert {m.weight_layout for m in loaded.modules() if isinstance(m, SparseLinear)} == {"conv1d"}
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("device_map", [None, "cpu", "auto", {"": "cpu"}])
def test_dtype_and_device_map(tmp_path, device_map):
    model = tiny_llama()
    sparsify(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, device_map=device_map)
    layers = [m for m in loaded.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 14 and {m.values.dtype for m in layers} == {torch.bfloat16}
    assert {m.values.device.type for m in layers} == {"cpu"} and loaded.lm_head.weight.dtype == torch.bfloat16
    q = loaded.model.layers[0].self_attn.q_proj
    assert torch.equal(q.dense_weight(), model.model.layers[0].self_attn.q_proj.dense_weight().bfloat16())
    with torch.no_grad():
        assert torch.isfinite(loaded(_ids()).logits).all()


def test_save_keeps_other_files_and_is_atomic_per_file(tmp_path, monkeypatch):
    model = tiny_llama()
    sparsify(model)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    model.save_pretrained(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "tokenizer.json" in before and "model.safetensors" in before
    # an interrupted save (the weights writer fails half-way) leaves the folder exactly as it was
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", broken)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.bias = None  # a change that would be visible in config.json
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left


def test_sparsified_model_pickles_and_deepcopies_with_its_save(tmp_path):
    import io

    model = tiny_llama()
    sparsify(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    twin = copy.deepcopy(model)
    ids = _ids()
    for i, m in enumerate((loaded, twin)):
        assert m.save_pretrained.model is m  # bound to the copy, not the original
        m.save_pretrained(tmp_path / f"c{i}")
        with torch.no_grad():
            assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path / f"c{i}")(ids).logits,
                               model(ids).logits)


def test_dtype_moves_stay_allowed(tmp_path):
    """transformers refuses .half() / .float() on models it calls quantized; a sparsified or loaded sparsekern model
    follows them like any model (SparseLinear casts its float values)."""
    model = tiny_llama()
    dense = copy.deepcopy(model)
    sparsify(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = _ids()
    for m in (model, loaded):
        m.half().float()
        m.to(torch.bfloat16)
        assert {x.values.dtype for x in m.modules() if isinstance(x, SparseLinear)} == {torch.bfloat16}
        m.float()
        with torch.no_grad():  # fp32 -> fp16 -> bf16 -> fp32 round trip of the weights, vs the dense model's
            want = copy.deepcopy(dense).half().to(torch.bfloat16).float()(ids).logits
            torch.testing.assert_close(m(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_densify_then_save_is_a_plain_checkpoint(tmp_path):
    model = tiny_llama()
    sparsify(model)
    densify(model)
    assert not getattr(model, "is_quantized", False)
    model.save_pretrained(tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert _n_sparse(loaded) == 0


def test_dequantize_gives_the_dense_model(tmp_path):
    model = tiny_llama()
    sparsify(model)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids = _ids()
    with torch.no_grad():
        sparse_logits = loaded(ids).logits
    loaded.dequantize()
    assert _n_sparse(loaded) == 0 and "quantization_config" not in loaded.config.to_dict()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, sparse_logits, rtol=1e-5, atol=1e-5)


def test_text_generation_pipeline(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, pipeline

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3, **{f"w{i}": i + 4 for i in range(92)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]",
                                  unk_token="[UNK]")
    model = tiny_llama()
    sparsify(model)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    gen = pipeline("text-generation", model=str(tmp_path / "ckpt"))
    assert _n_sparse(gen.model) == 14
    out = gen("w1 w2 w3", max_new_tokens=5, do_sample=False)
    # the oracle: the original (in-memory) model's greedy continuation, decoded
    ids = tok("w1 w2 w3", return_tensors="pt").input_ids
    ref = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    new = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(new.split()) == 5 and out[0]["generated_text"] == "w1 w2 w3" + new


# ------------------------------------------------------------------------------------------------- bad input


def _saved(tmp_path, **kw):
    model = tiny_llama()
    sparsify(model, **kw)
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def _edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_unknown_format_version_is_refused(tmp_path):
    _, ckpt = _saved(tmp_path)
    _edit_config(ckpt, lambda c: c["quantization_config"].update(format_version=9))
    with pytest.raises(CheckpointError, match=r"unknown sparsekern format_version 9; this sparsekern .* reads "
                                              r"version 2 \(upgrade sparsekern"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_layer_spec_must_fit_the_module_kind(tmp_path):
    _, ckpt = _saved(tmp_path)
    _edit_config(ckpt, lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].update(
        weight_layout="conv1d"))
    with pytest.raises(CheckpointError, match=r"layer 'model\.layers\.0\.mlp\.up_proj' has weight_layout 'conv1d' "
                                              r"but the model's layer is a Linear"):
        AutoModelForCausalLM.from_pretrained(ckpt)


def test_truncated_and_missing_shards_are_refused(tmp_path):
    model = tiny_llama()
    sparsify(model)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    shards = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))
    victim = shards[1]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{victim.name}: not a readable safetensors file .* truncated or "
                                              "corrupt"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"checkpoint file .*{victim.name} does not exist"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_layer_missing_from_checkpoint_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _, ckpt = _saved(tmp_path)
    st = ckpt / "model.safetensors"
    t = load_file(str(st))
    del t["model.layers.1.mlp.up_proj.codes"]
    save_file(t, str(st), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: the file's metadata has no 'sparsekern_checksums'"):
        AutoModelForCausalLM.from_pretrained(ckpt)  # re-saved by another writer: refused as such first
    with pytest.raises(CheckpointError, match=r"lists layer 'model\.layers\.1\.mlp\.up_proj' but the checkpoint has "
                                              r"no 'model\.layers\.1\.mlp\.up_proj\.codes'"):
        sparsekern.from_pretrained(ckpt, verify=False)


def test_invalid_pattern_codes_are_refused_naming_the_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    _, ckpt = _saved(tmp_path)
    st = ckpt / "model.safetensors"
    t = load_file(str(st))
    codes = t["model.layers.0.self_attn.k_proj.codes"].clone()
    codes[3, 0] = (codes[3, 0] & 0x0F) | 0xF0  # group 1 (byte 0's high nibble): code 15, not one of the six pairs
    t["model.layers.0.self_attn.k_proj.codes"] = codes
    save_file(t, str(st), metadata={"format": "pt"})  # no checksums: the pattern check itself must catch it
    token = sparsekern.hf.verify_checksums.set(False)
    with pytest.raises(CheckpointError, match=r"1 sparse layer\(s\) could not be loaded: "
                                              r"model\.layers\.0\.self_attn\.k_proj: .*codes\[3\] group 1 holds the "
                                              r"invalid pattern code 15"):
        try:
            AutoModelForCausalLM.from_pretrained(ckpt)
        finally:
            sparsekern.hf.verify_checksums.reset(token)


def test_changed_tensor_fails_its_checksum(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _, ckpt = _saved(tmp_path)
    st = ckpt / "model.safetensors"
    with safe_open(str(st), "pt") as f:
        meta = f.metadata()
    t = load_file(str(st))
    t["model.norm.weight"] = t["model.norm.weight"] * 1.001
    save_file(t, str(st), metadata=meta)
    with pytest.raises(CheckpointError, match=r"checksum mismatch: tensor 'model\.norm\.weight' does not match"):
        AutoModelForCausalLM.from_pretrained(ckpt)
    assert _n_sparse(sparsekern.from_pretrained(ckpt, verify=False)) == 14


def test_without_import_sparsekern_transformers_warns_and_loads_no_sparse_layer(tmp_path):
    """What a user who forgot `import sparsekern` sees: transformers' own warning naming the quant method, and its
    load report of the layers it could not fill (there is no hook for sparsekern to add to it)."""
    _, ckpt = _saved(tmp_path)
    code = ("import transformers, torch\n"
            f"m = transformers.AutoModelForCausalLM.from_pretrained({str(ckpt)!r})\n"
            "print('SPARSE', sum(type(x).__name__ == 'SparseLinear' for x in m.modules()))\n")
    env = {**os.environ, "PYTHONPATH": SPARSEKERN_PATH}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-2000:]
    assert "SPARSE 0" in out
    assert "Unknown quantization type, got sparsekern" in out
    assert "MISSING" in out and "q_proj.weight" in out  # the load report lists the dense weights it lacks


# ------------------------------------------------------------------------------------------------- the bundled model


@pytest.mark.slow
def test_bundled_model_round_trip_and_load_memory(tmp_path):
    """The bundled SmolLM2-135M, magnitude 2:4: save_pretrained -> AutoModelForCausalLM.from_pretrained gives the
    same logits and greedy tokens; loading the 2:4 checkpoint (in a fresh process) raises the peak RSS by less than
    the dense model's size."""
    from sparsekern import data

    model, tok = data.load_model("bundled")
    dense_bytes = sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())
    sparsekern.prune_model(model, method="magnitude", progress=False)
    sparsify(model)
    model.save_pretrained(tmp_path / "b24")
    tok.save_pretrained(tmp_path / "b24")
    ids = tok("The history of the city", return_tensors="pt").input_ids
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "b24")
    assert _n_sparse(loaded) == _n_sparse(model) == 210
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert torch.equal(_greedy(loaded, ids, 8), _greedy(model, ids, 8))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "hf_load_memory.py"), "--sparse", str(tmp_path / "b24"),
                        "--json"], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": SPARSEKERN_PATH})
    assert r.returncode == 0, r.stderr[-2000:]
    mem = json.loads(r.stdout.strip().splitlines()[-1])["sparse"]
    assert mem["sparse_layers"] == 210
    assert mem["peak_increase_mb"] * 2**20 < dense_bytes, (mem, dense_bytes)


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("device_map", ["cuda", "auto", {"": 0}])
def test_device_map_on_gpu_matches_cpu(tmp_path, device_map):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = tiny_llama()
    sparsify(model)
    model.save_pretrained(tmp_path / "ckpt")
    gpu = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float16, device_map=device_map)
    layers = [m for m in gpu.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 14 and {m.values.device.type for m in layers} == {"cuda"}
    assert {m.values.dtype for m in layers} == {torch.float16}
    ids = _ids()
    cpu = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    with torch.no_grad():
        got = gpu(ids.cuda()).logits.float().cpu()
        want = cpu(ids).logits
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)  # fp16 weights/activations vs fp32
    assert torch.equal(_greedy(gpu, ids[:1].cuda()).cpu()[:, :ids.shape[1]], ids[:1])
