"""Checkpoint-file helpers shared by serialization.py and the transformers integration (_hf_impl.py), below both:
opening safetensors files safely, reading their headers, per-tensor CRC-32s, the rules of a sparse layer's spec."""

from __future__ import annotations

import contextlib
import zlib
from pathlib import Path

import torch

from ._fsutil import FileRefused, check_regular_file
from .weight import CheckpointError


#: safetensors dtype codes -> torch dtypes (the ones sparsekern's checkpoints and the models it prunes hold)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
#: torch dtype name ("float32") -> safetensors code ("F32")
ST_CODES = {str(dt).removeprefix("torch."): code for code, dt in ST_DTYPES.items()}


def tensor_checksum(t: torch.Tensor) -> str:
    """CRC-32 of a tensor's dtype, shape and bytes (contiguous, row-major) as "crc32:xxxxxxxx": what save_safetensors
    records per tensor and the loaders verify, so a flipped bit in a checkpoint, or a header edited to call the same
    bytes another dtype or shape, is an error naming the tensor, not a changed output. zlib's CRC-32 runs at a few
    GB/s: a fraction of the time reading the file takes."""
    t = t.detach().to("cpu").contiguous()
    head = f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode()
    data = t.reshape(-1).view(torch.uint8).numpy()
    return f"crc32:{zlib.crc32(memoryview(data), zlib.crc32(head)) & 0xFFFFFFFF:08x}"


@contextlib.contextmanager
def _open_safetensors(path: Path):
    """safe_open on a regular file; CheckpointError naming the file for anything else (not a file, truncated,
    corrupt: safetensors raises its own error types)."""
    from safetensors import safe_open

    try:
        path = check_regular_file(path, "checkpoint file")
    except (FileRefused, FileNotFoundError) as exc:
        raise CheckpointError(str(exc)) from None
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); the file "
                              "is truncated or corrupt") from exc


def _safetensors_header(path: Path) -> tuple[dict[str, tuple[list[int], str]], dict[str, str]]:
    """({key: (shape, dtype name)}, metadata) from the file's header alone: nothing is allocated for the tensors, so
    sizes claimed elsewhere (configs) can be checked against what the file really holds first."""
    with _open_safetensors(path) as f:
        meta = f.metadata() or {}
        heads = {k: (list(f.get_slice(k).get_shape()), str(f.get_slice(k).get_dtype())) for k in f.keys()}
    return heads, meta


_FLOAT_NAMES = ("float32", "float16", "bfloat16")
# sparsekern_config.json "layers" entries: field -> (check, what the rule says)
_LAYER_RULES = {
    "in_features": (lambda v: type(v) is int and v > 0 and v % 4 == 0, "a positive multiple of 4"),
    "out_features": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "bias": (lambda v: type(v) is bool, "true or false"),
    "dtype": (lambda v: v in _FLOAT_NAMES, f"one of {list(_FLOAT_NAMES)}"),
    "quant": (lambda v: v in (None, "int8", "fp8"), 'null, "int8" or "fp8"'),
    "weight_layout": (lambda v: v in ("linear", "conv1d"), '"linear" or "conv1d"'),
}




def check_layer_specs(layers, where: str) -> None:
    """A checkpoint's "layers" object ({name: spec}) against _LAYER_RULES; CheckpointError naming `where`, the layer,
    the field and the rule."""
    if not isinstance(layers, dict):
        raise CheckpointError(f"{where}: 'layers' must be an object mapping layer names to their specs")
    for name, spec in layers.items():
        if not isinstance(spec, dict):
            raise CheckpointError(f"{where}: layers[{name!r}] must be an object, got {type(spec).__name__}")
        for field, (ok, rule) in _LAYER_RULES.items():
            if field not in spec:
                raise CheckpointError(f"{where}: layers[{name!r}] lacks the field {field!r}")
            if not ok(spec[field]):
                raise CheckpointError(f"{where}: layers[{name!r}].{field} must be {rule}, got "
                                      f"{str(spec[field])[:60]!r}")


def recorded_checksums(path, meta: dict) -> dict | None:
    """The {key: "crc32:..."} a safetensors file's metadata records ("sparsekern_checksums"), None when it records
    none; CheckpointError naming the file when the record is not a JSON object."""
    import json

    raw = meta.get("sparsekern_checksums")
    if raw is None:
        return None
    try:
        sums = json.loads(raw)
        if not isinstance(sums, dict):
            raise ValueError("not an object")
    except ValueError as exc:
        raise CheckpointError(f"{path}: metadata 'sparsekern_checksums' is not a JSON object ({exc}); the file is "
                              "corrupt") from None
    return sums
