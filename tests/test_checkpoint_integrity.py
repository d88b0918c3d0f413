"""Checkpoints that were changed, forged or are not files at all: a clear CheckpointError naming the file, the entry and
the rule, before anything large is allocated — never a silent load, a hang or an allocator error (issue 16).

The model is the tiny Llama of tests/data/checkpoint_v1/hf_llama, re-saved by this code (so it carries checksums)."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

import sparsekern
from sparsekern import _ext
from sparsekern import serialization as ser
from sparsekern.weight import CheckpointError

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytestmark = pytest.mark.skipif(not _ext.available(), reason="needs the compiled extension")

FIXTURE = Path(__file__).resolve().parent / "data" / "checkpoint_v1" / "hf_llama"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = sparsekern.from_pretrained(FIXTURE)
    out = tmp_path_factory.mktemp("ckpt") / "m"
    sparsekern.save_pretrained(model, out)
    return out


@pytest.fixture
def ckpt(saved, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(saved, dst)
    return dst


def _data_offset(path: Path, key: str) -> int:
    """Byte offset in the file of the first byte of tensor `key` (safetensors: 8-byte header length, JSON header)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return 8 + n + header[key]["data_offsets"][0]


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.values", "model.layers.1.mlp.down_proj.codes",
                                 "model.embed_tokens.weight", "model.norm.weight"])
def test_a_flipped_bit_is_an_error_naming_the_tensor(ckpt, key):
    path = ckpt / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path, key) + 1] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"checksum mismatch: tensor '{key}' does not match its recorded"):
        sparsekern.from_pretrained(ckpt)
    if key.endswith(".codes"):
        return  # a flipped code bit may also make an invalid pattern code: refused either way
    model = sparsekern.from_pretrained(ckpt, verify=False)  # the documented opt-out loads the changed bytes
    assert isinstance(model, torch.nn.Module)


def test_checkpoints_without_checksums_still_load(tmp_path):
    # tests/data/checkpoint_v1 was written before checksums existed
    assert "sparsekern_checksums" not in ser._safetensors_header(FIXTURE / "model.safetensors")[1]
    sparsekern.from_pretrained(FIXTURE)


def test_forged_layer_sizes_fail_on_the_header_before_allocating(ckpt):
    meta_path = ckpt / "sparsekern_config.json"
    for size in (2 ** 23, 2 ** 26, 2 ** 40):
        meta = json.loads(meta_path.read_text())
        meta["layers"]["model.layers.0.mlp.up_proj"]["in_features"] = size
        meta_path.write_text(json.dumps(meta))
        t0 = time.perf_counter()
        with pytest.raises(CheckpointError, match=rf"layer 'model.layers.0.mlp.up_proj' the shape \[128, {size}\]"):
            sparsekern.from_pretrained(ckpt)
        assert time.perf_counter() - t0 < 30  # no multi-gigabyte allocation happened first (generous bound)


def test_forged_vocab_size_fails_before_the_model_is_allocated(ckpt):
    cfg_path = ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["vocab_size"] = 4_000_000
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.json gives model.embed_tokens.weight the shape \[4000000, 64\]"):
        sparsekern.from_pretrained(ckpt)


@pytest.mark.parametrize("mutate,msg", [
    (lambda m: m["layers"]["model.layers.0.mlp.up_proj"].pop("in_features"), r"lacks the field 'in_features'"),
    (lambda m: m["layers"]["model.layers.0.mlp.up_proj"].update(in_features="64"),
     r"in_features must be a positive multiple of 4, got '64'"),
    (lambda m: m["layers"]["model.layers.0.mlp.up_proj"].update(quant="int4"), r'quant must be null, "int8" or "fp8"'),
    (lambda m: m.update(layers=[1, 2]), r"'layers' must be an object"),
    (lambda m: m.update(tied={"a": 3}), r"'tied' must map key names to key names"),
    (lambda m: m.update(format_version="1"), r"unknown format version '1'"),
])
def test_malformed_metadata_names_file_field_and_rule(ckpt, mutate, msg):
    meta_path = ckpt / "sparsekern_config.json"
    meta = json.loads(meta_path.read_text())
    mutate(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=msg) as info:
        sparsekern.from_pretrained(ckpt)
    assert "sparsekern_config.json" in str(info.value)


@pytest.mark.parametrize("content,msg", [
    (b"", r"sparsekern_config.json is not valid JSON \(it is empty\)"),
    (b'{"format": "sparsekern", ', r"sparsekern_config.json is not valid JSON \(line 1"),
    (b"[1, 2, 3]", r"sparsekern_config.json must hold a JSON object, not a list"),
    (b"\xff\xfe{}", r"sparsekern_config.json is not UTF-8 text"),
])
def test_empty_truncated_or_wrong_json_names_the_file(ckpt, content, msg):
    (ckpt / "sparsekern_config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=msg):
        sparsekern.from_pretrained(ckpt)


def test_config_json_that_is_a_list_names_the_file(ckpt):
    (ckpt / "config.json").write_text("[]")
    with pytest.raises(CheckpointError, match=r"config.json must hold a JSON object"):
        sparsekern.from_pretrained(ckpt)


def test_tied_map_cannot_substitute_another_kind_of_tensor(ckpt, tmp_path):
    path = ckpt / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors.pop("model.layers.1.self_attn.q_proj.codes")  # a hand-edited map puts another layer's values there
    meta = ser._safetensors_header(path)[1]
    meta.pop("sparsekern_checksums")
    save_file(tensors, str(path), metadata=meta)
    m = json.loads((ckpt / "sparsekern_config.json").read_text())
    m["tied"] = {"model.layers.1.self_attn.q_proj.codes": "model.layers.0.self_attn.q_proj.values"}
    (ckpt / "sparsekern_config.json").write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=r"refers to 'model.layers.0.self_attn.q_proj.values', an entry of "
                                              r"another kind"):
        sparsekern.from_pretrained(ckpt)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_place_of_the_weights_is_refused_not_waited_on(ckpt):
    (ckpt / "model.safetensors").unlink()
    os.mkfifo(ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors is a FIFO, not a regular file"):
        sparsekern.from_pretrained(ckpt)


def test_a_device_in_place_of_the_weights_is_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    os.symlink("/dev/zero", ckpt / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"is a device or socket, not a regular file"):
        sparsekern.from_pretrained(ckpt)


def test_module_checkpoints_carry_and_verify_checksums(tmp_path):
    lin = torch.nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight.copy_(sparsekern.prune_nm(lin.weight)[0])
    model = torch.nn.Sequential(sparsekern.SparseLinear.from_linear(lin))
    path = tmp_path / "m.safetensors"
    ser.save_safetensors(model, path)
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path, "0.bias")] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"tensor '0.bias' does not match"):
        ser.load_safetensors(model, path)
    ser.load_safetensors(model, path, verify=False)
