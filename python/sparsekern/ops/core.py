"""Typed wrappers and fake (meta) kernels of the core N:M / 2:4 ops (schemas in csrc/registration.cpp).

Conventions (csrc/core/nm.h, docs/format.md): a weight W is [rows, cols] = [out_features, in_features]; N:M groups
run along the last dim (the GEMM reduction dim), aligned at column 0; "n:m" prunes n of every m. Among equal scores
the lower column index is kept. The portable 2:4 format is `Compressed24` (sparsekern.format).

Public functions: prune_nm, is_nm, nm_violation, compress_24, decompress_24, sparse_linear, quantize_per_token.
"""

from __future__ import annotations

import torch

from .. import _ext
from ..format import Compressed24

__all__ = [
    "prune_nm",
    "is_nm",
    "nm_violation",
    "compress_24",
    "decompress_24",
    "sparse_linear",
    "quantize_per_token",
]

ACTIVATIONS = ("none", "relu", "gelu")


def _ops():
    return torch.ops.sparsekern


# ----------------------------------------------------------------------------------------------------- wrappers
def prune_nm(w: torch.Tensor, n: int = 2, m: int = 4, scores: torch.Tensor | None = None):
    """N:M prune along the last dim: keep the (m - n) largest |w| (or `scores`) of every aligned group of m.

    w: float32/float64/float16/bfloat16, any shape [..., K] with K a multiple of m (treated as [-1, K]).
    scores: optional, w's shape and device, floating; larger = more important. Ties keep the lower index.
    NaN in w or scores raises (naming the first NaN's index); +-Inf is a legal, largest magnitude.
    Returns (pruned: w's dtype/shape, contiguous; mask: bool, w's shape, True = kept).
    """
    _ext.require("sparsekern.prune_nm")
    return _ops().prune_nm(w, int(n), int(m), scores)


def nm_violation(w: torch.Tensor, n: int = 2, m: int = 4) -> tuple[int, int] | None:
    """(row, group) of the first group of w (viewed as [-1, K], row-major) holding more than m - n non-zeros,
    or None when w is N:M. Any dtype; NaN counts as non-zero, -0.0 as zero."""
    _ext.require("sparsekern.nm_violation")
    r, g = _ops().nm_violation(w, int(n), int(m)).tolist()
    return None if r < 0 else (int(r), int(g))


def is_nm(w: torch.Tensor, n: int = 2, m: int = 4) -> bool:
    """True when every aligned group of m along w's last dim holds at most m - n non-zeros."""
    return nm_violation(w, n, m) is None


def compress_24(w: torch.Tensor) -> Compressed24:
    """Compress a 2:4 weight w [rows, cols] (cols % 4 == 0; float32/float64/float16/bfloat16/int8/float8) into the
    portable format. Raises naming the first (row, group) with more than two non-zeros; prune first."""
    _ext.require("sparsekern.compress_24")
    if w.dim() != 2:
        raise ValueError(f"compress_24: w must be 2-D [rows, cols] (got shape {list(w.shape)})")
    values, codes = _ops().compress_24(w)
    return Compressed24(values, codes, (w.shape[0], w.shape[1]))


def decompress_24(c: Compressed24) -> torch.Tensor:
    """Dense weight [rows, cols] of a Compressed24 (its dtype and device); exact inverse of compress_24."""
    _ext.require("sparsekern.decompress_24")
    return _ops().decompress_24(c.values, c.codes, c.shape[1])


def sparse_linear(
    x: torch.Tensor,
    c: Compressed24,
    bias: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    activation: str | None = None,
    out_dtype: torch.dtype | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = act(row_scale[:, None] * alpha[None, :] * (x @ W^T) + bias): F.linear on the decompressed weight W.

    x: [..., K] (any strides), dtype = W's dtype: float32/float16/bfloat16 (fp32 accumulation) or int8 (W8A8,
       exact int32 accumulation). Leading dims are flattened and restored: y is [..., N].
    c: Compressed24 of W [N, K] on x's device.
    bias, alpha: optional floating [N] (alpha = per-output-channel scale). row_scale: optional floating [M] with
       M = x.numel() / K (per-token scale, e.g. from quantize_per_token).
    activation: None/"none", "relu" or "gelu" (erf form, like F.gelu's default).
    out_dtype: default x's dtype (int32 for int8 x); floating inputs allow float32/float16/bfloat16, int8 inputs
       also int32/int8 (rounded half-to-even, saturated).
    On CPU this runs spmm_24 on the portable tensors. On CUDA it runs cslt_linear when `c` holds a cuSPARSELt
    buffer (Compressed24.to("cuda")), else spmm_24's CUDA kernel.
    """
    act = "none" if activation is None else activation
    if act not in ACTIVATIONS:
        raise ValueError(f"sparse_linear: activation must be one of None, 'relu', 'gelu' (got {activation!r})")
    rows, cols = c.shape
    if x.shape[-1] != cols:
        raise ValueError(f"sparse_linear: x's last dim ({x.shape[-1]}) must equal the weight's in_features ({cols})")
    if x.device != c.device:
        raise ValueError(f"sparse_linear: the weight is on {c.device} but x is on {x.device}; move one of them")
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), cols)
    if row_scale is not None and row_scale.numel() != x2.shape[0]:
        raise ValueError(f"sparse_linear: row_scale must hold one scale per row of x ({x2.shape[0]}), "
                         f"got {row_scale.numel()}")
    if row_scale is not None:
        row_scale = row_scale.reshape(-1)
    if x.device.type == "cuda" and c.cslt is not None:
        _ext.require_cuda("sparse_linear on CUDA")
        y = _ops().cslt_linear(x2, c.cslt, rows, cols, bias, alpha, row_scale, act, out_dtype)
    else:
        _ext.require("sparse_linear")
        y = _ops().spmm_24(x2, c.values, c.codes, bias, alpha, row_scale, act, out_dtype)
    return y.reshape(*lead, rows)


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype = torch.int8):
    """Symmetric per-row quantisation of x [M, K] (float32/float16/bfloat16, finite) to int8 or float8_e4m3fn.

    Returns (q [M, K] of `dtype`, scale float32 [M]) with x ~= q * scale[:, None]; scale = amax|x[m]| / qmax
    (qmax 127 or 448; 1 for an all-zero row), q = round-half-even(x / scale) clamped to [-qmax, qmax].
    """
    _ext.require("sparsekern.quantize_per_token")
    return _ops().quantize_per_token(x, dtype)


def _cslt_compress_or_none(c: Compressed24, required: bool, dense_fn=None):
    """The cuSPARSELt buffer of `c` (on CUDA), or None when this build or the shape does not allow one and it is
    not `required` (then the error says why)."""
    why = None
    multiple = 32 if c.dtype in (torch.int8, torch.float8_e4m3fn) else 16
    if not (_ext.available() and _ext.build_info().get("with_cuda")):
        why = "this sparsekern build has no CUDA/cuSPARSELt support"
    elif c.dtype not in (torch.float16, torch.bfloat16, torch.int8, torch.float8_e4m3fn):
        why = f"cuSPARSELt does not take {c.dtype} weights (float16, bfloat16, int8, float8_e4m3fn)"
    elif c.shape[0] % multiple or c.shape[1] % multiple:
        why = f"cuSPARSELt needs both weight dims to be multiples of {multiple} for {c.dtype} (shape {c.shape})"
    if why is not None:
        if required:
            raise ValueError(f"Compressed24.to(cslt=True): {why}")
        return None
    dense = dense_fn() if dense_fn is not None else c.decompress()
    return _ops().cslt_compress(dense)


# ----------------------------------------------------------------------------------------------------- fake kernels
def _out_dtype(x_dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return torch.int32 if x_dtype == torch.int8 else x_dtype


def _register_fakes() -> None:
    @torch.library.register_fake("sparsekern::prune_nm")
    def _(w, n, m, scores=None):
        return torch.empty_like(w, memory_format=torch.contiguous_format), torch.empty_like(
            w, dtype=torch.bool, memory_format=torch.contiguous_format)

    @torch.library.register_fake("sparsekern::nm_violation")
    def _(w, n, m):
        return w.new_empty((2,), dtype=torch.int64)

    @torch.library.register_fake("sparsekern::compress_24")
    def _(w):
        rows, cols = w.shape
        return w.new_empty((rows, cols // 2)), w.new_empty((rows, (cols // 4 + 1) // 2), dtype=torch.uint8)

    @torch.library.register_fake("sparsekern::decompress_24")
    def _(values, codes, cols):
        return values.new_empty((values.shape[0], cols))

    @torch.library.register_fake("sparsekern::spmm_24")
    def _(x, values, codes, bias=None, alpha=None, row_scale=None, activation="none", out_dtype=None):
        return x.new_empty((x.shape[0], values.shape[0]), dtype=_out_dtype(x.dtype, out_dtype))

    @torch.library.register_fake("sparsekern::quantize_per_token")
    def _(x, dtype):
        return x.new_empty(x.shape, dtype=dtype), x.new_empty((x.shape[0],), dtype=torch.float32)


if _ext.available():
    _register_fakes()
