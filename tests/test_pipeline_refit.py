"""prune_model with refit="admm" and method="admm", on tiny random Llama / OPT models: the refit keeps each method's
mask, lowers every layer's output error on the calibration inputs, recomputes Hessians the same way the
references do, and (with quant) leaves weights on the deployed int8 grid that sparsify stores bit for bit."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sparsekern import prune as engine  # noqa: E402
from sparsekern.pipeline import PipelineError, PruneConfig, prune_model  # noqa: E402
from sparsekern.prune.refit import refit as refit_one  # noqa: E402

from test_pipeline import _calib, _clone, _hessian, _inputs_of, _is_nm, _llama, _opt  # noqa: E402


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}


def _output_error(dense_w, w, x):
    # the layer objective refit minimises (without its small ridge): ||(W_hat - W) x||^2 summed over tokens
    return float(((x @ (w.detach().double() - dense_w.detach().double()).T) ** 2).sum())


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_refit_keeps_masks_and_lowers_layer_error(method):
    torch.manual_seed(0)
    base = _llama(layers=2)
    calib = _calib(n=8, t=32)
    plain, fitted = _clone(base), _clone(base)
    prune_model(plain, calib, method=method, pattern="2:4", progress=False)
    rep = prune_model(fitted, calib, method=method, pattern="2:4", refit="admm", progress=False)
    assert rep.refit == "admm" and rep.refit_options["iters"] == 20
    dense = _linears(base)
    a, b = _linears(plain), _linears(fitted)
    for n in dense:
        assert _is_nm(b[n].weight), n
        if ".layers.0." in n:  # same inputs in both runs (later blocks see the refitted block 0's outputs)
            assert torch.equal(a[n].weight != 0, b[n].weight != 0), n  # the method's mask, kept
    # block 0's linears see the same inputs in both runs (the embeddings are not pruned): the refit's error on
    # them is lower than the method's own weights'
    names = [n for n in dense if ".layers.0." in n]
    xs = _inputs_of(base, names, calib)
    for n in names:
        assert _output_error(dense[n].weight, b[n].weight, xs[n]) < _output_error(dense[n].weight, a[n].weight,
                                                                                   xs[n]), n
    # and equals a direct refit of block 0's q_proj from the pipeline-free Hessian (the same spec, recomputed)
    q = "model.layers.0.self_attn.q_proj"
    H = _hessian(xs[q], calib.shape[0]).float()
    want = refit_one(dense[q].weight.detach(), H, b[q].weight != 0, "2:4")
    torch.testing.assert_close(b[q].weight, want.weight, rtol=1e-3, atol=1e-5)


def test_method_admm_and_refit_on_opt():
    torch.manual_seed(1)
    calib = _calib(n=6, t=32)
    m = _opt()
    rep = prune_model(m, calib, method="admm", pattern="2:4", progress=False)
    assert rep.method == "admm" and all(r.loss is not None for r in rep.linears)
    assert all(_is_nm(mod.weight) for mod in _linears(m).values())
    m2 = _opt()
    rep = prune_model(m2, calib, method="wanda", pattern="4:8", refit="admm", progress=False)
    assert all(_is_nm(mod.weight, 4, 8) for mod in _linears(m2).values()) and rep.refit == "admm"


def test_refit_with_true_sequential_and_staged_equal():
    torch.manual_seed(2)
    base = _llama(layers=2)
    calib = _calib(n=6, t=32)
    a, b = _clone(base), _clone(base)
    prune_model(a, calib, method="wanda", refit="admm", true_sequential=True, single_pass=True, progress=False)
    prune_model(b, calib, method="wanda", refit="admm", true_sequential=True, single_pass=False, progress=False)
    for n, mod in _linears(a).items():
        assert torch.equal(mod.weight, _linears(b)[n].weight), n


@pytest.mark.parametrize("permute", [False, True])
def test_refit_joint_int8_on_the_deployed_grid_and_sparsify_bit_exact(permute):
    from sparsekern.convert import sparsify
    from sparsekern.linear import SparseLinear
    from sparsekern.quant import dequantize_weight, weight_grid

    torch.manual_seed(3)
    base = _llama(layers=2)
    calib = _calib(n=8, t=32)
    m = _clone(base)
    # with permute, the producers (v, gate, up) are pruned and quantised before their rows are permuted: their
    # recorded grid must move with the rows
    prune_model(m, calib, method="sparsegpt", refit="admm", quant="int8", permute=permute, permute_seconds=0.2,
                progress=False)
    grids = {}
    for n, mod in _linears(m).items():
        grid = weight_grid(mod)
        assert grid is not None and grid[0] == "int8", n
        q = (mod.weight.detach() / grid[1][:, None]).round()
        assert float(q.abs().max()) <= 127, n
        assert torch.equal(dequantize_weight(q, grid[1]) + 0.0, mod.weight.detach() + 0.0), n  # on the grid, exactly
        assert _is_nm(mod.weight), n
        grids[n] = (mod.weight.detach().clone(), grid[1].clone())
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "weight is off its grid" fallback
        sparsify(m, quant="int8")
    for n, mod in m.named_modules():
        if n in grids:
            assert isinstance(mod, SparseLinear) and mod.quant == "int8", n
            w, s = grids[n]
            assert torch.equal(mod.weight_scale, s), n  # the optimised scale, bit for bit
            assert torch.equal(mod.dense_weight() + 0.0, w + 0.0), n  # codes * scale == optimised weights


def test_refit_bad_config_and_data_errors():
    with pytest.raises(PipelineError, match="refit 'lsq': expected None or 'admm'"):
        PruneConfig(refit="lsq")
    with pytest.raises(PipelineError, match="method='admm' already solves"):
        PruneConfig(method="admm", refit="admm")
    with pytest.raises(PipelineError, match="refit_iters \\+ refit_cg_iters must be >= 1"):
        PruneConfig(refit="admm", refit_iters=0, refit_cg_iters=0)
    with pytest.raises(PipelineError, match="refit_percdamp"):
        PruneConfig(refit="admm", refit_percdamp=0)
    with pytest.raises(PipelineError, match="refit_iters"):
        PruneConfig(refit="admm", refit_iters=-1)
    m = _llama(layers=1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(PipelineError, match="method 'magnitude' with refit='admm' needs calibration data"):
        prune_model(m, None, method="magnitude", refit="admm", progress=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


def test_magnitude_refit_uses_calibration_and_keeps_magnitude_mask():
    torch.manual_seed(4)
    base = _llama(layers=1)
    calib = _calib(n=6, t=32)
    a, b = _clone(base), _clone(base)
    prune_model(a, None, method="magnitude", progress=False)
    prune_model(b, calib, method="magnitude", refit="admm", progress=False)
    for n, mod in _linears(a).items():
        other = _linears(b)[n].weight
        assert torch.equal(mod.weight != 0, other != 0), n  # magnitude's mask
        assert torch.equal(engine.magnitude(_linears(base)[n].weight.detach(), "2:4").mask, other != 0), n
        assert not torch.equal(mod.weight, other), n  # new weights


# ------------------------------------------------------------------------------------------- permute=...


def _fold_recorded(model, report):
    """Apply the permutations a prune_model report recorded to (a clone of) the dense model."""
    from sparsekern.pipeline.permute import apply_permutation, fold_rules

    layers = model.model.layers
    for full, rec in report.permutations.items():
        i, rel = full.split(".layers.", 1)[1].split(".", 1)
        rule = fold_rules(layers[int(i)], model.config)[rel]
        apply_permutation(layers[int(i)], rule, torch.tensor(rec["perm"]))


def test_permute_folds_and_equals_pruning_the_permuted_dense_model():
    torch.manual_seed(5)
    base = _llama(layers=2)
    ids = _calib(n=2, t=16)
    a = _clone(base)
    rep = prune_model(a, None, method="magnitude", permute=True, permute_seconds=0.3, progress=False)
    assert sorted(k.split(".", 3)[3] for k in rep.permutations) == ["mlp.down_proj", "mlp.down_proj",
                                                                      "self_attn.o_proj", "self_attn.o_proj"]
    assert all(v["gain"] > 0 for v in rep.permutations.values())  # random weights: the search always finds some
    b = _clone(base)
    _fold_recorded(b, rep)
    with torch.no_grad():  # the permutation alone leaves the dense model's outputs unchanged
        torch.testing.assert_close(b(input_ids=ids).logits, base(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    prune_model(b, None, method="magnitude", progress=False)
    for n, mod in _linears(a).items():
        assert torch.equal(mod.weight, _linears(b)[n].weight), n  # same weights, same masks


@pytest.mark.parametrize("method,refit", [("wanda", None), ("sparsegpt", None), ("sparsegpt", "admm")])
def test_permute_with_calibrated_methods(method, refit):
    torch.manual_seed(6)
    base = _llama(layers=2)
    calib = _calib(n=8, t=32)
    a = _clone(base)
    rep = prune_model(a, calib, method=method, refit=refit, permute=["*.mlp.down_proj"], permute_seconds=0.3,
                      progress=False)
    assert sorted(rep.permutations) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    rec = rep.permutations["model.layers.0.mlp.down_proj"]
    assert rec["producers"] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert sorted(rec["perm"]) == list(range(128)) and rec["perm"] != list(range(128))
    assert all(_is_nm(mod.weight) for mod in _linears(a).values())
    # the same run on the dense model permuted beforehand gives the same model (statistics permuted consistently)
    b = _clone(base)
    _fold_recorded(b, rep)
    prune_model(b, calib, method=method, refit=refit, progress=False)
    for n, mod in _linears(a).items():
        torch.testing.assert_close(mod.weight, _linears(b)[n].weight, rtol=1e-4, atol=1e-5, msg=n)


def test_permute_refusals_leave_the_model_unchanged():
    m = _llama(layers=1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    calib = _calib(n=4, t=16)
    with pytest.raises(PipelineError, match="q_proj.*reads the residual stream"):
        prune_model(m, calib, method="wanda", permute=["*.q_proj"], progress=False)
    with pytest.raises(PipelineError, match="permute needs an N:M pattern"):
        prune_model(m, calib, method="wanda", pattern="0.5", permute=True, progress=False)
    with pytest.raises(PipelineError, match="single_pass=False"):
        prune_model(m, calib, method="wanda", permute=True, true_sequential=True, progress=False)
    with pytest.raises(PipelineError, match="match no pruned linear"):
        prune_model(m, calib, method="wanda", permute=["*.nothing"], progress=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    # true-sequential in separate passes works
    prune_model(m, calib, method="wanda", permute=True, true_sequential=True, single_pass=False,
                permute_seconds=0.1, progress=False)


@pytest.mark.cuda
@pytest.mark.parametrize("method,refit", [("sparsegpt", "admm"), ("admm", None), ("wanda", "admm")])
def test_refit_on_cuda_matches_cpu(method, refit):
    """The refit / ADMM path on a GPU (offload: the model stays on the CPU, blocks run on cuda): N:M weights within
    float32 rounding of the CPU run's (a near-tie may flip a mask, never many)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(7)
    base = _llama(layers=2)
    calib = _calib(n=8, t=32)
    a, b = _clone(base), _clone(base)
    prune_model(a, calib, method=method, refit=refit, progress=False)
    rb = prune_model(b, calib, method=method, refit=refit, progress=False, offload=True, device="cuda")
    assert rb.device.startswith("cuda") and all(p.device.type == "cpu" for p in b.parameters())
    same = 0
    for n, mod in _linears(a).items():
        other = _linears(b)[n].weight
        assert _is_nm(other), n
        same += int(torch.equal(mod.weight != 0, other != 0))
        assert float((mod.weight - other).norm() / mod.weight.norm()) < 0.05, n
    assert same >= len(_linears(a)) - 3


@pytest.mark.cuda
def test_permute_on_cuda_folds_and_records():
    """permute=True with the blocks on a GPU: every permutable linear permuted (the search and the fold on cuda
    tensors), N:M weights, finite outputs."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.manual_seed(8)
    m = _llama(layers=2)
    calib = _calib(n=8, t=32)
    rep = prune_model(m, calib, method="sparsegpt", refit="admm", permute=True, permute_seconds=0.5, progress=False,
                      device="cuda")
    assert len(rep.permutations) == 4 and all(v["gain"] >= 0 for v in rep.permutations.values())
    assert all(_is_nm(mod.weight.cpu()) for mod in _linears(m).values())
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=calib[:2].cuda()).logits).all()
