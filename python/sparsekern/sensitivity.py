"""Sensitivity scan: how much does pruning one block, or one linear, alone cost in perplexity?

    table = sensitivity_scan(model, calib, eval_ids, method="sparsegpt", pattern="2:4", unit="linear")
    print(table)                       # sorted, most sensitive first
    skip = table.most_sensitive(4)     # -> prune_model(..., skip=skip) keeps those 4 dense

Each unit is pruned on its own, with calibration statistics from the *dense* model (every other weight dense), the
perplexity on a small evaluation set is measured, and the unit's weights are restored. The dense inputs of block l
are captured once and carried block to block, so the scan costs one statistics pass per block plus one perplexity
evaluation per unit (keep the evaluation set small: a per-linear scan of a 30-block model evaluates 210 times).
The model is left exactly as it was.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from . import pipeline as P
from ._modules import model_device
from .data import check_seqlen
from .eval import perplexity

UNITS = ("block", "linear")


@dataclass
class SensitivityRow:
    """One scanned unit: `name` (a block path such as "model.layers.3", or a full linear name), the linears it
    covers, their weight count, the perplexity with only this unit pruned, and the change from dense."""

    name: str
    linears: list[str]
    numel: int
    ppl: float
    delta: float


@dataclass
class SensitivityTable:
    method: str
    pattern: str
    unit: str
    dense_ppl: float
    eval_tokens: int
    seqlen: int
    rows: list[SensitivityRow] = field(default_factory=list)
    seconds: float = 0.0

    def sorted_rows(self) -> list[SensitivityRow]:
        """Rows, most sensitive (largest perplexity increase) first; ties by name for determinism."""
        return sorted(self.rows, key=lambda r: (-r.delta, r.name))

    def most_sensitive(self, k: int) -> list[str]:
        """Full names of the linears of the k most sensitive units (for prune_model(skip=...))."""
        if k < 0:
            raise ValueError(f"k ({k}) must be >= 0")
        return [n for r in self.sorted_rows()[:k] for n in r.linears]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = [asdict(r) for r in self.sorted_rows()]
        return d

    def __str__(self) -> str:
        lines = [f"sensitivity ({self.method} {self.pattern}, one {self.unit} at a time): dense ppl "
                 f"{self.dense_ppl:.3f} on {self.eval_tokens} tokens (seqlen {self.seqlen}), {self.seconds:.1f} s",
                 f"  {'rank':>4}  {'unit':<44} {'weights':>10} {'ppl':>10} {'delta':>10}"]
        for k, r in enumerate(self.sorted_rows(), 1):
            lines.append(f"  {k:>4}  {r.name:<44} {r.numel:>10,} {r.ppl:>10.3f} {r.delta:>+10.3f}")
        return "\n".join(lines)


@torch.no_grad()
def sensitivity_scan(model: nn.Module, calibration: Any, eval_ids: torch.Tensor, *, method: str = "sparsegpt",
                     pattern: str = "2:4", unit: str = "block", seqlen: int | None = None,
                     include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                     batch_size: int = 8, eval_batch_size: int = 1, progress: bool = True,
                     blocksize: int = 128, percdamp: float = 0.01) -> SensitivityTable:
    """Prune one unit at a time and measure the perplexity change (module docstring). The model is unchanged.

    model:       causal LM (see prune_model), all on one device.
    calibration: int64 token ids [nsamples, T] (ignored for magnitude, may be None then).
    eval_ids:    int64 token ids [numel]; perplexity in windows of `seqlen` (default: the calibration's T).
    unit:        "block" (all selected linears of one decoder block) or "linear".
    include / exclude: which block linears are candidates (same rule as prune_model).
    Returns a SensitivityTable.
    """
    t_start = time.perf_counter()
    if unit not in UNITS:
        raise P.PipelineError(f"unit {unit!r}: expected one of {', '.join(UNITS)}")
    if method not in P.METHODS:
        raise P.PipelineError(f"method {method!r}: expected one of {', '.join(P.METHODS)}")
    pattern = P.check_pattern(pattern)
    eng_pattern = P.engine_pattern(pattern)
    layers_path, layers = P.find_decoder_layers(model)
    device = model_device(model)
    calib = None
    if method != "magnitude":
        if calibration is None:
            raise P.PipelineError(f"method {method!r} needs calibration data")
        calib = P.as_calibration(calibration, None, None, None)
    if seqlen is None:
        if calib is None:
            raise P.PipelineError("seqlen: give the evaluation window length (no calibration to take it from)")
        seqlen = calib.shape[1]
    check_seqlen(model, seqlen)
    was_training = model.training
    model.eval()
    dense_ppl = perplexity(model, eval_ids, seqlen, batch_size=eval_batch_size)
    table = SensitivityTable(method=method, pattern=pattern, unit=unit, dense_ppl=dense_ppl,
                             eval_tokens=(eval_ids.numel() // seqlen) * seqlen, seqlen=seqlen)
    options = {"blocksize": blocksize, "percdamp": percdamp}

    chunks = [] if calib is None else P.capture_block_inputs(model, layers, calib, batch_size=batch_size,
                                                            device=device)
    hidden = [c.hidden for c in chunks]
    bar = range(len(layers))
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"sensitivity ({unit})", unit="block")
    try:
        for i in bar:
            layer = layers[i]
            mods = P.block_linears(layer)
            names = [n for n in mods if P.is_selected(f"{layers_path}.{i}.{n}", include, exclude)]
            if names:
                if calib is None:
                    stat_of = {n: None for n in names}
                else:
                    groups = P.discover_groups(layer, names, chunks[0], hidden[0])
                    stats = P.collect_stats(layer, groups, chunks, hidden, method, device)
                    stat_of = {n: stats[g[0]].value for g in groups for n in g}
                units = [names] if unit == "block" else [[n] for n in names]
                for members in units:
                    saved = {n: P.weight_matrix(mods[n]).detach().clone() for n in members}
                    try:
                        for n in members:
                            value = stat_of[n]
                            res = P.prune_weight(method, saved[n], value, eng_pattern, options)
                            P.set_weight_matrix(mods[n], res.weight)
                        ppl = perplexity(model, eval_ids, seqlen, batch_size=eval_batch_size)
                    finally:
                        for n in members:
                            P.set_weight_matrix(mods[n], saved[n])
                    full = [f"{layers_path}.{i}.{n}" for n in members]
                    table.rows.append(SensitivityRow(
                        name=f"{layers_path}.{i}" if unit == "block" else full[0], linears=full,
                        numel=sum(saved[n].numel() for n in members), ppl=ppl,
                        delta=ppl - dense_ppl if math.isfinite(ppl) else math.inf))
            if calib is not None and i + 1 < len(layers):
                hidden = P.run_block(layer, chunks, hidden, keep=True)  # dense outputs: the next block's inputs
    finally:
        if progress:
            bar.close()
        model.train(was_training)
    table.seconds = time.perf_counter() - t_start
    return table
