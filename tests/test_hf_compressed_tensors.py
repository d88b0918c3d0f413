"""compressed-tensors "sparse-24-bitmask" checkpoints loaded through transformers' AutoModelForCausalLM once
`import sparsekern` has run (sparsekern.hf / _hf_impl): unquantised, int8 W8A8 and fp8-dynamic; the round trip
through sparsekern's own format; refusals; and what transformers does without sparsekern.

The layout oracle (written here by hand; compressed-tensors 0.20 no longer ships the sparse-24 compressor, so only its
config classes are used, for config.json's quantization_config, as llm-compressor writes it). Per 2:4 Linear X
(every block linear, not lm_head), `X.weight` is replaced by:
  X.compressed  [rows, cols/2]  the two kept values of each group of 4, row-major in increasing column order; the
                weight's float dtype, or the int8 / float8_e4m3fn codes when quantised;
  X.bitmask     uint8 [rows, ceil(cols/8)] = numpy.packbits(mask, axis=-1, bitorder="little") (bit j of byte b is
                column 8b+j); exactly 2 bits per group, groups with fewer non-zeros topped up with their lowest zero
                columns, so for cols % 8 == 4 the last byte's high nibble is 0;
  X.shape       int64 [[rows], [cols]];
  X.weight_scale  (quantised only) the model's dtype, [rows, 1] (strategy "channel") or [1] ("tensor"); symmetric,
                so no weight_zero_point; dynamic activations, so no input_scale.
  Quantised codes: int8 q = clamp(round(w / s), -127, 127), s = absmax / 127; fp8 q = e4m3(clamp(w / s, +-448)),
  s = absmax / 448; the mask is the non-zero pattern of q (topped up), compressed = q at the mask.
The W8A8 float64 reference: y = (q_x * s_x) @ (q_w * s_w)^T with per-token s_x = absmax(x_row) / 127 | 448,
q_x = clamp(round-half-even(x / s_x), -127, 127) | e4m3(x / s_x).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from compressed_tensors.config import Sparse24BitMaskConfig
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import sparsekern
from sparsekern.linear import SparseLinear
from sparsekern.weight import CheckpointError

QMAX = {"int8": 127.0, "fp8": 448.0}
SHAPES = {"even": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2),
          # every in_features (36, 100) is 4 mod 8: the last bitmask byte of every row is half used
          "odd": dict(hidden_size=36, intermediate_size=100, num_attention_heads=2, num_key_value_heads=1)}
N_SPARSE = 2 * 7  # q, k, v, o, gate, up, down per block


def prune_24(w: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Keep the two largest |w| of every group of 4, then zero ~15% of the kept values (groups with < 2 non-zeros,
    which the bitmask must top up)."""
    n, k = w.shape
    g = w.reshape(n, k // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    keep &= torch.rand(g.shape, generator=gen) > 0.15
    return torch.where(keep, g, 0.0).reshape(n, k)  # (g * keep would write -0.0)


def tiny_llama(shape="even", seed=0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, num_hidden_layers=2, max_position_embeddings=64, tie_word_embeddings=False,
                      pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.2, **SHAPES[shape])
    model = LlamaForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and "lm_head" not in name:
                m.weight.copy_(prune_24(m.weight, gen))
    return model


def block_linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def bitmask_layout(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed / bitmask / shape of a 2:4 weight or code tensor w [n, k] (module doc)."""
    n, k = w.shape
    g = (w.float() != 0).reshape(n, k // 4, 4).clone()
    for _ in range(2):  # top up groups with < 2 non-zeros by their lowest zero column
        short = g.sum(-1) < 2
        first_zero = (~g).int().argmax(-1)
        g[short, first_zero[short]] = True
    mask = g.reshape(n, k)
    return {"compressed": w[mask].reshape(n, k // 2).contiguous(),
            "bitmask": torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little")),
            "shape": torch.tensor([n, k]).reshape(-1, 1)}


def quantize(w: torch.Tensor, quant: str, strategy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [n, k], scale [n, 1] | [1] in w's dtype): the compressed-tensors symmetric weight quantisation."""
    absmax = w.abs().amax(dim=1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
    scale = (absmax / QMAX[quant]).to(w.dtype)
    r = (w.float() / scale.float()).clamp(-QMAX[quant], QMAX[quant])
    q = r.round().to(torch.int8) if quant == "int8" else r.to(torch.float8_e4m3fn)
    return q, scale


def scheme(quant: str, strategy: str = "channel", **act) -> QuantizationConfig:
    kind = "int" if quant == "int8" else "float"
    acts = None if act.get("weight_only") else QuantizationArgs(
        num_bits=8, type=kind, strategy="token" if act.get("dynamic", True) else "tensor", symmetric=True,
        dynamic=act.get("dynamic", True))
    weights = QuantizationArgs(num_bits=8, type=kind, strategy=strategy, symmetric=act.get("symmetric", True),
                               dynamic=False, group_size=16 if strategy == "group" else None)
    group = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    return QuantizationConfig(config_groups={"group_0": group}, format=f"{kind}-quantized", ignore=["lm_head"],
                              quantization_status="compressed")


def write_ct(model, directory: Path, quant=None, strategy="channel", qconfig=None, fmt="sparse-24-bitmask"):
    """Write `model` as a compressed-tensors checkpoint; returns {layer: (dense codes or weight, scale or None)}."""
    directory.mkdir()
    linears = block_linears(model)
    tensors, written = {}, {}
    for key, t in model.state_dict().items():
        layer = key.rpartition(".")[0]
        if layer in linears and key.endswith(".weight"):
            q, scale = quantize(t, quant, strategy) if quant else (t, None)
            tensors.update({f"{layer}.{k}": v for k, v in bitmask_layout(q).items()})
            if scale is not None:
                tensors[f"{layer}.weight_scale"] = scale.contiguous()
            written[layer] = (q, scale)
        else:
            tensors[key] = t.contiguous()
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(str(directory))
    cfg = json.loads((directory / "config.json").read_text())
    cfg["architectures"] = [type(model).__name__]
    if quant or qconfig:
        qc = (qconfig or scheme(quant, strategy)).model_dump()
    else:
        qc = {"quant_method": "compressed-tensors", "format": "dense", "config_groups": {}}
    sparsity = Sparse24BitMaskConfig(targets=["Linear"], ignore=["lm_head"], global_sparsity=0.5).model_dump()
    qc["sparsity_config"] = {**sparsity, "format": fmt}
    cfg["quantization_config"] = qc
    (directory / "config.json").write_text(json.dumps(cfg, indent=1))
    return written


def edit_tensors(directory: Path, fn) -> None:
    path = directory / "model.safetensors"
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path), metadata={"format": "pt"})


def sparse_layers(model) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def tokens(seed: int, batch=2, length=7) -> torch.Tensor:
    return torch.randint(3, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# ---------------------------------------------------------------------------------------------- 1. unquantised


@pytest.mark.parametrize("shape", ["even", "odd"])
def test_unquantised_loads_into_sparse_linear(tmp_path, shape):
    ref = tiny_llama(shape)
    write_ct(ref, tmp_path / "ct")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    layers = sparse_layers(model)
    assert sorted(layers) == sorted(block_linears(ref)) and len(layers) == N_SPARSE
    assert type(model.lm_head) is nn.Linear
    assert type(model.config.quantization_config).__name__ == "SparsekernConfig"
    for name, layer in layers.items():
        assert layer.quant is None and layer.values.dtype == torch.float32
        assert torch.equal(layer.to_linear().weight, ref.get_submodule(name).weight), name
    ids = tokens(1)
    want = logits(ref, ids)
    torch.testing.assert_close(logits(model, ids), want, rtol=0, atol=1e-5)
    gen = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **gen), ref.generate(ids, **gen))
    assert torch.equal(logits(sparsekern.from_pretrained(tmp_path / "ct"), ids), logits(model, ids))

    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.bfloat16)
    assert len(sparse_layers(bf16)) == N_SPARSE and bf16.lm_head.weight.dtype == torch.bfloat16
    for name, layer in sparse_layers(bf16).items():
        assert layer.values.dtype == torch.bfloat16
        assert torch.equal(layer.dense_weight(), ref.get_submodule(name).weight.to(torch.bfloat16)), name
    # vs the dense model in bf16: |logits| < 8 here, 0.125 = 4 bf16 ulps (summation order differs)
    ref_bf16 = LlamaForCausalLM(ref.config).eval()
    ref_bf16.load_state_dict(ref.state_dict())
    torch.testing.assert_close(logits(bf16, ids), logits(ref_bf16.to(torch.bfloat16), ids), rtol=0, atol=0.125)


# ---------------------------------------------------------------------------------------------- 2. int8 / fp8 W8A8


class RefW8A8(nn.Module):
    """float64 reference of a W8A8 layer (module doc), plain PyTorch."""

    def __init__(self, q, scale, quant):
        super().__init__()
        self.w = q.double() * scale.double().reshape(-1, 1)
        self.quant = quant

    def forward(self, x):
        s = x.abs().amax(-1, keepdim=True) / QMAX[self.quant]
        s = torch.where(s > 0, s, torch.ones_like(s))
        r = x / s
        qx = r.round().clamp(-127, 127) if self.quant == "int8" else r.to(torch.float8_e4m3fn).double()
        return (qx * s) @ self.w.t()


def reference_w8a8(ref, written, quant):
    model = LlamaForCausalLM(ref.config).eval()
    model.load_state_dict(ref.state_dict())
    model.double()
    for name, (q, scale) in written.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, RefW8A8(q, scale, quant))
    return model


# Observed |got - reference| <= 3e-6 (float32 vs float64 arithmetic); dropping the activation quantisation from the
# reference moves the logits by 0.1 (int8) to 0.5 (fp8), so 1e-4 separates the two by three orders of magnitude.
W8A8_TOL = 1e-4


@pytest.mark.parametrize("quant,strategy,shape,dtype", [
    ("int8", "channel", "even", torch.float32), ("int8", "tensor", "odd", torch.float32),
    ("fp8", "channel", "even", torch.float32), ("fp8", "channel", "odd", torch.float32),
    ("fp8", "tensor", "odd", torch.float32),
    # a bf16 model: bf16 weight scales (widened exactly to the layer's float32 scale), bf16 activations
    ("int8", "channel", "odd", torch.bfloat16), ("fp8", "channel", "even", torch.bfloat16)])
def test_w8a8_loads_codes_scales_and_matches_float64_reference(tmp_path, quant, strategy, shape, dtype):
    ref = tiny_llama(shape).to(dtype)
    written = write_ct(ref, tmp_path / "ct", quant, strategy)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    layers = sparse_layers(model)
    assert len(layers) == N_SPARSE and type(model.lm_head) is nn.Linear and model.dtype == dtype
    stored = load_file(str(tmp_path / "ct" / "model.safetensors"))
    for name, layer in layers.items():
        q, scale = written[name]
        assert layer.quant == quant and layer.values.dtype == q.dtype and layer.dense_dtype == dtype
        assert torch.equal(layer.values.view(torch.uint8), stored[f"{name}.compressed"].view(torch.uint8)), name
        assert torch.equal(layer.weight24.decompress().float(), q.float()), name  # (-0 codes are 0 here)
        assert torch.equal(layer.weight_scale, scale.float().reshape(-1).expand(q.shape[0])), name
        assert torch.equal(layer.dense_weight(), q.float() * scale.float().reshape(-1, 1)), name
    ids = tokens(2)
    got = logits(model, ids)
    assert got.dtype == dtype
    assert torch.equal(logits(sparsekern.from_pretrained(tmp_path / "ct"), ids), got)
    if dtype == torch.float32:  # (a bf16 model rounds every activation: no tight float64 comparison there)
        want = logits(reference_w8a8(ref, written, quant), ids)
        torch.testing.assert_close(got.double(), want, rtol=0, atol=W8A8_TOL)


# ---------------------------------------------------------------------------------------------- 3. re-save


@pytest.mark.parametrize("quant", [None, "int8", "fp8"])
def test_save_pretrained_writes_sparsekern_format_and_reloads_bit_for_bit(tmp_path, quant):
    write_ct(tiny_llama("odd"), tmp_path / "ct", quant)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    model.save_pretrained(tmp_path / "out")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "sparsekern" and len(qc["layers"]) == N_SPARSE
    assert {s["quant"] for s in qc["layers"].values()} == {quant}
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(sparse_layers(again)) == N_SPARSE
    ids = tokens(3)
    assert torch.equal(logits(again, ids), logits(model, ids))


# ---------------------------------------------------------------------------------------------- 4. refusals


def set_bits(t, layer, row, byte, low_nibble):
    b = t[f"{layer}.bitmask"]
    b[row, byte] = (int(b[row, byte]) & 0xF0) | low_nibble


BAD_TENSORS = {
    "three_bits": (None, lambda t: set_bits(t, "model.layers.1.mlp.down_proj", 5, 0, 0b0111),
                   r"could not be loaded: model\.layers\.1\.mlp\.down_proj: .*not a valid 2:4 bitmask .*row 5, "
                   r"group 0 .*selecting 3 columns"),
    "short_compressed": (None, lambda t: t.update({"model.layers.0.self_attn.q_proj.compressed":
                                                   t["model.layers.0.self_attn.q_proj.compressed"][:, :-2].clone()}),
                         r"layer model\.layers\.0\.self_attn\.q_proj: compressed \[36, 16\] / bitmask \[36, 5\] "
                         r"do not match the model's \[36, 36\] \(truncated or mismatched\)"),
    "input_scale": ("int8", lambda t: t.update({"model.layers.0.self_attn.q_proj.input_scale": torch.ones(1)}),
                    r"'model\.layers\.0\.self_attn\.q_proj\.input_scale' is a static activation scale"),
    "zero_point": ("int8", lambda t: t.update({"model.layers.0.self_attn.q_proj.weight_zero_point":
                                              torch.ones(36, 1, dtype=torch.int8)}),
                   r"model\.layers\.0\.self_attn\.q_proj: weight_zero_point is not zero: asymmetric weights"),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensors_refused(tmp_path, case):
    quant, edit, msg = BAD_TENSORS[case]
    write_ct(tiny_llama("odd"), tmp_path / "ct", quant)
    edit_tensors(tmp_path / "ct", edit)
    with pytest.raises(CheckpointError, match=msg):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ct")


BAD_SCHEMES = {
    "static_activations": (dict(dynamic=False), r"\.input_activations\.strategy is 'tensor'; sparsekern supports "
                                                r"'token' .*dynamic per-token activations"),
    "weight_only": (dict(weight_only=True), r" is weight-only quantisation; sparsekern runs W8A8"),
    "group_strategy": (dict(strategy="group"), r"\.weights\.strategy 'group' is not supported"),
    "asymmetric": (dict(symmetric=False), r"\.weights\.symmetric is False; sparsekern supports True"),
}


@pytest.mark.parametrize("case", sorted(BAD_SCHEMES))
def test_unsupported_schemes_refused(tmp_path, case):
    kwargs, msg = BAD_SCHEMES[case]
    ref = tiny_llama("odd")
    write_ct(ref, tmp_path / "ct", "int8", qconfig=scheme("int8", **kwargs))
    if case == "static_activations":  # a static scheme also stores input_scale, as llm-compressor writes it
        edit_tensors(tmp_path / "ct",
                     lambda t: t.update({f"{n}.input_scale": torch.ones(1) for n in block_linears(ref)}))
    with pytest.raises(CheckpointError, match=r"config\.json quantization_config \(compressed-tensors\): "
                                             r"config_groups\['group_0'\]" + msg):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ct")


def test_truncated_safetensors_file(tmp_path):
    from safetensors import SafetensorError

    write_ct(tiny_llama("odd"), tmp_path / "ct")
    path = tmp_path / "ct" / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    # an explicit dtype: sparsekern's header check is the first to read the file
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file .*truncated or "
                                              r"corrupt"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    # dtype "auto" (transformers 5's default) reads the file in transformers' _get_dtype, before any quantizer hook
    with pytest.raises(SafetensorError, match="incomplete metadata, file not fully covered"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ct")
    with pytest.raises(CheckpointError, match=r"from_pretrained failed \(SafetensorError: .*incomplete metadata"):
        sparsekern.from_pretrained(tmp_path / "ct")


def test_other_sparsity_format_goes_to_transformers(tmp_path):
    """"sparse-bitmask" is not ours: transformers' own compressed-tensors quantizer takes it. It does not decompress
    these entries: they are reported unexpected, every block weight missing and freshly initialised, no error."""
    from transformers.quantizers.quantizer_compressed_tensors import CompressedTensorsHfQuantizer
    from transformers.utils.quantization_config import CompressedTensorsConfig

    ref = tiny_llama("odd")
    write_ct(ref, tmp_path / "ct", fmt="sparse-bitmask")
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", output_loading_info=True)
    assert not sparse_layers(model)
    assert type(model.config.quantization_config) is CompressedTensorsConfig
    assert type(model.hf_quantizer) is CompressedTensorsHfQuantizer
    names = block_linears(ref)
    assert set(info["missing_keys"]) == {f"{n}.weight" for n in names}
    assert set(info["unexpected_keys"]) == {f"{n}.{e}" for n in names for e in ("compressed", "bitmask", "shape")}
    w = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(w, ref.model.layers[0].self_attn.q_proj.weight) and (w == 0).float().mean() < 0.1


# ---------------------------------------------------------------------------------------------- 5. no sparsekern

NO_SPARSEKERN = """
import json, sys, transformers
out = {}
for d in sys.argv[1:]:
    try:
        m, info = transformers.AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
        w = m.model.layers[0].self_attn.q_proj.weight
        out[d] = {"linear": type(m.model.layers[0].self_attn.q_proj).__name__,
                  "missing": len(info["missing_keys"]), "unexpected": len(info["unexpected_keys"]),
                  "zero_fraction": (w == 0).float().mean().item()}
    except Exception as exc:
        out[d] = {"raised": type(exc).__name__, "message": str(exc)}
print(json.dumps({"results": out, "sparsekern_imported": "sparsekern" in sys.modules}))
"""


def test_without_import_sparsekern_transformers_loads_garbage_or_crashes(tmp_path):
    dirs = {}
    for quant in (None, "int8", "fp8"):
        dirs[quant] = tmp_path / f"ct-{quant}"
        write_ct(tiny_llama("odd"), dirs[quant], quant)
    env = {**os.environ, "PYTHONPATH": "python"}
    proc = subprocess.run([sys.executable, "-c", NO_SPARSEKERN, *map(str, dirs.values())], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    assert doc["sparsekern_imported"] is False
    res = {q: doc["results"][str(d)] for q, d in dirs.items()}
    # unquantised: no error; the 2:4 entries are ignored and the block weights are random (not 2:4), with transformers'
    # load report on stderr
    assert res[None]["linear"] == "Linear" and res[None]["missing"] == N_SPARSE
    assert res[None]["unexpected"] == 3 * N_SPARSE and res[None]["zero_fraction"] < 0.1
    assert "LOAD REPORT" in proc.stderr and "| UNEXPECTED" in proc.stderr and "| MISSING" in proc.stderr
    assert "MISSING:\tthose params were newly initialized because missing from the checkpoint" in proc.stderr
    # quantised: transformers' compressed-tensors path tries to random-initialise the int8 / fp8 weights and fails
    assert res["int8"] == {"raised": "NotImplementedError",
                           "message": '"normal_kernel_cpu" not implemented for \'Char\''}
    assert res["fp8"] == {"raised": "NotImplementedError",
                          "message": '"normal_kernel_cpu" not implemented for \'Float8_e4m3fn\''}
