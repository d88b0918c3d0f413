"""Perplexity with the WikiText-2 protocol of the pruning references (SparseGPT, Wanda; ALGORITHMS.md).

The token stream is cut into nsamples = numel // seqlen non-overlapping windows (the tail is dropped); each window
is scored on its own (no context carried over); the mean next-token NLL of a window (over its seqlen - 1
predictions) is weighted by seqlen, exactly as the references do, so numbers are comparable with theirs:

    ppl = exp( sum_w (mean_nll_w * seqlen) / (nsamples * seqlen) )

seqlen changes the number a lot: always report it next to the perplexity.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ._modules import model_device
from .data import DataError, check_seqlen


@torch.no_grad()
def window_nlls(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, *, batch_size: int = 1,
                progress: bool = False) -> torch.Tensor:
    """Mean next-token NLL of each window, float64 [nsamples] (see the module docstring for the windowing).

    model: a causal LM whose forward(input_ids) returns an object with .logits [B, T, vocab] (Hugging Face style).
    ids: int64 token ids, [numel] or [1, numel], any device (moved to the model's device window by window).
    batch_size: windows per forward; logits of B x seqlen x vocab are materialised, so keep it small.
    """
    if seqlen < 2:
        raise DataError(f"seqlen ({seqlen}) must be >= 2: a window of one token has nothing to predict")
    ids = ids.reshape(-1)
    nsamples = ids.numel() // seqlen
    if nsamples == 0:
        raise DataError(f"text too short: one window of seqlen = {seqlen} tokens needed, the text has {ids.numel()}")
    check_seqlen(model, seqlen)
    if batch_size < 1:
        raise DataError(f"batch_size ({batch_size}) must be >= 1")
    device = model_device(model)
    windows = ids[: nsamples * seqlen].reshape(nsamples, seqlen)
    out = torch.empty(nsamples, dtype=torch.float64)
    was_training = model.training
    model.eval()
    starts = range(0, nsamples, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="perplexity", unit="batch", leave=False)
    try:
        for s in starts:
            batch = windows[s:s + batch_size].to(device)
            logits = _logits(model, batch)
            # Loss in float32 whatever the model dtype (the references upcast the logits too).
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), batch[:, 1:], reduction="none")
            out[s:s + batch.shape[0]] = nll.double().mean(dim=1).cpu()
    finally:
        model.train(was_training)
    return out


def _logits(model: Any, batch: torch.Tensor) -> torch.Tensor:
    try:
        result = model(input_ids=batch, use_cache=False)
    except TypeError:  # a plain nn.Module LM without Hugging Face keywords
        result = model(batch)
    return result.logits if hasattr(result, "logits") else result


def perplexity(model: torch.nn.Module, ids: torch.Tensor, seqlen: int, *, batch_size: int = 1,
               progress: bool = False) -> float:
    """Perplexity of `model` on `ids` (int64 [numel] or [1, numel]) in windows of `seqlen` tokens.

    Follows the references' protocol (module docstring): windows = numel // seqlen, tail dropped, each window's
    mean NLL weighted by seqlen. Returns a Python float.
    """
    nll = window_nlls(model, ids, seqlen, batch_size=batch_size, progress=progress)
    return math.exp(float((nll * seqlen).sum() / (nll.numel() * seqlen)))
