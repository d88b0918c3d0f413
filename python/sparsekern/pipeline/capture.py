"""Calibration data, the capture of what block 0 receives, and the replay of those arguments through a block.

The calibration windows are run through the model up to block 0, and what block 0 receives is captured: the
hidden states and every other argument (attention mask, position ids / rotary embeddings, cache disabled); a hook
raises StopForward there, so nothing after the embeddings is computed. Each block is then run on its own
(run_block) with the captured arguments and the current hidden states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from ..data import DataError, calibration_windows, tokenize
from .errors import PipelineError, StopForward


def as_calibration(calibration: Any, nsamples: int | None, seqlen: int | None, tokenizer: Any) -> torch.Tensor:
    """int64 token ids [nsamples, seqlen] from a tensor, a list of 1-D rows, or a text (with `tokenizer`: the
    first nsamples consecutive windows of seqlen tokens, defaults 128 x 2048)."""
    if isinstance(calibration, str):
        if tokenizer is None:
            raise PipelineError("calibration is a text: pass tokenizer=... to turn it into token windows")
        return calibration_windows(tokenize(tokenizer, calibration), nsamples or 128, seqlen or 2048)
    if isinstance(calibration, (list, tuple)):
        if not calibration:
            raise PipelineError("calibration: empty list of token rows")
        rows = [torch.as_tensor(r).reshape(-1) for r in calibration]
        if len({r.numel() for r in rows}) != 1:
            raise PipelineError("calibration: token rows must all have the same length (seqlen); got lengths "
                                f"{sorted({r.numel() for r in rows})}")
        calibration = torch.stack(rows)
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.dtype not in (
            torch.int64, torch.int32):
        raise PipelineError("calibration must be int64 token ids [nsamples, seqlen], a list of such rows, or a "
                            f"text; got {type(calibration).__name__}"
                            + (f" {calibration.dtype} {list(calibration.shape)}" if isinstance(calibration,
                                                                                              torch.Tensor) else ""))
    calibration = calibration.long()
    n, t = calibration.shape
    if seqlen is not None and seqlen != t:
        if seqlen > t:
            raise PipelineError(f"calibration rows have {t} tokens, fewer than seqlen = {seqlen}")
        calibration = calibration[:, :seqlen]
    if nsamples is not None:
        if nsamples > n:
            raise DataError(f"calibration too short: nsamples = {nsamples} windows requested, {n} given")
        calibration = calibration[:nsamples]
    return calibration


@dataclass
class Chunk:
    """One batch of calibration sequences as block 0 sees it: hidden states [b, T, C] + the other arguments."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def move_outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter/buffer of `model` not inside `layers` to `device` (in place: tied Parameters stay
    tied because Module._apply replaces .data, not the Parameter object)."""
    inside = {id(m) for m in layers.modules()}
    for m in model.modules():
        if id(m) not in inside:
            m._apply(lambda t: t.to(device), recurse=False)


def _record_block_input(chunks: list[Chunk]):
    """A forward pre-hook (with kwargs) appending what the block receives to `chunks`, then ending the forward."""
    def record(_mod, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        chunks.append(Chunk(hidden.detach(), rest, dict(kwargs)))
        raise StopForward
    return record


def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, *, batch_size: int,
                         device: torch.device) -> list[Chunk]:
    """Run `ids` (int64 [n, T]) through the model in batches and return what layers[0] receives for each batch.

    A forward pre-hook on layers[0] records its arguments and raises StopForward, so only the embeddings (and
    whatever precedes block 0: rotary tables, the causal mask) are computed.
    """
    chunks: list[Chunk] = []
    handle = layers[0].register_forward_pre_hook(_record_block_input(chunks), with_kwargs=True)
    try:
        for s in range(0, ids.shape[0], batch_size):
            batch = ids[s:s + batch_size].to(device)
            try:
                try:
                    model(input_ids=batch, use_cache=False)
                except TypeError:  # not a Hugging Face signature
                    model(batch)
            except StopForward:
                continue
            raise PipelineError(f"{type(model).__name__}'s forward never called its first decoder block")
    finally:
        handle.remove()
    return chunks


def hidden_of(out) -> torch.Tensor:
    """The hidden states of a block's output (the first element of a tuple output), detached."""
    return (out[0] if isinstance(out, (tuple, list)) else out).detach()


def run_block(layer: nn.Module, chunks: Sequence[Chunk], hidden: Sequence[torch.Tensor],
              keep: bool) -> list[torch.Tensor] | None:
    """Run `layer` on every chunk (hidden states from `hidden`, other arguments as captured). Returns the output
    hidden states when `keep`; a StopForward raised by a hook ends that chunk's forward quietly."""
    outs = [] if keep else None
    for chunk, h in zip(chunks, hidden):
        try:
            out = layer(h, *chunk.args, **chunk.kwargs)
        except StopForward:
            if keep:
                raise RuntimeError("internal: a forward whose output is needed was stopped") from None
            continue
        if keep:
            outs.append(hidden_of(out))
    return outs
