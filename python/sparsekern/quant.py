"""W8A8 quantisation for SparseLinear: INT8 and FP8 (E4M3) weights per output channel, activations per token.

Scheme (the same for both formats):
  weight   w [N, K] (2:4 along K)  ->  q_w [N, K] int8 | float8_e4m3fn,  s_w float32 [N]
           symmetric, one scale per output channel (row) over its kept values: s_w[n] = max_k |w[n, k]| / QMAX,
           q_w = round(w / s_w[n]) clamped to [-QMAX, QMAX] (int8: QMAX = 127, -128 unused so the range is
           symmetric; fp8 e4m3: QMAX = 448 and the cast rounds to nearest). Pruned zeros stay exact zeros, so q_w
           is 2:4 with the same pattern (a kept value may round to 0: still 2:4). An all-zero row gets s_w = 1.
  input    x [M, K] -> q_x [M, K], s_x float32 [M], per token (row), by the fused op
           sparsekern::quantize_per_token at run time (dynamic quantisation, nothing to calibrate).
  matmul   y[m, n] = s_x[m] * s_w[n] * sum_k q_x[m, k] q_w[n, k] (+ bias[n]), int32 (int8) or fp32 (fp8) accumulate,
           with s_x passed as the kernel's row_scale and s_w as its per-channel alpha, so the scales are applied in
           the GEMM epilogue; y is returned in x's dtype.

Joint pruning + quantisation (sparsekern.prune.sparsegpt(..., quant="int8" | "fp8")) optimises the weight on exactly
this grid, with the scale fitted on the weight before pruning (fit_weight_scale). attach_weight_grid(module, quant,
scale) records that grid on the module (a plain attribute, never in the state dict) and SparseLinear.from_linear then
stores the weight's codes on the recorded scale (quantize_weight_on_grid) instead of fitting a new scale from the
final weight, so sparsify re-rounds nothing.

Support: int8 on the CPU and on CUDA sm80+; fp8 on CUDA sm89+ (FP8 tensor cores). On the CPU fp8 is emulated:
q_x and q_w are stored and rounded exactly as on the GPU, then widened to float32 for the CPU kernel (fp8 values are
exact in float32), so CPU results equal an fp8 GEMM with fp32 accumulation up to summation order.
"""

from __future__ import annotations

import torch

from ._modules import is_conv1d

QUANT_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}
_MIN_CAPABILITY = {"int8": (8, 0), "fp8": (8, 9)}


class QuantUnsupportedError(RuntimeError):
    """The requested quantisation cannot run on the target device/arch."""


def quant_dtype(quant: str) -> torch.dtype:
    """Storage dtype of a quant mode ("int8" -> torch.int8, "fp8" -> torch.float8_e4m3fn)."""
    if quant not in QUANT_DTYPES:
        raise ValueError(f"quant must be None, 'int8' or 'fp8'; got {quant!r}")
    return QUANT_DTYPES[quant]


def quant_of_dtype(dtype: torch.dtype) -> str | None:
    """Inverse of quant_dtype for a stored values dtype; None for an unquantised (float) weight."""
    for name, dt in QUANT_DTYPES.items():
        if dt == dtype:
            return name
    return None


def check_quant_supported(quant: str | None, device: torch.device | str) -> None:
    """Raise QuantUnsupportedError when `quant` cannot run on `device` (see the module doc for the rules)."""
    if quant is None:
        return
    quant_dtype(quant)
    device = torch.device(device)
    if device.type == "cpu":
        return  # int8 natively, fp8 emulated
    if device.type != "cuda":
        raise QuantUnsupportedError(f"quant={quant!r} is supported on cpu and cuda devices, not {device.type}")
    cap = torch.cuda.get_device_capability(device)
    need = _MIN_CAPABILITY[quant]
    if cap < need:
        name = torch.cuda.get_device_name(device)
        raise QuantUnsupportedError(
            f"quant={quant!r} needs a GPU of compute capability sm{need[0]}{need[1]} or newer"
            f"{' (FP8 tensor cores)' if quant == 'fp8' else ''}; {device} is sm{cap[0]}{cap[1]} ({name}). "
            f"Use quant={'int8' if quant == 'fp8' else None!r} or run on the CPU."
        )


def fit_weight_scale(w: torch.Tensor, quant: str) -> torch.Tensor:
    """The per-output-channel scale of the W8A8 weight grid: float32 [N], s[n] = max_k |w[n, k]| / QMAX[quant]
    (computed on w.float()), 1 for an all-zero row. quantize_weight fits exactly this; SparseGPT's joint quantisation
    fits it on the weight before pruning."""
    quant_dtype(quant)
    # max |w[n, k]| is exact in any dtype and float32 rounding is monotonic, so this is absmax(w.float()), without
    # a [N, K] temporary (the inf-norm reduces |w| on the fly).
    absmax = torch.linalg.vector_norm(w, ord=float("inf"), dim=1).float()
    return torch.where(absmax > 0, absmax / QMAX[quant], torch.ones_like(absmax))


def _codes(wf: torch.Tensor, scale: torch.Tensor, quant: str) -> torch.Tensor:
    """q = round(w / s) clamped to [-127, 127] (int8, half to even) | the e4m3 cast of clamp(w / s, -448, 448)."""
    r = wf / scale[:, None]
    if quant == "int8":
        return r.round().clamp_(-QMAX[quant], QMAX[quant]).to(QUANT_DTYPES[quant])
    return r.clamp_(-QMAX[quant], QMAX[quant]).to(QUANT_DTYPES[quant])


def quantize_weight(w: torch.Tensor, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantisation of a (2:4-pruned) weight.

    w: [N, K] floating (any float dtype; computed in float32). Returns (q [N, K] int8 | float8_e4m3fn,
    scale float32 [N]) with w ~= q.float() * scale[:, None]; zeros of w are zeros of q.
    """
    quant_dtype(quant)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight: w must be a 2-D floating tensor [N, K]; got {tuple(w.shape)} {w.dtype}")
    wf = w.float()
    if not torch.isfinite(wf).all():
        raise ValueError("quantize_weight: w holds NaN or Inf; a scale cannot be fitted")
    scale = fit_weight_scale(wf, quant)
    return _codes(wf, scale, quant), scale.contiguous()


def _check_grid_scale(scale, rows: int, where: str) -> None:
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or tuple(scale.shape) != (rows,):
        what = f"{scale.dtype} {list(scale.shape)}" if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"{where}: scale must be a floating tensor [out_features] = [{rows}] (one per output "
                         f"channel), got {what}")
    if rows and not bool(((scale > 0) & torch.isfinite(scale)).all()):
        raise ValueError(f"{where}: scale must be finite and > 0 in every row")


def quantize_weight_on_grid(w: torch.Tensor, quant: str,
                            scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The codes of w on a given grid (quant, scale) instead of a freshly fitted one.

    w: [N, K] floating; scale: floating [N] (used as float32, moved to w's device). Returns (q [N, K] int8 |
    float8_e4m3fn, scale float32 [N] contiguous, on_grid) with q computed as quantize_weight does but on `scale`:
    int8 q = clamp(round(w / s), -127, 127) (half to even), fp8 q = e4m3(clamp(w / s, -448, 448)).

    on_grid, the rule: dequantize_weight(q, scale) rounded to w's dtype equals w exactly, element for element (-0 ==
    +0). For a float32 w that is q * s == w exactly (the weight is a grid point and storing (q, s) loses nothing);
    for float16 / bfloat16 it says w is the grid point q * s (float32) rounded to w's dtype, which is what
    sparsegpt(..., quant=...) returns for such a weight: the codes are still the optimised ones (the dtype's
    rounding moves w / s by less than 0.5 for |q| <= 127), and q * s is the float32 value the optimisation chose.
    A weight changed after it was put on the grid (fine-tuning, a different scale) fails the rule.
    """
    quant_dtype(quant)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        what = f"{tuple(w.shape)} {w.dtype}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"quantize_weight_on_grid: w must be a 2-D floating tensor [N, K]; got {what}")
    _check_grid_scale(scale, w.shape[0], "quantize_weight_on_grid")
    scale = scale.detach().to(device=w.device, dtype=torch.float32).contiguous()
    q = _codes(w.detach().float(), scale, quant)
    on_grid = torch.equal(dequantize_weight(q, scale).to(w.dtype), w.detach())
    return q, scale, on_grid


WEIGHT_GRID_ATTR = "_sparsekern_weight_grid"


def attach_weight_grid(module: torch.nn.Module, quant: str | None, scale: torch.Tensor | None = None) -> None:
    """Record on `module` (nn.Linear / transformers Conv1D) the W8A8 grid its weight was optimised on.

    quant: "int8" | "fp8"; scale: floating [out_features] (stored as float32 on its own device, e.g. CPU or the
    weight's), typically sparsegpt's PruneResult.quant / .scale. quant=None removes the record.
    The record is the plain attribute `_sparsekern_weight_grid = (quant, scale)`: not a buffer, so it never enters
    the state dict and Module.to() does not move it (SparseLinear.from_linear moves the scale to the weight).
    SparseLinear.from_linear(module, quant=quant) (and so sparsify) stores the weight on this scale when the weight is
    still on it (quantize_weight_on_grid's rule), and warns and fits a fresh scale when it is not.
    """
    if quant is None:
        module.__dict__.pop(WEIGHT_GRID_ATTR, None)
        return
    quant_dtype(quant)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"attach_weight_grid: {type(module).__name__} has no 2-D weight")
    rows = weight.shape[1] if is_conv1d(module) else weight.shape[0]
    _check_grid_scale(scale, rows, "attach_weight_grid")
    setattr(module, WEIGHT_GRID_ATTR, (quant, scale.detach().float().contiguous()))


def weight_grid(module: torch.nn.Module) -> tuple[str, torch.Tensor] | None:
    """The (quant, scale float32 [out_features]) recorded by attach_weight_grid, or None."""
    return getattr(module, WEIGHT_GRID_ATTR, None)


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [N, K] int8 | fp8, scale float32 [N] -> float32 [N, K] = q * scale[:, None]."""
    return q.float() * scale.float()[:, None]


def quantize_activation(x: torch.Tensor, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantisation by the fused op: x [M, K] float -> (q [M, K], scale float32 [M])."""
    from .ops import core

    return core.quantize_per_token(x, quant_dtype(quant))
