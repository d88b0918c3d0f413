"""Write tests/data/checkpoint_v1/: checkpoints made by a given sparsekern checkout, plus the outputs that code
computed, so tests/test_compat.py can prove later code loads them unchanged and computes bit-identical outputs.

    PYTHONPATH=<checkout>/python python tools/make_compat_fixture.py tests/data/checkpoint_v1

The committed fixture was written by commit 921fca6 (the code before the Sparse24Weight refactor, issue 15).
"""

import json
import sys
from pathlib import Path

import torch
from torch import nn

import sparsekern
from sparsekern import serialization as ser

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
g = torch.Generator().manual_seed(1234)


def pruned_linear(k, n, bias, dtype):
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        w, _ = sparsekern.prune_nm(torch.randn(n, k, generator=g), 2, 4)
        lin.weight.copy_(w)
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin.to(dtype)


# A plain nn.Module: float32 (K = 36: an odd number of groups, so a padding nibble), bfloat16 without bias, W8A8 int8,
# float16 with K = 64.
layers = {
    "f32": sparsekern.SparseLinear.from_linear(pruned_linear(36, 24, True, torch.float32)),
    "bf16": sparsekern.SparseLinear.from_linear(pruned_linear(64, 40, False, torch.bfloat16)),
    "int8": sparsekern.SparseLinear.from_linear(pruned_linear(48, 32, True, torch.float32), quant="int8"),
    "f16": sparsekern.SparseLinear.from_linear(pruned_linear(64, 16, True, torch.float16)),
}
model = nn.ModuleDict(layers)
ser.save_safetensors(model, out / "modules.safetensors")
inputs, outputs = {}, {}
for name, layer in layers.items():
    dtype = torch.float32 if name == "int8" else layer.values.dtype
    x = torch.randn(5, layer.in_features, generator=g).to(dtype)
    inputs[name] = x
    with torch.no_grad():
        outputs[name] = layer(x)
spec = {name: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None,
               "dtype": str(m.dense_dtype).removeprefix("torch."), "quant": m.quant} for name, m in layers.items()}
(out / "modules.json").write_text(json.dumps(spec, indent=1) + "\n")

from safetensors.torch import save_file  # noqa: E402

save_file({f"x.{k}": v.contiguous() for k, v in inputs.items()} | {f"y.{k}": v.contiguous() for k, v in outputs.items()},
          str(out / "modules_io.safetensors"))

# A tiny Hugging Face model through save_pretrained (config + safetensors + sparsekern_config.json).
import transformers  # noqa: E402

cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
torch.manual_seed(7)
hf = transformers.LlamaForCausalLM(cfg).eval()
with torch.no_grad():
    for name, m in hf.named_modules():
        if isinstance(m, nn.Linear) and "lm_head" not in name:
            m.weight.copy_(sparsekern.prune_nm(m.weight, 2, 4)[0])
sparsekern.sparsify(hf)
ser.save_pretrained(hf, out / "hf_llama", overwrite=True)
ids = torch.randint(0, 96, (2, 11), generator=g)
with torch.no_grad():
    logits = hf(ids).logits
save_file({"ids": ids, "logits": logits.contiguous()}, str(out / "hf_llama_io.safetensors"))
print("wrote", sorted(p.name for p in out.iterdir()))
