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

Support: int8 on the CPU and on CUDA sm80+; fp8 on CUDA sm89+ (FP8 tensor cores). On the CPU fp8 is emulated:
q_x and q_w are stored and rounded exactly as on the GPU, then widened to float32 for the CPU kernel (fp8 values are
exact in float32), so CPU results equal an fp8 GEMM with fp32 accumulation up to summation order.
"""

from __future__ import annotations

import torch

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


def quantize_weight(w: torch.Tensor, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantisation of a (2:4-pruned) weight.

    w: [N, K] floating (any float dtype; computed in float32). Returns (q [N, K] int8 | float8_e4m3fn,
    scale float32 [N]) with w ~= q.float() * scale[:, None]; zeros of w are zeros of q.
    """
    qdt = quant_dtype(quant)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight: w must be a 2-D floating tensor [N, K]; got {tuple(w.shape)} {w.dtype}")
    wf = w.float()
    if not torch.isfinite(wf).all():
        raise ValueError("quantize_weight: w holds NaN or Inf; a scale cannot be fitted")
    absmax = wf.abs().amax(dim=1)
    scale = torch.where(absmax > 0, absmax / QMAX[quant], torch.ones_like(absmax))
    r = wf / scale[:, None]
    if quant == "int8":
        q = r.round().clamp_(-QMAX[quant], QMAX[quant]).to(qdt)
    else:
        q = r.clamp_(-QMAX[quant], QMAX[quant]).to(qdt)
    return q, scale.contiguous()


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [N, K] int8 | fp8, scale float32 [N] -> float32 [N, K] = q * scale[:, None]."""
    return q.float() * scale.float()[:, None]


def quantize_activation(x: torch.Tensor, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric quantisation by the fused op: x [M, K] float -> (q [M, K], scale float32 [M])."""
    from .ops import core

    return core.quantize_per_token(x, quant_dtype(quant))
