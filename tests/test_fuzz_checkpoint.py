"""Property-based tests of the entry points users hand files and command lines to: the checkpoint loader
(sparsekern.from_pretrained on mutated folders) and the command-line parser (sparsekern.cli).

Loader property: a folder written by save_pretrained (format version 2: config.json with the sparsekern
quantization_config, generation_config.json, model.safetensors recording a CRC-32 per tensor), then mutated (bytes of
model.safetensors flipped, its header edited, the file truncated or extended, fields of config.json's
quantization_config / the rest of config.json / generation_config.json set to wrong types, huge / negative numbers,
strings, removed; files replaced by garbage, folders or deleted), either fails with CheckpointError (or another
ValueError, or FileNotFoundError, with a message), or loads a model that computes exactly what the original computed
(the mutation changed nothing that matters). Never another exception type, never a silently different model. Edits
of config.json outside quantization_config that load are held to the weaker rule "every tensor loaded equals the
original's" (cast to the model's dtype: config.json's "dtype" is the load dtype): the model's own hyper-parameters
(rms_norm_eps, hidden_act, ...) legitimately change its outputs. Edits of quantization_config get no such leeway.

CLI property: an argument list with an obviously invalid value is refused with exit status 2 (argparse's
SystemExit(2) or main() returning 2), quickly, before any work (loading a model, pruning, benchmarking: those entry
points are replaced by a sentinel that fails the test when reached).

Budget and long mode: tests/fuzz_support.py, docs/fuzzing.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import event, given, note
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st

from fuzz_support import fuzz
from fuzz_support import fuzz_threads  # noqa: F401  (autouse: one intra-op thread)
from sparsekern import _ext

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import sparsekern  # noqa: E402
from sparsekern.weight import CheckpointError  # noqa: E402

CONFIG, GEN, WEIGHTS = "config.json", "generation_config.json", "model.safetensors"
INDEX = "model.safetensors.index.json"
QC = "quantization_config"  # the sparsekern part of config.json: the "json" mutations address it on its own
FILES = [CONFIG, GEN, WEIGHTS]
ALLOWED = (CheckpointError, ValueError, FileNotFoundError)  # CheckpointError is a ValueError

# Known library bug (tests/test_checkpoint_integrity.py::test_a_missing_dense_tensor_is_an_error_not_a_random_init and
# the reproducers at the end of the loader section): a dense tensor the model needs but that no checkpoint file holds
# (a header key renamed, config.json's num_hidden_layers raised, tie_word_embeddings turned off) is initialised at
# random by transformers, with only a logged load report. While it stands, a mutated folder that loads with such
# tensors is accepted as that bug (an event) provided every tensor the checkpoint does hold is the original's; set this
# to False once the loader refuses it (the strict xfail reproducers then pass and say so).
KNOWN_BUG_MISSING_DENSE_KEYS = False
# Known library bug (tests/test_checkpoint_integrity.py::test_a_damaged_checksum_record_does_not_let_a_changed_tensor_
# through): the CRC-32 check is skipped for every tensor of a file whose metadata holds no "sparsekern_checksums" entry
# for it, so one flipped bit in that metadata key's name (or the entry replaced by "{}") lets changed tensor bytes
# load. While it stands, a load whose only changed tensors are ones without a recorded CRC-32 in the mutated file is
# accepted as that bug (an event); a tensor whose CRC-32 is recorded must still never load changed.
KNOWN_BUG_CHECKSUMS_DROPPABLE = False

# ------------------------------------------------------------------------------------------------------ the model
IDS = torch.tensor([[1, 5, 9, 2, 33, 60, 7, 0, 12, 41]])


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n])


class Saved:
    def __init__(self, root: Path):
        torch.manual_seed(1234)
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                       max_position_embeddings=64, attention_bias=True, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            for mod in model.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.copy_(sparsekern.prune_nm(mod.weight)[0])
                    if mod.bias is not None:
                        mod.bias.normal_()
        sparsekern.sparsify(model)
        self.dir = root / "saved"
        sparsekern.save_pretrained(model, self.dir)
        self.logits = _logits(model)
        self.state = {k: v.clone() for k, v in model.state_dict().items()}
        self.work = root / "work"
        self.work.mkdir()
        self.config = json.loads((self.dir / CONFIG).read_text())
        assert self.config[QC]["quant_method"] == "sparsekern" and self.config[QC]["layers"]
        self.gen = json.loads((self.dir / GEN).read_text())
        raw = (self.dir / WEIGHTS).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        self.header = json.loads(raw[8:8 + n])
        self.size = len(raw)
        self.header_end = 8 + n
        # the folder holds every tensor of the model but the tied lm_head.weight (re-tied by transformers on load)
        assert set(self.state) - set(self.header) == {"lm_head.weight"}
        # the same model in shards (model-0000i-of-0000n.safetensors + model.safetensors.index.json)
        self.sharded = root / "sharded"
        sparsekern.save_pretrained(model, self.sharded, max_shard_size="8KB")
        self.index = json.loads((self.sharded / INDEX).read_text())
        self.shards = sorted(set(self.index["weight_map"].values()))
        assert len(self.shards) > 2 and not (self.sharded / WEIGHTS).exists()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return Saved(tmp_path_factory.mktemp("fuzz_ckpt"))


# ------------------------------------------------------------------------------------------------------ mutations
def _paths(doc, prefix=()):
    """Every path (tuple of keys / indices) into a JSON document, objects and lists included."""
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


HUGE = [2**31, 2**32, 2**40, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 10**30, -1, -2**63, 0, -7]
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.sampled_from(HUGE), st.integers(-10**6, 10**6),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                         st.sampled_from(["float32", "float16", "bfloat16", "int8", "fp8", "float64", "linear",
                                          "conv1d", "LlamaForCausalLM", "llama", "", "sparsekern", "1", "silu"]))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=3)), max_leaves=6)
# config.json outside quantization_config: every size is now checked on the meta-device skeleton before anything is
# allocated (the 2:4 layers against quantization_config's layer list, the dense tensors against the headers), so
# every integer field also gets the huge values, except the layer count: a skeleton of 2**40 decoder layers takes
# forever to build even on the meta device (no header can be compared before it exists), so num_hidden_layers stays
# small. Integers otherwise stay small most of the time so that most edits reach the loader.
SMALL_INTS = st.integers(-8, 4096)
CONFIG_SCALARS = st.one_of(st.none(), st.booleans(), SMALL_INTS, st.floats(allow_nan=True, allow_infinity=True),
                           st.text(max_size=12), st.sampled_from(["float32", "float16", "bfloat16", "llama", "", "silu",
                                                                  "1", "LlamaForCausalLM", "default", "auto"]))
CONFIG_VALUES = st.recursive(CONFIG_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                     st.dictionaries(st.text(max_size=6), inner,
                                                                                     max_size=3)), max_leaves=6)
GARBAGE = st.one_of(st.sampled_from([b"", b"{", b"[]", b"null", b"1", b'{"a":', b"\xff\xfe\x00", b"[" * 5000,
                                     b'{"format": 1e999999}', b"\x00" * 64, b'"just a string"']),
                    st.binary(max_size=64))
ST_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "U32", "I16", "U16", "I8", "U8", "BOOL", "F8_E4M3", "X9"]


@st.composite
def mutation(draw, saved: Saved):
    kind = draw(st.sampled_from(["flip", "flip", "header", "header", "truncate", "append", "json", "json", "json",
                                 "garbage", "delete", "folder"]))
    if kind == "flip":
        region = draw(st.sampled_from(["length", "header", "data"]))
        lo, hi = {"length": (0, 8), "header": (8, saved.header_end), "data": (saved.header_end, saved.size)}[region]
        return ("flip", region, draw(st.integers(lo, hi - 1)), draw(st.integers(1, 255)))
    if kind == "header":
        keys = sorted(k for k in saved.header if k != "__metadata__")
        key = draw(st.sampled_from(keys + ["__metadata__"]))
        if key == "__metadata__":
            mkey = draw(st.sampled_from(sorted(saved.header["__metadata__"]) + ["other"]))
            return ("header", key, mkey, draw(st.one_of(st.text(max_size=20), JSON_VALUES.map(json.dumps))))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "rename", "drop", "alias"]))
        if field == "dtype":
            return ("header", key, field, draw(st.sampled_from(ST_DTYPES)))
        if field == "shape":
            return ("header", key, field, draw(st.lists(st.one_of(st.integers(0, 80), st.sampled_from(HUGE)),
                                                         max_size=3)))
        if field == "data_offsets":
            return ("header", key, field, (draw(st.integers(-16, 16)), draw(st.integers(-16, 16))))
        if field in ("rename", "alias"):
            return ("header", key, field, draw(st.sampled_from(keys + ["x", key + ".x", key.replace("values",
                                                                                                   "weight")])))
        return ("header", key, field, None)
    if kind == "truncate":
        return ("truncate", draw(st.integers(0, saved.size - 1)))
    if kind == "append":
        return ("append", draw(st.binary(min_size=1, max_size=32)))
    if kind == "json":
        # quantization_config (sparsekern's own fields) as often as sparsekern_config.json was before version 2
        part = draw(st.sampled_from([QC, QC, CONFIG, GEN]))
        if part == GEN:
            path, values = draw(st.sampled_from(_paths(saved.gen))), JSON_VALUES
        elif part == QC:
            path, values = draw(st.sampled_from(_paths(saved.config[QC], (QC,)))), JSON_VALUES
        else:
            path = draw(st.sampled_from([p for p in _paths(saved.config) if p[0] != QC]))
            values = st.one_of(CONFIG_VALUES, st.sampled_from(HUGE))
            if path[-1] == "num_hidden_layers":
                values = st.one_of(st.integers(-2, 16), CONFIG_SCALARS.filter(lambda v: not isinstance(v, int)))
        op = draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
        return ("json", GEN if part == GEN else CONFIG, path, op, draw(values) if op != "delete" else None,
                draw(st.text(max_size=8)) if op == "add" else None)
    if kind == "garbage":
        return ("garbage", draw(st.sampled_from(FILES)), draw(GARBAGE))
    return (kind, draw(st.sampled_from(FILES)))


def _get_parent(doc, path):
    for p in path[:-1]:
        doc = doc[p]
    return doc


def apply_mutation(folder: Path, mut) -> None:
    try:
        _apply(folder, mut)
    except OSError:
        pass  # an earlier mutation removed the file or made it a folder: nothing to change


def _apply(folder: Path, mut) -> None:
    kind = mut[0]
    st_path = folder / WEIGHTS
    if kind == "flip":
        raw = bytearray(st_path.read_bytes())
        if mut[2] < len(raw):
            raw[mut[2]] ^= mut[3]
        st_path.write_bytes(bytes(raw))
    elif kind == "header":
        try:
            raw = st_path.read_bytes()
            n = int.from_bytes(raw[:8], "little")
            header = json.loads(raw[8:8 + n])
            assert isinstance(header, dict)
        except (OSError, ValueError, AssertionError, RecursionError):
            return  # an earlier mutation removed or broke the header: nothing to edit
        _, key, field, value = mut
        if key == "__metadata__":
            header.setdefault("__metadata__", {})[field] = value
        elif key in header:
            entry = header[key]
            if not isinstance(entry, dict):
                return
            if field == "dtype":
                entry["dtype"] = value
            elif field == "shape":
                entry["shape"] = value
            elif field == "data_offsets":
                entry["data_offsets"] = [entry["data_offsets"][0] + value[0], entry["data_offsets"][1] + value[1]]
            elif field == "rename":
                header[value] = header.pop(key)
            elif field == "alias":
                header[value] = dict(entry)
            elif field == "drop":
                del header[key]
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        st_path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    elif kind == "truncate":
        with open(st_path, "r+b") as f:
            f.truncate(mut[1])
    elif kind == "append":
        with open(st_path, "ab") as f:
            f.write(mut[1])
    elif kind == "json":
        _, file, path, op, value, new_key = mut
        p = folder / file
        try:
            doc = json.loads(p.read_text())
            parent = _get_parent(doc, path)
            if op == "set":
                parent[path[-1]] = value
            elif op == "delete":
                del parent[path[-1]]
            elif isinstance(parent[path[-1]], dict):
                parent[path[-1]][new_key] = value
            else:
                parent[path[-1]] = {new_key: value}
        except (OSError, ValueError, KeyError, IndexError, TypeError, RecursionError):
            return  # an earlier mutation removed or broke this file: nothing to edit
        p.write_text(json.dumps(doc))
    elif kind == "garbage":
        p = folder / mut[1]
        if p.is_dir():
            shutil.rmtree(p)
        p.write_bytes(mut[2])
    elif kind == "delete":
        p = folder / mut[1]
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    elif kind == "folder":
        p = folder / mut[1]
        if p.exists() and not p.is_dir():
            p.unlink()
        p.mkdir(exist_ok=True)


def _label(m) -> str:
    if m[0] == "json":
        return f"json:{m[1]}" + (":" + QC if m[1] == CONFIG and m[2][0] == QC else "")
    return m[0] + (":" + m[1] if m[0] in ("garbage", "delete", "folder") else "")


# The campaign's findings on version 1 folders (a forged header dtype, sparsekern_config.json dtypes, config.json sizes
# of the sparse layers, an unvalidated config.json) were fixed in the loader (issue 16); their reproducers, ported to
# version 2, are the tests below this target, and the target itself allows no exception but ALLOWED and no silently
# different model (but KNOWN_BUG_MISSING_DENSE_KEYS above).


def _tensor_equal(t: torch.Tensor, original: torch.Tensor, cast: bool) -> bool:
    """t is the original tensor; cast: or the original cast to t's float dtype (config.json's "dtype" edited)."""
    if t.dtype == original.dtype:
        return torch.equal(t, original)
    return cast and t.is_floating_point() and original.is_floating_point() and torch.equal(t, original.to(t.dtype))


def _state_equal(model, saved: Saved, cast: bool = False) -> bool:
    state = model.state_dict()
    if set(state) != set(saved.state):
        return False
    return all(_tensor_equal(state[k], v, cast) for k, v in saved.state.items())


def _loaded_files(folder: Path) -> list[Path]:
    """The weights files transformers reads: those the index's weight_map names, or model.safetensors."""
    try:
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        return [folder / name for name in set(weight_map.values())
                if isinstance(name, str) and (folder / name).is_file()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return [folder / WEIGHTS]


def _missing_from_checkpoint(model, folder: Path) -> set[str]:
    """Keys of the loaded model that no tensor of the weights files transformers reads holds (lm_head.weight excepted
    while it is really tied to an embedding they hold): transformers initialised them."""
    held = set()
    for path in _loaded_files(folder):
        try:
            held |= set(_header(path))
        except (OSError, ValueError):
            pass
    missing = set(model.state_dict()) - held
    if _is_tied(model) and "model.embed_tokens.weight" not in missing:
        missing.discard("lm_head.weight")  # tied to an embedding the checkpoint holds
    return missing


def _is_tied(model) -> bool:
    lm_head, embed = getattr(model, "lm_head", None), model.get_input_embeddings()
    return lm_head is not None and embed is not None and lm_head.weight is embed.weight


def _check_load(folder: Path, saved: Saved, config_touched: bool) -> None:
    """The property: sparsekern.from_pretrained(folder) raises one of ALLOWED with a message, or loads a model equal to
    the saved one (config_touched: config.json's hyper-parameters were edited, see the module doc)."""
    try:
        model = sparsekern.from_pretrained(folder)
    except ALLOWED as exc:
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        if not isinstance(exc, CheckpointError):
            event(f"{type(exc).__name__}: {str(exc)[:60]}")
        return
    except Exception as exc:  # noqa: BLE001  (the property: no other exception type)
        raise AssertionError(f"from_pretrained raised {type(exc).__name__}: {exc}") from exc
    missing = _missing_from_checkpoint(model, folder)
    if missing:
        note(f"loaded with tensors that no checkpoint file holds: {sorted(missing)[:6]}")
        state = model.state_dict()
        assert KNOWN_BUG_MISSING_DENSE_KEYS, f"loaded with tensors initialised at random: {sorted(missing)[:6]}"
        held = {k: v for k, v in saved.state.items() if k in state and k not in missing}
        assert all(_tensor_equal(state[k], v, config_touched) for k, v in held.items()), \
            "a mutated checkpoint loaded silently with other values for the tensors it holds"
        event("KNOWN BUG: tensors missing from the checkpoint initialised at random")
        return
    note_exc = None
    try:
        same_out = torch.equal(_logits(model), saved.logits)
    except Exception as exc:  # noqa: BLE001
        same_out, note_exc = False, exc
        note(f"forward failed: {type(exc).__name__}: {exc}")
    if same_out and _state_equal(model, saved):
        event("loaded unchanged")
        return
    if config_touched and _state_equal(model, saved, cast=True):
        # A hyper-parameter edit that every shape check accepts (e.g. rope_theta, or "dtype", the load dtype) gives
        # another model on the same weights: legitimate. A model that then cannot run means a size was not checked.
        assert note_exc is None, f"a config.json edit loaded a model whose forward fails: {note_exc}"
        event("config.json edit changed the model's hyper-parameters, weights intact")
        return
    state = model.state_dict()
    changed = {k for k, v in saved.state.items() if k in state and not _tensor_equal(state[k], v, config_touched)}
    if _is_tied(model):
        changed = {"model.embed_tokens.weight" if k == "lm_head.weight" else k for k in changed}  # stored once
    if KNOWN_BUG_CHECKSUMS_DROPPABLE and set(state) == set(saved.state) and changed \
            and changed <= _unverified_keys(folder):
        note(f"changed tensors without a recorded CRC-32 loaded: {sorted(changed)[:6]}")
        event("KNOWN BUG: checksum record damaged, changed tensors loaded")
        return
    raise AssertionError("a mutated checkpoint loaded silently as a different model")


def _unverified_keys(folder: Path) -> set[str]:
    """Tensors of the folder's weights files for which the file records no CRC-32 (readable headers only)."""
    keys = set()
    for path in _loaded_files(folder):
        try:
            header = _header(path)
            sums = json.loads((header.get("__metadata__") or {}).get("sparsekern_checksums", "{}"))
        except (OSError, ValueError, AttributeError, TypeError, RecursionError):
            continue
        if isinstance(sums, dict):
            keys |= {k for k in header if k != "__metadata__" and k not in sums}
    return keys


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")  # config.json sizes of 0
@fuzz(1200)
@given(data=st.data())
def test_mutated_checkpoints_fail_cleanly_or_load_unchanged(saved, data):
    muts = data.draw(st.lists(mutation(saved), min_size=1, max_size=3), label="mutations")
    folder = Path(tempfile.mkdtemp(dir=saved.work)) / "m"
    try:
        shutil.copytree(saved.dir, folder)
        for mut in muts:
            apply_mutation(folder, mut)
        event(" + ".join(sorted({_label(m) for m in muts})))
        _check_load(folder, saved, any(m[0] == "json" and m[1] == CONFIG and m[2][0] != QC for m in muts))
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


@st.composite
def sharded_mutation(draw, saved: Saved):
    """A change to a sharded folder: the index (its weight_map edited, garbage, deleted, a folder) or a shard (bytes
    flipped, truncated, deleted, replaced by garbage or by another shard)."""
    kind = draw(st.sampled_from(["index", "index", "index", "flip", "truncate", "garbage", "delete", "folder",
                                 "swap"]))
    if kind == "index":
        path = draw(st.sampled_from(_paths(saved.index)))
        op = draw(st.sampled_from(["set", "set", "delete", "add"]))
        values = st.one_of(st.sampled_from(saved.shards + ["model.safetensors", "../saved/model.safetensors",
                                                           "/dev/zero", "", "."]), JSON_VALUES)
        return ("json", INDEX, path, op, draw(values) if op != "delete" else None,
                draw(st.sampled_from(sorted(saved.index["weight_map"]) + ["x"])) if op == "add" else None)
    target = draw(st.sampled_from(saved.shards + ([INDEX] if kind in ("garbage", "delete", "folder") else [])))
    if kind == "flip":
        size = (saved.sharded / target).stat().st_size
        return ("flip_file", target, draw(st.integers(0, size - 1)), draw(st.integers(1, 255)))
    if kind == "truncate":
        return ("truncate_file", target, draw(st.integers(0, (saved.sharded / target).stat().st_size - 1)))
    if kind == "garbage":
        return ("garbage", target, draw(GARBAGE))
    if kind == "swap":
        return ("swap", target, draw(st.sampled_from(saved.shards)))
    return (kind, target)


def apply_sharded_mutation(folder: Path, mut) -> None:
    kind = mut[0]
    try:
        if kind == "flip_file":
            raw = bytearray((folder / mut[1]).read_bytes())
            if mut[2] < len(raw):
                raw[mut[2]] ^= mut[3]
            (folder / mut[1]).write_bytes(bytes(raw))
        elif kind == "truncate_file":
            with open(folder / mut[1], "r+b") as f:
                f.truncate(mut[2])
        elif kind == "swap":
            a, b = folder / mut[1], folder / mut[2]
            data = a.read_bytes()
            a.write_bytes(b.read_bytes())
            b.write_bytes(data)
        else:
            apply_mutation(folder, mut)
    except OSError:
        pass  # an earlier mutation removed the file or made it a folder: nothing to change


@fuzz(300)
@given(data=st.data())
def test_mutated_sharded_checkpoints_fail_cleanly_or_load_unchanged(saved, data):
    muts = data.draw(st.lists(sharded_mutation(saved), min_size=1, max_size=3), label="mutations")
    folder = Path(tempfile.mkdtemp(dir=saved.work)) / "m"
    try:
        shutil.copytree(saved.sharded, folder)
        for mut in muts:
            apply_sharded_mutation(folder, mut)
        event(" + ".join(sorted({m[0] for m in muts})))
        _check_load(folder, saved, config_touched=False)
    finally:
        shutil.rmtree(folder.parent, ignore_errors=True)


# ---------------------------------------------------------------------------------------- reproducers of the findings
def _copy(saved: Saved, tmp_path: Path) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(saved.dir, dst)
    return dst


def _edit(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


# Errors raised while transformers builds the model from the config (after it was read) are wrapped as
# "<folder>: LlamaForCausalLM.from_pretrained failed (<type>: <first line>)": they name the class and the cause, no
# longer config.json itself (version 1 said "config.json: LlamaForCausalLM cannot be built from it (...)").
@pytest.mark.parametrize("field,value,msg", [
    ("hidden_size", "abc", r"config\.json: transformers cannot read it \(StrictDataclassFieldValidationError"),
    ("num_attention_heads", 0, r"config\.json: transformers cannot read it \(ZeroDivisionError"),
    ("vocab_size", -1, r"LlamaForCausalLM\.from_pretrained failed \(RuntimeError: Trying to create tensor with "
                       r"negative dimension -1"),
    ("hidden_act", "nope", r"LlamaForCausalLM\.from_pretrained failed \(KeyError: 'nope'\)"),
    ("model_type", "xyz", r"config\.json: transformers cannot read it \(ValueError: .*model type `xyz`"),
    ("architectures", [1], r"config\.json: 'architectures' must be a list of class names, got \[1\]"),
])
def test_forged_config_json_is_a_checkpoint_error(saved, tmp_path, field, value, msg):
    folder = _copy(saved, tmp_path)
    _edit(folder / CONFIG, lambda d: d.__setitem__(field, value))
    with pytest.raises(CheckpointError, match=msg):
        sparsekern.from_pretrained(folder)


def test_forged_layer_dtype_in_quantization_config_is_a_checkpoint_error(saved, tmp_path):
    # version 1's sparsekern_config.json "dtype" claims: tests/test_checkpoint_integrity.py's test_v1_forged_dtype_...
    folder = _copy(saved, tmp_path)
    layer = next(iter(saved.config[QC]["layers"]))
    _edit(folder / CONFIG, lambda d: d[QC]["layers"][layer].__setitem__("dtype", "bfloat16"))
    with pytest.raises(CheckpointError, match=rf"'{layer}.values' is F32 \[\d+, \d+\] in the checkpoint; the layer "
                                              r"needs BF16"):
        sparsekern.from_pretrained(folder)


def test_config_json_dtype_is_the_load_dtype(saved, tmp_path):
    # Version 2 has no dtype claim of its own: config.json's "dtype" is transformers' load dtype (dtype="auto"), so an
    # edited one loads the model cast to it, exactly as from_pretrained(dtype=...) on the original folder does.
    folder = _copy(saved, tmp_path)
    _edit(folder / CONFIG, lambda d: d.__setitem__("dtype", "bfloat16"))
    edited = sparsekern.from_pretrained(folder)
    explicit = sparsekern.from_pretrained(saved.dir, dtype=torch.bfloat16)
    assert edited.model.layers[0].self_attn.q_proj.values.dtype == torch.bfloat16
    assert _state_equal(edited, saved, cast=True)
    a, b = edited.state_dict(), explicit.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("field,value", [("intermediate_size", 2**40), ("num_attention_heads", 4), ("head_dim", 4096)])
def test_config_sizes_of_sparse_layers_are_checked(saved, tmp_path, field, value):
    folder = _copy(saved, tmp_path)
    _edit(folder / CONFIG, lambda d: d.__setitem__(field, value))
    with pytest.raises(CheckpointError, match=r"config\.json quantization_config: layer '[\w.]+' is \[\d+, \d+\] but "
                                              r"the model built from config\.json has it \[\d+, \d+\]"):
        sparsekern.from_pretrained(folder)


@pytest.mark.parametrize("verify", [True, False],
                         ids=["verify", "no-verify"])
@pytest.mark.parametrize("key", ["model.norm.weight", "model.embed_tokens.weight",
                                 "model.layers.0.self_attn.q_proj.bias"])
def test_forged_dtype_in_safetensors_header_is_a_checkpoint_error(saved, tmp_path, key, verify):
    folder = _copy(saved, tmp_path)
    apply_mutation(folder, ("header", key, "dtype", "I32"))  # same width: every byte unchanged, the CRC-32 not
    with pytest.raises(CheckpointError, match=key):
        sparsekern.from_pretrained(folder, verify=verify)


@pytest.mark.parametrize("op", ["false", "delete"])
def test_untying_the_embeddings_in_config_json_is_refused(saved, tmp_path, op):
    folder = _copy(saved, tmp_path)
    _edit(folder / CONFIG, lambda d: d.__setitem__("tie_word_embeddings", False) if op == "false"
          else d.pop("tie_word_embeddings"))
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        sparsekern.from_pretrained(folder)


def test_more_layers_in_config_json_than_in_the_checkpoint_is_refused(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    _edit(folder / CONFIG, lambda d: d.__setitem__("num_hidden_layers", 3))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\."):
        sparsekern.from_pretrained(folder)


def test_a_weight_map_without_a_dense_tensor_is_refused(saved, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(saved.sharded, folder)
    weight_map = saved.index["weight_map"]
    shard = weight_map["model.embed_tokens.weight"]
    assert [k for k, f in weight_map.items() if f == shard] == ["model.embed_tokens.weight"]  # alone in its shard
    _edit(folder / INDEX, lambda d: d["weight_map"].pop("model.embed_tokens.weight"))
    with pytest.raises(CheckpointError, match="model.embed_tokens.weight"):
        sparsekern.from_pretrained(folder)


# ------------------------------------------------------------------------------------------------------ the CLI
class WorkStarted(BaseException):
    """Raised by the sentinels that replace the CLI's expensive entry points (BaseException: no `except Exception`
    in the CLI swallows it)."""


# (module, attribute) of every expensive step a command may take; each is replaced by a sentinel while a case runs.
WORK = [("sparsekern.data", "load_model"), ("sparsekern.serialization", "from_pretrained"),
        ("sparsekern.pipeline", "prune_model"), ("sparsekern.eval", "perplexity"),
        ("sparsekern.sensitivity", "sensitivity_scan"), ("sparsekern.bench.gemm", "run_gemm"),
        ("sparsekern.bench.prune", "bench_point"), ("sparsekern.bench.prune", "_run_with_policy"),
        ("sparsekern.pipeline_cli", "_load")]


@contextlib.contextmanager
def _sentinels():
    import importlib

    # Import every module that binds one of these names at import time first: a module first imported while the
    # sentinels are in place would keep a sentinel for the rest of the session (sensitivity binds eval.perplexity).
    for mod_name in ("sparsekern.cli", "sparsekern.pipeline_cli", "sparsekern.sensitivity", "sparsekern.pipeline",
                     "sparsekern.eval", "sparsekern.bench.cli", "sparsekern.bench.gemm", "sparsekern.bench.prune"):
        importlib.import_module(mod_name)
    with contextlib.ExitStack() as stack:
        for mod_name, attr in WORK:
            try:
                mod = importlib.import_module(mod_name)
            except ImportError:
                continue
            if hasattr(mod, attr):
                def boom(*a, _name=f"{mod_name}.{attr}", **k):
                    raise WorkStarted(_name)
                stack.enter_context(mock.patch.object(mod, attr, boom))
        # `bench prune` re-runs itself in a child process with its page policy unless this marks it as that child
        stack.enter_context(mock.patch.dict(os.environ, {"SPARSEKERN_BENCH_PRUNE_THP": "both"}))
        yield


def run_cli(argv: list[str]) -> tuple[int | None, str, float, str | None]:
    """(exit status, stderr, seconds, work step reached or None) of `sparsekern <argv>` run in-process."""
    from sparsekern import cli

    err = io.StringIO()
    t0 = time.perf_counter()
    code, work = None, None
    with _sentinels(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                err.write(str(exc.code))
        except WorkStarted as exc:
            work = str(exc)
        except Exception as exc:  # noqa: BLE001  (a traceback: recorded as exit 1, as the interpreter would)
            code = 1
            err.write(f"{type(exc).__name__}: {exc}")
    return code, err.getvalue(), time.perf_counter() - t0, work


def assert_refused(argv: list[str]) -> None:
    code, err, _, work = run_cli(argv)
    if currently_in_test_context():
        note(f"argv={argv!r} exit={code} work={work} stderr={err[-400:]!r}")
    assert work is None, f"{argv}: work started ({work}) before the argument was refused"
    assert code == 2, f"{argv}: exit status {code}, expected 2 (stderr: {err[-300:]!r})"
    assert err.strip(), f"{argv}: no message on stderr"


@pytest.fixture(scope="module")
def cli_paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_cli")
    a_file = root / "a_file"
    a_file.write_text("not a folder\n")
    return {"file": str(a_file), "under_file": str(a_file / "out"), "missing": str(root / "no" / "such" / "model"),
            "existing_dir": str(root)}


# Invalid values per option: every one is a user error by the option's documented rule.
COUNTS = ["0", "-1", "-100", "abc", "1.5", ""]
PATTERNS = ["5:4", "2:x", "0:4", "4:4", "2:64", "", "abc", "1.5", "-0.5", "0", "2:4:8"]
DEVICES = ["tpu", "npu", "cuda:x", "", "gpu0"]


def _prune_invalid(paths):
    return {
        "--pattern": PATTERNS, "--nsamples": COUNTS, "--batch-size": COUNTS, "--seqlen": COUNTS,
        "--scan-nsamples": COUNTS, "--scan-eval-tokens": COUNTS, "--method": ["foo", ""],
        "--calib-dtype": ["float8"], "--rerun-kernel": ["x"], "--quant": ["int4"],
        "--model": [paths["missing"]], "--unknown-flag": ["1"], "--skip-sensitive": ["-3", "-1", "x"],
        "--eval-tokens": ["-1", "-5", "x"], "--device": DEVICES, "--text": [paths["missing"]],
        "--out": [paths["under_file"], paths["file"] + "/", ""],
    }


def _eval_invalid(paths):
    return {"--eval-tokens": COUNTS, "--batch-size": COUNTS, "--seqlen": COUNTS, "--model": [paths["missing"]],
            "--unknown-flag": ["1"], "--device": DEVICES, "--text": [paths["missing"]]}


def _gemm_invalid(paths):
    return {"--shapes": ["0x4x4", "4x0x8", "-1x4x4", "abc", "4x4x4x4", "1x4000000x4000000", "1x8x2147483648"],
            "--m": ["0", "-1", "abc"], "--m-max": ["0", "-3"], "--warmup": ["-1", "abc"], "--iters": ["0", "-2"],
            "--min-iters": ["0"], "--max-seconds": ["0", "-1", "abc"], "--rotate": ["0"], "--threads": ["0", "-2"],
            "--seed": ["-1"], "--dtype": ["fp99", ""], "--contenders": ["nope"], "--device": DEVICES,
            "--preset": ["nope"], "--unknown-flag": ["1"], "--out": [paths["file"], paths["under_file"]],
            "--policy": [paths["under_file"], paths["existing_dir"]]}


def _bench_prune_invalid(paths):
    return {"--thp": ["x"], "--unknown-flag": ["1"], "--repeats": ["abc"], "--budget": ["abc"], "--threads": ["x"]}


def _bench_prune_pending(paths):
    # `bench prune` validates none of these today: it starts benchmarking (or fails with a traceback, or exits 0)
    return {"--shapes": ["0x4", "abc", "4x-4", "4x4000000000"], "--methods": ["nope", ""],
            "--pattern": ["5:4", "2:x"], "--devices": ["tpu", ""], "--repeats": ["0", "-1"], "--budget": ["0", "-1"],
            "--threads": ["0", "-1"], "--json": [paths["under_file"], paths["existing_dir"]]}


def _none(paths):
    return {}


# command -> (argv head, invalid options refused today, invalid options pending, valid options to mix in)
COMMANDS = {
    "prune": (["prune"], _prune_invalid, _none, ["--method", "magnitude", "--nsamples", "2"]),
    "eval": (["eval"], _eval_invalid, _none, ["--eval-tokens", "64"]),
    "bench gemm": (["bench", "gemm"], _gemm_invalid, _none, ["--shapes", "4x8x8", "--iters", "1"]),
    "bench prune": (["bench", "prune"], _bench_prune_invalid, _bench_prune_pending, ["--repeats", "1"]),
}


# bench prune validated its arguments only while benchmarking when this campaign ran; fixed in issue 16.


@st.composite
def cli_case(draw, paths, which: int):
    """(command, argv): some valid options, then 1-2 invalid ones from table `which` of COMMANDS (1: refused today,
    2: pending)."""
    name = draw(st.sampled_from(sorted(c for c, spec in COMMANDS.items() if spec[which](paths))))
    head, invalid, pending, valid = COMMANDS[name]
    table = (invalid if which == 1 else pending)(paths)
    options = draw(st.lists(st.sampled_from(sorted(table)), min_size=1, max_size=2, unique=True))
    argv = list(head) + (valid if draw(st.booleans()) else [])
    for opt in options:
        value = draw(st.sampled_from(table[opt]))
        argv += [opt, value] if not draw(st.booleans()) or not value.startswith("-") else [f"{opt}={value}"]
    return name, argv


@fuzz(800)
@given(data=st.data())
def test_cli_refuses_invalid_arguments_before_any_work(cli_paths, data):
    name, argv = data.draw(cli_case(cli_paths, 1), label="argv")
    event(name)
    assert_refused(argv)


@fuzz(100)
@given(data=st.data())
def test_cli_refuses_pending_invalid_arguments_before_any_work(cli_paths, data):
    name, argv = data.draw(cli_case(cli_paths, 2), label="argv")
    event(name)
    assert_refused(argv)


# The reproducers and their neighbours, one case each.
CLI_EXAMPLES = [
    ["prune", "--skip-sensitive", "-3"],
    ["prune", "--eval-tokens", "-1"],
    ["prune", "--device", "tpu"],
    ["prune", "--out", "{under_file}"],
    ["prune", "--out", ""],
    ["prune", "--pattern", "4:8", "--out", "{fresh_dir}"],
    ["prune", "--dense", "--quant", "int8", "--out", "{fresh_dir}"],
    ["prune", "--text", "{missing}"],
    ["eval", "--device", "tpu"],
    ["eval", "--text", "{missing}"],
    ["bench", "gemm", "--shapes", "1x4000000x4000000"],
    ["bench", "gemm", "--shapes", "4x8x8", "--out", "{file}"],
    ["bench", "gemm", "--shapes", "4x8x8", "--out", "{under_file}"],
    ["bench", "gemm", "--shapes", "4x8x8", "--policy", "{under_file}"],
    ["bench", "prune", "--shapes", "0x4"],
    ["bench", "prune", "--shapes", "abc"],
    ["bench", "prune", "--methods", "nope"],
    ["bench", "prune", "--pattern", "5:4"],
    ["bench", "prune", "--devices", "tpu"],
    ["bench", "prune", "--repeats", "0"],
    ["bench", "prune", "--budget", "-1"],
    ["bench", "prune", "--threads", "-1"],
    ["bench", "prune", "--json", "{under_file}"],
]


def _fill(argv, paths, tmp_path):
    values = dict(paths, fresh_dir=str(tmp_path / "fresh_out"))
    return [a.format(**values) for a in argv]


def _cli_id(param) -> str:
    argv = param.values[0] if hasattr(param, "values") else param
    return " ".join(a.strip("{}") for a in argv)


@pytest.mark.parametrize("argv", CLI_EXAMPLES, ids=[_cli_id(p) for p in CLI_EXAMPLES])
def test_cli_examples_refused_before_any_work(cli_paths, tmp_path, argv):
    assert_refused(_fill(argv, cli_paths, tmp_path))
