"""Checkpoints written by earlier sparsekern code load unchanged and compute bit-identical outputs.

tests/data/checkpoint_v1/ was written by commit 921fca6 (before the 2:4 weight got one owner, issue 15) with
tools/make_compat_fixture.py, which also stored the inputs and the outputs that code computed:
  modules.safetensors + modules.json + modules_io.safetensors   SparseLinear layers of a plain nn.ModuleDict
      (float32 with K = 36, i.e. a padding nibble; bfloat16 without bias; W8A8 int8; float16), save_safetensors
  hf_llama/ + hf_llama_io.safetensors                           a tiny Llama through save_pretrained
The outputs must match exactly (same kernels, same inputs, same machine class: this CPU's kernels are deterministic).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsekern
from sparsekern import _ext
from sparsekern import serialization as ser

DATA = Path(__file__).resolve().parent / "data" / "checkpoint_v1"

pytestmark = pytest.mark.skipif(not _ext.available(), reason="needs the compiled extension")


def _load_io(name):
    from safetensors.torch import load_file

    return load_file(str(DATA / name))


def test_modules_checkpoint_from_before_the_refactor_loads_bit_identical():
    spec = json.loads((DATA / "modules.json").read_text())
    model = nn.ModuleDict({
        name: sparsekern.SparseLinear(s["in_features"], s["out_features"], s["bias"],
                                      dtype=getattr(torch, s["dtype"]), quant=s["quant"])
        for name, s in spec.items()})
    ser.load_safetensors(model, DATA / "modules.safetensors")
    io = _load_io("modules_io.safetensors")
    assert set(spec) == {"f32", "bf16", "int8", "f16"}
    for name, layer in model.items():
        assert layer.weight24.shape == (spec[name]["out_features"], spec[name]["in_features"])
        with torch.no_grad():
            y = layer(io[f"x.{name}"])
        assert y.dtype == io[f"y.{name}"].dtype
        assert torch.equal(y, io[f"y.{name}"]), f"{name}: outputs differ from the pre-refactor code's"
    # and what this code writes for them is the same file layout, key for key and byte for byte
    sd = model.state_dict()
    from safetensors.torch import load_file

    old = load_file(str(DATA / "modules.safetensors"))
    assert set(sd) == set(old)
    for k, v in old.items():
        assert sd[k].dtype == v.dtype and torch.equal(sd[k].view(torch.uint8) if v.element_size() == 1 else sd[k], 
                                                      v.view(torch.uint8) if v.element_size() == 1 else v), k


def test_hf_checkpoint_from_before_the_refactor_loads_bit_identical():
    pytest.importorskip("transformers")
    model = sparsekern.from_pretrained(DATA / "hf_llama")
    io = _load_io("hf_llama_io.safetensors")
    assert any(isinstance(m, sparsekern.SparseLinear) for m in model.modules())
    with torch.no_grad():
        logits = model(io["ids"]).logits
    assert torch.equal(logits, io["logits"])
