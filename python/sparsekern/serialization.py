"""Saving and loading models with SparseLinear layers.

state_dict: each SparseLinear contributes `<layer>.values`, `.codes`, `.weight_scale` (quantised), `.bias`,
`.shape` (int64 [2] = [out, in]) and `.format_version` (int64 [1]): the layout of sparsekern.weight.Sparse24Weight,
which owns it (SparseLinear adds its bias). torch.save of that
dict round-trips as is. Loading also accepts a *dense* 2:4 `<layer>.weight` for a SparseLinear (it is compressed on
load), so a pruned dense checkpoint loads straight into a sparsified model.

load_state_dict(model, sd) validates every entry (keys, shapes, dtypes, format versions, 2:4 pattern of dense
weights, pattern codes) before changing anything: on any problem it raises CheckpointError listing them all and the
model keeps its old weights. (torch's own Module.load_state_dict copies module by module and can stop half-way.)

Hugging Face folders: save_pretrained(model, dir) is transformers' own model.save_pretrained (sparsekern.hf attaches
its quantizer to the model) written into a temporary sibling folder and renamed into place: config.json with
quantization_config {"quant_method": "sparsekern", "format_version": 2, "layers": {...}, "metadata": ...},
generation_config.json, model.safetensors or shards + index (the state dict above; tied tensors stored once;
a CRC-32 per tensor in each file's metadata). from_pretrained(dir) loads it through transformers
(model_class.from_pretrained with sparsekern's quantizer: docs/sparselinear.md "Hugging Face"), as it does
compressed-tensors "sparse-24-bitmask" checkpoints; folders of format version 1 (sparsekern_config.json beside
config.json, one model.safetensors with a "tied" map) are read by _from_pretrained_v1 below.
save_compressed_tensors(model, dir) writes the compressed-tensors layout.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ._fsutil import FileRefused, atomic_write, read_json
from ._modules import replace_module
from ._version import __version__
from .linear import SparseLinear, dense_weight_of, is_convertible
from ._ckptio import (  # noqa: F401  (tensor_checksum and the header helpers stay importable from here)
    _FLOAT_NAMES,
    _LAYER_RULES,
    ST_CODES,
    _open_safetensors,
    _safetensors_header,
    check_layer_specs,
    recorded_checksums,
    tensor_checksum,
)
from .weight import FORMAT_VERSION, CheckpointError, NotTwoFourError

FILE_FORMAT = "sparsekern"
FILE_FORMAT_VERSION = 1
META_FILE = "sparsekern_config.json"
WEIGHTS_FILE = "model.safetensors"


# ---------------------------------------------------------------------------------------------- state dicts


def _sparse_layers(model: nn.Module) -> dict[str, SparseLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SparseLinear)}


def _layer_of(key: str, prefixes: dict[str, SparseLinear]) -> str | None:
    prefix = key.rpartition(".")[0]
    return prefix if prefix in prefixes else None


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, strict: bool = True) -> None:
    """Load `state_dict` into `model` all-or-nothing (see the module doc). CheckpointError lists every problem."""
    sparse = _sparse_layers(model)
    problems: list[str] = []
    installs: dict[str, tuple] = {}
    sparse_keys = {"values", "codes", "weight_scale", "bias", "shape", "format_version", "weight"}
    for name, layer in sparse.items():
        prefix = name + "." if name else ""
        if not strict and not any(prefix + key in state_dict for key in sparse_keys):
            continue  # strict=False: a layer absent from the dict keeps its weights
        try:
            installs[name] = layer.state_from_dict(state_dict, prefix)
        except (CheckpointError, NotTwoFourError, ValueError) as exc:
            problems.append(str(exc))
    expected = {k: v for k, v in model.state_dict().items() if _layer_of(k, sparse) is None}
    missing = [k for k in expected if k not in state_dict]
    for k, t in expected.items():
        if k in state_dict and tuple(state_dict[k].shape) != tuple(t.shape):
            problems.append(f"{k}: checkpoint shape {tuple(state_dict[k].shape)} != model shape {tuple(t.shape)} "
                            "(truncated or mismatched)")
        elif k in state_dict and _kind(state_dict[k].dtype) != _kind(t.dtype):
            # torch would convert the values silently (an int32 tensor's bit patterns read as numbers)
            problems.append(f"{k}: checkpoint dtype {state_dict[k].dtype} is not the kind of the model's {t.dtype} "
                            "(mismatched or edited checkpoint)")
    unexpected = [k for k in state_dict if k not in expected
                  and not (_layer_of(k, sparse) is not None and k.rpartition(".")[2] in sparse_keys)]
    if strict and missing:
        problems.append(f"missing keys: {missing}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {unexpected}")
    if problems:
        raise CheckpointError("checkpoint not loaded (the model is unchanged):\n  " + "\n  ".join(problems))
    rest = {k: v for k, v in state_dict.items() if _layer_of(k, sparse) is None}
    with torch.no_grad():
        model.load_state_dict(rest, strict=False)
    for name, (weight, bias) in installs.items():
        sparse[name].load_weight(weight, bias)


def _kind(dtype: torch.dtype) -> str:
    return "bool" if dtype == torch.bool else "float" if dtype.is_floating_point else \
        "complex" if dtype.is_complex else "int"


def _dedupe(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors that are views of the same memory with the same shape (tied weights) are stored once:
    returns (unique tensors, {alias key: stored key})."""
    seen: dict[tuple, str] = {}
    unique, tied = {}, {}
    for k, t in tensors.items():
        ident = (t.device, t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            tied[k] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = k
        unique[k] = t.detach().to("cpu").contiguous()
    return unique, tied


def save_safetensors(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> dict:
    """Write model.state_dict() to a safetensors file (atomically: temp file + rename), with a CRC-32 of every
    tensor in the file's metadata ("sparsekern_checksums"). Returns the tied-key map."""
    from safetensors.torch import save_file

    tensors, tied = _dedupe(model.state_dict())
    meta = {"format": "pt", "sparsekern_format_version": str(FILE_FORMAT_VERSION), "tied": json.dumps(tied),
            "sparsekern_checksums": json.dumps({k: tensor_checksum(t) for k, t in tensors.items()})}
    meta.update(metadata or {})
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return tied


def _read_safetensors(path: Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with _open_safetensors(path) as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if verify:
        _verify_checksums(path, tensors, meta)
    return tensors, meta


def _verify_checksums(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Compare every tensor with the CRC-32 save_safetensors recorded (files without checksums, e.g. from sparsekern
    before they existed or from other writers, are accepted as they are)."""
    sums = recorded_checksums(path, meta)
    if sums is None:
        return
    bad = [k for k, t in tensors.items() if k in sums and tensor_checksum(t) != sums[k]]
    missing = sorted(set(sums) - set(tensors))
    if bad or missing:
        raise CheckpointError(
            f"{path}: checksum mismatch: " + ", ".join(f"tensor {k!r} does not match its recorded CRC-32" for k in bad)
            + (f"; tensors {missing} are recorded but absent" if missing else "")
            + " (the file was changed or damaged after it was written; load with verify=False to skip the check)")


def _apply_tied(where: str, tensors: dict[str, torch.Tensor], tied) -> None:
    """Add the aliases of a tied-key map ({alias: stored key}) to `tensors`, refusing a map that could substitute one
    tensor for another of a different kind: the alias and its key must be the same kind of entry (same last name,
    e.g. both `.weight`) and of the same shape and dtype as what the alias's own key would hold."""
    if not isinstance(tied, dict) or not all(isinstance(a, str) and isinstance(k, str) for a, k in tied.items()):
        raise CheckpointError(f"{where}: 'tied' must map key names to key names")
    for alias, key in tied.items():
        if key not in tensors:
            raise CheckpointError(f"{where}: tied key {alias!r} refers to missing {key!r}")
        if alias in tensors:
            raise CheckpointError(f"{where}: tied key {alias!r} is also stored itself; a checkpoint holds one or "
                                  "the other")
        if alias.rpartition(".")[2] != key.rpartition(".")[2]:
            raise CheckpointError(f"{where}: tied key {alias!r} refers to {key!r}, an entry of another kind; tied "
                                  "entries share their last name (e.g. both '.weight')")
        tensors[alias] = tensors[key]


def load_safetensors(model: nn.Module, path: str | os.PathLike, *, strict: bool = True, verify: bool = True) -> None:
    """Load a file written by save_safetensors into `model` (all-or-nothing, see load_state_dict). verify: check the
    per-tensor CRC-32s the file records (a mismatch names the tensor)."""
    tensors, meta = _read_safetensors(Path(path), verify=verify)
    version = meta.get("sparsekern_format_version")
    if version is not None and version != str(FILE_FORMAT_VERSION):
        raise CheckpointError(f"{path}: unknown sparsekern file format version {version}; this sparsekern reads "
                              f"version {FILE_FORMAT_VERSION}")
    try:
        tied = json.loads(meta.get("tied", "{}"))
    except ValueError as exc:
        raise CheckpointError(f"{path}: metadata 'tied' is not JSON ({exc})") from None
    _apply_tied(str(path), tensors, tied)
    load_state_dict(model, tensors, strict=strict)


# ---------------------------------------------------------------------------------------------- Hugging Face


def _model_dtype(model: nn.Module) -> torch.dtype:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point() and t.dtype not in (torch.float8_e4m3fn,):
            return t.dtype
    return torch.float32


def _check_user_metadata(metadata) -> dict | None:
    """save_pretrained's `metadata` argument, checked before anything is written: a dict that json can encode."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise TypeError(f"save_pretrained: metadata must be a dict (JSON-serialisable) or None, not "
                        f"{type(metadata).__name__}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as exc:  # ValueError: circular reference
        raise TypeError(f"save_pretrained: metadata is not JSON-serialisable ({exc}); nothing was written") from exc
    return metadata


def save_pretrained(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False,
                    metadata=None, max_shard_size: int | str = "5GB") -> Path:
    """Save a (sparsified) Hugging Face model as a Hugging Face folder that `AutoModel*.from_pretrained` loads once
    sparsekern is imported (module doc; the same files as `model.save_pretrained(directory)`).

    model:     a transformers PreTrainedModel, SparseLinear layers or not.
    directory: target folder; must not exist unless overwrite=True. The whole folder is written under a temporary
               sibling name, then renamed into place. Returns the path.
    metadata:  optional JSON-serialisable value of the caller's own, stored as quantization_config "metadata" and
               exposed after loading as `model.sparsekern_metadata`; None keeps the model's own (what it was loaded
               with). Anything json cannot encode is refused with a TypeError before anything is written.
    max_shard_size: safetensors shards above this size are split (transformers' rule; an index file names them).
    """
    from . import hf

    metadata = _check_user_metadata(metadata)
    directory = Path(directory)
    if not hf.is_transformers_model(model):
        raise TypeError("save_pretrained(model, dir) needs a Hugging Face model (with .config); for other models "
                        "use sparsekern.serialization.save_safetensors(model, path)")
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    hf.attach(model)

    def write(tmp: Path) -> None:
        own = model.sparsekern_metadata
        if metadata is not None:
            model.sparsekern_metadata = metadata
        try:
            type(model).save_pretrained(model, str(tmp), max_shard_size=max_shard_size)
        finally:
            model.sparsekern_metadata = own

    return atomic_write(directory, write, overwrite=overwrite)


def _dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise CheckpointError(f"unknown dtype {name!r} in {META_FILE}")
    return dt


def _build_model(directory: Path, model_class, dtype: torch.dtype | None):
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(directory))
    except Exception as exc:  # noqa: BLE001  (transformers raises many types for a malformed config)
        raise CheckpointError(f"{directory}/config.json: transformers cannot read it ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        if not isinstance(archs, (list, tuple)) or not all(isinstance(a, str) for a in archs):
            raise CheckpointError(f"{directory}/config.json: 'architectures' must be a list of class names, got "
                                  f"{str(archs)[:80]}")
        model_class = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
        if model_class is None:
            raise CheckpointError(f"{directory}/config.json names no known architecture ({archs}); pass "
                                  "model_class=...")
    return config, model_class, dtype


def _fill_tied(model: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Checkpoints store a tied tensor once (HF drops lm_head.weight when tied to the embeddings): give every key
    of the model that shares memory with a key present in `sd` that key's tensor."""
    groups: dict[int, list[str]] = {}
    for k, t in model.state_dict(keep_vars=True).items():
        if t is not None and t.numel():
            groups.setdefault(t.data_ptr(), []).append(k)
    for keys in groups.values():
        have = [k for k in keys if k in sd]
        for k in keys:
            if k not in sd and have:
                sd[k] = sd[have[0]]


def _read_json_object(path: Path, what: str) -> dict:
    """A JSON object from `path` (regular file, size-capped, UTF-8); CheckpointError naming the file otherwise."""
    try:
        doc = read_json(path, what)
    except (FileRefused, FileNotFoundError) as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{what} {path} must hold a JSON object, not a {type(doc).__name__}")
    return doc


def _check_meta(meta: dict, meta_path: Path) -> None:
    """Validate sparsekern_config.json against its schema (module doc); the error names the file, field and rule."""
    if meta.get("format") != FILE_FORMAT:
        raise CheckpointError(f"{meta_path}: 'format' is {meta.get('format')!r}, expected {FILE_FORMAT!r}")
    if meta.get("format_version") != FILE_FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: unknown format version {meta.get('format_version')!r}; this "
                              f"sparsekern ({__version__}) reads version {FILE_FORMAT_VERSION}")
    if meta.get("portable_format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: unknown 2:4 portable format version "
                              f"{meta.get('portable_format_version')!r}; this sparsekern reads {FORMAT_VERSION}")
    if meta.get("dtype", "float32") not in _FLOAT_NAMES:
        raise CheckpointError(f"{meta_path}: 'dtype' must be one of {list(_FLOAT_NAMES)}, got {meta.get('dtype')!r}")
    check_layer_specs(meta.get("layers", {}), str(meta_path))
    tied = meta.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(a, str) and isinstance(k, str) for a, k in tied.items()):
        raise CheckpointError(f"{meta_path}: 'tied' must map key names to key names")


def _check_layers_against_header(meta: dict, heads: dict, where: str) -> None:
    """Each sparse layer's sizes in sparsekern_config.json must be those of its tensors in the file: checked on the
    header before anything is allocated (forged sizes would otherwise allocate gigabytes before failing)."""
    for name, spec in meta.get("layers", {}).items():
        n, k = spec["out_features"], spec["in_features"]
        head = heads.get(f"{name}.values")
        if head is None:
            raise CheckpointError(f"{where}: sparsekern_config.json names layer {name!r} but {WEIGHTS_FILE} holds no "
                                  f"'{name}.values'")
        if head[0] != [n, k // 2]:
            raise CheckpointError(f"{where}: sparsekern_config.json gives layer {name!r} the shape [{n}, {k}] "
                                  f"(values [{n}, {k // 2}]) but {WEIGHTS_FILE} holds values {head[0]}")


def _construct(model_class, config, where: str, device: str | None = None):
    """model_class(config), on `device` (e.g. "meta"); any failure is a CheckpointError naming config.json (a
    malformed config makes transformers raise ZeroDivisionError, KeyError, its own validation errors...)."""
    try:
        with torch.device(device) if device else contextlib.nullcontext():
            return model_class(config)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{where}/config.json: {model_class.__name__} cannot be built from it "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from exc


_ST_DTYPES = {name: ST_CODES[name] for name in _FLOAT_NAMES}


def _check_dense_against_header(model_class, config, meta: dict, heads: dict, where: str) -> None:
    """Build the model on the meta device (no memory) and compare it with the file's header before the real model is
    allocated: each dense entry's shape (a forged vocab_size), each sparse layer's [out, in] (a forged
    intermediate_size or head count), and the dtypes sparsekern_config.json claims (top level: the floating dense
    tensors; per layer: an unquantised layer's values)."""
    tied, layers = meta.get("tied", {}), meta.get("layers", {})
    probe = _construct(model_class, config, where, "meta")
    for name, spec in layers.items():
        try:
            mod = probe.get_submodule(name)
            shape = list(dense_weight_of(mod)[0].shape)
        except (AttributeError, TypeError):
            raise CheckpointError(f"{where}: sparsekern_config.json names layer {name!r}, which the model built from "
                                  "config.json has not as a Linear") from None
        if shape != [spec["out_features"], spec["in_features"]]:
            raise CheckpointError(f"{where}: config.json gives layer {name!r} the shape {shape} but "
                                  f"sparsekern_config.json and {WEIGHTS_FILE} hold [{spec['out_features']}, "
                                  f"{spec['in_features']}]; the config does not match the weights")
        head = heads.get(f"{name}.values")
        if spec["quant"] is None and head is not None and head[1] != _ST_DTYPES[spec["dtype"]]:
            raise CheckpointError(f"{where}: sparsekern_config.json says layer {name!r} is {spec['dtype']} but its "
                                  f"values are {head[1]} in {WEIGHTS_FILE}")
    want = _ST_DTYPES[meta.get("dtype", "float32")]
    for key, t in probe.state_dict().items():
        if key.rpartition(".")[0] in layers:
            continue
        head = heads.get(tied.get(key, key))
        if head is not None and list(t.shape) != head[0]:
            raise CheckpointError(f"{where}: config.json gives {key} the shape {list(t.shape)} but {WEIGHTS_FILE} "
                                  f"holds {head[0]}; the config does not match the weights")
        if head is not None and t.is_floating_point() and head[1] in _ST_DTYPES.values() and head[1] != want:
            raise CheckpointError(f"{where}: sparsekern_config.json says the model is {meta.get('dtype')} but "
                                  f"{WEIGHTS_FILE} holds {key} as {head[1]}")
        if key in tied and head is None:
            raise CheckpointError(f"{where}: tied key {key!r} refers to missing {tied[key]!r}")


def from_pretrained(directory: str | os.PathLike, *, model_class=None, dtype: torch.dtype | None = None,
                    device: torch.device | str | None = None, verify: bool = True) -> nn.Module:
    """Rebuild a model saved by save_pretrained (or a compressed-tensors sparse-24-bitmask checkpoint) with its
    SparseLinear layers; returns it in eval mode on `device` (default CPU). The same as
    `model_class.from_pretrained(directory, dtype=dtype or "auto", device_map=device)` with sparsekern imported,
    plus folders of the earlier layout (sparsekern_config.json, format version 1). The metadata passed to
    save_pretrained(..., metadata=...) is `model.sparsekern_metadata` (None when none was given, and for
    compressed-tensors checkpoints).

    model_class: transformers model class; default the config's `architectures[0]`.
    dtype:       dtype of the model's float parameters; default the dtype recorded at save time.
    verify:      check the per-tensor CRC-32s recorded at save time (a changed tensor is an error naming it).
    Every size the config claims is checked against the safetensors headers before anything is allocated.
    """
    from . import hf

    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{directory} holds no config.json: not a saved model")
    raw_cfg = _read_json_object(cfg_path, "model config")
    if not (hf.config_dict_is_sparsekern(raw_cfg) or _ct_sparsity_config(raw_cfg) is not None):
        return _from_pretrained_v1(directory, model_class=model_class, dtype=dtype, device=device, verify=verify)
    hf.register()
    _, model_class, _ = _build_model(directory, model_class, dtype)
    token = hf.verify_checksums.set(verify)
    try:
        model = model_class.from_pretrained(str(directory), dtype=dtype or "auto", local_files_only=True,
                                            device_map=str(torch.device(device)) if device is not None else None)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001  (transformers raises many types for a malformed folder)
        raise CheckpointError(f"{directory}: {model_class.__name__}.from_pretrained failed ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300] if str(exc) else ''})") from exc
    finally:
        hf.verify_checksums.reset(token)
    if not hasattr(model, "sparsekern_metadata"):
        model.sparsekern_metadata = None
    return model.eval()


def _from_pretrained_v1(directory: Path, *, model_class, dtype, device, verify) -> nn.Module:
    """Folders written by sparsekern before version 2: sparsekern_config.json + one model.safetensors."""
    directory = Path(directory)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{directory} holds no config.json: not a saved model")
    meta_path = directory / META_FILE
    if not meta_path.exists():
        raise CheckpointError(f"{directory} has no {META_FILE}: not written by sparsekern.save_pretrained")
    meta = _read_json_object(meta_path, "sparsekern metadata")
    _check_meta(meta, meta_path)
    heads, _ = _safetensors_header(directory / WEIGHTS_FILE)
    _check_layers_against_header(meta, heads, str(directory))
    config, model_class, _ = _build_model(directory, model_class, dtype)
    _check_dense_against_header(model_class, config, meta, heads, str(directory))
    tensors, st_meta = _read_safetensors(directory / WEIGHTS_FILE, verify=verify)
    requested = dtype
    dtype = dtype or _dtype_from_name(meta.get("dtype", "float32"))
    model = _construct(model_class, config, str(directory)).to(dtype)
    for name, spec in meta.get("layers", {}).items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise CheckpointError(f"{META_FILE} names layer {name!r}, which {model_class.__name__} lacks") from exc
        if not is_convertible(old):
            raise CheckpointError(f"{META_FILE} names layer {name!r}, a {type(old).__name__}, not a Linear")
        replace_module(model, name, SparseLinear(
            # An explicit dtype applies to the sparse layers too (their values are cast on load; quantised values
            # keep int8/fp8 and only the bias follows). Built on the meta device: loading installs the real tensors,
            # so nothing is allocated for a weight before its entries are validated.
            spec["in_features"], spec["out_features"], spec["bias"],
            dtype=requested or _dtype_from_name(spec["dtype"]),
            quant=spec["quant"], weight_layout=spec["weight_layout"], device="meta"))
    _apply_tied(f"{directory / WEIGHTS_FILE}", tensors, meta.get("tied", {}))
    load_state_dict(model, tensors, strict=True)
    from . import hf

    hf.attach(model, metadata=meta.get("user"))  # saves as the current (version 2) format from now on
    model.eval()
    if device is not None:
        model.to(device)
    return model


# ---------------------------------------------------------------------------------------------- compressed-tensors


def _ct_sparsity_config(raw_cfg: dict) -> dict | None:
    for key in ("quantization_config", "compression_config"):
        qc = raw_cfg.get(key)
        if isinstance(qc, dict) and isinstance(qc.get("sparsity_config"), dict):
            return qc["sparsity_config"]
    return None


def save_compressed_tensors(model: nn.Module, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Export a sparsified Hugging Face model as a compressed-tensors "sparse-24-bitmask" checkpoint (the layout
    llm-compressor writes and vLLM reads), atomically like save_pretrained.

    Every unquantised SparseLinear born from an nn.Linear is stored as X.compressed / X.bitmask / X.shape
    (Sparse24Weight.to_bitmask: the values are shared, the codes become bitmasks); everything else is stored dense (a
    Conv1D-born layer as its dense [in, out] weight: compressed-tensors targets Linear layers). Quantised
    SparseLinear layers are refused: their int8/fp8 scheme is not compressed-tensors' quantisation config.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise TypeError("save_compressed_tensors(model, dir) needs a Hugging Face model (with .config)")
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    sparse = _sparse_layers(model)
    quantised = [n for n, m in sparse.items() if m.quant is not None]
    if quantised:
        raise ValueError(f"save_compressed_tensors: quantised SparseLinear layers cannot be exported as "
                         f"sparse-24-bitmask: {quantised}")
    tensors: dict[str, torch.Tensor] = {}
    compressed_layers = []
    for key, t in model.state_dict().items():
        layer = _layer_of(key, sparse)
        if layer is None:
            tensors[key] = t
            continue
        m, leaf = sparse[layer], key.rpartition(".")[2]
        if leaf == "bias":
            tensors[key] = t
        elif leaf == "values" and m.weight_layout == "linear":
            values, bitmask, shape = m.weight24.to_bitmask()
            tensors.update({f"{layer}.compressed": values, f"{layer}.bitmask": bitmask, f"{layer}.shape": shape})
            compressed_layers.append(layer)
        elif leaf == "values":
            tensors[f"{layer}.weight"] = m.dense_weight().t()
    tensors, _ = _dedupe(tensors)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        config.architectures = [type(model).__name__]
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
        ignore = sorted(n for n, mod in model.named_modules() if isinstance(mod, nn.Linear))
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "dense", "config_groups": {},
            "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"],
                                "ignore": ignore, "global_sparsity": None},
        }
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")

    return atomic_write(directory, write, overwrite=overwrite)
