"""Typed wrappers and fake (meta) kernels of the core N:M / 2:4 ops (schemas in csrc/registration.cpp).

One wrapper per op, named like the op, taking and returning plain tensors; the portable 2:4 weight type built on
them is sparsekern.weight.Sparse24Weight (this layer imports nothing from the layers above it).

Conventions (csrc/core/nm.h, docs/format.md): a weight W is [rows, cols] = [out_features, in_features]; N:M groups
run along the last dim (the GEMM reduction dim), aligned at column 0; "n:m" prunes n of every m. Among equal scores
the lower column index is kept.

Public functions: prune_nm, nm_violation, is_nm, compress_24, decompress_24, spmm_24, quantize_per_token.
"""

from __future__ import annotations

import torch

from .. import _ext

__all__ = [
    "ACTIVATIONS",
    "check_activation",
    "prune_nm",
    "is_nm",
    "nm_violation",
    "compress_24",
    "decompress_24",
    "spmm_24",
    "quantize_per_token",
]

# The fused epilogue activations every GEMM op takes (csrc/registration.cpp documents the same list).
ACTIVATIONS = ("none", "relu", "gelu")


def check_activation(op: str, activation: str | None) -> str:
    """The canonical activation name ("none" for None), or ValueError naming `op` and the allowed names."""
    act = "none" if activation is None else activation
    if act not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be one of None, 'relu', 'gelu' (got {activation!r})")
    return act


def check_same_device(op: str, **tensors: torch.Tensor | None) -> None:
    """Every given tensor on one device (meta only when all are meta), else ValueError naming both."""
    first_name, first = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        if first is None:
            first_name, first = name, t
        elif t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; all tensors "
                             "must be on one device")


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
    check_same_device("prune_nm", w=w, scores=scores)
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


def compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable 2:4 tensors of a 2:4 weight w [rows, cols] (cols % 4 == 0; float32/float64/float16/bfloat16/int8/
    float8): (values [rows, cols/2] of w's dtype, codes uint8 [rows, ceil(cols/8)]). Raises naming the first
    (row, group) with more than two non-zeros. sparsekern.compress_24 wraps the result in a Sparse24Weight."""
    _ext.require("sparsekern.compress_24")
    if w.dim() != 2:
        raise ValueError(f"compress_24: w must be 2-D [rows, cols] (got shape {list(w.shape)})")
    return _ops().compress_24(w)


def decompress_24(values: torch.Tensor, codes: torch.Tensor, cols: int) -> torch.Tensor:
    """Dense weight [rows, cols] (values' dtype and device) of the portable tensors; exact inverse of compress_24.
    Refuses invalid pattern codes, naming the row and group."""
    _ext.require("sparsekern.decompress_24")
    check_same_device("decompress_24", values=values, codes=codes)
    return _ops().decompress_24(values, codes, int(cols))


def spmm_24(x: torch.Tensor, values: torch.Tensor, codes: torch.Tensor, bias: torch.Tensor | None = None,
            alpha: torch.Tensor | None = None, row_scale: torch.Tensor | None = None, activation: str | None = None,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y [M, N] = act(row_scale[:, None] * alpha[None, :] * (x @ W^T) + bias), W [N, K] given by its portable tensors.

    x: [M, K], W's dtype (float32/float16/bfloat16: fp32 accumulation; int8: exact int32 accumulation).
    values [N, K/2], codes uint8 [N, ceil(K/8)]: the weight (sparsekern.weight documents the format).
    bias, alpha: optional floating [N]; row_scale: optional floating [M]; all on x's device.
    activation: None/"none", "relu", "gelu" (erf form). out_dtype: default x's dtype (int32 for int8 x).
    The codes are trusted, not re-validated: checking them costs a pass over the whole codes tensor per call (a
    decode step's weight read again), and on CUDA a host synchronisation. They are validated once where compressed
    data enters the library: Sparse24Weight's constructor (and so sparsekern.sparse_linear, SparseLinear, every
    checkpoint loader). With an invalid code the result is unspecified (it differs between kernels); call
    sparsekern.weight.codes_violation(codes, K) first when the codes come from elsewhere.
    """
    act = check_activation("spmm_24", activation)
    _ext.require("sparse_linear")
    check_same_device("spmm_24", x=x, values=values, codes=codes, bias=bias, alpha=alpha, row_scale=row_scale)
    return _ops().spmm_24(x, values, codes, bias, alpha, row_scale, act, out_dtype)


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype = torch.int8):
    """Symmetric per-row quantisation of x [M, K] (float32/float16/bfloat16, finite) to int8 or float8_e4m3fn.

    Returns (q [M, K] of `dtype`, scale float32 [M]) with x ~= q * scale[:, None]; scale = max(amax|x[m]| / qmax,
    2^-149) (qmax 127 or 448; 2^-149, the smallest positive float, keeps a denormal row's scale from underflowing to
    0; 1 for an all-zero row), q = round-half-even(x / scale) clamped to [-qmax, qmax].
    """
    _ext.require("sparsekern.quantize_per_token")
    return _ops().quantize_per_token(x, dtype)


# ----------------------------------------------------------------------------------------------------- fake kernels
def _out_dtype(x_dtype: torch.dtype, out_dtype: torch.dtype | None) -> torch.dtype:
    if out_dtype is not None:
        return out_dtype
    return torch.int32 if x_dtype == torch.int8 else x_dtype


def _register_fakes() -> None:
    # Each fake kernel first checks that its tensors share one device: the dispatcher sends a call that mixes real
    # and meta tensors to these fakes, which would otherwise return uninitialised memory as the answer.
    @torch.library.register_fake("sparsekern::prune_nm")
    def _(w, n, m, scores=None):
        check_same_device("prune_nm", w=w, scores=scores)
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
        check_same_device("decompress_24", values=values, codes=codes)
        return values.new_empty((values.shape[0], cols))

    @torch.library.register_fake("sparsekern::spmm_24")
    def _(x, values, codes, bias=None, alpha=None, row_scale=None, activation="none", out_dtype=None):
        check_same_device("spmm_24", x=x, values=values, codes=codes, bias=bias, alpha=alpha, row_scale=row_scale)
        return x.new_empty((x.shape[0], values.shape[0]), dtype=_out_dtype(x.dtype, out_dtype))

    @torch.library.register_fake("sparsekern::quantize_per_token")
    def _(x, dtype):
        return x.new_empty(x.shape, dtype=dtype), x.new_empty((x.shape[0],), dtype=torch.float32)


if _ext.available():
    _register_fakes()
