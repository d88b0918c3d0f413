"""sparsekern._modules: the small module rules shared by conversion, pruning, evaluation and loading."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

from sparsekern._modules import is_conv1d, matches, model_device, replace_module


def test_matches_equal_suffix_or_glob():
    name = "model.layers.0.self_attn.q_proj"
    assert matches(name, ["q_proj"]) and matches(name, ["self_attn.q_proj"]) and matches(name, [name])
    assert matches(name, ["model.layers.*.self_attn.*"])
    assert not matches(name, ["proj"]) and not matches(name, ["layers.0"]) and not matches(name, [])


def test_model_device_and_replace_module():
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    assert model_device(model) == torch.device("cpu") and model_device(nn.ReLU()) == torch.device("cpu")
    new = nn.Identity()
    replace_module(model, "1.0", new)
    assert model[1][0] is new
    replace_module(model, "0", new)
    assert model[0] is new


def _fake_class(module_name, base=nn.Module, name="Conv1D"):
    def init(self, nf=4, nx=8):
        base.__init__(self)
        self.nf = nf
        self.weight = nn.Parameter(torch.zeros(nx, nf))

    return types.new_class(name, (base,), exec_body=lambda ns: ns.update(__module__=module_name, __init__=init))


def test_is_conv1d_needs_the_transformers_class_name_nf_and_a_2d_weight():
    conv = _fake_class("transformers.pytorch_utils")
    assert is_conv1d(conv())
    assert is_conv1d(_fake_class("my_models", base=conv, name="MyConv")())  # a subclass of it
    assert not is_conv1d(_fake_class("my_models")())  # same name, not transformers'
    m = conv()
    del m.nf
    assert not is_conv1d(m)
    m = conv()
    m.weight = nn.Parameter(torch.zeros(8))
    assert not is_conv1d(m)
    assert not is_conv1d(nn.Conv1d(2, 2, 1)) and not is_conv1d(nn.Linear(2, 2))


def test_is_conv1d_on_the_real_transformers_class():
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    assert is_conv1d(pytorch_utils.Conv1D(16, 8))
