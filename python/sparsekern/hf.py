"""Hugging Face transformers integration: `AutoModelForCausalLM.from_pretrained` builds SparseLinear layers from
sparsekern and compressed-tensors "sparse-24-bitmask" checkpoints, and `model.save_pretrained` writes sparsekern's
format, once `import sparsekern` has run.

    import sparsekern, transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(dir, dtype="auto", device_map="auto")
    model.save_pretrained(out)              # config.json quantization_config {"quant_method": "sparsekern", ...}
    transformers.pipeline("text-generation", model=dir)

How it plugs in (transformers >= 5; docs/sparselinear.md "Hugging Face"):
- SparsekernConfig (quant_method "sparsekern") and SparsekernHfQuantizer are registered with transformers'
  register_quantization_config / register_quantizer. `import sparsekern` does not import transformers (it costs
  ~1.3 s): register() runs at once if transformers' quantizer registry is already imported, otherwise an import hook
  runs it right after `transformers.quantizers.auto` is imported (which every from_pretrained does).
- Loading never holds a dense copy of a sparse layer: before any weight is read, the quantizer checks the
  config's layer list against the checkpoint headers and the model skeleton (shapes, dtypes, every entry present),
  then replaces those Linear / Conv1D modules of the meta-device skeleton by SparseLinear layers; transformers'
  loader then streams each layer's `values / codes / weight_scale / shape / format_version` entries into one load op
  (`_LoadSparse24`), which validates them (Sparse24Weight.from_state_dict: pattern codes, shapes, dtypes) and installs
  them on the device the device_map gives. Every failure is collected and raised as one CheckpointError after the
  loader has run (transformers' loader would otherwise only log it); the half-built model is never returned.
- compressed-tensors: transformers' own "compressed-tensors" entries are wrapped (register_* refuses existing names,
  so the mappings are updated directly): a config whose sparsity_config has format "sparse-24-bitmask" is served by
  CompressedTensors24Quantizer (X.compressed / X.bitmask / X.shape per layer, optionally int8 / fp8 W8A8 with
  per-channel weight scales and dynamic per-token activations: exactly SparseLinear's int8 / fp8 scheme); any other
  compressed-tensors config goes to transformers' original classes unchanged.
- A model with SparseLinear layers carries `hf_quantizer` and `config.quantization_config` (attach(), also called by
  sparsekern.sparsify on a transformers model), so transformers' own `model.save_pretrained` writes the sparsekern
  format (sharded above max_shard_size, safetensors with CRC-32s); attach() also makes that save atomic per file
  (written into a hidden sibling folder, then each file renamed into place, config.json last).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
import threading
from pathlib import Path

from torch import nn

from ._hfbase import (  # noqa: F401  (re-exported: sparsekern.hf is the public home)
    CHECKSUMS_KEY,
    HF_FORMAT_VERSION,
    QUANT_METHOD,
    is_transformers_model,
    verify_checksums,
)

_lock = threading.Lock()
_registered = False


# ---------------------------------------------------------------------------------------------- registration


def register() -> bool:
    """Register sparsekern's quantization config and quantizer with transformers (idempotent, thread-safe). Returns
    False when transformers (>= 5) is not installed."""
    global _registered
    if _registered:
        return True
    try:
        # Imported outside the lock: this import can run the post-import hook, which calls register() again
        # (it then finds the registry imported and installs; this call sees _registered and returns).
        from transformers.quantizers import auto

        from . import _hf_impl  # needs transformers >= 5 (its core_model_loading)
    except ImportError:
        return False
    with _lock:
        if not _registered:
            _hf_impl.install(auto)
            _registered = True
    return True


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs register() right after `transformers.quantizers.auto` has been imported (a post-import hook): the
    registry exists only then, and importing it eagerly would double `import sparsekern`'s time."""

    TARGET = "transformers.quantizers.auto"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _remove_hook()
            register()

        spec.loader.exec_module = exec_and_register
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _AfterImport)]


def install_hook() -> None:
    """Called by `import sparsekern`: register now if transformers' registry is loaded, else when it is."""
    if _AfterImport.TARGET in sys.modules:
        register()
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


# ---------------------------------------------------------------------------------------------- attach / save


def attach(model: nn.Module, metadata=None) -> None:
    """Mark a transformers model holding SparseLinear layers as a sparsekern model: `config.quantization_config`,
    `hf_quantizer`, an atomic `save_pretrained` (is_quantized stays False: dtype moves stay allowed). The layer list
    is recomputed at every save, so layers sparsified or densified later are described as they are then. A no-op for
    other modules."""
    if not is_transformers_model(model) or not register():
        return
    from ._hf_impl import attach as attach_impl

    attach_impl(model, metadata)


def detach(model: nn.Module) -> None:
    """Undo attach() (the model holds no SparseLinear layer any more: it saves as a plain model again)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(getattr(config, "quantization_config", None), "quant_method", None) \
            == QUANT_METHOD:
        del config.quantization_config
    for name in ("hf_quantizer", "quantization_method"):
        model.__dict__.pop(name, None)
    if "is_quantized" in model.__dict__:
        model.is_quantized = False
    model.__dict__.pop("save_pretrained", None)


def config_dict_is_sparsekern(cfg: dict) -> bool:
    qc = cfg.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def read_config_json(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / "config.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
