"""prune_model: prune every Linear of a model's decoder blocks, one block at a time (layer-sequential calibration).

    model, tok = sparsekern.data.load_model("bundled")
    calib = sparsekern.data.calibration_windows(ids, nsamples=64, seqlen=512)     # int64 [64, 512]
    report = sparsekern.prune_model(model, calib, method="sparsegpt", pattern="2:4")
    print(report.table())

The procedure is the one of the SparseGPT / Wanda references (ALGORITHMS.md):

1. Find the decoder blocks: the largest nn.ModuleList of same-class blocks holding nn.Linear / transformers Conv1D
   (model.model.layers for LLaMA/Mistral/Qwen/Gemma, model.model.decoder.layers for OPT, model.transformer.h for
   GPT-2), found generically rather than from a table of architectures.
2. Run the calibration windows through the model up to block 0 and capture what block 0 receives: the hidden
   states and every other argument (attention mask, position ids / rotary embeddings, cache disabled); a hook
   raises a private exception there, so nothing after the embeddings is computed.
3. For each block l: replay the captured arguments with the current hidden states; forward pre-hooks on the
   block's linears feed calibration statistics (Hessian for SparseGPT, activation scale for Wanda) of all of
   them in one pass; prune each linear; re-run the now pruned block to produce the hidden states block l+1
   receives. So block l+1 is calibrated on the outputs of the *pruned* blocks 0..l, as in the references.

Two things make it cheaper than the references without changing the result:
- Linears reading the *same input tensor* (q/k/v; gate/up; GPT-2's fused c_attn is one linear anyway) share one
  statistics object: the Hessian of an input is computed once, not once per consumer. Groups are found by tensor
  identity in one forward of the first batch, once per block class.
- The statistics pass stops (private exception) as soon as the last statistics it needs are taken: the last
  group's own matmul and everything after it are not computed. Magnitude pruning needs no data at all and runs no
  forward.

true_sequential=True prunes the groups in the order the block calls them (q/k/v -> o -> gate/up -> down), each
group calibrated on the outputs of the block with the earlier groups already pruned. By default that takes one
forward per chunk, paused before each group until all chunks got there and the group is pruned
(run_block_staged): the statistics of every group and the re-run come from that single pass, bit-identical to one
statistics pass per group (each stopping at its group) plus a re-run (single_pass=False).

Hessians are accumulated on their upper block-triangle only (csrc/cpu/prune_stats.cpp); the re-run can run the
pruned 2:4 linears through sparsekern's own 2:4 GEMM (rerun_kernel="sparse" / "auto").

Large-model mode (offload=True): the model stays on the CPU; the embeddings (for the capture) and then one block
at a time are moved to `device`, the hidden states stay on `device`. GPU memory then needs one block plus the
calibration activations (nsamples x seqlen x hidden), not the model.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from .data import DataError, calibration_windows, check_seqlen, tokenize

METHODS = ("magnitude", "wanda", "sparsegpt")


class PipelineError(ValueError):
    """prune_model cannot run on this model or these arguments; the message names what and why."""


class _StopForward(Exception):
    """Raised by a hook to end a forward early once the information it needed is taken."""


# --------------------------------------------------------------------------------------------- model structure


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain nn.Module models
        return None
    return Conv1D


def is_prunable(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2 family; its weight is stored transposed, [in, out])."""
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def _is_conv1d(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a transposed view for Conv1D): the layout pruning expects,
    with the N:M groups along in_features (the GEMM reduction dimension)."""
    return module.weight.t() if _is_conv1d(module) else module.weight


def _set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    with torch.no_grad():
        weight_matrix(module).copy_(w.to(module.weight.dtype))


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (dotted name, ModuleList) of the model's decoder blocks.

    The blocks are the nn.ModuleList whose children are all of one class and each hold at least one prunable
    linear (the children are blocks, not linears themselves); among several (e.g. a list of experts inside each
    block), the one holding the most parameters. Raises PipelineError naming the model class when none exists.
    """
    best = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        children = list(mod)
        cls = type(children[0])
        if is_prunable(children[0]) or any(type(c) is not cls for c in children):
            continue
        if not all(any(is_prunable(m) for m in c.modules()) for c in children):
            continue
        nparams = sum(p.numel() for p in mod.parameters())
        key = (nparams, len(children))
        if best is None or key > best[0]:
            best = (key, name, mod)
    if best is None:
        raise PipelineError(
            f"no recognisable decoder layers in {type(model).__name__}: found no nn.ModuleList of repeated blocks "
            "containing nn.Linear / Conv1D (expected e.g. model.model.layers, model.model.decoder.layers or "
            "model.transformer.h)")
    return best[1], best[2]


def _matches(name: str, patterns: Iterable[str]) -> bool:
    # Same selection rule as sparsekern.convert.sparsify: equal, a dotted suffix, or an fnmatch glob.
    parts = name.split(".")
    suffixes = {".".join(parts[i:]) for i in range(len(parts))}
    return any(p in suffixes or fnmatch.fnmatchcase(name, p) for p in patterns)


def block_linears(layer: nn.Module) -> dict[str, nn.Module]:
    """Prunable linears of one block, by name relative to the block, in registration order."""
    return {n: m for n, m in layer.named_modules() if n and is_prunable(m)}


# --------------------------------------------------------------------------------------------- calibration data


def _as_calibration(calibration: Any, nsamples: int | None, seqlen: int | None, tokenizer: Any) -> torch.Tensor:
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


# --------------------------------------------------------------------------------------------- capture / replay


@dataclass
class _Chunk:
    """One batch of calibration sequences as block 0 sees it: hidden states [b, T, C] + the other arguments."""

    hidden: torch.Tensor
    args: tuple
    kwargs: dict


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _move_outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter/buffer of `model` not inside `layers` to `device` (in place: tied Parameters stay
    tied because Module._apply replaces .data, not the Parameter object)."""
    inside = {id(m) for m in layers.modules()}
    for m in model.modules():
        if id(m) not in inside:
            m._apply(lambda t: t.to(device), recurse=False)


def capture_block_inputs(model: nn.Module, layers: nn.ModuleList, ids: torch.Tensor, *, batch_size: int,
                         device: torch.device) -> list[_Chunk]:
    """Run `ids` (int64 [n, T]) through the model in batches and return what layers[0] receives for each batch.

    A forward pre-hook on layers[0] records its arguments and raises _StopForward, so only the embeddings (and
    whatever precedes block 0: rotary tables, the causal mask) are computed.
    """
    chunks: list[_Chunk] = []

    def record(_mod, args, kwargs):
        if args:
            hidden, rest = args[0], tuple(args[1:])
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        chunks.append(_Chunk(hidden.detach(), rest, dict(kwargs)))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(record, with_kwargs=True)
    try:
        for s in range(0, ids.shape[0], batch_size):
            batch = ids[s:s + batch_size].to(device)
            try:
                try:
                    model(input_ids=batch, use_cache=False)
                except TypeError:  # not a Hugging Face signature
                    model(batch)
            except _StopForward:
                continue
            raise PipelineError(f"{type(model).__name__}'s forward never called its first decoder block")
    finally:
        handle.remove()
    return chunks


def _run_block(layer: nn.Module, chunks: Sequence[_Chunk], hidden: Sequence[torch.Tensor],
               keep: bool) -> list[torch.Tensor] | None:
    """Run `layer` on every chunk (hidden states from `hidden`, other arguments as captured). Returns the output
    hidden states when `keep`; a _StopForward raised by a hook ends that chunk's forward quietly."""
    outs = [] if keep else None
    for chunk, h in zip(chunks, hidden):
        try:
            out = layer(h, *chunk.args, **chunk.kwargs)
        except _StopForward:
            if keep:
                raise RuntimeError("internal: a forward whose output is needed was stopped") from None
            continue
        if keep:
            outs.append((out[0] if isinstance(out, (tuple, list)) else out).detach())
    return outs


def discover_groups(layer: nn.Module, names: Sequence[str], chunk: _Chunk, hidden: torch.Tensor) -> list[list[str]]:
    """Group the block's linears `names` by the input tensor they receive, in call order.

    Linears fed the very same tensor object (q/k/v after the attention norm, gate/up after the MLP norm) share
    calibration statistics; the groups' order is the block's execution order, which is also the true-sequential
    order. Linears never called on this input are put last, each alone.
    """
    mods = block_linears(layer)
    seen: list[tuple[torch.Tensor, list[str]]] = []
    handles = []

    def hook_for(name):
        def hook(_mod, args):
            x = args[0]
            for t, group in seen:
                if t is x:
                    group.append(name)
                    return
            seen.append((x, [name]))
        return hook

    for n in names:
        handles.append(mods[n].register_forward_pre_hook(hook_for(n)))
    try:
        with torch.no_grad():
            _run_block(layer, [chunk], [hidden], keep=False)
    finally:
        for h in handles:
            h.remove()
    groups = [g for _, g in seen]
    called = {n for g in groups for n in g}
    return groups + [[n] for n in names if n not in called]


# --------------------------------------------------------------------------------------------- pruning


def _engine():
    from . import prune as engine  # the pruning engine (magnitude / wanda / sparsegpt, statistics)

    return engine


def _make_stats(method: str, in_features: int, device: torch.device):
    engine = _engine()
    if method == "sparsegpt":
        return engine.HessianStats(in_features, device)
    if method == "wanda":
        return engine.ActScaleStats(in_features, device)
    return None


def _prune_weight(method: str, w: torch.Tensor, stat: torch.Tensor | None, pattern, options: dict):
    engine = _engine()
    if method == "magnitude":
        return engine.magnitude(w, pattern)
    if method == "wanda":
        return engine.wanda(w, stat, pattern, use_variant=options.get("use_variant", False))
    return engine.sparsegpt(w, stat, pattern, blocksize=options.get("blocksize", 128),
                            percdamp=options.get("percdamp", 0.01), quant=options.get("quant"))


def collect_stats(layer: nn.Module, groups: Sequence[Sequence[str]], chunks: Sequence[_Chunk],
                  hidden: Sequence[torch.Tensor], method: str, device: torch.device) -> dict[str, Any]:
    """One pass of the block over all chunks, feeding one statistics object per group (keyed by the group's first
    linear) from forward pre-hooks; the pass stops right after the last group's statistics are taken."""
    mods = block_linears(layer)
    stats: dict[str, Any] = {}
    handles = []
    last = groups[-1][0]

    def hook_for(leader):
        def hook(_mod, args):
            stats[leader].add(args[0].detach())
            if leader == last:
                raise _StopForward  # nothing later in the block is needed for these statistics
        return hook

    for g in groups:
        leader = g[0]
        w = weight_matrix(mods[leader])
        stats[leader] = _make_stats(method, w.shape[1], device)
        handles.append(mods[leader].register_forward_pre_hook(hook_for(leader)))
    try:
        _run_block(layer, chunks, hidden, keep=False)
    finally:
        for h in handles:
            h.remove()
    return stats


RERUN_KERNELS = ("auto", "dense", "sparse")


def _fp32_rounding_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    # Worst-case rounding error of one float32 dot product of length K, for each output: K * 2^-24 * sum |x||w|
    # (Higham's gamma_K); two such results may differ by twice that.
    return 2 * w.shape[1] * 2.0 ** -24 * (x.abs().double() @ w.abs().double().t())


def _probe_sparse_rerun(w: torch.Tensor, rows: int, timer_reps: int = 3) -> dict:
    """Time F.linear against sparsekern's spmm_24 for one exactly 2:4 weight w [N, K] at `rows` input rows
    (float32 inputs from a seeded generator), and check that the two agree within float32 rounding.
    Returns {"dense_s", "sparse_s", "agree", "max_err_over_bound"}; min over `timer_reps` interleaved runs."""
    from .ops import core

    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, w.shape[1], generator=gen, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
    c = core.compress_24(w.detach().contiguous())
    yd = torch.nn.functional.linear(x, w)
    ys = core.sparse_linear(x, c)
    ratio = float(((ys.double() - yd.double()).abs() / _fp32_rounding_bound(x, w).clamp_min(1e-30)).max())
    dense, sparse = [], []
    for _ in range(timer_reps):
        t = time.perf_counter()
        torch.nn.functional.linear(x, w)
        dense.append(time.perf_counter() - t)
        t = time.perf_counter()
        core.sparse_linear(x, c)
        sparse.append(time.perf_counter() - t)
    return {"dense_s": min(dense), "sparse_s": min(sparse), "agree": ratio <= 1.0, "max_err_over_bound": ratio}


def _sparse_forward(compressed, bias, x):
    from .ops import core

    return core.sparse_linear(x, compressed, bias)


@contextlib.contextmanager
def _sparse_forwards(modules: Iterable[nn.Module]):
    """While active, the given linears (nn.Linear or Conv1D whose weight is exactly 2:4 along in_features) run
    through sparsekern's 2:4 GEMM on a compressed copy of their weight instead of their dense forward. The
    modules are not changed: an instance attribute `forward` shadows the class's and is removed on exit (forward
    hooks still fire, `module(x)` is unchanged for the caller)."""
    patched = []
    try:
        for m in modules:
            if "forward" in m.__dict__:
                continue  # someone else (e.g. accelerate) wraps this instance's forward: leave it dense
            from .ops import core

            c = core.compress_24(weight_matrix(m).detach().contiguous())
            m.forward = functools.partial(_sparse_forward, c, m.bias)
            patched.append(m)
        yield patched
    finally:
        for m in patched:
            del m.forward


class _AbortForward(Exception):
    """Raised inside a paused chunk forward to unwind it when the staged pass is abandoned (error or no output
    needed)."""


def _hidden_of(out) -> torch.Tensor:
    return (out[0] if isinstance(out, (tuple, list)) else out).detach()


def run_block_staged(layer: nn.Module, groups: Sequence[Sequence[str]], chunks: Sequence[_Chunk],
                     hidden: Sequence[torch.Tensor], method: str, device: torch.device, on_group,
                     keep: bool = True, context=contextlib.nullcontext) -> list[torch.Tensor] | None:
    """True-sequential calibration and re-run of one block in a single forward per chunk.

    True-sequential order wants group k's statistics from the block with groups 0..k-1 already pruned, and the
    next block's inputs from the fully pruned block. Both are what one forward computes if it can be *paused*
    right before each group's first linear until every chunk got there and the group is pruned: every chunk's
    forward runs in its own thread, and a forward pre-hook on each group's leader adds the chunk's input to the
    group's statistics and parks the thread. The calling thread advances the chunks one at a time (never two
    forwards at once, so each still gets all cores and the order of every floating-point operation is that of a
    plain forward), calls `on_group(k, stat)` once all chunks reached group k (or finished without calling it),
    and resumes them. The result is bit-identical to one statistics pass per group plus a re-run of the pruned
    block, at the cost of one forward instead of (groups + 1) partial ones.

    groups:  the block's linear groups in call order (discover_groups); on_group(k, stat) prunes groups[k]
             (stat: the group's statistics object, None for magnitude).
    context: a factory of context managers entered in every chunk thread (autocast is thread-local, so the
             caller's would not apply there).
    Returns the block's output hidden states per chunk when `keep`, else None (forwards still running after the
    last group are then abandoned). Memory: all chunks are paused mid-block at the same time, so their live
    intermediate tensors add up (about one block's activations over all calibration sequences).
    """
    mods = block_linears(layer)
    stats = [_make_stats(method, weight_matrix(mods[g[0]]).shape[1], device) for g in groups]
    n = len(chunks)
    stage = 0  # groups[:stage] are pruned
    go = [threading.Semaphore(0) for _ in range(n)]  # the calling thread lets chunk c run
    back = threading.Semaphore(0)  # chunk thread -> caller: paused, done or failed
    status: list[tuple | None] = [None] * n  # ("paused", k) | ("done", out) | ("aborted", None) | ("error", exc)
    abort = False
    local = threading.local()

    def hook_for(k):
        def hook(_mod, args):
            c = getattr(local, "chunk", None)
            if c is None or k < stage:
                return  # not a staged forward, or a group already pruned (data-dependent call order)
            if stats[k] is not None:
                stats[k].add(args[0].detach())
            status[c] = ("paused", k)
            back.release()
            go[c].acquire()
            if abort:
                raise _AbortForward
        return hook

    cuda_ctx = (lambda: torch.cuda.device(device)) if device.type == "cuda" else contextlib.nullcontext

    def worker(c):
        local.chunk = c
        go[c].acquire()
        try:
            if abort:
                raise _AbortForward
            # Grad mode, autocast and the current CUDA device are per thread.
            with torch.no_grad(), cuda_ctx(), context():
                out = layer(hidden[c], *chunks[c].args, **chunks[c].kwargs)
            status[c] = ("done", _hidden_of(out) if keep else None)
        except _AbortForward:
            status[c] = ("aborted", None)
        except BaseException as e:  # handed to the calling thread, which re-raises it
            status[c] = ("error", e)
        finally:
            back.release()

    def resume(c):
        go[c].release()
        back.acquire()
        if status[c][0] == "error":
            raise status[c][1]

    handles = [mods[g[0]].register_forward_pre_hook(hook_for(k)) for k, g in enumerate(groups)]
    threads = [threading.Thread(target=worker, args=(c,), name=f"sparsekern-chunk-{c}", daemon=True)
               for c in range(n)]
    for t in threads:
        t.start()
    try:
        for k in range(len(groups) + 1):
            stage = k
            if k == len(groups) and not keep:
                break  # every group is pruned and no output is needed: leave the rest unrun
            for c in range(n):
                st = status[c]
                # Not started yet, or parked at an earlier group: run it until it parks at group >= k or ends.
                if st is None or (st[0] == "paused" and st[1] < k):
                    resume(c)
            if k < len(groups):
                on_group(k, stats[k])
        return [status[c][1] for c in range(n)] if keep else None
    finally:
        abort = True
        for c in range(n):
            st = status[c]
            if st is None or st[0] == "paused":
                go[c].release()
                back.acquire()
        for t in threads:
            t.join()
        for h in handles:
            h.remove()


def _sparsity_of(w: torch.Tensor) -> float:
    return float((w == 0).sum()) / w.numel()


@dataclass
class LinearReport:
    """One pruned linear: full dotted name, weight shape [out, in], loss (SparseGPT's OBS loss; None when the
    method has none), fraction of zeros after pruning, seconds spent in the pruning engine."""

    layer: int
    name: str
    shape: tuple[int, int]
    loss: float | None
    sparsity: float
    seconds: float


@dataclass
class PruneReport:
    """What prune_model did. Times in seconds; `capture_seconds` covers running the calibration data up to
    block 0, `block_seconds[l]` all of block l (statistics pass, pruning, re-run)."""

    method: str
    pattern: str
    nsamples: int
    seqlen: int
    true_sequential: bool
    device: str
    offload: bool
    layers_path: str = ""
    linears: list[LinearReport] = field(default_factory=list)
    kept_dense: list[str] = field(default_factory=list)
    block_seconds: list[float] = field(default_factory=list)
    capture_seconds: float = 0.0
    total_seconds: float = 0.0
    # CPU time of this process (all threads) over the whole call: with wall time, it shows how much a run was
    # slowed down by other processes sharing the cores.
    cpu_seconds: float = 0.0
    calib_dtype: str = "model"
    single_pass: bool = True
    # Re-run kernel requested ("dense" | "sparse" | "auto") and, per weight shape "NxK dtype", the one used;
    # with "auto" also the probe that decided it (seconds per GEMM at batch_size x seqlen rows, agreement).
    rerun_kernel: str = "dense"
    rerun_choices: dict = field(default_factory=dict)
    rerun_probes: dict = field(default_factory=dict)

    @property
    def sparsity(self) -> float:
        """Zeros / weights over the pruned linears."""
        total = sum(r.shape[0] * r.shape[1] for r in self.linears)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.linears) / total if total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        return d

    def table(self, per_linear: bool = False) -> str:
        calib = (f"{self.nsamples} x {self.seqlen} calibration tokens" if self.nsamples
                 else "no calibration (data-free)")
        lines = [f"prune_model: {self.method} {self.pattern}, {calib}, "
                 f"true_sequential={self.true_sequential}, device={self.device}, calibration dtype "
                 f"{self.calib_dtype}"
                 + (" (offload)" if self.offload else ""),
                 f"  {len(self.linears)} linears pruned in {len(self.block_seconds)} blocks of {self.layers_path}, "
                 f"sparsity {100 * self.sparsity:.2f}%, kept dense: {len(self.kept_dense)}",
                 f"  time: capture {self.capture_seconds:.1f} s, blocks {sum(self.block_seconds):.1f} s, "
                 f"total {self.total_seconds:.1f} s (process CPU time {self.cpu_seconds:.1f} s)"]
        if per_linear:
            lines.append(f"  {'layer':>5}  {'linear':<40} {'shape':>12} {'loss':>12} {'sparsity':>8} {'s':>6}")
            for r in self.linears:
                loss = "-" if r.loss is None else f"{r.loss:.4g}"
                lines.append(f"  {r.layer:>5}  {r.name:<40} {r.shape[0]:>5}x{r.shape[1]:<6} {loss:>12} "
                             f"{100 * r.sparsity:>7.2f}% {r.seconds:>6.2f}")
        for name in self.kept_dense:
            lines.append(f"  kept dense: {name}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _check_pattern(pattern) -> str:
    """Validate with the engine's parser; returns the canonical text ("2:4", "0.5")."""
    from .prune import parse_pattern

    try:
        p = parse_pattern(pattern)
    except ValueError as e:
        raise PipelineError(f"pattern {pattern!r}: {e} (expected 'N:M' with N of every M weights pruned, e.g. "
                            "'2:4', or an unstructured sparsity in (0, 1) such as '0.5')") from None
    return f"{p.n}:{p.m}" if p.structured else f"{p.sparsity:g}"


def _engine_pattern(pattern: str):
    # The engine takes "n:m" strings and unstructured sparsity as a float.
    return pattern if ":" in pattern else float(pattern)


@torch.no_grad()
def prune_model(model: nn.Module, calibration: Any = None, *, method: str = "sparsegpt", pattern: str = "2:4",
                nsamples: int | None = None, seqlen: int | None = None, true_sequential: bool = False,
                include: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
                device: str | torch.device | None = None, offload: bool = False, skip: Iterable[str] = (),
                progress: bool = True, tokenizer: Any = None, batch_size: int = 8, blocksize: int = 128,
                percdamp: float = 0.01, quant: str | None = None, use_variant: bool = False,
                calib_dtype: torch.dtype | None = None, single_pass: bool = True,
                rerun_kernel: str = "dense") -> PruneReport:
    """Prune the linears of every decoder block of `model` in place, block after block (module docstring).

    model:       a causal LM (Hugging Face style; forward(input_ids=[B, T]) reaches the decoder blocks in order).
    calibration: int64 token ids [nsamples, seqlen]; a list of such 1-D rows; or a text (with `tokenizer`), cut
                 into the first nsamples consecutive windows of seqlen tokens (defaults 128 x 2048). Not needed
                 for method="magnitude".
    method:      "magnitude" | "wanda" | "sparsegpt".
    pattern:     "N:M" (N of every M consecutive weights along in_features pruned: "2:4", "4:8") or an
                 unstructured sparsity ("0.5").
    nsamples, seqlen: take the first nsamples rows / seqlen tokens of a tensor calibration (default: all).
    true_sequential: prune the block's linear groups in call order, each on inputs from the partly pruned block.
    include / exclude: name patterns (equal, dotted suffix or fnmatch glob of the full dotted name) selecting
                 which block linears are pruned; exclude wins. skip: full names kept dense (sensitivity).
    device:      where blocks run (default: where the model is); the model is moved there unless offload=True.
    offload:     keep the model on the CPU and move one block at a time to `device`.
    batch_size:  calibration sequences per block forward.
    blocksize, percdamp, quant: SparseGPT options (quant: joint quantisation, e.g. "int8"); use_variant: Wanda's
                 variant.
    calib_dtype: None (default: calibration forwards in the model's dtype, as the references) or a lower
                 precision (torch.bfloat16) for the block matmuls of the calibration forwards, under
                 torch.autocast: ~2.3x faster fp32->bf16 GEMMs on CPUs with AVX512-BF16 / AMX; the residual
                 stream, norms and statistics stay float32. An approximation: the statistics change slightly.
    single_pass: with true_sequential, compute every group's statistics and the re-run in one forward per
                 chunk, paused at each group until all chunks got there (run_block_staged): bit-identical to
                 one pass per group plus a re-run, ~2x less forward work; holds all chunks' in-flight
                 activations at once. False: one partial pass per group, then the re-run (less memory).
    rerun_kernel: how the re-run computes the block's just-pruned linears (pattern "2:4" only): "dense"
                 (their forward, as the references), "sparse" (sparsekern's 2:4 GEMM spmm_24 on a compressed
                 copy, for the re-run only; results equal within float32 rounding), or "auto" (per weight
                 shape, "sparse" when a probe at batch_size x seqlen rows finds it >= 5% faster and agreeing
                 within float32 rounding; CPU float32 forwards only, else "dense"). The model is not changed.
    Returns a PruneReport (per-linear losses, sparsity and times).
    """
    t_start, cpu_start = time.perf_counter(), time.process_time()
    if method not in METHODS:
        raise PipelineError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    pattern = _check_pattern(pattern)
    if batch_size < 1:
        raise PipelineError(f"batch_size ({batch_size}) must be >= 1")
    if quant is not None and method != "sparsegpt":
        raise PipelineError(f"quant={quant!r} (joint pruning + quantisation) needs method='sparsegpt', not {method!r}")
    layers_path, layers = find_decoder_layers(model)
    device = torch.device(device) if device is not None else _model_device(model)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    options = {"blocksize": blocksize, "percdamp": percdamp, "quant": quant, "use_variant": use_variant}
    if calib_dtype is not None and calib_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise PipelineError(f"calib_dtype {calib_dtype}: expected None, torch.float32, torch.bfloat16 or "
                            "torch.float16")

    def autocast():
        if calib_dtype is None or calib_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=calib_dtype)

    if rerun_kernel not in RERUN_KERNELS:
        raise PipelineError(f"rerun_kernel {rerun_kernel!r}: expected one of {', '.join(RERUN_KERNELS)}")
    if rerun_kernel == "sparse" and calib_dtype not in (None, torch.float32):
        raise PipelineError(f"rerun_kernel='sparse' runs the pruned linears in the weights' dtype; it cannot be "
                            f"combined with calib_dtype={calib_dtype} (autocast does not reach sparsekern's GEMM)")
    eng_pattern = _engine_pattern(pattern)

    calib = None
    if method != "magnitude":
        if calibration is None:
            raise PipelineError(f"method {method!r} needs calibration data (token ids [nsamples, seqlen] or a text)")
        calib = _as_calibration(calibration, nsamples, seqlen, tokenizer)
        check_seqlen(model, calib.shape[1])
    report = PruneReport(method=method, pattern=pattern, nsamples=0 if calib is None else calib.shape[0],
                         seqlen=0 if calib is None else calib.shape[1], true_sequential=true_sequential,
                         device=str(device), offload=offload, layers_path=layers_path,
                         calib_dtype="model" if calib_dtype is None else str(calib_dtype).removeprefix("torch."),
                         single_pass=bool(true_sequential and single_pass), rerun_kernel=rerun_kernel)

    skip = set(skip)
    selected: list[list[str]] = []
    for i, layer in enumerate(layers):
        names = []
        for rel in block_linears(layer):
            full = f"{layers_path}.{i}.{rel}"
            if (include is not None and not _matches(full, include)) or (exclude and _matches(full, exclude)) \
                    or full in skip:
                report.kept_dense.append(full)
            else:
                names.append(rel)
        selected.append(names)

    was_training = model.training
    model.eval()
    if not offload:
        model.to(device)
    chunks: list[_Chunk] = []
    if calib is not None:
        t0 = time.perf_counter()
        if offload:
            _move_outside_layers(model, layers, device)
        try:
            chunks = capture_block_inputs(model, layers, calib, batch_size=batch_size, device=device)
        finally:
            if offload:
                _move_outside_layers(model, layers, torch.device("cpu"))
        report.capture_seconds = time.perf_counter() - t0
    hidden = [c.hidden for c in chunks]

    bar = range(len(layers))
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(bar, desc=f"{method} {pattern}", unit="block")
    group_cache: dict[tuple, list[list[str]]] = {}
    rows_per_chunk = batch_size * (calib.shape[1] if calib is not None else 0)

    def use_sparse(m: nn.Module) -> bool:
        """Whether the re-run runs this (just pruned) linear through spmm_24; decided once per weight shape."""
        if rerun_kernel == "dense" or pattern != "2:4":
            return False
        w = weight_matrix(m)
        key = f"{w.shape[0]}x{w.shape[1]} {str(w.dtype).removeprefix('torch.')}"
        if key not in report.rerun_choices:
            if rerun_kernel == "sparse":
                report.rerun_choices[key] = "sparse"
            elif device.type != "cpu" or calib_dtype not in (None, torch.float32):
                report.rerun_choices[key] = "dense"  # auto measures CPU float forwards only
            else:
                probe = _probe_sparse_rerun(w.detach(), rows_per_chunk)
                # A 5% margin keeps timing noise from flipping the choice (and the last bits of the results).
                faster = probe["sparse_s"] < 0.95 * probe["dense_s"]
                report.rerun_choices[key] = "sparse" if faster and probe["agree"] else "dense"
                report.rerun_probes[key] = probe
        return report.rerun_choices[key] == "sparse"

    try:
        for i in bar:
            t_block = time.perf_counter()
            layer = layers[i]
            if offload:
                layer.to(device)
            names = selected[i]
            mods = block_linears(layer)
            rerun_done = False
            if names:
                if calib is None:
                    groups = [[n] for n in names]
                else:
                    key = (type(layer), tuple(names))
                    if key not in group_cache:
                        group_cache[key] = discover_groups(layer, names, chunks[0], hidden[0])
                    groups = group_cache[key]
                keep = calib is not None and i + 1 < len(layers)

                def prune_group(g, stat, i=i, mods=mods):
                    value = None if stat is None else stat.value
                    for n in g:
                        t0 = time.perf_counter()
                        w = weight_matrix(mods[n])
                        # The engine leaves its statistics untouched, so a group shares one object.
                        res = _prune_weight(method, w, value, eng_pattern, options)
                        _set_weight_matrix(mods[n], res.weight)
                        loss = getattr(res, "loss", None)
                        report.linears.append(LinearReport(
                            layer=i, name=f"{layers_path}.{i}.{n}", shape=tuple(w.shape),
                            loss=None if loss is None else float(loss.sum()), sparsity=_sparsity_of(w),
                            seconds=time.perf_counter() - t0))

                if calib is not None and true_sequential and single_pass:
                    # Statistics of each group and the re-run in one forward per chunk (run_block_staged).
                    with contextlib.ExitStack() as sparse_stack:
                        def on_group(k, stat):
                            prune_group(groups[k], stat)
                            if keep:  # the rest of the pass runs the just-pruned linears
                                sparse_stack.enter_context(_sparse_forwards(
                                    [mods[n] for n in groups[k] if use_sparse(mods[n])]))

                        out = run_block_staged(layer, groups, chunks, hidden, method, device, on_group, keep=keep,
                                               context=autocast)
                    if keep:
                        hidden = out
                    rerun_done = True
                else:
                    passes = [[g] for g in groups] if true_sequential else [groups]
                    for todo in passes:
                        with autocast():
                            stats = {} if calib is None else collect_stats(layer, todo, chunks, hidden, method,
                                                                           device)
                        for g in todo:
                            prune_group(g, stats.get(g[0]))
                        del stats
            if calib is not None and i + 1 < len(layers) and not rerun_done:
                # Block l+1's inputs come from the pruned block l.
                with autocast(), _sparse_forwards([m for n, m in mods.items() if n in names and use_sparse(m)]):
                    hidden = _run_block(layer, chunks, hidden, keep=True)
            if offload:
                layer.to("cpu")
            report.block_seconds.append(time.perf_counter() - t_block)
            if progress and report.linears and report.linears[-1].loss is not None:
                bar.set_postfix(loss=f"{report.linears[-1].loss:.3g}")
    finally:
        if progress:
            bar.close()
        model.train(was_training)
    report.total_seconds = time.perf_counter() - t_start
    report.cpu_seconds = time.process_time() - cpu_start
    return report
