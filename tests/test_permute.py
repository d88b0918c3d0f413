"""N:M input-channel permutations: the search (sparsekern.prune.permute) and its folding into decoder blocks
(sparsekern.pipeline.permute): the model computes the same function after any fold, the search never loses
importance, and the linears whose permutation cannot fold are refused with the model unchanged."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from sparsekern.pipeline.errors import PipelineError  # noqa: E402
from sparsekern.pipeline.permute import (FoldRule, apply_permutation, check_permutable,  # noqa: E402
                                         consumer_permutation, fold_rules, permutation_importance, permute_block,
                                         producer_permutation)
from sparsekern.pipeline.structure import find_decoder_layers, weight_matrix  # noqa: E402
from sparsekern.prune.permute import (brute_force_permutation, kept_importance,  # noqa: E402
                                      round_robin_permutation, search_permutation)


def _heavy(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    # heavy-tailed, with per-column scales (outlier channels), like |W| * sqrt(act_scale)
    return torch.empty(rows, cols).exponential_(generator=g) ** 2 * torch.rand(cols, generator=g).pow(3).mul(4)


def _is_perm(p, n):
    return p.dtype == torch.int64 and p.shape == (n,) and torch.equal(p.sort().values, torch.arange(n))


# ------------------------------------------------------------------------------------------------------ the search

def test_kept_importance_is_the_nm_objective():
    imp = _heavy(5, 12, seed=3)
    want = sum(sorted(imp[r, g * 4:(g + 1) * 4].tolist())[-2:][0] + sorted(imp[r, g * 4:(g + 1) * 4].tolist())[-1]
               for r in range(5) for g in range(3))
    assert kept_importance(imp, 2, 4) == pytest.approx(want, rel=1e-12)
    assert kept_importance(imp, 1, 4) == pytest.approx(
        sum(sum(sorted(imp[r, g * 4:(g + 1) * 4].tolist())[1:]) for r in range(5) for g in range(3)), rel=1e-12)


def test_brute_force_checker_is_the_optimum_over_all_permutations():
    imp = _heavy(4, 8, seed=1).double()
    _, best = brute_force_permutation(imp, 2, 4)
    perms = torch.tensor(list(itertools.permutations(range(8))))                       # all 40320
    g = imp[:, perms].view(4, -1, 2, 4).topk(2, dim=-1).values.sum(-1).sum(-1).sum(0)
    assert best == pytest.approx(float(g.max()), rel=1e-12)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 4), (4, 8), (1, 2)])
@pytest.mark.parametrize("shape", [(1, 8), (7, 16), (33, 64), (16, 520)])
def test_search_is_a_permutation_and_never_worse(n, m, shape):
    rows, cols = shape
    cols = cols // m * m
    imp = _heavy(rows, cols, seed=rows + cols)
    perm = search_permutation(imp, n, m, time_budget=0.3)
    assert _is_perm(perm, cols)
    assert kept_importance(imp[:, perm], n, m) >= kept_importance(imp, n, m)


def test_search_returns_the_identity_when_nothing_is_better():
    # every grouping keeps the same: all columns equal; and a matrix whose identity grouping is optimal
    assert torch.equal(search_permutation(torch.ones(6, 16), 2, 4), torch.arange(16))
    imp = torch.zeros(3, 8)
    imp[:, [0, 1, 4, 5]] = 1.0  # the identity puts two large values in each group: optimal
    assert torch.equal(search_permutation(imp, 2, 4), torch.arange(8))
    assert torch.equal(search_permutation(torch.zeros(0, 8), 2, 4), torch.arange(8))


def test_search_strictly_better_on_heavy_tailed_importance():
    imp = _heavy(64, 256, seed=7)
    base = kept_importance(imp, 2, 4)
    perm = search_permutation(imp, 2, 4, time_budget=1.0)
    assert kept_importance(imp[:, perm], 2, 4) > base * 1.01
    # the search improves on its RIA-style start
    rr = kept_importance(imp[:, round_robin_permutation(imp, 4)], 2, 4)
    assert kept_importance(imp[:, perm], 2, 4) > rr


def test_search_respects_blocks():
    imp = _heavy(24, 64, seed=5)
    perm = search_permutation(imp, 2, 4, blocks=4, time_budget=0.5)
    assert _is_perm(perm, 64)
    assert torch.equal(perm // 16, torch.arange(64) // 16)       # every segment onto itself
    assert kept_importance(imp[:, perm], 2, 4) > kept_importance(imp, 2, 4)
    # the segments are independent problems: each segment's result equals searching it alone, up to the search's
    # local optimum; at least never worse than the identity there
    for s in range(4):
        seg = imp[:, s * 16:(s + 1) * 16]
        assert kept_importance(seg[:, perm[s * 16:(s + 1) * 16] - s * 16], 2, 4) >= kept_importance(seg, 2, 4)
    with pytest.raises(ValueError, match="blocks"):
        search_permutation(imp, 2, 4, blocks=3)
    with pytest.raises(ValueError, match="blocks"):
        search_permutation(imp, 2, 4, blocks=32)                  # segments of 2 < m


@pytest.mark.parametrize("seed", range(12))
def test_search_finds_the_optimum_of_8_columns(seed):
    imp = _heavy(16, 8, seed=100 + seed)
    _, best = brute_force_permutation(imp, 2, 4)
    perm = search_permutation(imp, 2, 4, time_budget=None)
    assert kept_importance(imp[:, perm], 2, 4) == pytest.approx(best, rel=1e-9)


def test_search_is_close_to_the_optimum_of_12_columns_and_blocks():
    gaps = []
    for seed in range(8):
        imp = _heavy(12, 12, seed=200 + seed)
        _, best = brute_force_permutation(imp, 2, 4)
        perm = search_permutation(imp, 2, 4, time_budget=None)
        gaps.append(1 - kept_importance(imp[:, perm], 2, 4) / best)
    assert max(gaps) < 0.01 and min(gaps) < 1e-9, gaps
    imp = _heavy(10, 16, seed=9)
    bperm, best = brute_force_permutation(imp, 2, 4, blocks=2)
    assert torch.equal(bperm // 8, torch.arange(16) // 8)
    perm = search_permutation(imp, 2, 4, blocks=2, time_budget=None)
    assert kept_importance(imp[:, perm], 2, 4) == pytest.approx(best, rel=1e-9)


def test_search_is_deterministic_for_a_seed():
    imp = _heavy(16, 640, seed=11)   # a segment of 640 columns is searched in random chunks
    a = search_permutation(imp, 2, 4, time_budget=None, max_sweeps=2, seed=3)
    b = search_permutation(imp, 2, 4, time_budget=None, max_sweeps=2, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.arange(640))
    small = _heavy(20, 32, seed=12)
    assert torch.equal(search_permutation(small, 2, 4, time_budget=None),
                       search_permutation(small, 2, 4, time_budget=None))


def test_search_validates_its_input():
    with pytest.raises(ValueError, match="non-negative"):
        search_permutation(-torch.ones(2, 8), 2, 4)
    with pytest.raises(ValueError, match="finite"):
        search_permutation(torch.full((2, 8), float("nan")), 2, 4)
    with pytest.raises(ValueError, match="multiple of m"):
        search_permutation(torch.ones(2, 10), 2, 4)
    with pytest.raises(ValueError, match="n < m"):
        search_permutation(torch.ones(2, 8), 4, 4)
    with pytest.raises(ValueError, match="2-D"):
        kept_importance(torch.ones(8), 2, 4)


# ------------------------------------------------------------------------------------------------ tiny HF models

def _config(family):
    T = transformers
    common = dict(num_hidden_layers=2, vocab_size=100)
    if family == "llama":
        return T.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             initializer_range=0.2, **common)
    if family == "llama_bias":
        return T.LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4,
                             attention_bias=True, mlp_bias=True, initializer_range=0.2, **common)
    if family == "smollm_gqa":   # SmolLM2-135M's head layout: 9 query heads, 3 kv heads (g = 3)
        return T.LlamaConfig(hidden_size=144, intermediate_size=96, num_attention_heads=9, num_key_value_heads=3,
                             initializer_range=0.2, **common)
    if family == "mistral":
        return T.MistralConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=1,
                               initializer_range=0.2, **common)
    if family == "qwen2":         # q/k/v biases
        return T.Qwen2Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             initializer_range=0.2, **common)
    if family == "qwen3":         # q_norm / k_norm
        return T.Qwen3Config(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=32, initializer_range=0.2, **common)
    if family == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=128, num_attention_heads=4, word_embed_proj_dim=64,
                           init_std=0.2, **common)
    if family == "gpt2":
        return T.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=100, n_positions=32, initializer_range=0.2,
                            bos_token_id=0, eos_token_id=0)
    if family == "phi":
        return T.PhiConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, initializer_range=0.2,
                           **common)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, initializer_range=0.2,
                               **common)
    raise AssertionError(family)


EXPECTED = {
    "llama": {"mlp.down_proj", "self_attn.o_proj"},
    "llama_bias": {"mlp.down_proj", "self_attn.o_proj"},
    "smollm_gqa": {"mlp.down_proj", "self_attn.o_proj"},
    "mistral": {"mlp.down_proj", "self_attn.o_proj"},
    "qwen2": {"mlp.down_proj", "self_attn.o_proj"},
    "qwen3": {"mlp.down_proj", "self_attn.o_proj"},
    "opt": {"fc2", "self_attn.out_proj"},
    "gpt2": {"mlp.c_proj", "attn.c_proj"},
    "phi": {"mlp.fc2", "self_attn.dense"},
    "gpt_neox": {"mlp.dense_4h_to_h"},   # fused, head-interleaved query_key_value: attention refused
}


def _model(family, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = _config(family)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():   # non-trivial biases and norm weights, so a wrongly permuted one shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model, cfg


def _logits(model, seed=1):
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def _random_perm(rule, gen):
    if rule.per_head:
        return torch.stack([torch.randperm(rule.head_dim, generator=gen) for _ in range(rule.num_kv_heads)])
    return torch.randperm(rule.in_features, generator=gen)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    return all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_fold_rules_found(family):
    model, cfg = _model(family, torch.float32)
    _, layers = find_decoder_layers(model)
    for layer in layers:
        assert set(fold_rules(layer, cfg)) == EXPECTED[family]
        assert set(fold_rules(layer)) == EXPECTED[family]          # without the config: the modules' attributes


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_random_permutations_preserve_the_logits_float64(family):
    model, cfg = _model(family)
    ref = _logits(model)
    _, layers = find_decoder_layers(model)
    gen = torch.Generator().manual_seed(4)
    for layer in layers:
        for rule in fold_rules(layer, cfg).values():
            consumer = layer.get_submodule(rule.consumer)
            before_c = weight_matrix(consumer).detach().clone()
            before_p = [weight_matrix(layer.get_submodule(p)).detach().clone() for p in rule.producers]
            perm = _random_perm(rule, gen)
            apply_permutation(layer, rule, perm)
            cperm = consumer_permutation(rule, perm)
            assert not torch.equal(cperm, torch.arange(rule.in_features))
            assert torch.equal(weight_matrix(consumer), before_c[:, cperm])   # the columns really moved
            pperm = producer_permutation(rule, perm) + rule.producer_offset
            for name, old in zip(rule.producers, before_p):
                new = weight_matrix(layer.get_submodule(name))
                assert torch.equal(new[rule.producer_offset:rule.producer_offset + pperm.numel()], old[pperm])
                assert torch.equal(new[:rule.producer_offset], old[:rule.producer_offset])
    out = _logits(model)
    assert _rel(out, ref) < 1e-10


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_searched_permutations_preserve_the_logits_float64(family):
    model, cfg = _model(family)
    ref = _logits(model)
    _, layers = find_decoder_layers(model)
    gains = []
    for layer in layers:
        for rule in fold_rules(layer, cfg).values():
            consumer = layer.get_submodule(rule.consumer)
            before = weight_matrix(consumer).detach().clone()
            scale = torch.rand(rule.in_features, dtype=torch.float64) * 3
            imp = permutation_importance(rule, layer, scale)
            base = kept_importance(imp, 2, 4)
            perm, gain = permute_block(layer, rule, act_scale=scale, n=2, m=4, time_budget=0.2)
            assert _is_perm(perm, rule.in_features)
            assert torch.equal(weight_matrix(consumer), before[:, perm])
            # the gain is the Wanda-metric kept importance's, measured on the consumer itself
            metric = before.abs() * scale.sqrt()
            assert kept_importance(metric, 2, 4) == pytest.approx(base, rel=1e-12)
            assert kept_importance(metric[:, perm], 2, 4) == pytest.approx(base * (1 + gain), rel=1e-9)
            gains.append(gain)
    assert min(gains) >= 0 and max(gains) > 0
    assert _rel(_logits(model), ref) < 1e-10


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_permutations_preserve_the_logits_float32(family):
    model, cfg = _model(family, torch.float32)
    ref = _logits(model)
    _, layers = find_decoder_layers(model)
    gen = torch.Generator().manual_seed(5)
    for layer in layers:
        for rule in fold_rules(layer, cfg).values():
            apply_permutation(layer, rule, _random_perm(rule, gen))
            permute_block(layer, rule, n=2, m=4, time_budget=0.1)
    assert _rel(_logits(model), ref) < 1e-5


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_half_precision_weights_are_permuted_exactly(family):
    model, cfg = _model(family, torch.bfloat16)
    _, layers = find_decoder_layers(model)
    gen = torch.Generator().manual_seed(9)
    for rule in fold_rules(layers[0], cfg).values():
        consumer = layers[0].get_submodule(rule.consumer)
        before = weight_matrix(consumer).detach().clone()
        perm, gain = permute_block(layers[0], rule, act_scale=torch.rand(rule.in_features), time_budget=0.1)
        assert consumer.weight.dtype == torch.bfloat16 and gain >= 0
        assert torch.equal(weight_matrix(consumer), before[:, perm])
        local = _random_perm(rule, gen)
        apply_permutation(layers[0], rule, local)
        assert torch.equal(weight_matrix(consumer), before[:, perm][:, consumer_permutation(rule, local)])


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_a_wrong_fold_is_detected(family):
    # the checks above can fail: for every rule, permuting the consumer's columns without the producers' rows
    # changes the logits well above the tolerance
    model, cfg = _model(family)
    ref = _logits(model)
    _, layers = find_decoder_layers(model)
    gen = torch.Generator().manual_seed(6)
    for rule in fold_rules(layers[0], cfg).values():
        snap = _snapshot(model)
        consumer = layers[0].get_submodule(rule.consumer)
        cperm = consumer_permutation(rule, _random_perm(rule, gen))
        with torch.no_grad():
            w = weight_matrix(consumer)
            w.copy_(w[:, cperm].clone())
        assert _rel(_logits(model), ref) > 1e-6, rule.consumer
        model.load_state_dict(snap)


# ------------------------------------------------------------------------------------------- grouped-query attention

def test_gqa_permutation_reaches_every_query_head_of_the_group():
    model, cfg = _model("smollm_gqa")
    layer = model.model.layers[1]
    rule = fold_rules(layer, cfg)["self_attn.o_proj"]
    assert (rule.head_dim, rule.num_heads, rule.num_kv_heads, rule.group_size) == (16, 9, 3, 3)
    assert rule.perm_shape == (3, 16) and rule.search_blocks == 3
    ref = _logits(model)
    o_before = layer.self_attn.o_proj.weight.detach().clone()
    v_before = layer.self_attn.v_proj.weight.detach().clone()
    gen = torch.Generator().manual_seed(8)
    perm = _random_perm(rule, gen)
    apply_permutation(layer, rule, perm)
    o_after, v_after = layer.self_attn.o_proj.weight, layer.self_attn.v_proj.weight
    for h in range(9):                      # query head h reads kv head h // 3 (repeat_kv order)
        j = h // 3
        assert torch.equal(o_after[:, h * 16:(h + 1) * 16], o_before[:, h * 16 + perm[j]])
    for j in range(3):
        assert torch.equal(v_after[j * 16:(j + 1) * 16], v_before[j * 16 + perm[j]])
    assert _rel(_logits(model), ref) < 1e-10

    # applying the kv head's permutation to the first query head of each group only is wrong, and shows
    model2, _ = _model("smollm_gqa")
    layer2 = model2.model.layers[1]
    with torch.no_grad():
        v, o = layer2.self_attn.v_proj.weight, layer2.self_attn.o_proj.weight
        for j in range(3):
            v[j * 16:(j + 1) * 16] = v[j * 16 + perm[j]].clone()
            h = j * 3
            o[:, h * 16:(h + 1) * 16] = o[:, h * 16 + perm[j]].clone()
    assert _rel(_logits(model2), ref) > 1e-6


def test_gqa_full_permutation_form_and_importance_stacking():
    model, cfg = _model("smollm_gqa")
    layer = model.model.layers[0]
    rule = fold_rules(layer, cfg)["self_attn.o_proj"]
    gen = torch.Generator().manual_seed(2)
    local = _random_perm(rule, gen)
    full = consumer_permutation(rule, local)
    assert full.shape == (144,)
    assert torch.equal(consumer_permutation(rule, full), full)          # the full form is accepted
    bad = full.clone()
    bad[:16] = bad[:16].flip(0)                                        # query head 0 differs from heads 1, 2
    snap = _snapshot(model)
    with pytest.raises(PipelineError, match="share"):
        apply_permutation(layer, rule, bad)
    across = torch.arange(144)
    across[[0, 16]] = across[[16, 0]]                                  # moves a channel between heads
    with pytest.raises(PipelineError, match="between heads"):
        apply_permutation(layer, rule, across)
    assert _unchanged(model, snap)
    # the stacked importance: segment j = the 3 query heads of kv head j under one another
    imp = permutation_importance(rule, layer)
    w = layer.self_attn.o_proj.weight.detach().abs()
    assert imp.shape == (144 * 3, 48)
    for j in range(3):
        for i in range(3):
            h = j * 3 + i
            assert torch.equal(imp[i * 144:(i + 1) * 144, j * 16:(j + 1) * 16], w[:, h * 16:(h + 1) * 16])
    assert kept_importance(imp, 2, 4) == pytest.approx(kept_importance(w, 2, 4), rel=1e-12)
    searched = torch.cat([local[j] + 16 * j for j in range(3)])     # the search's form of `local`
    assert kept_importance(imp[:, searched], 2, 4) == pytest.approx(kept_importance(w[:, full], 2, 4), rel=1e-12)


# --------------------------------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("family,name", [
    ("llama", "self_attn.q_proj"), ("llama", "mlp.gate_proj"), ("llama", "mlp.up_proj"), ("llama", "self_attn.v_proj"),
    ("opt", "fc1"), ("gpt2", "attn.c_attn"), ("gpt2", "mlp.c_fc"),
])
def test_residual_stream_readers_are_refused(family, name):
    model, cfg = _model(family, torch.float32)
    _, layers = find_decoder_layers(model)
    snap = _snapshot(model)
    with pytest.raises(PipelineError) as e:
        check_permutable(layers[0], ["mlp.down_proj" if family == "llama" else name, name], cfg)
    msg = str(e.value)
    assert repr(name) in msg and "residual stream" in msg
    assert any(c in msg for c in EXPECTED[family])                     # lists the foldable consumers
    assert _unchanged(model, snap)
    rules = check_permutable(layers[0], sorted(EXPECTED[family]), cfg)
    assert set(rules) == EXPECTED[family]


def test_unknown_block_architecture_is_refused():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 16)
            self.b = nn.Linear(16, 8)

    layer = Block()
    assert fold_rules(layer) == {}
    with pytest.raises(PipelineError, match="unknown block architecture Block"):
        check_permutable(layer, ["b"])
    with pytest.raises(PipelineError, match="no linear of that name"):
        check_permutable(layer, ["mlp.down_proj"])


def test_fused_qkv_attention_is_refused():
    model, cfg = _model("gpt_neox", torch.float32)
    layer = model.gpt_neox.layers[0]
    with pytest.raises(PipelineError, match="'attention.dense'.*no separate v_proj"):
        check_permutable(layer, ["attention.dense"], cfg)


def test_unexpected_modules_inside_attention_or_mlp_are_refused():
    model, cfg = _model("llama", torch.float32)
    layer = model.model.layers[0]
    layer.self_attn.v_norm = nn.LayerNorm(16)     # something that may act on the value channels
    layer.mlp.inner_norm = nn.LayerNorm(128)
    assert fold_rules(layer, cfg) == {}
    with pytest.raises(PipelineError, match="v_norm"):
        check_permutable(layer, ["self_attn.o_proj"], cfg)
    with pytest.raises(PipelineError, match="inner_norm"):
        check_permutable(layer, ["mlp.down_proj"], cfg)


def test_inconsistent_head_counts_give_no_attention_rule():
    model, cfg = _model("llama", torch.float32)
    layer = model.model.layers[0]
    bad = transformers.LlamaConfig(**{**cfg.to_dict(), "num_key_value_heads": 4})
    assert set(fold_rules(layer, bad)) == {"mlp.down_proj"}
    with pytest.raises(PipelineError, match="kv heads"):
        check_permutable(layer, ["self_attn.o_proj"], bad)


def test_failures_leave_the_layer_unchanged():
    model, cfg = _model("llama", torch.float32)
    layer = model.model.layers[0]
    rules = fold_rules(layer, cfg)
    snap = _snapshot(model)
    mlp, attn = rules["mlp.down_proj"], rules["self_attn.o_proj"]
    for rule, perm in [(mlp, torch.arange(127)), (mlp, torch.zeros(128, dtype=torch.int64)),
                       (mlp, torch.arange(128.0)), (attn, torch.arange(32)), (attn, torch.zeros(2, 16).long())]:
        with pytest.raises(PipelineError):
            apply_permutation(layer, rule, perm)
    with pytest.raises(PipelineError, match="multiple of 32"):
        permute_block(layer, attn, n=2, m=32)                  # head_dim 16
    with pytest.raises(PipelineError, match="act_scale"):
        permute_block(layer, mlp, act_scale=torch.ones(64))
    with pytest.raises(PipelineError, match="act_scale"):
        permute_block(layer, mlp, act_scale=-torch.ones(128))
    wrong = FoldRule("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"), 256)
    with pytest.raises(PipelineError, match="input features"):
        permute_block(layer, wrong)
    missing = FoldRule("mlp.nothing", ("mlp.gate_proj",), 128)
    with pytest.raises(PipelineError, match="no module"):
        apply_permutation(layer, missing, torch.arange(128))
    assert _unchanged(model, snap)
