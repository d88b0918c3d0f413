"""The block loop prune_model runs (its stages are listed in sequential.py's docstring): _PruneRun carries the
state from block to block; run_blocks drives it. pipeline/lowmem.py subclasses _PruneRun to read and write blocks."""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Any

import torch
from torch import nn

from .._modules import model_device
from ..data import check_seqlen
from .capture import as_calibration, capture_block_inputs, move_outside_layers
from .config import PruneConfig, calibration_autocast, engine_pattern
from .dist import DistContext, was_reported
from .errors import PipelineError
from .pruning import BlockPermuter, GroupPruner
from .report import PruneReport
from .rerun import RerunKernels, rerun_block, sparse_forwards
from .staged import run_block_staged
from .stats import collect_stats, discover_groups
from .structure import block_linears, find_decoder_layers, select_linears


def _resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    device = torch.device(device) if device is not None else model_device(model)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _calibration_ids(model: nn.Module, calibration: Any, cfg: PruneConfig) -> torch.Tensor | None:
    """The calibration windows int64 [nsamples, seqlen], checked against the model; None for magnitude (without a
    refit)."""
    if not cfg.needs_data:
        return None
    if calibration is None:
        what = f"method {cfg.method!r}" + (f" with refit={cfg.refit!r}" if cfg.refit else "")
        raise PipelineError(f"{what} needs calibration data (token ids [nsamples, seqlen] or a text)")
    calib = as_calibration(calibration, cfg.nsamples, cfg.seqlen, cfg.tokenizer)
    check_seqlen(model, calib.shape[1])
    return calib


class _PruneRun:
    """The state one prune_model call carries from block to block, and its stages (module docstring)."""

    def __init__(self, model: nn.Module, calibration: Any, cfg: PruneConfig, dist: DistContext | None = None):
        self.model, self.cfg, self.dist = model, cfg, dist
        self.layers_path, self.layers = find_decoder_layers(model)
        self.device = _resolve_device(cfg.device, model)
        self.calib = _calibration_ids(model, calibration, cfg)
        n, t = (0, 0) if self.calib is None else self.calib.shape
        self.samples = (0, n)  # the calibration sequences this process runs: all, or its rank's range
        if dist is not None:
            self._check_distributable(cfg)
            nbatches = -(-n // cfg.batch_size)
            if self.calib is not None and nbatches < dist.world:
                raise PipelineError(f"{n} calibration sequences in batches of {cfg.batch_size} make {nbatches} "
                                    f"batch(es) for {dist.world} ranks: every rank needs at least one (more nsamples "
                                    "or a smaller batch_size)")
            b0, b1 = dist.batch_range(nbatches, dist.rank)
            self.samples = (min(n, b0 * cfg.batch_size), min(n, b1 * cfg.batch_size))
        self.report = PruneReport(
            method=cfg.method, pattern=cfg.pattern, nsamples=n, seqlen=t, true_sequential=cfg.true_sequential,
            device=str(self.device), offload=cfg.offload, layers_path=self.layers_path,
            calib_dtype=cfg.calib_dtype_name, single_pass=bool(cfg.true_sequential and cfg.single_pass),
            rerun_kernel=cfg.rerun_kernel, refit=cfg.refit,
            refit_options=cfg.refit_options if cfg.uses_refit else {})
        if dist is not None:
            self.report.world_size, self.report.backend = dist.world, dist.backend
        self.selected, self.report.kept_dense = select_linears(self.layers_path, self.layers, cfg.include,
                                                               cfg.exclude, cfg.skip)
        self.autocast = functools.partial(calibration_autocast, cfg.calib_dtype, self.device)
        permuter = None
        if cfg.permute is not False:
            n_, m_ = (int(v) for v in cfg.pattern.split(":"))
            permuter = BlockPermuter(self.layers, self._permute_rules(model, cfg), n_, m_, cfg.permute_seconds,
                                     self.report, self.layers_path)
        self.prune_group = GroupPruner(cfg.method, engine_pattern(cfg.pattern), cfg.engine_options, self.report,
                                       self.layers_path, refit=cfg.refit,
                                       refit_options=cfg.refit_options if cfg.uses_refit else None,
                                       permuter=permuter, dist=dist)
        self.kernels = RerunKernels(cfg.rerun_kernel, cfg.pattern, self.device, cfg.calib_dtype,
                                    cfg.batch_size * t, self.report)
        self.chunks: list = []
        self.hidden: list[torch.Tensor] = []
        self._group_cache: dict[tuple, list[list[str]]] = {}

    @staticmethod
    def _check_distributable(cfg: PruneConfig) -> None:
        if cfg.permute is not False:
            raise PipelineError("permute across ranks is not supported: the permutation search is time-budgeted, so "
                                "ranks could fold different permutations; prune with permute in one process")
        if cfg.rerun_kernel == "auto":
            raise PipelineError("rerun_kernel='auto' decides by timing on each rank, so ranks could choose "
                                "differently; use 'dense' or 'sparse' across ranks")

    def fingerprint(self) -> dict:
        """What every rank must agree on (pipeline/dist.py checks it): options, calibration ids, model."""
        import dataclasses
        import hashlib

        from .. import __version__
        from .dist import model_digest

        fp = {f"option {f.name}": repr(getattr(self.cfg, f.name)) for f in dataclasses.fields(self.cfg)
              if f.name not in ("device", "progress", "tokenizer", "distributed")}
        fp["device type"] = self.device.type
        fp["calibration ids"] = (None if self.calib is None else
                                 f"{list(self.calib.shape)} sha256 "
                                 f"{hashlib.sha256(self.calib.contiguous().numpy().tobytes()).hexdigest()[:16]}")
        fp["model"] = f"{type(self.model).__name__} {model_digest(self.model)}"
        fp["sparsekern version"] = __version__
        fp["torch version"] = torch.__version__
        return fp

    def _permute_rules(self, model: nn.Module, cfg: PruneConfig) -> list[dict]:
        """Per block, the fold rules of the selected linears to permute; PipelineError (before anything is changed)
        for a named linear that cannot fold, or when nothing can be permuted."""
        from .._modules import matches
        from .permute import check_permutable, fold_rules

        config = getattr(model, "config", None)
        rules: list[dict] = []
        for i, layer in enumerate(self.layers):
            names = self.selected[i]
            if cfg.permute is True:
                found = fold_rules(layer, config)
                rules.append({n: r for n, r in found.items() if n in names})
            else:
                want = [n for n in names if matches(f"{self.layers_path}.{i}.{n}", cfg.permute)]
                rules.append(check_permutable(layer, want, config) if want else {})
        if not any(rules):
            if cfg.permute is True:
                raise PipelineError(f"permute=True: no pruned linear of {self.layers_path} "
                                    f"({type(self.layers[0]).__name__} blocks) can have its input channels permuted "
                                    "for free (supported: the Llama / Mistral / Qwen2 / Qwen3 / Gemma / Phi MLP and "
                                    "attention, OPT, GPT-2, the GPT-NeoX MLP; pipeline/permute.py)")
            raise PipelineError(f"permute={list(cfg.permute)}: the patterns match no pruned linear of "
                                f"{self.layers_path}")
        return rules

    def capture(self) -> None:
        if self.calib is None:
            return
        t0 = time.perf_counter()
        if self.cfg.offload:
            move_outside_layers(self.model, self.layers, self.device)
        try:
            s0, s1 = self.samples
            self.chunks = capture_block_inputs(self.model, self.layers, self.calib[s0:s1],
                                               batch_size=self.cfg.batch_size, device=self.device)
        finally:
            if self.cfg.offload:
                move_outside_layers(self.model, self.layers, torch.device("cpu"))
        self.report.capture_seconds = time.perf_counter() - t0
        self.hidden = [c.hidden for c in self.chunks]

    def groups(self, layer: nn.Module, names: list[str]) -> list[list[str]]:
        if self.calib is None:
            return [[n] for n in names]
        key = (type(layer), tuple(names))
        if key not in self._group_cache:
            groups, err = None, None
            try:
                groups = discover_groups(layer, names, self.chunks[0], self.hidden[0])
            except Exception as exc:  # noqa: BLE001  (reported to every rank by check, then re-raised here)
                if self.dist is None:
                    raise
                err = exc
            if self.dist is not None:
                # Found from each rank's own first batch: a block whose linears run data-dependently (experts) could
                # group differently on different ranks, and the ranks would then exchange mismatched weights.
                self.dist.check(err, f"grouping the linears of {type(layer).__name__}",
                                fingerprint={"linear groups": repr(groups)})
            self._group_cache[key] = groups
        return self._group_cache[key]

    def needs_output(self, i: int) -> bool:
        """Whether block i's outputs are needed: they are block i+1's calibration inputs."""
        return self.calib is not None and i + 1 < len(self.layers)

    def calibrate_staged(self, i: int, layer: nn.Module, mods: dict, groups: list[list[str]]) -> None:
        """Statistics of each group and the re-run in one paused forward per chunk (staged.run_block_staged)."""
        keep = self.needs_output(i)
        with contextlib.ExitStack() as sparse_stack:
            on_group = _PruneGroupMidPass(self, i, mods, groups, sparse_stack if keep else None)
            out = run_block_staged(layer, groups, self.chunks, self.hidden, self.cfg.stats_method, self.device, on_group,
                                   keep=keep, context=self.autocast)
        if keep:
            self.hidden = out

    def calibrate_in_passes(self, i: int, layer: nn.Module, mods: dict, groups: list[list[str]]) -> None:
        """One statistics pass for all groups (or one per group with true_sequential), then pruning."""
        for todo in ([[g] for g in groups] if self.cfg.true_sequential else [groups]):
            with self.autocast():
                stats = {} if self.calib is None else collect_stats(layer, todo, self.chunks, self.hidden,
                                                                    self.cfg.stats_method, self.device)
            # one call for all of them: across ranks, their linears are dealt to the ranks together
            self.prune_group.prune_groups(i, mods, todo, [stats.get(g[0]) for g in todo])
            del stats

    def staged(self) -> bool:
        return self.calib is not None and self.cfg.true_sequential and self.cfg.single_pass

    def rerun(self, layer: nn.Module, mods: dict, names: list[str]) -> None:
        pruned = {n: m for n, m in mods.items() if n in names}
        self.hidden = rerun_block(layer, self.chunks, self.hidden, pruned, self.kernels, self.autocast)

    # Where block weights live. In memory: all on the device, or (offload) moved there one block at a time.
    # pipeline/lowmem.py overrides these three to read each block from the checkpoint and write it out.

    def prepare(self) -> None:
        if not self.cfg.offload:
            self.model.to(self.device)

    def load_block(self, i: int, layer: nn.Module) -> nn.Module:
        if self.cfg.offload:
            layer.to(self.device)
        return layer

    def unload_block(self, i: int, layer: nn.Module, names: list[str]) -> None:
        if self.cfg.offload:
            layer.to("cpu")

    def finish(self, t_start: float, cpu_start: float) -> PruneReport:
        if self.dist is not None:
            n, bs = self.report.nsamples, self.cfg.batch_size
            nbatches = -(-n // bs)
            self.report.ranks = [
                {"rank": r, "samples": [min(n, b0 * bs), min(n, b1 * bs)],
                 "linears": [row.name for row in self.report.linears if row.rank == r]}
                for r in range(self.dist.world) for b0, b1 in [self.dist.batch_range(nbatches, r)]]
        self.report.total_seconds = time.perf_counter() - t_start
        self.report.cpu_seconds = time.process_time() - cpu_start
        return self.report


class _PruneGroupMidPass:
    """run_block_staged's on_group(k, stat): prune group k of block i; when the block's output is needed
    (`sparse_stack` given), the rest of the paused pass runs the just-pruned linears through the re-run kernel."""

    def __init__(self, run: _PruneRun, i: int, mods: dict, groups: list[list[str]],
                 sparse_stack: contextlib.ExitStack | None):
        self.run, self.i, self.mods, self.groups, self.sparse_stack = run, i, mods, groups, sparse_stack

    def __call__(self, k: int, stat) -> None:
        self.run.prune_group(self.i, self.mods, self.groups[k], stat)
        if self.sparse_stack is not None:
            group = (self.mods[n] for n in self.groups[k])
            self.sparse_stack.enter_context(sparse_forwards(self.run.kernels.sparse_ones(group)))


def _block_bar(nblocks: int, cfg: PruneConfig, show: bool):
    if not show:
        return range(nblocks)
    from tqdm.auto import tqdm

    return tqdm(range(nblocks), desc=f"{cfg.method}{'+refit' if cfg.refit else ''} {cfg.pattern}", unit="block")


def _show_loss(bar, report: PruneReport) -> None:
    if hasattr(bar, "set_postfix") and report.linears and report.linears[-1].loss is not None:
        bar.set_postfix(loss=f"{report.linears[-1].loss:.3g}")


@contextlib.contextmanager
def rank_step(dist: DistContext | None, what: str):
    """One step of the run that may fail on one rank only: across ranks, the step ends with dist.check, where a
    rank that failed reports its error and every rank raises (pipeline/dist.py). One process: nothing added."""
    if dist is None:
        yield
        return
    try:
        yield
    except Exception as exc:  # not KeyboardInterrupt / SystemExit: a stopped rank does not join another exchange
        # another rank's failure, a broken group, or an error already reported: no further collective
        if not was_reported(exc):
            dist.check(exc, what)
        raise
    dist.check(None, what)


def start_run(make_run, dist: DistContext | None) -> _PruneRun:
    """make_run() (a _PruneRun); across ranks, checked to have succeeded on every rank and to have the same
    options, calibration ids and model everywhere."""
    if dist is None:
        return make_run()
    try:
        run = make_run()
        fingerprint = run.fingerprint()
    except Exception as exc:
        if not was_reported(exc):
            dist.check(exc, "setting up")
        raise
    dist.check(None, "setting up", fingerprint=fingerprint)
    return run


def run_blocks(run: _PruneRun, t_start: float, cpu_start: float) -> PruneReport:
    """The block loop of prune_model (module docstring's stages), for any _PruneRun."""
    model, cfg, dist = run.model, run.cfg, run.dist
    was_training = model.training
    model.eval()
    bar = None
    show = cfg.progress and (dist is None or dist.rank == 0)
    try:
        with rank_step(dist, "capturing the calibration inputs"):
            run.prepare()
            run.capture()                                                       # capture
        bar = _block_bar(len(run.layers), cfg, show)
        for i in bar:
            t_block = time.perf_counter()
            names = run.selected[i]
            with rank_step(dist, f"reading block {i}"):
                layer = run.load_block(i, run.layers[i])                        # load
            with rank_step(dist, f"block {i}"):
                mods = block_linears(layer)
                if names:
                    groups = run.groups(layer, names)                           # groups
                    if run.staged():
                        run.calibrate_staged(i, layer, mods, groups)            # calibrate + rerun, one pass
                    else:
                        run.calibrate_in_passes(i, layer, mods, groups)         # calibrate
                if run.needs_output(i) and not (names and run.staged()):
                    run.rerun(layer, mods, names)                               # rerun
                del mods  # the block's dense linears: a low-memory unload replaces them, nothing may keep them alive
                run.unload_block(i, layer, names)                               # unload (low memory: write)
                del layer  # likewise the block itself, before the next one is read
            run.report.block_seconds.append(time.perf_counter() - t_block)
            _show_loss(bar, run.report)
    finally:
        if bar is not None and show:
            bar.close()
        model.train(was_training)
    return run.finish(t_start, cpu_start)                                       # report
