"""sparsify(model) / densify(model): swap every eligible 2:4 Linear of a model for SparseLinear, and back.

    report = sparsekern.sparsify(model)                      # strict: all included layers must be 2:4
    print(report)                                            # converted, skipped (with reasons), weight bytes
    sparsekern.densify(model)                                # SparseLinear -> nn.Linear / Conv1D again

Layer selection by name (the dotted name of model.named_modules()): a pattern matches a name when it equals the
name, equals one of its dotted suffixes ("q_proj" matches "model.layers.0.self_attn.q_proj") or matches it as an
fnmatch glob ("model.layers.*.mlp.*"). `include=None` includes every nn.Linear / transformers Conv1D; `exclude`
wins over include (default ("lm_head",): the output head is usually tied to the embeddings and kept dense).
A layer whose weight Parameter is shared with another module (tied weights) is skipped with that reason: replacing
it would silently untie the model. Only modules whose class is exactly nn.Linear or transformers' Conv1D are
converted: a subclass may compute something else in its own forward (it is skipped with the reason unless
allow_subclasses=True), and a Linear whose parent reads its `.weight` directly instead of calling it
(nn.MultiheadAttention.out_proj) is always skipped, since the parent would break on the missing attribute.

Atomicity: all replacements are built first (compress, quantise) and swapped in only when every one succeeded, so a
refusal or an error mid-way leaves the model exactly as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from . import _ext
from ._modules import matches, replace_module
from .linear import SparseLinear, dense_weight_of, is_convertible, twofour_violation
from .quant import check_quant_supported, quant_dtype

Selector = Iterable[str] | Callable[[str, nn.Module], bool] | None


class SparsifyError(ValueError):
    """sparsify(strict=True) refused the conversion; the model is unchanged. `.layers` maps name -> reason."""

    def __init__(self, message: str, layers: dict[str, str]):
        super().__init__(message)
        self.layers = layers


@dataclass
class SparsifyReport:
    """What sparsify() did.

    converted:    names of the layers now SparseLinear.
    skipped:      name -> reason, for every nn.Linear / Conv1D not converted (excluded, not included, tied, not 2:4,
                  in_features not a multiple of 4).
    bytes_before: weight bytes of the converted layers as dense tensors.
    bytes_after:  their compressed bytes (values + codes + scales); biases are not counted in either.
    """

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    quant: str | None = None

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def __str__(self) -> str:
        lines = [f"sparsify: {len(self.converted)} layer(s) converted (quant={self.quant}), "
                 f"{len(self.skipped)} skipped; weight bytes {self.bytes_before:,} -> {self.bytes_after:,} "
                 f"({100 * self.ratio:.1f}%)"]
        lines += [f"  skipped {name}: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def _selected(sel: Selector, name: str, module: nn.Module, default: bool) -> bool:
    if sel is None:
        return default
    if callable(sel):
        return bool(sel(name, module))
    if isinstance(sel, str):
        sel = (sel,)
    return matches(name, sel)


# Parents that read a child Linear's .weight / .bias tensors directly instead of (or besides) calling the child:
# converting the child breaks them. nn.MultiheadAttention passes out_proj.weight to F.multi_head_attention_forward;
# nn.TransformerEncoderLayer's forward inspects linear1.weight / linear2.weight to pick its fused fast path.
_PARENTS_READING_WEIGHT = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def _exact_class(mod: nn.Module) -> bool:
    cls = type(mod)
    return cls is nn.Linear or (cls.__name__ == "Conv1D" and (cls.__module__ or "").startswith("transformers"))


def _parents(model: nn.Module) -> dict[str, nn.Module]:
    """name -> parent module, for every submodule."""
    out = {}
    for pname, parent in model.named_modules():
        for cname, _ in parent.named_children():
            out[f"{pname}.{cname}" if pname else cname] = parent
    return out


def _structural_skip(name: str, mod: nn.Module, parents: dict[str, nn.Module], allow_subclasses: bool) -> str | None:
    """Why converting `mod` would change or break the model regardless of its weight, or None."""
    parent = parents.get(name)
    if isinstance(parent, _PARENTS_READING_WEIGHT):
        return (f"its parent {type(parent).__name__} reads the weight tensor directly instead of calling the layer; "
                "a SparseLinear has no .weight, so converting it would break the parent")
    if not _exact_class(mod) and not allow_subclasses:
        return (f"{type(mod).__name__} is a subclass of {'nn.Linear' if isinstance(mod, nn.Linear) else 'Conv1D'} "
                "whose own code a plain SparseLinear would drop; pass allow_subclasses=True to convert it anyway")
    return None


def _shared_weight_names(model: nn.Module) -> set[str]:
    """Names of modules whose `weight` Parameter object is also held by another module (tied weights)."""
    owners: dict[int, list[str]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        w = mod._parameters.get("weight") if hasattr(mod, "_parameters") else None
        if w is not None:
            owners.setdefault(id(w), []).append(mname)
    return {n for names in owners.values() if len(names) > 1 for n in names}


def sparsify(model: nn.Module, *, include: Selector = None, exclude: Selector = ("lm_head",),
             quant: str | None = None, strict: bool = True, dense_cache: bool = False,
             allow_subclasses: bool = False) -> SparsifyReport:
    """Replace the model's 2:4 nn.Linear / Conv1D layers by SparseLinear, in place; returns a SparsifyReport.

    include:  None (all Linear/Conv1D), name patterns, or a callable(name, module) -> bool.
    exclude:  name patterns or a callable; wins over include. Default ("lm_head",).
    quant:    None | "int8" | "fp8" for every converted layer (sparsekern.quant).
    strict:   True: if any included layer is not 2:4 (or its in_features is not a multiple of 4) raise
              SparsifyError naming every such layer, and change nothing. False: skip those layers with the reason.
    dense_cache: every converted layer also keeps a dense copy of its weight while on the CPU, used at batch sizes
              where dense beats the CPU 2:4 kernels (SparseLinear's doc; unquantised only). Costs the memory back.
    allow_subclasses: also convert subclasses of nn.Linear / Conv1D (their own forward is then not kept); by default
              they are skipped with the reason. Linears whose parent reads .weight directly are skipped always.
    The model's layers stay on their device and dtype. Nothing is swapped until every replacement is built.
    """
    if quant is not None:
        quant_dtype(quant)
        if dense_cache:
            raise ValueError("sparsify: dense_cache=True is for unquantised layers (quant=None)")
    _ext.require("sparsify")
    report = SparsifyReport(quant=quant)
    tied = _shared_weight_names(model)
    parents = _parents(model)
    candidates: list[tuple[str, nn.Module]] = []
    refused: dict[str, str] = {}
    for name, mod in model.named_modules():
        if not is_convertible(mod) or isinstance(mod, SparseLinear):
            continue
        if _selected(exclude, name, mod, False):
            report.skipped[name] = "excluded"
            continue
        if not _selected(include, name, mod, True):
            report.skipped[name] = "not included"
            continue
        if name in tied:
            report.skipped[name] = "weight shared with another module (tied); converting would untie it"
            continue
        why = _structural_skip(name, mod, parents, allow_subclasses)
        if why is not None:
            report.skipped[name] = why
            continue
        w, _ = dense_weight_of(mod)
        if w.shape[1] % 4 != 0:
            refused[name] = f"in_features = {w.shape[1]} is not a multiple of 4"
            continue
        bad = twofour_violation(w)
        if bad is not None:
            row, group, nnz = bad
            refused[name] = f"not 2:4: row {row}, group {group} has {nnz} non-zeros"
            continue
        candidates.append((name, mod))
    if refused and strict:
        listing = "; ".join(f"{n} ({why})" for n, why in refused.items())
        raise SparsifyError(
            f"sparsify(strict=True) refused: {len(refused)} included layer(s) are not 2:4: {listing}. The model is "
            "unchanged. Prune them, exclude them, or pass strict=False to skip them.", refused)
    report.skipped.update(refused)
    for _, mod in candidates:
        check_quant_supported(quant, dense_weight_of(mod)[0].device)
    # Build every replacement before touching the model.
    built = [(name, mod, SparseLinear.from_linear(mod, quant=quant, check=False, name=name, dense_cache=dense_cache))
             for name, mod in candidates]
    for name, mod, new in built:
        w, _ = dense_weight_of(mod)
        report.bytes_before += w.numel() * w.element_size()
        report.bytes_after += new.weight_nbytes()
        new.train(mod.training)
        replace_module(model, name, new)
        report.converted.append(name)
    if report.converted:
        # A transformers model now saves (model.save_pretrained) and reloads (AutoModel*.from_pretrained) as a
        # sparsekern checkpoint: quantization_config + hf_quantizer (sparsekern.hf).
        from . import hf

        hf.attach(model)
    return report


def densify(model: nn.Module, *, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every SparseLinear of the model by its dense layer (SparseLinear.to_linear), in place.
    dtype: of the dense weights (default: each layer's own). Returns the names replaced."""
    if isinstance(model, SparseLinear):
        raise TypeError("densify(model): model is itself a SparseLinear; call model.to_linear()")
    built = [(name, mod.to_linear(dtype)) for name, mod in model.named_modules() if isinstance(mod, SparseLinear)]
    for name, new in built:
        replace_module(model, name, new)
    if not any(isinstance(m, SparseLinear) for m in model.modules()):
        from . import hf

        hf.detach(model)  # a plain dense model again: save_pretrained writes a plain checkpoint
    return [name for name, _ in built]
