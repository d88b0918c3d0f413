"""PruneConfig: prune_model's options in one dataclass, validated in one place; the keyword form is a thin shim
over it (same result bit for bit)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

pytest.importorskip("transformers")

from sparsekern.pipeline import PipelineError, PruneConfig, prune_model  # noqa: E402
from test_pipeline import _calib, _clone, _gpt2, _llama  # noqa: E402


def _timeless(report):
    d = report.to_dict()
    for k in ("block_seconds", "capture_seconds", "total_seconds", "cpu_seconds"):
        d.pop(k)
    for r in d["linears"]:
        r.pop("seconds")
    return d


def _same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("build", [_llama, _gpt2])
def test_config_and_keyword_forms_give_the_same_result(build):
    base = build(2)
    ids = _calib(5, 16)
    options = dict(method="sparsegpt", pattern="2:4", true_sequential=True, batch_size=2, progress=False)
    by_kw, by_cfg, mixed = _clone(base), _clone(base), _clone(base)
    r_kw = prune_model(by_kw, ids, **options)
    r_cfg = prune_model(by_cfg, ids, PruneConfig(**options))
    # Keywords replace the config's fields.
    r_mixed = prune_model(mixed, ids, PruneConfig(**dict(options, method="wanda", batch_size=5)), method="sparsegpt",
                          batch_size=2)
    assert _same_weights(by_kw, by_cfg) and _same_weights(by_kw, mixed)
    assert _timeless(r_kw) == _timeless(r_cfg) == _timeless(r_mixed)
    assert not _same_weights(by_kw, base)


def test_the_documented_call_still_works():
    # README / docs/pipeline.md: prune_model(model, calib, method=..., pattern=...).
    model = _llama(1)
    report = prune_model(model, _calib(2, 16), method="wanda", pattern="4:8", progress=False)
    assert report.method == "wanda" and report.pattern == "4:8" and report.sparsity == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("options,message", [
    (dict(method="obs"), r"method 'obs': expected one of magnitude, wanda, sparsegpt"),
    (dict(pattern="4:2"), r"pattern '4:2': .*1 <= n < m"),
    (dict(nsamples=0), r"nsamples \(0\) must be None \(all\) or >= 1"),
    (dict(seqlen=-1), r"seqlen \(-1\) must be None \(all\) or >= 1"),
    (dict(batch_size=0), r"batch_size \(0\) must be >= 1"),
    (dict(method="wanda", quant="int8"), r"quant='int8' .* needs method='sparsegpt', not 'wanda'"),
    (dict(blocksize=0), r"blocksize \(0\) must be a positive int"),
    (dict(blocksize=6), r"blocksize \(6\) must be a multiple of m = 4 for pattern 2:4"),
    (dict(percdamp=0.0), r"percdamp \(0.0\) must be > 0"),
    (dict(device="nowhere"), r"device 'nowhere': "),
    (dict(calib_dtype=torch.int8), r"calib_dtype torch.int8: expected None, torch.float32"),
    (dict(rerun_kernel="fast"), r"rerun_kernel 'fast': expected one of auto, dense, sparse"),
    (dict(rerun_kernel="sparse", calib_dtype=torch.float16), r"rerun_kernel='sparse' .* cannot be combined"),
])
def test_each_rule_names_its_field_and_is_checked_before_the_model_is_touched(options, message):
    with pytest.raises(PipelineError, match=message):
        PruneConfig(**options)
    with pytest.raises(PipelineError, match=message):
        dataclasses.replace(PruneConfig(), **options)
    model = _llama(1)
    before = _clone(model)
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(PipelineError, match=message):
        prune_model(model, _calib(2, 16), progress=False, **options)
    assert calls == [] and _same_weights(model, before)


def test_config_is_normalised_and_frozen():
    cfg = PruneConfig(pattern=0.5, include="q_proj", exclude=["a", "b"], skip=iter(["x"]))
    assert cfg.pattern == "0.5" and cfg.include == ("q_proj",) and cfg.exclude == ("a", "b") and cfg.skip == ("x",)
    assert PruneConfig(pattern="2:4") == PruneConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.method = "wanda"


def test_a_single_include_pattern_is_one_pattern():
    model = _llama(2)
    report = prune_model(model, None, method="magnitude", include="q_proj", progress=False)
    assert [r.name for r in report.linears] == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_bad_calls_are_type_errors():
    model = _llama(1)
    with pytest.raises(TypeError, match=r"prune_model\(\) got an unexpected keyword argument 'methods'"):
        prune_model(model, None, methods="magnitude")
    with pytest.raises(TypeError, match=r"config must be a PruneConfig or None, got str"):
        prune_model(model, None, "magnitude")


def test_signature_lists_every_option():
    params = inspect.signature(prune_model).parameters
    fields = [f.name for f in dataclasses.fields(PruneConfig)]
    assert list(params) == ["model", "calibration", "config", *fields]
    assert len(fields) == 28
    assert params["method"].default == "sparsegpt" and params["rerun_kernel"].default == "dense"
    assert all(params[f].kind is inspect.Parameter.KEYWORD_ONLY for f in fields)
