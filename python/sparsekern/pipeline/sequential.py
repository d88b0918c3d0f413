"""prune_model: the layer-sequential loop, one named stage after the other (the parts live in the sibling modules).

    setup     find the decoder blocks (structure), the device, the calibration windows, the linears to prune
    capture   what block 0 receives for each calibration batch (capture)
    per block l:
      load        offload: move block l to the device
      groups      the block's linears grouped by shared input, in call order (stats.discover_groups)
      calibrate   statistics + pruning: one pass for all groups, one pass per group (true_sequential,
                  single_pass=False), or the single paused pass that also re-runs the block (staged)
      rerun       block l+1's inputs from the pruned block l (rerun)
      unload      offload: block l back to the CPU
    report    times (report.PruneReport)
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import time
from typing import Any

import torch
from torch import nn

from .config import PruneConfig, make_config
from .errors import PipelineError
from .report import PruneReport
from .dist import DistContext
from .run import _PruneRun, run_blocks, start_run


@torch.no_grad()
def prune_model(model: nn.Module, calibration: Any = None, config: PruneConfig | None = None,
                **options) -> PruneReport:
    """Prune the linears of every decoder block of `model` in place, block after block (sparsekern.pipeline).

    model:       a causal LM (Hugging Face style; forward(input_ids=[B, T]) reaches the decoder blocks in order).
    calibration: int64 token ids [nsamples, seqlen]; a list of such 1-D rows; or a text (with `tokenizer`), cut
                 into the first nsamples consecutive windows of seqlen tokens (defaults 128 x 2048). Not needed
                 for method="magnitude".
    config:      a PruneConfig (default PruneConfig()); keyword `options` (method=..., pattern=..., any field of
                 PruneConfig, documented there) replace its fields: prune_model(model, calib, method="wanda",
                 pattern="2:4") == prune_model(model, calib, PruneConfig(method="wanda", pattern="2:4")).
    Returns a PruneReport (per-linear losses, sparsity and times).
    Under an initialised torch.distributed process group of several ranks (torchrun), every rank calls this with the
    same model, options and calibration, and the ranks share the work (calibration batches, pruning; pipeline/dist.py;
    distributed=False opts out): every rank ends with the same pruned model, equal to a one-process run's.
    """
    low_memory, out = options.pop("low_memory", False), options.pop("out", None)
    if low_memory:
        if not isinstance(model, (str, os.PathLike)) or out is None:
            raise PipelineError("low_memory=True prunes a checkpoint folder into another without loading it: "
                                "prune_model('DIR', calibration, low_memory=True, out='OUT', ...) "
                                "(pipeline.prune_checkpoint)")
        from .lowmem import prune_checkpoint

        return prune_checkpoint(model, out, calibration, config, **options)
    if out is not None:
        raise PipelineError("out= is for low_memory=True; an in-memory run prunes the model in place (save it with "
                            "model.save_pretrained)")
    if isinstance(model, (str, os.PathLike)):
        raise PipelineError(f"prune_model({str(model)!r}): a path is pruned out of core with low_memory=True, "
                            "out='OUT'; otherwise load the model first (sparsekern.data.load_model)")
    t_start, cpu_start = time.perf_counter(), time.process_time()
    cfg = make_config(config, options)
    dist = DistContext.detect(cfg.distributed)
    return run_blocks(start_run(lambda: _PruneRun(model, calibration, cfg, dist), dist), t_start, cpu_start)


def _keyword_signature(fn):
    """Show PruneConfig's fields as fn's keyword-only parameters (help(), IDEs), in place of **options."""
    sig = inspect.signature(fn)
    params = [p for p in sig.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in dataclasses.fields(PruneConfig)]
    fn.__signature__ = sig.replace(parameters=params)
    return fn


_keyword_signature(prune_model)
