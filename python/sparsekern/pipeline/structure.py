"""Model structure: the decoder blocks, the prunable linears of a block, and which of them a run prunes.

The decoder blocks are found generically rather than from a table of architectures: the largest nn.ModuleList of
same-class blocks holding nn.Linear / transformers Conv1D (model.model.layers for LLaMA/Mistral/Qwen/Gemma,
model.model.decoder.layers for OPT, model.transformer.h for GPT-2).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .._modules import is_conv1d, matches
from .errors import PipelineError


def is_prunable(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2 family; its weight is stored transposed, [in, out])."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a transposed view for Conv1D): the layout pruning expects,
    with the N:M groups along in_features (the GEMM reduction dimension)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    """Copy `w` ([out_features, in_features]) into the module's weight, in its dtype and layout."""
    with torch.no_grad():
        weight_matrix(module).copy_(w.to(module.weight.dtype))


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (dotted name, ModuleList) of the model's decoder blocks.

    The blocks are the nn.ModuleList whose children are all of one class and each hold at least one prunable
    linear (the children are blocks, not linears themselves); among several (e.g. a list of experts inside each
    block), the one holding the most parameters. Raises PipelineError naming the model class when none exists.
    """
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        children = list(mod)
        cls = type(children[0])
        if is_prunable(children[0]) or any(type(c) is not cls for c in children):
            continue
        if not all(any(is_prunable(m) for m in c.modules()) for c in children):
            continue
        nparams = sum(p.numel() for p in mod.parameters())
        key = (nparams, len(children))
        if best is None or key > best[0]:
            best = (key, name, mod)
    if best is None:
        raise PipelineError(
            f"no recognisable decoder layers in {type(model).__name__}: found no nn.ModuleList of repeated blocks "
            "containing nn.Linear / Conv1D (expected e.g. model.model.layers, model.model.decoder.layers or "
            "model.transformer.h)")
    return best[1], best[2]


def block_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """Prunable linears of one block, by name relative to the block, in registration order."""
    return {n: m for n, m in layer.named_modules() if n and is_prunable(m)}


def is_selected(full_name: str, include: Iterable[str] | None, exclude: Iterable[str] | None) -> bool:
    """Whether a block linear (full dotted name) is pruned: included (include=None: all) and not excluded; the
    same name rule as sparsekern.convert.sparsify (_modules.matches)."""
    return not ((include is not None and not matches(full_name, include)) or (exclude and matches(full_name, exclude)))


def select_linears(layers_path: str, layers: nn.ModuleList, include: Iterable[str] | None,
                   exclude: Iterable[str] | None, skip: Iterable[str]) -> tuple[list[list[str]], list[str]]:
    """(per block: names relative to the block of the linears to prune, full names of the linears kept dense)."""
    skip = set(skip)
    selected: list[list[str]] = []
    kept_dense: list[str] = []
    for i, layer in enumerate(layers):
        names = []
        for rel in block_linears(layer):
            full = f"{layers_path}.{i}.{rel}"
            if is_selected(full, include, exclude) and full not in skip:
                names.append(rel)
            else:
                kept_dense.append(full)
        selected.append(names)
    return selected, kept_dense
