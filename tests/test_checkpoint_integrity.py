"""Checkpoints that were changed, forged or are not files at all: a clear CheckpointError naming the file, the entry and
the rule, before anything large is allocated — never a silent load, a hang or an allocator error (issue 16).

The model is the tiny Llama of tests/data/checkpoint_v1/hf_llama, re-saved by this code, in two layouts:
- version 2 (what save_pretrained writes now): config.json with quantization_config {"quant_method": "sparsekern",
  "format_version": 2, "layers": ...}, model.safetensors (or shards + an index) recording a CRC-32 per tensor;
- version 1 (still read): sparsekern_config.json beside config.json and one model.safetensors, written here as
  sparsekern wrote it then (`_write_v1_folder`, as tests/test_serialization.py's write_v1_folder). Guarantees about
  sparsekern_config.json (its schema, its "tied" map) are tested on such folders."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
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
UP = "model.layers.0.mlp.up_proj"  # a 2:4 layer of the fixture: [128, 64]
IDS = torch.tensor([[1, 5, 9, 33, 70]])


def _write_v1_folder(model, directory: Path) -> Path:
    """A folder of the layout sparsekern wrote before format version 2 (test_serialization.write_v1_folder)."""
    from test_serialization import write_v1_folder

    return write_v1_folder(model, directory)


@pytest.fixture(scope="module")
def model():
    return sparsekern.from_pretrained(FIXTURE)


@pytest.fixture(scope="module")
def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "m"
    sparsekern.save_pretrained(model, out)
    assert not (out / "sparsekern_config.json").exists()
    return out


@pytest.fixture(scope="module")
def saved_sharded(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt_sharded") / "m"
    sparsekern.save_pretrained(model, out, max_shard_size="50KB")
    assert (out / "model.safetensors.index.json").exists() and not (out / "model.safetensors").exists()
    return out


@pytest.fixture(scope="module")
def saved_v1(model, tmp_path_factory):
    return _write_v1_folder(model, tmp_path_factory.mktemp("ckpt_v1") / "m")


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def ckpt(saved, tmp_path):
    return _copy(saved, tmp_path)


@pytest.fixture
def sharded(saved_sharded, tmp_path):
    return _copy(saved_sharded, tmp_path)


@pytest.fixture
def v1(saved_v1, tmp_path):
    return _copy(saved_v1, tmp_path)


def _data_offset(path: Path, key: str) -> int:
    """Byte offset in the file of the first byte of tensor `key` (safetensors: 8-byte header length, JSON header)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    return 8 + n + header[key]["data_offsets"][0]


def _flip(path: Path, key: str) -> None:
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path, key) + 1] ^= 0x10
    path.write_bytes(bytes(raw))


def _edit_header(path: Path, fn) -> None:
    """Rewrite the JSON header of a safetensors file (the tensor bytes are kept as they are)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    fn(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def _edit_json(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def _edit_qc(folder: Path, fn) -> None:
    """Edit config.json's quantization_config (version 2)."""
    _edit_json(folder / "config.json", lambda cfg: fn(cfg["quantization_config"]))


def _shard_of(folder: Path, key: str) -> str:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]


class _Hung(BaseException):
    """Raised by _deadline (a BaseException: sparsekern.from_pretrained wraps every Exception of transformers into a
    CheckpointError, which must not make a hang look like a refusal)."""


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail instead of waiting forever: SIGALRM interrupts a blocking open() of a FIFO, or a read of /dev/zero."""
    def hung(signum, frame):
        raise _Hung(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


# ---------------------------------------------------------------------------------------------- checksums


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.values", "model.layers.1.mlp.down_proj.codes",
                                 "model.embed_tokens.weight", "model.norm.weight"])
def test_a_flipped_bit_is_an_error_naming_the_tensor_and_file(ckpt, key):
    _flip(ckpt / "model.safetensors", key)
    with pytest.raises(CheckpointError, match=rf"checksum mismatch: tensor '{key}' does not match its recorded "
                                              r"CRC-32 \(model\.safetensors\)"):
        sparsekern.from_pretrained(ckpt)
    if key.endswith(".codes"):
        return  # a flipped code bit may also make an invalid pattern code: refused either way
    model = sparsekern.from_pretrained(ckpt, verify=False)  # the documented opt-out loads the changed bytes
    assert isinstance(model, torch.nn.Module)


@pytest.mark.parametrize("key", ["model.layers.0.mlp.up_proj.values", "model.embed_tokens.weight"])
def test_a_flipped_bit_in_a_shard_names_the_tensor_and_the_shard(sharded, key):
    shard = _shard_of(sharded, key)
    _flip(sharded / shard, key)
    with pytest.raises(CheckpointError, match=rf"checksum mismatch: tensor '{key}' does not match its recorded "
                                              rf"CRC-32 \({shard}\)"):
        sparsekern.from_pretrained(sharded)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.values", "model.embed_tokens.weight"])
def test_a_flipped_bit_in_a_v1_checkpoint_is_an_error_naming_the_tensor(v1, key):
    _flip(v1 / "model.safetensors", key)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: checksum mismatch: tensor '{key}' does not match"):
        sparsekern.from_pretrained(v1)
    assert isinstance(sparsekern.from_pretrained(v1, verify=False), torch.nn.Module)


def test_checkpoints_without_checksums_still_load(logits):
    # tests/data/checkpoint_v1 was written (format version 1) before checksums existed
    assert "sparsekern_checksums" not in ser._safetensors_header(FIXTURE / "model.safetensors")[1]
    with torch.no_grad():
        assert torch.equal(sparsekern.from_pretrained(FIXTURE)(IDS).logits, logits)


@pytest.mark.parametrize("damage", ["key-renamed", "emptied"])
def test_a_damaged_checksum_record_does_not_let_a_changed_tensor_through(ckpt, damage):
    path = ckpt / "model.safetensors"
    _flip(path, "model.embed_tokens.weight")

    def edit(header):
        meta = header["__metadata__"]
        if damage == "key-renamed":
            meta["rparsekern_checksums"] = meta.pop("sparsekern_checksums")  # s (0x73) ^ 0x01 = r: one flipped bit
        else:
            meta["sparsekern_checksums"] = "{}"

    _edit_header(path, edit)
    with pytest.raises(CheckpointError, match=r"(?i)checksum|CRC-32"):
        sparsekern.from_pretrained(ckpt)


# ---------------------------------------------------------------------------------------------- forged sizes


@pytest.mark.parametrize("field", ["in_features", "out_features"])
def test_forged_layer_sizes_fail_before_allocating(ckpt, field):
    for size in (2 ** 23, 2 ** 26, 2 ** 40):
        _edit_qc(ckpt, lambda qc: qc["layers"][UP].__setitem__(field, size))
        shape = [128, size] if field == "in_features" else [size, 64]
        before = _peak_rss_bytes()
        with pytest.raises(CheckpointError, match=rf"config\.json quantization_config: layer '{UP}' is "
                                                  rf"\[{shape[0]}, {shape[1]}\] but the model built from config\.json "
                                                  r"has it \[128, 64\]"):
            sparsekern.from_pretrained(ckpt)
        assert _peak_rss_bytes() - before < 512 << 20  # no multi-gigabyte allocation happened first


def test_consistently_forged_sizes_fail_on_the_header_before_allocating(ckpt):
    # config.json and quantization_config agree on a huge intermediate size (the meta-device skeleton matches the
    # layer list): the safetensors headers, which hold the real sizes, refuse it before anything is allocated.
    size = 2 ** 30

    def forge(cfg):
        cfg["intermediate_size"] = size
        for name, spec in cfg["quantization_config"]["layers"].items():
            if name.endswith(("gate_proj", "up_proj")):
                spec["out_features"] = size
            elif name.endswith("down_proj"):
                spec["in_features"] = size

    _edit_json(ckpt / "config.json", forge)
    before = _peak_rss_bytes()
    with pytest.raises(CheckpointError, match=r"'model\.layers\.\d\.mlp\.\w+_proj\.values' is F32 \[\d+, \d+\] in the "
                                              r"checkpoint; the layer needs F32 \[\d+, \d+\]"):
        sparsekern.from_pretrained(ckpt)
    assert _peak_rss_bytes() - before < 512 << 20  # one forged layer alone would be 256 GiB


def test_v1_forged_layer_sizes_fail_on_the_header_before_allocating(v1):
    meta_path = v1 / "sparsekern_config.json"
    for size in (2 ** 23, 2 ** 26, 2 ** 40):
        _edit_json(meta_path, lambda meta: meta["layers"][UP].__setitem__("in_features", size))
        before = _peak_rss_bytes()
        with pytest.raises(CheckpointError, match=rf"layer '{UP}' the shape \[128, {size}\]"):
            sparsekern.from_pretrained(v1)
        assert _peak_rss_bytes() - before < 512 << 20


def test_forged_vocab_size_fails_before_the_model_is_allocated(ckpt):
    _edit_json(ckpt / "config.json", lambda cfg: cfg.__setitem__("vocab_size", 4_000_000))
    before = _peak_rss_bytes()
    with pytest.raises(CheckpointError, match=r"config\.json gives model.embed_tokens.weight the shape \[4000000, 64\] "
                                              r"but the checkpoint holds \[96, 64\]"):
        sparsekern.from_pretrained(ckpt)
    # the embedding and lm_head it describes are 1 GiB each: neither was allocated (let alone initialised) first
    assert _peak_rss_bytes() - before < 512 << 20


def test_v1_forged_vocab_size_fails_before_the_model_is_allocated(v1):
    _edit_json(v1 / "config.json", lambda cfg: cfg.__setitem__("vocab_size", 4_000_000))
    with pytest.raises(CheckpointError, match=r"config\.json gives model.embed_tokens.weight the shape \[4000000, 64\] "
                                              r"but model\.safetensors holds \[96, 64\]"):
        sparsekern.from_pretrained(v1)


# ---------------------------------------------------------------------------------------------- malformed metadata


@pytest.mark.parametrize("mutate,msg", [
    (lambda q: q["layers"][UP].pop("in_features"), rf"layers\['{UP}'\] lacks the field 'in_features'"),
    (lambda q: q["layers"][UP].update(in_features="64"), r"in_features must be a positive multiple of 4, got '64'"),
    (lambda q: q["layers"][UP].update(in_features=66), r"in_features must be a positive multiple of 4, got '66'"),
    (lambda q: q["layers"][UP].update(out_features=0), r"out_features must be a positive integer, got '0'"),
    (lambda q: q["layers"][UP].update(bias="yes"), r"bias must be true or false, got 'yes'"),
    (lambda q: q["layers"][UP].update(dtype="float64"), r"dtype must be one of \['float32', 'float16', 'bfloat16'\]"),
    (lambda q: q["layers"][UP].update(quant="int4"), r'quant must be null, "int8" or "fp8"'),
    (lambda q: q["layers"][UP].update(weight_layout="rows"), r'weight_layout must be "linear" or "conv1d"'),
    (lambda q: q["layers"].update({UP: [1]}), rf"layers\['{UP}'\] must be an object, got list"),
    (lambda q: q["layers"].update({"model.nope": dict(q["layers"][UP])}), r"layer 'model.nope' is not in "
                                                                           r"LlamaForCausalLM"),
    (lambda q: q.update(format_version="1"), r"unknown sparsekern format_version '1'"),
    (lambda q: q.update(format_version=3), r"unknown sparsekern format_version 3; this sparsekern \(.*\) reads version "
                                           r"2 \(upgrade sparsekern"),
    (lambda q: q.update(portable_format_version=2), r"unknown 2:4 portable_format_version 2"),
], ids=["no-in_features", "in_features-str", "in_features-66", "out_features-0", "bias-str", "dtype-float64",
        "quant-int4", "weight_layout", "spec-list", "unknown-layer", "format_version-str", "format_version-3",
        "portable_format_version"])
def test_malformed_quantization_config_names_file_field_and_rule(ckpt, mutate, msg):
    _edit_qc(ckpt, mutate)
    with pytest.raises(CheckpointError, match=msg) as info:
        sparsekern.from_pretrained(ckpt)
    assert "config.json quantization_config" in str(info.value)


@pytest.mark.parametrize("layers", [[1, 2], "ab", 5], ids=["list", "str", "int"])
def test_quantization_config_layers_not_an_object_names_the_rule(ckpt, layers):
    _edit_qc(ckpt, lambda q: q.__setitem__("layers", layers))
    with pytest.raises(CheckpointError, match=r"config\.json quantization_config: 'layers' must be an object mapping layer names"):
        sparsekern.from_pretrained(ckpt)


def test_layer_list_missing_a_sparse_layer_is_refused(ckpt):
    _edit_qc(ckpt, lambda q: q["layers"].pop(UP))
    with pytest.raises(CheckpointError, match=rf"the checkpoint holds 2:4 entries for \['{UP}'\] but config\.json "
                                              r"quantization_config does not list them"):
        sparsekern.from_pretrained(ckpt)


@pytest.mark.parametrize("mutate,msg", [
    (lambda m: m["layers"][UP].pop("in_features"), r"lacks the field 'in_features'"),
    (lambda m: m["layers"][UP].update(in_features="64"), r"in_features must be a positive multiple of 4, got '64'"),
    (lambda m: m["layers"][UP].update(quant="int4"), r'quant must be null, "int8" or "fp8"'),
    (lambda m: m.update(layers=[1, 2]), r"'layers' must be an object"),
    (lambda m: m.update(tied={"a": 3}), r"'tied' must map key names to key names"),
    (lambda m: m.update(format_version="1"), r"unknown format version '1'"),
], ids=["no-in_features", "in_features-str", "quant-int4", "layers-list", "tied", "format_version-str"])
def test_v1_malformed_metadata_names_file_field_and_rule(v1, mutate, msg):
    _edit_json(v1 / "sparsekern_config.json", mutate)
    with pytest.raises(CheckpointError, match=msg) as info:
        sparsekern.from_pretrained(v1)
    assert "sparsekern_config.json" in str(info.value)


@pytest.mark.parametrize("where", ["top", "layer"])
def test_v1_forged_dtype_in_sparsekern_config_is_a_checkpoint_error(v1, where):
    # version 2 has no top-level dtype claim: config.json's "dtype" is the load dtype (test_fuzz_checkpoint's
    # test_config_json_dtype_is_the_load_dtype); the per-layer claim is checked (test_forged_layer_dtype_...)
    if where == "top":
        _edit_json(v1 / "sparsekern_config.json", lambda d: d.__setitem__("dtype", "float16"))
    else:
        _edit_json(v1 / "sparsekern_config.json", lambda d: d["layers"][UP].__setitem__("dtype", "bfloat16"))
    with pytest.raises(CheckpointError, match=r"sparsekern_config\.json says"):
        sparsekern.from_pretrained(v1)


# ---------------------------------------------------------------------------------------------- JSON files


@pytest.mark.parametrize("content,msg", [
    (b"", r"config\.json is not valid JSON \(it is empty\)"),
    (b'{"architectures": ', r"config\.json is not valid JSON \(line 1"),
    (b"[1, 2, 3]", r"config\.json must hold a JSON object, not a list"),
    (b"[]", r"config\.json must hold a JSON object, not a list"),
    (b"\xff\xfe{}", r"config\.json is not UTF-8 text"),
], ids=["empty", "truncated", "list", "empty-list", "not-utf8"])
def test_empty_truncated_or_wrong_config_json_names_the_file(ckpt, content, msg):
    (ckpt / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=msg):
        sparsekern.from_pretrained(ckpt)


@pytest.mark.parametrize("content,msg", [
    (b"", r"sparsekern_config\.json is not valid JSON \(it is empty\)"),
    (b'{"format": "sparsekern", ', r"sparsekern_config\.json is not valid JSON \(line 1"),
    (b"[1, 2, 3]", r"sparsekern_config\.json must hold a JSON object, not a list"),
    (b"\xff\xfe{}", r"sparsekern_config\.json is not UTF-8 text"),
], ids=["empty", "truncated", "list", "not-utf8"])
def test_v1_empty_truncated_or_wrong_sparsekern_config_names_the_file(v1, content, msg):
    (v1 / "sparsekern_config.json").write_bytes(content)
    with pytest.raises(CheckpointError, match=msg):
        sparsekern.from_pretrained(v1)


# ---------------------------------------------------------------------------------------------- substituted entries


def test_v1_tied_map_cannot_substitute_another_kind_of_tensor(v1):
    # version 2 has no tied map (transformers drops tied keys on save and re-ties them on load): the v2 analogues are
    # the two tests below
    path = v1 / "model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors.pop("model.layers.1.self_attn.q_proj.codes")  # a hand-edited map puts another layer's values there
    meta = ser._safetensors_header(path)[1]
    meta.pop("sparsekern_checksums")
    save_file(tensors, str(path), metadata=meta)
    _edit_json(v1 / "sparsekern_config.json", lambda m: m.__setitem__(
        "tied", {"model.layers.1.self_attn.q_proj.codes": "model.layers.0.self_attn.q_proj.values"}))
    with pytest.raises(CheckpointError, match=r"refers to 'model.layers.0.self_attn.q_proj.values', an entry of "
                                              r"another kind"):
        sparsekern.from_pretrained(v1)


def test_another_kind_of_tensor_under_a_layer_entry_is_refused_on_the_header(ckpt):
    # the codes of one layer replaced by another layer's values (the header says so): refused before loading
    from safetensors.torch import load_file, save_file

    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.1.self_attn.q_proj.codes"] = tensors["model.layers.0.self_attn.q_proj.values"].clone()
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model.layers.1.self_attn.q_proj.codes' is F32 \[64, 32\] in the "
                                              r"checkpoint; the layer needs U8"):
        sparsekern.from_pretrained(ckpt, verify=False)  # re-saved without checksums


def test_a_missing_layer_entry_is_named_before_loading(ckpt):
    from safetensors.torch import load_file, save_file

    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    tensors.pop("model.layers.1.self_attn.q_proj.codes")
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"lists layer 'model.layers.1.self_attn.q_proj' but the checkpoint has "
                                              r"no 'model.layers.1.self_attn.q_proj.codes'"):
        sparsekern.from_pretrained(ckpt, verify=False)  # re-saved without checksums


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("key", ["model.embed_tokens.weight", "lm_head.weight"])
def test_a_missing_dense_tensor_is_an_error_not_a_random_init(ckpt, key, verify):
    _edit_header(ckpt / "model.safetensors", lambda h: h.__setitem__(key + "_renamed", h.pop(key)))
    with pytest.raises(CheckpointError, match=key):
        sparsekern.from_pretrained(ckpt, verify=verify)


# ---------------------------------------------------------------------------------------------- not regular files


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_in_place_of_the_weights_is_refused_not_waited_on(ckpt, kind):
    # transformers looks only for regular files: it reports the weights missing (an OSError, wrapped)
    (ckpt / "model.safetensors").unlink()
    if kind == "fifo":
        os.mkfifo(ckpt / "model.safetensors")
    else:
        os.symlink("/dev/zero", ckpt / "model.safetensors")
    with _deadline(60), pytest.raises(CheckpointError, match=r"LlamaForCausalLM.from_pretrained failed \(OSError: "
                                                             r".*no file named model\.safetensors"):
        sparsekern.from_pretrained(ckpt)  # _deadline: a read that blocks on the FIFO fails the test, not hangs it


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
@pytest.mark.parametrize("kind,msg", [("fifo", "is a FIFO, not a regular file"),
                                      ("device", "is a device or socket, not a regular file"),
                                      ("missing", "does not exist")])
def test_a_fifo_device_or_missing_shard_is_refused_not_waited_on(sharded, kind, msg):
    shard = sharded / _shard_of(sharded, "model.layers.0.mlp.up_proj.values")
    shard.unlink()
    if kind == "fifo":
        os.mkfifo(shard)
    elif kind == "device":
        os.symlink("/dev/zero", shard)
    with _deadline(60), pytest.raises(CheckpointError, match=rf"checkpoint file .*{shard.name} {msg}"):
        sparsekern.from_pretrained(sharded)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_in_place_of_config_json_is_refused_not_waited_on(ckpt):
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    with _deadline(60), pytest.raises(CheckpointError, match=r"config\.json is a FIFO, not a regular file"):
        sparsekern.from_pretrained(ckpt)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_v1_a_fifo_in_place_of_the_weights_is_refused_not_waited_on(v1):
    (v1 / "model.safetensors").unlink()
    os.mkfifo(v1 / "model.safetensors")
    with _deadline(60), pytest.raises(CheckpointError, match=r"model\.safetensors is a FIFO, not a regular file"):
        sparsekern.from_pretrained(v1)


def test_v1_a_device_in_place_of_the_weights_is_refused(v1):
    (v1 / "model.safetensors").unlink()
    os.symlink("/dev/zero", v1 / "model.safetensors")
    with _deadline(60), pytest.raises(CheckpointError, match=r"is a device or socket, not a regular file"):
        sparsekern.from_pretrained(v1)


# ---------------------------------------------------------------------------------------------- a fresh process


def test_a_fresh_interpreter_loads_a_v2_folder(saved):
    # the tests above run after other loads have imported transformers' quantizer registry; a user's first call
    # does not
    python_dir = Path(sparsekern.__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(python_dir), os.environ.get("PYTHONPATH", "")]))
    code = "import sys, sparsekern; m = sparsekern.from_pretrained(sys.argv[1]); print(type(m).__name__)"
    try:
        out = subprocess.run([sys.executable, "-c", code, str(saved)], env=env, capture_output=True, text=True,
                             timeout=45)
    except subprocess.TimeoutExpired:
        pytest.fail("sparsekern.from_pretrained hung for 45 s in a fresh interpreter")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("LlamaForCausalLM")


# ---------------------------------------------------------------------------------------------- module files


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
