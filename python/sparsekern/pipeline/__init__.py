"""prune_model: prune every Linear of a model's decoder blocks, one block at a time (layer-sequential calibration).

    model, tok = sparsekern.data.load_model("bundled")
    calib = sparsekern.data.calibration_windows(ids, nsamples=64, seqlen=512)     # int64 [64, 512]
    report = sparsekern.prune_model(model, calib, method="sparsegpt", pattern="2:4")
    print(report.table())
    # or: sparsekern.prune_model(model, calib, PruneConfig(method="sparsegpt", pattern="2:4"))

The procedure is the one of the SparseGPT / Wanda references (ALGORITHMS.md):

1. Find the decoder blocks (structure.py): the largest nn.ModuleList of same-class blocks holding nn.Linear /
   transformers Conv1D, found generically rather than from a table of architectures.
2. Run the calibration windows through the model up to block 0 and capture what block 0 receives (capture.py); a
   hook raises a private exception there, so nothing after the embeddings is computed.
3. For each block l: replay the captured arguments with the current hidden states; forward pre-hooks on the
   block's linears feed calibration statistics (Hessian for SparseGPT, activation scale for Wanda) of all of
   them in one pass (stats.py); prune each linear (pruning.py); re-run the now pruned block to produce the hidden
   states block l+1 receives (rerun.py). So block l+1 is calibrated on the outputs of the *pruned* blocks 0..l,
   as in the references.

Two things make it cheaper than the references without changing the result (stats.py): linears reading the same
input tensor share one statistics object, and the statistics pass stops as soon as the last statistics it needs
are taken. true_sequential=True prunes the groups in call order, by default in one paused forward per chunk
(staged.py). The loop over blocks and its named stages: sequential.py; the options: config.py (PruneConfig); the
report: report.py.

Large-model mode (offload=True): the model stays on the CPU; the embeddings (for the capture) and then one block
at a time are moved to `device`, the hidden states stay on `device`. GPU memory then needs one block plus the
calibration activations (nsamples x seqlen x hidden), not the model.
"""

from __future__ import annotations

from .._modules import matches as _matches
from .._modules import model_device as _model_device
from .capture import Chunk, as_calibration, capture_block_inputs, hidden_of, move_outside_layers, run_block
from .config import (
    METHODS,
    RERUN_KERNELS,
    PruneConfig,
    calibration_autocast,
    check_pattern,
    engine_pattern,
    make_config,
)
from .errors import PipelineError, StopForward
from .pruning import GroupPruner, make_stats, prune_weight, sparsity_of
from .report import LinearReport, PruneReport
from .rerun import RerunKernels, choose_rerun_kernel, fp32_rounding_bound, probe_sparse_rerun, rerun_block, \
    sparse_forwards
from .lowmem import ShardReader, prune_checkpoint
from .sequential import prune_model
from .staged import run_block_staged
from .stats import collect_stats, discover_groups
from .structure import (
    block_linears,
    find_decoder_layers,
    is_prunable,
    is_selected,
    select_linears,
    set_weight_matrix,
    weight_matrix,
)

# The names pipeline.py had before it became this package (sensitivity scans, tests and user code call them).
# To replace one in a test, patch it in its module (e.g. sparsekern.pipeline.rerun.probe_sparse_rerun).
_Chunk = Chunk
_StopForward = StopForward
_as_calibration = as_calibration
_check_pattern = check_pattern
_engine_pattern = engine_pattern
_fp32_rounding_bound = fp32_rounding_bound
_make_stats = make_stats
_move_outside_layers = move_outside_layers
_probe_sparse_rerun = probe_sparse_rerun
_prune_weight = prune_weight
_run_block = run_block
_set_weight_matrix = set_weight_matrix
_sparse_forwards = sparse_forwards
_sparsity_of = sparsity_of
_hidden_of = hidden_of

__all__ = [
    "prune_checkpoint",
    "ShardReader",
    "METHODS", "RERUN_KERNELS", "Chunk", "GroupPruner", "LinearReport", "PipelineError", "PruneConfig", "PruneReport",
    "RerunKernels", "as_calibration", "block_linears", "calibration_autocast", "capture_block_inputs",
    "check_pattern", "choose_rerun_kernel", "collect_stats", "discover_groups", "engine_pattern",
    "find_decoder_layers", "fp32_rounding_bound", "is_prunable", "is_selected", "make_config", "make_stats",
    "move_outside_layers", "probe_sparse_rerun", "prune_model", "prune_weight", "rerun_block", "run_block",
    "run_block_staged", "select_linears", "set_weight_matrix", "sparse_forwards", "sparsity_of", "weight_matrix",
]
