"""sparsekern.eval.perplexity against the references' protocol written out in float64."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsekern.data import DataError
from sparsekern.eval import perplexity, window_nlls


class _Out:
    def __init__(self, logits):
        self.logits = logits


class _TinyLM(nn.Module):
    """Embedding -> causal mean of the prefix -> Linear: a deterministic causal LM with a real context dependence."""

    def __init__(self, vocab=37, dim=16, max_pos=64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab)
        self.config = type("Cfg", (), {"max_position_embeddings": max_pos})()

    def forward(self, input_ids, use_cache=False):
        h = self.emb(input_ids)
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, device=h.device).view(1, -1, 1)
        return _Out(self.head(torch.tanh(h)) * 3)


def _reference_ppl(model, ids, seqlen):
    # ALGORITHMS.md: nsamples = numel // seqlen windows, tail dropped; window NLL = mean over its seqlen-1
    # predictions, weighted by seqlen; ppl = exp(sum / (nsamples * seqlen)). In float64 throughout.
    n = ids.numel() // seqlen
    total = 0.0
    for w in range(n):
        x = ids[w * seqlen:(w + 1) * seqlen].view(1, -1)
        logp = torch.log_softmax(model(x).logits.double(), dim=-1)[0]
        nll = -sum(logp[t, x[0, t + 1]].item() for t in range(seqlen - 1)) / (seqlen - 1)
        total += nll * seqlen
    return math.exp(total / (n * seqlen))


@pytest.mark.parametrize("numel,seqlen,batch_size", [(256, 32, 1), (300, 32, 3), (101, 7, 4), (64, 64, 1)])
def test_perplexity_matches_float64_reference(numel, seqlen, batch_size):
    model = _TinyLM().eval()
    ids = torch.randint(0, 37, (numel,))
    got = perplexity(model, ids, seqlen, batch_size=batch_size)
    want = _reference_ppl(model, ids, seqlen)
    # float32 logits and log-softmax against float64: relative error of a mean of O(1) terms, well below 1e-5.
    assert got == pytest.approx(want, rel=1e-5)


def test_tail_is_dropped_and_2d_ids_accepted():
    model = _TinyLM().eval()
    ids = torch.randint(0, 37, (100,))
    assert perplexity(model, ids, 32) == perplexity(model, ids[:96], 32)
    assert perplexity(model, ids.view(1, -1), 32) == perplexity(model, ids, 32)
    # The dropped tail matters to the spec: with it the number would differ.
    assert perplexity(model, ids[:96], 32) != perplexity(model, ids[4:100], 32)


def test_uniform_model_has_perplexity_equal_to_vocab():
    class Uniform(nn.Module):
        def forward(self, input_ids, use_cache=False):
            return _Out(torch.zeros(*input_ids.shape, 50))

    ids = torch.randint(0, 50, (90,))
    assert perplexity(Uniform(), ids, 30) == pytest.approx(50.0, rel=1e-6)


def test_window_nlls_shape_and_independence_of_batching():
    model = _TinyLM().eval()
    ids = torch.randint(0, 37, (33 * 5 + 2,))
    a = window_nlls(model, ids, 33, batch_size=1)
    b = window_nlls(model, ids, 33, batch_size=5)
    assert a.dtype == torch.float64 and a.shape == (5,)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_bad_inputs_have_clear_messages():
    model = _TinyLM(max_pos=16).eval()
    ids = torch.randint(0, 37, (100,))
    with pytest.raises(DataError, match=r"seqlen 32 is beyond the model's maximum of 16 positions"):
        perplexity(model, ids, 32)
    with pytest.raises(DataError, match=r"seqlen \(1\) must be >= 2"):
        perplexity(model, ids, 1)
    with pytest.raises(DataError, match=r"one window of seqlen = 16 tokens needed, the text has 10"):
        perplexity(model, ids[:10], 16)
    with pytest.raises(DataError, match=r"batch_size \(0\) must be >= 1"):
        perplexity(model, ids, 8, batch_size=0)


def test_model_mode_is_restored():
    model = _TinyLM().train()
    perplexity(model, torch.randint(0, 37, (64,)), 32)
    assert model.training
