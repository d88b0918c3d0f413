"""PruneConfig: every option of prune_model in one dataclass, validated in one place.

    cfg = PruneConfig(method="wanda", pattern="2:4", true_sequential=True)
    report = sparsekern.prune_model(model, calib, cfg)
    report = sparsekern.prune_model(model, calib, method="wanda", pattern="2:4")   # the same, keyword form

Each rule is checked when the config is built (also by dataclasses.replace), before the model is touched, and
a broken rule raises PipelineError naming the field and the rule. Rules that need the model or the calibration
data (decoder blocks found, seqlen within the model's positions, enough calibration rows) are checked by
prune_model itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from .errors import PipelineError

METHODS = ("magnitude", "wanda", "sparsegpt", "admm")
REFITS = (None, "admm")
RERUN_KERNELS = ("auto", "dense", "sparse")
CALIB_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def check_pattern(pattern) -> str:
    """Validate with the engine's parser; returns the canonical text ("2:4", "0.5")."""
    from ..prune import parse_pattern

    try:
        p = parse_pattern(pattern)
    except ValueError as e:
        raise PipelineError(f"pattern {pattern!r}: {e} (expected 'N:M' with N of every M weights pruned, e.g. "
                            "'2:4', or an unstructured sparsity in (0, 1) such as '0.5')") from None
    return f"{p.n}:{p.m}" if p.structured else f"{p.sparsity:g}"


def engine_pattern(pattern: str):
    """The engine takes "n:m" strings and unstructured sparsity as a float."""
    return pattern if ":" in pattern else float(pattern)


def _names(value: Iterable[str] | str | None) -> tuple[str, ...] | None:
    # A single string is one pattern (as in sparsify), not a sequence of one-letter patterns.
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


@dataclass(frozen=True)
class PruneConfig:
    """How prune_model prunes (see prune_model for the calibration data and the model).

    method:      "magnitude" | "wanda" | "sparsegpt" | "admm" (ADMM with a gradually chosen mask, Boza 2024: the mask
                 and the least-squares weights in one solve; prune.refit.admm_gradual).
    refit:       None | "admm": after the method chose its mask, replace the kept weights by the least-squares
                 solution on that mask (prune.refit: ADMM + conjugate gradients on the layer's Hessian). Any
                 method; magnitude and Wanda then collect the Hessian too (their masks are unchanged).
    permute:     False; True (every linear of the blocks whose input channels can be permuted for free: the
                 MLP's down projection, the attention's output projection; pipeline/permute.py); or name patterns
                 (as include) of such linears. Before pruning such a linear, its input channels are reordered so
                 that the important weights fall into different N:M groups (prune.permute.search_permutation on
                 Wanda's |W| * sqrt(act_scale); |W| for magnitude), and the same permutation is applied to the rows
                 of the linears producing its input (gate/up, v): the dense model computes the same function. N:M
                 patterns only; with true_sequential it needs single_pass=False. A named linear that cannot fold
                 a permutation is refused before the model is touched. The permutations are in the report.
    permute_seconds: time budget of each permutation search (seconds).
    refit_iters, refit_cg_iters, refit_percdamp: ADMM iterations, CG iterations, ridge damping (fraction of diag(H))
                 of refit; method="admm" runs refit_gradual_iters ADMM iterations that choose the mask, then the
                 same refit_iters + refit_cg_iters on the final mask.
    pattern:     "N:M" (N of every M consecutive weights along in_features pruned: "2:4", "4:8") or an
                 unstructured sparsity ("0.5"); stored in canonical form ("2:4", "0.5").
    nsamples, seqlen: take the first nsamples rows / seqlen tokens of a tensor calibration (default: all; for a
                 text, 128 x 2048).
    true_sequential: prune the block's linear groups in call order, each on inputs from the partly pruned block.
    include / exclude: name patterns (equal, dotted suffix or fnmatch glob of the full dotted name; a single
                 string is one pattern) selecting which block linears are pruned; exclude wins.
    skip:        full names kept dense (e.g. from a sensitivity scan).
    device:      where blocks run (default: where the model is); the model is moved there unless offload=True.
    offload:     keep the model on the CPU and move one block at a time to `device`.
    progress:    show a progress bar (tqdm) over the blocks.
    tokenizer:   turns a text calibration into token ids.
    batch_size:  calibration sequences per block forward.
    blocksize, percdamp, quant: SparseGPT options (quant: joint quantisation, e.g. "int8").
    use_variant: Wanda's variant.
    calib_dtype: None (default: calibration forwards in the model's dtype, as the references) or a lower
                 precision (torch.bfloat16, torch.float16) for the block matmuls of the calibration forwards, under
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
    distributed: None (default) -- when torch.distributed's default process group is initialised with more than
                 one rank (torchrun), prune across its ranks (pipeline/dist.py: calibration batches split, statistics
                 added in rank order, linears dealt to ranks and broadcast; every rank must call prune_model with
                 the same model, options and calibration); False -- this process alone even then; True -- require
                 such a group.
    """

    method: str = "sparsegpt"
    pattern: str = "2:4"
    nsamples: int | None = None
    seqlen: int | None = None
    true_sequential: bool = False
    include: Iterable[str] | None = None
    exclude: Iterable[str] | None = None
    device: str | torch.device | None = None
    offload: bool = False
    skip: Iterable[str] = ()
    progress: bool = True
    tokenizer: Any = field(default=None, repr=False, compare=False)
    batch_size: int = 8
    blocksize: int = 128
    percdamp: float = 0.01
    quant: str | None = None
    use_variant: bool = False
    calib_dtype: torch.dtype | None = None
    single_pass: bool = True
    rerun_kernel: str = "dense"
    refit: str | None = None
    refit_iters: int = 20
    refit_cg_iters: int = 10
    refit_percdamp: float = 0.01
    refit_gradual_iters: int = 30
    permute: bool | Iterable[str] = False
    permute_seconds: float = 1.0
    distributed: bool | None = None

    def __post_init__(self) -> None:
        def set_(name, value):  # frozen: the normalised values are set once, here
            object.__setattr__(self, name, value)

        if self.method not in METHODS:
            raise PipelineError(f"method {self.method!r}: expected one of {', '.join(METHODS)}")
        set_("pattern", check_pattern(self.pattern))
        for name in ("nsamples", "seqlen"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise PipelineError(f"{name} ({value}) must be None (all) or >= 1")
        if self.batch_size < 1:
            raise PipelineError(f"batch_size ({self.batch_size}) must be >= 1")
        self._check_method_options()
        if self.permute is not False and self.permute is not None:
            if ":" not in self.pattern:
                raise PipelineError(f"permute needs an N:M pattern (the permutation regroups input channels into "
                                    f"groups of M); pattern {self.pattern} is unstructured")
            if self.true_sequential and self.single_pass:
                raise PipelineError("permute with true_sequential=True needs single_pass=False (the single paused "
                                    "pass has computed the permuted linear's inputs in the old channel order)")
            if not self.permute_seconds > 0:
                raise PipelineError(f"permute_seconds ({self.permute_seconds!r}) must be > 0")
            if self.permute is not True:
                set_("permute", _names(self.permute))
        else:
            set_("permute", False)
        set_("include", _names(self.include))
        set_("exclude", _names(self.exclude))
        set_("skip", _names(self.skip))
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as e:
                raise PipelineError(f"device {self.device!r}: {e}") from None
        self._check_kernels()
        if self.distributed not in (None, True, False):
            raise PipelineError(f"distributed ({self.distributed!r}) must be None (automatic), True or False")

    def _check_method_options(self) -> None:
        if self.refit not in REFITS:
            raise PipelineError(f"refit {self.refit!r}: expected None or 'admm'")
        if self.method == "admm" and self.refit is not None:
            raise PipelineError("method='admm' already solves the least-squares weights on its mask; refit must be "
                                f"None, not {self.refit!r}")
        for name in ("refit_iters", "refit_cg_iters", "refit_gradual_iters"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise PipelineError(f"{name} ({v!r}) must be an int >= 0")
        if self.uses_refit and self.refit_iters + self.refit_cg_iters < 1:
            raise PipelineError("refit_iters + refit_cg_iters must be >= 1")
        if self.method == "admm" and self.refit_gradual_iters < 1:
            raise PipelineError(f"refit_gradual_iters ({self.refit_gradual_iters}) must be >= 1 for method='admm'")
        if not (isinstance(self.refit_percdamp, (int, float)) and self.refit_percdamp > 0):
            raise PipelineError(f"refit_percdamp ({self.refit_percdamp!r}) must be > 0")
        if self.quant is not None and self.method != "sparsegpt":
            raise PipelineError(f"quant={self.quant!r} (joint pruning + quantisation) needs method='sparsegpt', not "
                                f"{self.method!r}")
        if self.method != "sparsegpt":
            return
        # The engine checks these too, but only when the first linear is pruned, after the capture.
        if not isinstance(self.blocksize, int) or isinstance(self.blocksize, bool) or self.blocksize < 1:
            raise PipelineError(f"blocksize ({self.blocksize!r}) must be a positive int")
        m = int(self.pattern.split(":")[1]) if ":" in self.pattern else 1
        if self.blocksize % m:
            raise PipelineError(f"blocksize ({self.blocksize}) must be a multiple of m = {m} for pattern "
                                f"{self.pattern}")
        if not self.percdamp > 0:
            raise PipelineError(f"percdamp ({self.percdamp!r}) must be > 0")

    def _check_kernels(self) -> None:
        if self.calib_dtype not in CALIB_DTYPES:
            raise PipelineError(f"calib_dtype {self.calib_dtype}: expected None, torch.float32, torch.bfloat16 or "
                                "torch.float16")
        if self.rerun_kernel not in RERUN_KERNELS:
            raise PipelineError(f"rerun_kernel {self.rerun_kernel!r}: expected one of {', '.join(RERUN_KERNELS)}")
        if self.rerun_kernel == "sparse" and self.calib_dtype not in (None, torch.float32):
            raise PipelineError(f"rerun_kernel='sparse' runs the pruned linears in the weights' dtype; it cannot be "
                                f"combined with calib_dtype={self.calib_dtype} (autocast does not reach sparsekern's "
                                "GEMM)")

    @property
    def uses_refit(self) -> bool:
        """The least-squares solve runs: refit="admm", or method="admm"."""
        return self.refit is not None or self.method == "admm"

    @property
    def needs_data(self) -> bool:
        """Calibration data is needed: every method but magnitude, and magnitude with a refit."""
        return self.method != "magnitude" or self.uses_refit

    @property
    def stats_method(self) -> str:
        """What make_stats collects per group: the method's statistics, plus the Hessian for a refit."""
        return self.method if self.refit is None else f"{self.method}+hessian"

    @property
    def refit_options(self) -> dict:
        return {"iters": self.refit_iters, "cg_iters": self.refit_cg_iters, "percdamp": self.refit_percdamp,
                "gradual_iters": self.refit_gradual_iters}

    @property
    def calib_dtype_name(self) -> str:
        """"model" (the model's own dtype) or the autocast dtype without "torch." ("bfloat16")."""
        return "model" if self.calib_dtype is None else str(self.calib_dtype).removeprefix("torch.")

    @property
    def engine_options(self) -> dict:
        """The method options the pruning engine takes (sparsegpt: blocksize, percdamp, quant; wanda: use_variant)."""
        return {"blocksize": self.blocksize, "percdamp": self.percdamp, "quant": self.quant,
                "use_variant": self.use_variant}


FIELDS = tuple(f.name for f in dataclasses.fields(PruneConfig))


def make_config(config: PruneConfig | None, options: Mapping[str, Any], caller: str = "prune_model") -> PruneConfig:
    """The PruneConfig of a call: `config` (default PruneConfig()) with the keyword `options` replacing its fields.
    An unknown option is a TypeError, as for any Python function."""
    for name in options:
        if name not in FIELDS:
            raise TypeError(f"{caller}() got an unexpected keyword argument {name!r}")
    if config is None:
        return PruneConfig(**options)
    if not isinstance(config, PruneConfig):
        raise TypeError(f"{caller}(): config must be a PruneConfig or None, got {type(config).__name__} (the options "
                        "are keyword arguments: method=..., pattern=...)")
    return dataclasses.replace(config, **options) if options else config


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16, which every AMX CPU has): bf16 autocast then
    makes the calibration forwards' GEMMs ~2x faster than float32; without it, slower."""
    from .. import _ext

    if not _ext.available():
        return False
    return bool(dict(_ext._C.cpu_features()).get("avx512_bf16", False))


def auto_calib_dtype(device: torch.device | str, model_dtype: torch.dtype) -> torch.dtype | None:
    """`sparsekern prune --calib-dtype auto` (its default): bfloat16 autocast for a float32 model's calibration
    forwards on a CPU with native bf16 (native_bf16_cpu), the model's dtype (None) everywhere else."""
    if torch.device(device).type == "cpu" and model_dtype == torch.float32 and native_bf16_cpu():
        return torch.bfloat16
    return None


def calibration_autocast(calib_dtype: torch.dtype | None, device: torch.device):
    """The context the calibration forwards run in: nothing for the model's dtype, else torch.autocast."""
    if calib_dtype is None or calib_dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=calib_dtype)
