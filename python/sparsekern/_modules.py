"""Small rules about torch modules that several layers of sparsekern need, each written once.

    matches(name, patterns)                 # layer selection by dotted name (sparsify, prune_model, sensitivity)
    model_device(model)                     # where a model's parameters are (prune_model, perplexity)
    replace_module(model, dotted_name, new) # swap a submodule by its dotted name (sparsify/densify, loading)
    is_conv1d(module)                       # transformers' GPT-2 style Conv1D, without importing transformers

Imports only torch and the standard library (a leaf module any layer may use).
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a pattern selects the dotted module name `name`: it equals the name, equals one of its dotted
    suffixes ("q_proj" matches "model.layers.0.self_attn.q_proj"), or matches it as an fnmatch glob
    ("model.layers.*.mlp.*"). `patterns` is iterated once per call."""
    parts = name.split(".")
    suffixes = {".".join(parts[i:]) for i in range(len(parts))}
    return any(p in suffixes or fnmatch.fnmatchcase(name, p) for p in patterns)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def replace_module(model: nn.Module, dotted_name: str, new: nn.Module) -> None:
    """Put `new` where model.get_submodule(dotted_name) is (setattr on its parent). dotted_name must be non-empty."""
    parent_name, _, child = dotted_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D (a linear whose weight is stored transposed, [in, out]), detected without
    importing transformers: the class or one of its bases is named "Conv1D" and defined in a `transformers` module,
    and the module has Conv1D's `nf` (out features) and a 2-D weight. (torch's nn.Conv1d is not one: other name.)"""
    if not any(c.__name__ == "Conv1D" and (c.__module__ or "").startswith("transformers")
               for c in type(module).__mro__):
        return False
    weight = getattr(module, "weight", None)
    return hasattr(module, "nf") and isinstance(weight, torch.Tensor) and weight.dim() == 2
