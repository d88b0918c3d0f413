"""sparsekern: 2:4 structured sparsity for PyTorch on NVIDIA GPUs (sm80+) and CPUs.

The public names below are imported lazily (PEP 562), so `import sparsekern` stays cheap and works even where an
optional dependency of one area (transformers, matplotlib) is missing: the error names it when that area is used.
"""

from __future__ import annotations

import importlib

from ._ext import ExtensionMissingError
from ._version import __version__
from . import ops
from .diagnostics import doctor
from . import hf as _hf

# transformers integration (AutoModel*.from_pretrained / save_pretrained of 2:4 checkpoints): registered when
# transformers' quantizer registry is imported, without importing transformers here (sparsekern.hf).
_hf.install_hook()

# public name -> module that defines it
_LAZY = {
    # core ops (ops/core.py) and the 2:4 weight type (weight.py)
    "prune_nm": "sparsekern.ops.core",
    "is_nm": "sparsekern.ops.core",
    "nm_violation": "sparsekern.ops.core",
    "quantize_per_token": "sparsekern.ops.core",
    "compress_24": "sparsekern.weight",
    "decompress_24": "sparsekern.weight",
    "sparse_linear": "sparsekern.weight",
    "Sparse24Weight": "sparsekern.weight",
    "Compressed24": "sparsekern.weight",
    # layers and conversion
    "SparseLinear": "sparsekern.linear",
    "sparsify": "sparsekern.convert",
    "densify": "sparsekern.convert",
    "save_pretrained": "sparsekern.serialization",
    "from_pretrained": "sparsekern.serialization",
    # whole-model pruning and evaluation
    "prune_model": "sparsekern.pipeline",
    "PruneConfig": "sparsekern.pipeline",
}
_SUBMODULES = {"prune", "eval", "linear", "convert", "serialization", "pipeline", "format", "policy", "quant", "data",
               "bench", "sensitivity", "weight", "envs", "hf"}

__all__ = ["__version__", "ExtensionMissingError", "doctor", "ops", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"sparsekern.{name}")
    raise AttributeError(f"module 'sparsekern' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
