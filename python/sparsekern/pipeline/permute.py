"""Fold an N:M input-channel permutation into a decoder block, so that it costs nothing at run time.

    rules = fold_rules(layer, model.config)            # {"mlp.down_proj": FoldRule(...), "self_attn.o_proj": ...}
    perm, gain = permute_block(layer, rules["mlp.down_proj"], act_scale=None, n=2, m=4)
    # the block computes the same function; mlp.down_proj's weight columns are now W[:, perm], and an N:M mask
    # chosen on it keeps `gain` (relative) more |W| (Wanda's |W| * sqrt(act_scale) with act_scale) than before.

A permutation of a linear's input channels (the consumer's weight columns) is free when the same permutation can
be applied to the output channels of whatever produces that input (the producers' weight rows and biases), with
only channel-wise operations in between:
- MLP: the rows of gate_proj and up_proj (+ biases) and the columns of down_proj (Llama / Mistral / Qwen2 / Qwen3 /
  Gemma); fc1 -> fc2 (OPT, at the block's level; Phi, under mlp); GPT-2's mlp.c_fc -> mlp.c_proj (Conv1D, weights
  stored [in, out]); GPT-NeoX's mlp.dense_h_to_4h -> mlp.dense_4h_to_h.
- Attention: the value channels within each head: rows of v_proj (+ bias) and columns of o_proj / out_proj /
  dense (Llama family, Qwen2/3, Gemma, Phi, OPT), and for GPT-2 the value third of the fused c_attn (its columns
  2E..3E, Conv1D) and the rows of attn.c_proj. Under grouped-query attention (num_kv_heads < num_heads) kv head j
  serves the query heads j*g .. j*g+g-1 (g = num_heads // num_kv_heads, transformers' repeat_kv order), so there is
  one permutation of head_dim per kv head, applied to v_proj's rows of kv head j and to o_proj's columns of every
  query head of its group.
- Linears reading the residual stream (q/k/v/gate/up/fc1/c_fc/c_attn...) cannot fold: their input is the block's
  norm output, shared through the residual stream by the whole model. check_permutable refuses them, and any
  linear of a block whose structure is not recognised (fused per-head QKV as GPT-NeoX / Falcon, a v_norm, an
  unexpected module inside the MLP or attention...).

Permutation conventions (rule = a FoldRule):
- MLP rules: perm is a LongTensor [in_features] of the consumer: consumer W <- W[:, perm], every producer's rows
  (and bias) <- rows[perm].
- Attention rules: perm is a LongTensor [num_kv_heads, head_dim], row j a permutation of range(head_dim) for kv
  head j (the full consumer permutation [num_heads * head_dim] is accepted too, when it has that structure).
  consumer_permutation(rule, perm)[h * head_dim + d] = h * head_dim + perm[h // g, d] is the consumer's column
  permutation; producer_permutation(rule, perm)[j * head_dim + d] = j * head_dim + perm[j, d] the producer's (within
  the producer's rows from rule.producer_offset on).
- permute_block returns the consumer's full column permutation [in_features] (CPU LongTensor), whatever the rule.
- Calibration statistics of the consumer's input taken before the permutation are in the old order: permute them
  too (act_scale[perm]; a Hessian H[perm][:, perm]).

Every function here validates everything before writing: on any error the layer is left unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._modules import is_conv1d
from ..quant import attach_weight_grid, weight_grid
from ..prune.permute import kept_importance, search_permutation
from .errors import PipelineError
from .structure import block_linears, is_prunable, weight_matrix

__all__ = [
    "FoldRule",
    "apply_permutation",
    "check_permutable",
    "consumer_permutation",
    "fold_rules",
    "permutation_importance",
    "permute_block",
    "producer_permutation",
]


@dataclass(frozen=True)
class FoldRule:
    """One foldable permutation of a block: the consumer's input columns and the producers' output rows.

    consumer: dotted name (relative to the block) of the linear whose input columns are permuted.
    producers: names of the linears whose output rows (and biases) are permuted with it.
    in_features: the consumer's input features (the permuted channels).
    head_dim, num_heads, num_kv_heads: the head structure of an attention rule (None for an MLP rule).
    producer_offset: the first producer output row of the permuted range (GPT-2's fused c_attn: 2 * hidden, the
      value third); the producers' rows [offset, offset + producer_channels) are permuted.
    description: what the rule folds, in words.
    """

    consumer: str
    producers: tuple[str, ...]
    in_features: int
    head_dim: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    producer_offset: int = 0
    description: str = ""

    @property
    def per_head(self) -> bool:
        return self.head_dim is not None

    @property
    def group_size(self) -> int:
        """Query heads per kv head (1 for MHA and for MLP rules)."""
        return self.num_heads // self.num_kv_heads if self.per_head else 1

    @property
    def producer_channels(self) -> int:
        """Rows of each producer that the permutation touches (num_kv_heads * head_dim for attention)."""
        return self.num_kv_heads * self.head_dim if self.per_head else self.in_features

    @property
    def search_blocks(self) -> int | None:
        """`blocks` for search_permutation on permutation_importance's matrix (num_kv_heads; None for an MLP)."""
        return self.num_kv_heads if self.per_head else None

    @property
    def perm_shape(self) -> tuple[int, ...]:
        """The shape apply_permutation takes: (in_features,) or (num_kv_heads, head_dim)."""
        return (self.num_kv_heads, self.head_dim) if self.per_head else (self.in_features,)


# ---------------------------------------------------------------------------------------------------- recognition

# (container, producers, consumer, other children allowed in the container, description). Everything between the
# producers and the consumer must be channel-wise: the allow-list names the only other modules the container may
# hold (an activation, dropout); anything else (a norm, experts, a gate) and the pair is not recognised.
_MLP_SPECS = (
    ("mlp", ("gate_proj", "up_proj"), "down_proj", {"act_fn", "act", "activation_fn", "dropout"},
     "gated MLP (Llama / Mistral / Qwen2 / Gemma): rows of gate_proj and up_proj, columns of down_proj"),
    ("mlp", ("c_fc",), "c_proj", {"act", "dropout"},
     "GPT-2 MLP (Conv1D): output channels of c_fc, input channels of c_proj"),
    ("mlp", ("fc1",), "fc2", {"activation_fn", "act", "dropout"}, "MLP (Phi): rows of fc1, columns of fc2"),
    ("mlp", ("dense_h_to_4h",), "dense_4h_to_h", {"act", "dropout"},
     "GPT-NeoX MLP: rows of dense_h_to_4h, columns of dense_4h_to_h"),
    ("", ("fc1",), "fc2", {"self_attn", "self_attn_layer_norm", "activation_fn", "final_layer_norm", "dropout"},
     "OPT MLP: rows of fc1, columns of fc2"),
)

_ATTN_CONTAINERS = ("self_attn", "attn", "attention")
_ATTN_CONSUMERS = ("o_proj", "out_proj", "dense")
_ATTN_ALLOWED = {"q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "q_layernorm", "k_layernorm", "rotary_emb",
                 "dropout", "attn_dropout", "resid_dropout"}
_GPT2_ATTN_ALLOWED = {"c_attn", "c_proj", "attn_dropout", "resid_dropout"}

# Linears whose input is the block's normalised residual stream, by their last name.
_RESIDUAL_READERS = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1", "c_fc", "c_attn", "q_attn",
                     "query_key_value", "dense_h_to_4h", "w1", "w3", "wq", "wk", "wv", "qkv_proj", "gate_up_proj",
                     "Wqkv", "query", "key", "value"}


def _children(mod: nn.Module) -> set[str]:
    return {n for n, _ in mod.named_children()}


def _out_in(mod: nn.Module) -> tuple[int, int]:
    w = weight_matrix(mod)
    return int(w.shape[0]), int(w.shape[1])


def _text_config(config):
    if config is not None and hasattr(config, "get_text_config"):
        try:
            return config.get_text_config()
        except Exception:  # noqa: BLE001 - a config without a text part is used as is
            return config
    return config


def _int_attr(obj, *names) -> int | None:
    for n in names:
        v = getattr(obj, n, None) if obj is not None else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _mlp_rule(layer: nn.Module, spec) -> tuple[FoldRule | None, str | None]:
    container, producers, consumer, allowed, desc = spec
    parent = layer.get_submodule(container) if container else layer
    prefix = f"{container}." if container else ""
    mods = [getattr(parent, n, None) for n in (*producers, consumer)]
    if not all(isinstance(m, nn.Module) and is_prunable(m) for m in mods):
        return None, None  # not this family
    extra = sorted(_children(parent) - set(producers) - {consumer} - allowed)
    cname = prefix + consumer
    if extra:
        return None, (f"{type(parent).__name__} holds modules {extra} besides {list(producers)} -> {consumer}: what "
                      "runs between them is not known to be channel-wise")
    kinds = {is_conv1d(m) for m in mods}
    if len(kinds) != 1:
        return None, "the producers and the consumer mix nn.Linear and Conv1D"
    cin = _out_in(mods[-1])[1]
    outs = [_out_in(m)[0] for m in mods[:-1]]
    if any(o != cin for o in outs):
        return None, f"shapes do not chain: producers' out_features {outs}, consumer's in_features {cin}"
    return FoldRule(cname, tuple(prefix + p for p in producers), cin, description=desc), None


def _head_structure(attn: nn.Module, v_rows: int, o_in: int, config) -> tuple[tuple[int, int, int] | None, str]:
    """(head_dim, num_heads, num_kv_heads) consistent with the shapes and every declared value, or (None, why)."""
    cfgs = [c for c in (_text_config(config), _text_config(getattr(attn, "config", None))) if c is not None]
    head_dim = _int_attr(attn, "head_dim")
    if head_dim is None:
        for c in cfgs:
            head_dim = _int_attr(c, "head_dim")
            if head_dim is None:
                hidden, heads = _int_attr(c, "hidden_size"), _int_attr(c, "num_attention_heads")
                if hidden and heads and hidden % heads == 0:
                    head_dim = hidden // heads
            if head_dim is not None:
                break
    if head_dim is None:
        return None, "head_dim is unknown (no head_dim on the attention module, no config)"
    if o_in % head_dim or v_rows % head_dim:
        return None, f"head_dim {head_dim} divides neither the value rows ({v_rows}) nor the consumer's input ({o_in})"
    heads, kv = o_in // head_dim, v_rows // head_dim
    if kv == 0 or heads % kv:
        return None, f"{heads} query heads are not a multiple of {kv} kv heads"
    declared_heads = [_int_attr(c, "num_attention_heads") for c in cfgs] + [_int_attr(attn, "num_heads")]
    declared_kv = [_int_attr(c, "num_key_value_heads") for c in cfgs] + [_int_attr(attn, "num_key_value_heads")]
    groups = _int_attr(attn, "num_key_value_groups")
    for d in declared_heads:
        if d is not None and d != heads:
            return None, f"the shapes give {heads} query heads of {head_dim}, the config/module declare {d}"
    for d in declared_kv:
        if d is not None and d != kv:
            return None, f"the shapes give {kv} kv heads of {head_dim}, the config/module declare {d}"
    if groups is not None and groups != heads // kv:
        return None, f"the shapes give {heads // kv} query heads per kv head, the module declares {groups}"
    return (head_dim, heads, kv), ""


def _attn_rule(layer: nn.Module, config) -> tuple[FoldRule | None, str | None, str | None]:
    """(rule, refused consumer name, why) for the block's attention, if it has one of the known layouts."""
    for cont in _ATTN_CONTAINERS:
        attn = getattr(layer, cont, None)
        if not isinstance(attn, nn.Module):
            continue
        # GPT-2: fused c_attn (q | k | v along its outputs, Conv1D) -> c_proj.
        c_attn, c_proj = getattr(attn, "c_attn", None), getattr(attn, "c_proj", None)
        if isinstance(c_attn, nn.Module) and isinstance(c_proj, nn.Module) and is_prunable(c_attn) \
                and is_prunable(c_proj):
            cname = f"{cont}.c_proj"
            extra = sorted(_children(attn) - _GPT2_ATTN_ALLOWED)
            if extra or getattr(attn, "is_cross_attention", False):
                return None, cname, (f"{type(attn).__name__} holds {extra or ['q_attn (cross-attention)']}: not the "
                                     "GPT-2 self-attention layout c_attn = [q | k | v]")
            qkv_out, _ = _out_in(c_attn)
            o_out, o_in = _out_in(c_proj)
            if qkv_out != 3 * o_in:
                return None, cname, f"c_attn's {qkv_out} outputs are not 3 x c_proj's {o_in} inputs (q | k | v)"
            split = _int_attr(attn, "split_size", "embed_dim")
            if split is not None and split != o_in:
                return None, cname, f"split_size {split} differs from c_proj's {o_in} inputs"
            heads, why = _head_structure(attn, o_in, o_in, config)
            if heads is None:
                return None, cname, why
            hd, nh, nkv = heads
            return FoldRule(cname, (f"{cont}.c_attn",), o_in, hd, nh, nkv, producer_offset=2 * o_in,
                            description="GPT-2 attention: value channels within each head (the value third of "
                                        "c_attn, Conv1D) and the matching input channels of c_proj"), None, None
        v = getattr(attn, "v_proj", None)
        consumer = next((n for n in _ATTN_CONSUMERS if isinstance(getattr(attn, n, None), nn.Module)), None)
        if not (isinstance(v, nn.Module) and consumer is not None):
            if consumer is not None:
                return None, f"{cont}.{consumer}", (
                    f"{type(attn).__name__} has no separate v_proj (fused or interleaved QKV projection "
                    f"{sorted(_children(attn))}): its value channels cannot be permuted alone")
            continue
        o = getattr(attn, consumer)
        cname = f"{cont}.{consumer}"
        if not (is_prunable(v) and is_prunable(o)) or is_conv1d(v) != is_conv1d(o):
            return None, cname, "v_proj / the output projection are not both nn.Linear (or both Conv1D)"
        extra = sorted(_children(attn) - _ATTN_ALLOWED - {consumer})
        if extra:
            return None, cname, (f"{type(attn).__name__} holds modules {extra} besides the projections: they may act "
                                 "on the value channels")
        v_rows, _ = _out_in(v)
        _, o_in = _out_in(o)
        heads, why = _head_structure(attn, v_rows, o_in, config)
        if heads is None:
            return None, cname, why
        hd, nh, nkv = heads
        kind = "grouped-query" if nkv < nh else "multi-head"
        return FoldRule(cname, (f"{cont}.v_proj",), o_in, hd, nh, nkv,
                        description=f"{kind} attention ({nh} heads, {nkv} kv heads of {hd}): value channels "
                                    f"within each kv head, rows of v_proj and the columns of {consumer} of every "
                                    "query head of its group"), None, None
    return None, None, None


def _analyse(layer: nn.Module, config) -> tuple[dict[str, FoldRule], dict[str, str]]:
    """(rules by consumer name, refusal reasons by consumer name for the known layouts that failed a check)."""
    rules: dict[str, FoldRule] = {}
    refused: dict[str, str] = {}
    for spec in _MLP_SPECS:
        container = spec[0]
        if container and not isinstance(getattr(layer, container, None), nn.Module):
            continue
        rule, why = _mlp_rule(layer, spec)
        name = f"{container}.{spec[2]}" if container else spec[2]
        if rule is not None:
            rules[rule.consumer] = rule
            refused.pop(rule.consumer, None)
        elif why is not None and name not in rules:
            refused[name] = why
    rule, name, why = _attn_rule(layer, config)
    if rule is not None:
        rules[rule.consumer] = rule
    elif name is not None:
        refused[name] = why
    return rules, refused


def fold_rules(layer: nn.Module, config=None) -> dict[str, FoldRule]:
    """The foldable permutations of one decoder block, by consumer name (relative to the block).

    config: the model's Hugging Face config (head counts); without it the attention module's own attributes and
    its `config` are used. Only rules whose structure and shapes are consistent are returned (none for an unknown
    block); check_permutable says why a linear has none.
    """
    return _analyse(layer, config)[0]


def check_permutable(layer: nn.Module, names, config=None) -> dict[str, FoldRule]:
    """The fold rule of each linear in `names` (relative to the block), or PipelineError naming the first one that
    cannot have its input channels permuted for free, why, and the block's foldable consumers."""
    if isinstance(names, str):
        names = [names]
    rules, refused = _analyse(layer, config)
    linears = block_linears(layer)
    foldable = sorted(rules)
    tail = (f"the permutable (consumer) linears of this block are {foldable}" if foldable
            else "this block has no permutable linear")
    out: dict[str, FoldRule] = {}
    for name in names:
        if name in rules:
            out[name] = rules[name]
            continue
        if name not in linears:
            raise PipelineError(f"cannot permute the input of {name!r}: no linear of that name in this "
                                f"{type(layer).__name__} block (its linears: {sorted(linears)}); {tail}")
        last = name.rsplit(".", 1)[-1]
        if name in refused:
            why = f"the layout around it is not one that folds: {refused[name]}"
        elif any(name in r.producers for r in rules.values()) or last in _RESIDUAL_READERS:
            why = ("it reads the residual stream: its input is the block's normalised hidden state, shared by the "
                   "whole model, so no producer in the block can absorb a permutation of its input channels")
        elif not rules and not refused:
            why = (f"unknown block architecture {type(layer).__name__}: no recognised producer -> consumer pair "
                   "(supported: the Llama / Mistral / Qwen2 / Qwen3 / Gemma / Phi MLP and attention, OPT, GPT-2, "
                   "the GPT-NeoX MLP)")
        else:
            why = (f"it is not the consumer of a recognised producer -> consumer pair in this "
                   f"{type(layer).__name__} block (unknown architecture around it)")
        raise PipelineError(f"cannot permute the input channels of {name!r}: {why}; {tail}")
    return out


# ---------------------------------------------------------------------------------------------------- application

def _modules(layer: nn.Module, rule: FoldRule) -> tuple[nn.Module, list[nn.Module]]:
    """The rule's consumer and producers in `layer`, checked against the rule's shapes."""
    if not isinstance(rule, FoldRule):
        raise PipelineError(f"expected a FoldRule, got {type(rule).__name__}")
    try:
        consumer = layer.get_submodule(rule.consumer)
        producers = [layer.get_submodule(p) for p in rule.producers]
    except AttributeError as e:
        raise PipelineError(f"{type(layer).__name__} has no module of the rule for {rule.consumer!r}: {e}") from None
    for name, mod in zip((rule.consumer, *rule.producers), (consumer, *producers)):
        if not is_prunable(mod):
            raise PipelineError(f"{name!r} is a {type(mod).__name__}, not an nn.Linear / Conv1D")
    if _out_in(consumer)[1] != rule.in_features:
        raise PipelineError(f"{rule.consumer!r} has {_out_in(consumer)[1]} input features, the rule "
                            f"{rule.in_features}")
    if rule.per_head and rule.num_heads * rule.head_dim != rule.in_features:
        raise PipelineError(f"rule for {rule.consumer!r}: {rule.num_heads} heads x {rule.head_dim} != "
                            f"{rule.in_features} input features")
    if rule.per_head and rule.num_heads % rule.num_kv_heads:
        raise PipelineError(f"rule for {rule.consumer!r}: {rule.num_heads} heads not a multiple of "
                            f"{rule.num_kv_heads} kv heads")
    for name, mod in zip(rule.producers, producers):
        rows = _out_in(mod)[0]
        if rule.producer_offset + rule.producer_channels > rows:
            raise PipelineError(f"producer {name!r} has {rows} output features, the rule permutes rows "
                                f"[{rule.producer_offset}, {rule.producer_offset + rule.producer_channels})")
        bias = getattr(mod, "bias", None)
        if isinstance(bias, torch.Tensor) and bias.shape != (rows,):
            raise PipelineError(f"producer {name!r}: bias of shape {tuple(bias.shape)} for {rows} outputs")
    return consumer, producers


def _is_perm(p: torch.Tensor, n: int) -> bool:
    return bool((torch.sort(p, dim=-1).values == torch.arange(n)).all())


def _local(rule: FoldRule, perm) -> torch.Tensor:
    """perm as a CPU LongTensor of rule.perm_shape (attention: per kv head), validated."""
    if not isinstance(perm, torch.Tensor) or perm.is_floating_point() or perm.is_complex() \
            or perm.dtype == torch.bool:
        raise PipelineError(f"the permutation for {rule.consumer!r} must be an integer tensor, got "
                            f"{type(perm).__name__ if not isinstance(perm, torch.Tensor) else perm.dtype}")
    p = perm.detach().to("cpu", torch.int64)
    if not rule.per_head:
        if tuple(p.shape) != rule.perm_shape or not _is_perm(p, rule.in_features):
            raise PipelineError(f"the permutation for {rule.consumer!r} must be a permutation of "
                                f"range({rule.in_features}) (shape {rule.perm_shape}), got shape {tuple(p.shape)}")
        return p
    hd, nh, nkv, g = rule.head_dim, rule.num_heads, rule.num_kv_heads, rule.group_size
    if tuple(p.shape) == (rule.in_features,) and rule.perm_shape != (rule.in_features,):
        # a full consumer permutation: head-preserving and the same for every query head of a group
        if not _is_perm(p, rule.in_features):
            raise PipelineError(f"the permutation for {rule.consumer!r} is not a permutation of "
                                f"range({rule.in_features})")
        per_q = p.view(nh, hd) - (torch.arange(nh) * hd).view(-1, 1)
        if bool(((per_q < 0) | (per_q >= hd)).any()):
            raise PipelineError(f"the permutation for {rule.consumer!r} moves channels between heads: only "
                                "permutations within each head fold into the value projection")
        per_q = per_q.view(nkv, g, hd)
        if not bool((per_q == per_q[:, :1]).all()):
            raise PipelineError(f"the permutation for {rule.consumer!r} differs between query heads of one kv head "
                                f"group (g = {g}): they share one value head, so they must share its permutation")
        p = per_q[:, 0].contiguous()
    if tuple(p.shape) != rule.perm_shape or not _is_perm(p, hd):
        raise PipelineError(f"the permutation for {rule.consumer!r} must be [num_kv_heads, head_dim] = "
                            f"{list(rule.perm_shape)}, each row a permutation of range({hd}) (or the full "
                            f"[{rule.in_features}] column permutation); got shape {tuple(p.shape)}")
    return p


def consumer_permutation(rule: FoldRule, perm) -> torch.Tensor:
    """The consumer's full column permutation [in_features] (CPU LongTensor) of `perm` (rule.perm_shape)."""
    p = _local(rule, perm)
    if not rule.per_head:
        return p
    hd, g = rule.head_dim, rule.group_size
    per_q = p.repeat_interleave(g, dim=0)                                 # [num_heads, hd]: query head h -> h // g
    return (per_q + (torch.arange(rule.num_heads) * hd).view(-1, 1)).reshape(-1)


def producer_permutation(rule: FoldRule, perm) -> torch.Tensor:
    """The permutation of the producers' rows [producer_channels] (from rule.producer_offset on), CPU LongTensor."""
    p = _local(rule, perm)
    if not rule.per_head:
        return p
    return (p + (torch.arange(rule.num_kv_heads) * rule.head_dim).view(-1, 1)).reshape(-1)


def apply_permutation(layer: nn.Module, rule: FoldRule, perm) -> None:
    """Permute in place: the consumer's input columns by consumer_permutation(rule, perm), the producers' output
    rows and biases by producer_permutation(rule, perm). Works on any device / dtype, nn.Linear ([out, in]) and
    Conv1D ([in, out]) weights. All is computed first and written last: on an error the layer is unchanged."""
    consumer, producers = _modules(layer, rule)
    cperm = consumer_permutation(rule, perm)
    pperm = producer_permutation(rule, perm)
    writes: list[tuple[torch.Tensor, torch.Tensor]] = []
    grids: list = []
    with torch.no_grad():
        w = consumer.weight
        in_dim = 0 if is_conv1d(consumer) else 1
        writes.append((w, w.index_select(in_dim, cperm.to(w.device))))
        for mod in producers:
            w = mod.weight
            out_dim = 1 if is_conv1d(mod) else 0
            rows = w.shape[out_dim]
            off = rule.producer_offset
            full = torch.cat([torch.arange(off), pperm + off, torch.arange(off + pperm.numel(), rows)])
            writes.append((w, w.index_select(out_dim, full.to(w.device))))
            bias = getattr(mod, "bias", None)
            if isinstance(bias, torch.Tensor):
                writes.append((bias, bias.index_select(0, full.to(bias.device))))
            grid = weight_grid(mod)
            if grid is not None:  # a per-row quantisation grid recorded by joint pruning moves with its rows
                grids.append((mod, grid[0], grid[1].index_select(0, full.to(grid[1].device))))
        seen = set()
        for t, _ in writes:
            key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.device.type != "meta" else id(t)
            if key in seen:
                raise PipelineError(f"the rule for {rule.consumer!r} would permute one (tied) tensor twice")
            seen.add(key)
        for t, new in writes:
            t.copy_(new)
        for mod, quant, scale in grids:
            attach_weight_grid(mod, quant, scale)


def permutation_importance(rule: FoldRule, layer: nn.Module, act_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The importance matrix to search for `rule`: Wanda's |W| * sqrt(act_scale) on the consumer (|W| without
    act_scale), float32 (float64 for a float64 weight), on the weight's device.

    MLP rule: [out_features, in_features]; search it with blocks=None.
    Attention rule: [out_features * g, num_kv_heads * head_dim]: segment j (columns j*head_dim ..) holds the
    consumer columns of the g query heads of kv head j stacked along the rows (they share one permutation); search
    it with blocks=rule.search_blocks (= num_kv_heads). Its kept importance equals the consumer's.
    act_scale: [in_features] non-negative (the mean square of the consumer's inputs, ActScaleStats.value).
    """
    consumer, _ = _modules(layer, rule)
    w = weight_matrix(consumer).detach()
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    metric = w.abs().to(dtype)
    if act_scale is not None:
        if not isinstance(act_scale, torch.Tensor) or act_scale.shape != (rule.in_features,):
            shape = tuple(act_scale.shape) if isinstance(act_scale, torch.Tensor) else type(act_scale).__name__
            raise PipelineError(f"act_scale for {rule.consumer!r} must be [{rule.in_features}], got {shape}")
        s = act_scale.detach().to(device=w.device, dtype=dtype)
        if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
            raise PipelineError(f"act_scale for {rule.consumer!r} must be finite and >= 0")
        metric = metric * torch.sqrt(s)
    if not rule.per_head:
        return metric
    out = metric.shape[0]
    hd, g, nkv = rule.head_dim, rule.group_size, rule.num_kv_heads
    # [out, nkv, g, hd] -> [g, out, nkv, hd] -> rows (i, r), columns (j, d)
    return metric.view(out, nkv, g, hd).permute(2, 0, 1, 3).reshape(g * out, nkv * hd).contiguous()


def permute_block(layer: nn.Module, rule: FoldRule, act_scale: torch.Tensor | None = None, n: int = 2, m: int = 4,
                  time_budget: float | None = 1.0, seed: int = 0) -> tuple[torch.Tensor, float]:
    """Search and fold the permutation of `rule` into `layer` (importance + search_permutation + apply_permutation).

    n, m: the N:M pattern the consumer will be pruned to (n pruned of every m). act_scale: see
    permutation_importance (None: |W|). time_budget, seed: search_permutation's.
    Returns (the consumer's full column permutation [in_features], CPU LongTensor; the relative gain in kept
    importance, (kept after - kept before) / kept before, >= 0). The identity (gain 0) when nothing better is
    found. On any error the layer is unchanged.
    """
    _modules(layer, rule)
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int) \
            or not 1 <= n < m:
        raise PipelineError(f"need ints 1 <= n < m (n pruned of every m), got {n!r}:{m!r}")
    unit = rule.head_dim if rule.per_head else rule.in_features
    if unit % m:
        what = f"head_dim {unit}" if rule.per_head else f"in_features {unit}"
        raise PipelineError(f"cannot permute {rule.consumer!r} for {n}:{m}: its {what} is not a multiple of {m}")
    imp = permutation_importance(rule, layer, act_scale)
    found = search_permutation(imp, n, m, blocks=rule.search_blocks, time_budget=time_budget, seed=seed).cpu()
    if rule.per_head:
        local = found.view(rule.num_kv_heads, rule.head_dim) - (
            torch.arange(rule.num_kv_heads) * rule.head_dim).view(-1, 1)
    else:
        local = found
    before = kept_importance(imp, n, m)
    after = kept_importance(imp[:, found.to(imp.device)], n, m)
    gain = (after - before) / before if before > 0 else 0.0
    apply_permutation(layer, rule, local)
    return consumer_permutation(rule, local), gain
