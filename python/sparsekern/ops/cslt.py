"""cuSPARSELt on CUDA: typed wrappers and fake kernels of ``sparsekern::cslt_compress`` / ``sparsekern::cslt_linear``,
algorithm search with JSON persistence, and the plan-cache statistics.

The layout, constraints and cache design are documented in docs/cusparselt.md. In short:

* ``cslt_compress(w)`` turns a 2:4 weight ``w [n, k]`` (float16 / bfloat16 / int8 / float8_e4m3fn, CUDA, row-major) into
  cuSPARSELt's opaque buffer: a 1-D uint8 tensor of ``compressed_nbytes(n, k, w.dtype)`` bytes, valid only on GPUs
  of the architecture it was made on (keep the portable 2:4 form for storage).
* ``cslt_linear(x, c, n, k, ...)`` computes ``y = act(row_scale[:, None] * alpha[None, :] * (x @ W^T) + bias)`` with
  ``x [..., k]`` and returns ``y [..., n]`` (``F.linear`` semantics on the weight that was compressed).
* Shape rules (cuSPARSELt's): ``n`` and ``k`` multiples of 16 for float16 / bfloat16, of 32 for int8 / float8; any
  number of tokens ``M`` (padded internally to 8 / 16 rows, never returned). The numbers live once, in the C++ header
  csrc/core/cslt_shape.h that the op's own checks use; ``structured_multiple`` reads them from the extension, and
  ``shape_supported`` / ``unsupported_reason`` are the one Python statement of the rule.
* A steady-state call builds nothing on the host: descriptors, plan and workspace are cached per configuration
  (``cache_stats()`` counts their creations). Warm up a shape once before capturing it in a CUDA graph.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, Optional

import torch

from .. import _ext
from .._fsutil import atomic_write_text
from .core import ACTIVATIONS as _ACTIVATIONS
from .core import check_same_device

__all__ = [
    "cslt_compress",
    "cslt_linear",
    "cslt_linear_2d",
    "structured_multiple",
    "shape_supported",
    "unsupported_reason",
    "capability_reason",
    "buffer_tag",
    "search",
    "compressed_nbytes",
    "formula_nbytes",
    "cache_stats",
    "clear_cache",
    "search_results",
    "clear_search_results",
    "save_search_results",
    "load_search_results",
    "runtime_version",
]

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.int8, torch.float8_e4m3fn)
_EIGHT_BIT = (torch.int8, torch.float8_e4m3fn)
_FLOAT_OUT = (torch.float16, torch.bfloat16, torch.float32)
_SEARCH_FORMAT = "sparsekern-cslt-search"
_SEARCH_FORMAT_VERSION = 1


def structured_multiple(dtype: torch.dtype) -> int:
    """Multiple cuSPARSELt requires of the structured operand's dims (n and k): 32 for 8-bit types, 16 for 16-bit
    ones (csrc/core/cslt_shape.h, read through the extension so Python and C++ cannot disagree); 0 for a dtype
    cuSPARSELt does not take."""
    if dtype not in _INPUT_DTYPES:
        return 0
    return int(_ext.cslt_structured_multiple(dtype.itemsize))


def unsupported_reason(n: int, k: int, dtype: torch.dtype) -> str | None:
    """Why a 2:4 weight [n, k] of `dtype` cannot be a cuSPARSELt operand in this build (None when it can)."""
    if not (_ext.available() and _ext.build_info().get("with_cuda")):
        return "this sparsekern build has no CUDA/cuSPARSELt support"
    if dtype not in _INPUT_DTYPES:
        return f"cuSPARSELt does not take {dtype} weights (float16, bfloat16, int8, float8_e4m3fn)"
    mult = structured_multiple(dtype)
    if n <= 0 or k <= 0 or n % mult or k % mult:
        return f"cuSPARSELt needs both weight dims to be multiples of {mult} for {dtype} (shape {(n, k)})"
    return None


def capability_reason(capability: tuple[int, int], dtype: torch.dtype) -> str | None:
    """Why a GPU of compute `capability` (major, minor) cannot run cuSPARSELt on `dtype` (None when it can):
    cuSPARSELt's sparse tensor cores need sm80+, its float8 kernels sm89+. Checked before any cuSPARSELt state is
    built, so a T4 / V100 falls back to the portable-format kernels instead of failing."""
    major, minor = (int(v) for v in capability)
    if (major, minor) < (8, 0):
        return f"cuSPARSELt needs a GPU of compute capability 8.0 or newer (this one is sm{major}{minor})"
    if dtype == torch.float8_e4m3fn and (major, minor) < (8, 9):
        return f"cuSPARSELt's float8 kernels need compute capability 8.9 or newer (this GPU is sm{major}{minor})"
    return None


def shape_supported(n: int, k: int, dtype: torch.dtype) -> bool:
    """cuSPARSELt's rule for the structured operand: dtype it takes, n and k positive multiples of
    structured_multiple(dtype). (Says nothing about whether this build has CUDA.)"""
    mult = structured_multiple(dtype) if _ext.available() else 0
    return mult > 0 and n > 0 and k > 0 and n % mult == 0 and k % mult == 0


def buffer_tag(device: torch.device | str) -> tuple:
    """What a cuSPARSELt buffer made on `device` is valid for: (device, "sm<maj><min>", cuSPARSELt version). A
    buffer whose tag differs from the current device's must be rebuilt from the portable tensors."""
    device = torch.device(device)
    if device.type != "cuda":
        return (str(device), device.type, None)
    major, minor = torch.cuda.get_device_capability(device)
    version = str(_ext._C.cslt_version()) if _ext.available() and _ext.build_info().get("with_cuda") else None
    return (str(device), f"sm{major}{minor}", version)


def formula_nbytes(n: int, k: int, dtype: torch.dtype) -> int:
    """The kept values plus 2 bits of metadata each: 9/16 of the dense bytes for 16-bit dtypes, 10/16 for 8-bit
    ones. A lower bound of what cuSPARSELt allocates (it pads small matrices: 384 bytes for an 8x16 fp16 matrix)."""
    return n * k * 10 // 16 if dtype in _EIGHT_BIT else n * k * 2 * 9 // 16


@functools.lru_cache(maxsize=4096)
def _queried_nbytes(n: int, k: int, dtype_name: str, device: int) -> int:
    with torch.cuda.device(device):
        return int(_ext._C.cslt_compressed_size(n, k, dtype_name))


def compressed_nbytes(n: int, k: int, dtype: torch.dtype) -> int:
    """Bytes of the compressed buffer cslt_compress returns for a 2:4 weight [n, k] of `dtype`: cuSPARSELt's own
    cusparseLtSpMMACompressedSize2 for the current GPU (cached per GPU and shape; the C++ op uses the same query).
    Where no GPU can answer (a CPU-only build or machine, e.g. meta-tensor shape propagation there) it is the
    formula lower bound, formula_nbytes(); cslt_linear accepts any buffer at least this large."""
    if (dtype in _INPUT_DTYPES and _ext.available() and _ext.build_info().get("with_cuda")
            and torch.cuda.is_available() and shape_supported(n, k, dtype)):
        return _queried_nbytes(int(n), int(k), str(dtype).removeprefix("torch."), torch.cuda.current_device())
    return formula_nbytes(n, k, dtype)


def _check_dtype(op: str, name: str, dtype: torch.dtype) -> None:
    if dtype not in _INPUT_DTYPES:
        raise ValueError(
            f"{op}: {name} must be float16, bfloat16, int8 or float8_e4m3fn for cuSPARSELt, got {dtype}"
        )


def _check_nk(op: str, dtype: torch.dtype, n: int, k: int) -> None:
    mult = structured_multiple(dtype)
    for name, val, what in (("n", n, "out_features"), ("k", k, "in_features")):
        if val <= 0 or val % mult != 0:
            raise ValueError(
                f"{op}: {name} ({what}) = {val} must be a positive multiple of {mult} for {dtype} "
                "(cuSPARSELt's rule for the structured operand)"
            )


def _check_compress_args(w: torch.Tensor) -> None:
    op = "cslt_compress"
    if w.dim() != 2:
        raise ValueError(f"{op}: w must be 2-D [n, k], got {w.dim()}-D")
    _check_dtype(op, "w", w.dtype)
    _check_nk(op, w.dtype, w.shape[0], w.shape[1])


def _linear_out_dtype(
    x: torch.Tensor,
    compressed: torch.Tensor,
    n: int,
    k: int,
    bias: Optional[torch.Tensor],
    alpha: Optional[torch.Tensor],
    row_scale: Optional[torch.Tensor],
    activation: str,
    out_dtype: Optional[torch.dtype],
) -> torch.dtype:
    """Metadata checks of cslt_linear on a 2-D x (the same rules as the C++ op, so fake and real agree).
    Returns the output dtype."""
    op = "cslt_linear"
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [M, k] here (sparsekern.ops.cslt.linear flattens), got {x.dim()}-D")
    _check_dtype(op, "x", x.dtype)
    _check_nk(op, x.dtype, n, k)
    if x.shape[1] != k:
        raise ValueError(f"{op}: x's last dim ({x.shape[1]}) must equal k = {k}")
    want = compressed_nbytes(n, k, x.dtype)
    if compressed.dtype != torch.uint8 or compressed.dim() != 1 or compressed.numel() < want:
        raise ValueError(
            f"{op}: compressed must be the uint8 buffer cslt_compress returned for a [{n}, {k}] {x.dtype} weight "
            f"(at least {want} bytes), got {compressed.dtype} {tuple(compressed.shape)}"
        )
    if activation not in _ACTIVATIONS:
        raise ValueError(f'{op}: activation must be "none", "relu" or "gelu", got "{activation}"')
    M = x.shape[0]
    for name, t, length, lname in (("row_scale", row_scale, M, "M"), ("alpha", alpha, n, "n"), ("bias", bias, n, "n")):
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != length:
            raise ValueError(f"{op}: {name} must be 1-D [{lname} = {length}], got {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")
    dt = x.dtype
    if dt in (torch.float16, torch.bfloat16):
        out = out_dtype or dt
        if out not in _FLOAT_OUT:
            raise ValueError(f"{op}: out_dtype for {dt} inputs must be float16, bfloat16 or float32, got {out}")
    elif dt == torch.int8:
        out = out_dtype or torch.int32
        if out not in (torch.int8, torch.int32) + _FLOAT_OUT:
            raise ValueError(
                f"{op}: out_dtype for int8 inputs must be int8, int32, float16, bfloat16 or float32, got {out}"
            )
    else:
        out = out_dtype or torch.float32
        if out not in (torch.float8_e4m3fn,) + _FLOAT_OUT:
            raise ValueError(
                f"{op}: out_dtype for float8_e4m3fn inputs must be float8_e4m3fn, float16, bfloat16 or float32, "
                f"got {out}"
            )
        if out == torch.float8_e4m3fn and (row_scale is not None or (bias is not None and bias.dtype != torch.float16)):
            raise ValueError(
                f"{op}: a float8_e4m3fn output needs everything in cuSPARSELt's epilogue: no row_scale, and a bias "
                "(if any) of dtype torch.float16; ask for a float out_dtype"
            )
    return out


def _check_devices(op: str, **tensors: Optional[torch.Tensor]) -> None:
    first_name, first = next((k, v) for k, v in tensors.items() if v is not None)
    if first.device.type != "cuda":
        raise ValueError(f"{op}: {first_name} must be a CUDA tensor (cuSPARSELt), got device {first.device}")
    for name, t in tensors.items():
        if t is not None and t.device != first.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; all tensors must be on one "
                "CUDA device"
            )


def cslt_compress(w: torch.Tensor) -> torch.Tensor:
    """Compress a 2:4 weight to cuSPARSELt's buffer.

    w: [n, k] float16 / bfloat16 / int8 / float8_e4m3fn on CUDA; every aligned group of 4 along k holds at most
       2 non-zeros (else ValueError-like RuntimeError naming the first bad row and group). float8 needs sm89+.
    Returns a 1-D uint8 CUDA tensor of ``compressed_nbytes(n, k, w.dtype)`` bytes (architecture-specific layout).
    """
    _check_compress_args(w)
    _ext.require_cuda("cuSPARSELt compress")
    _check_devices("cslt_compress", w=w)
    return torch.ops.sparsekern.cslt_compress(w)


def _flatten(x: torch.Tensor, row_scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if x.dim() < 1:
        raise ValueError("cslt_linear: x must have at least one dimension [..., k]")
    x2 = x.reshape(-1, x.shape[-1])
    if row_scale is not None:
        if tuple(row_scale.shape) != tuple(x.shape[:-1]):
            raise ValueError(
                f"cslt_linear: row_scale must have x's leading shape {tuple(x.shape[:-1])}, "
                f"got {tuple(row_scale.shape)}"
            )
        row_scale = row_scale.reshape(-1).contiguous()
    return x2, row_scale


def cslt_linear(
    x: torch.Tensor,
    compressed: torch.Tensor,
    n: int,
    k: int,
    bias: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
    alg_id: int = -1,
    split_k: int = 1,
) -> torch.Tensor:
    """y = act(row_scale[..., None] * alpha * (x @ W^T) + bias) with W [n, k] given as ``cslt_compress(W)``.

    x:          [..., k] CUDA, float16 / bfloat16 / int8 / float8_e4m3fn (the weight's dtype); any strides.
    compressed: uint8 buffer from ``compress`` of W [n, k] (same dtype as x).
    bias:       optional floating [n]. Fused in cuSPARSELt's epilogue when its dtype is the epilogue's (float32 for
                int8 inputs, else the output dtype, float16 for a float8 output) and it is contiguous; any other
                floating bias is added by sparsekern's post-op kernel (same result, one more pass over y).
    alpha:      optional floating [n], per output channel (cuSPARSELt's alpha vector; float32 internally).
    row_scale:  optional floating [...] (x's leading shape), per token (always sparsekern's post-op, since
                cuSPARSELt's alpha vector scales output channels only).
    activation: None / "none", "relu", "gelu". Fused by cuSPARSELt when everything else is; its GELU may be the tanh
                approximation (within 5e-4 of F.gelu's erf form); the post-op's GELU is the erf form.
    out_dtype:  float16/bfloat16 inputs: float16, bfloat16, float32 (default x's dtype; cuSPARSELt computes in fp32
                and writes x's dtype, the post-op widens / converts). int8: int32 (default, exact), int8 (rounded
                half to even, saturated), float16, bfloat16, float32. float8_e4m3fn: float32 (default), float16,
                bfloat16, float8_e4m3fn (only with everything fused: no row_scale, bias float16).
    alg_id:     cuSPARSELt algorithm id; -1 uses ``search()``'s result for this configuration, else the default.
    split_k:    cuSPARSELt split-K factor (ignored when alg_id = -1 finds a search result, which carries its own).
    Returns y [..., n] of out_dtype.
    """
    act = activation or "none"
    x2, rs = _flatten(x, row_scale)
    _linear_out_dtype(x2, compressed, n, k, bias, alpha, rs, act, out_dtype)
    _ext.require_cuda("cuSPARSELt linear")
    _check_devices("cslt_linear", x=x, compressed=compressed, bias=bias, alpha=alpha, row_scale=row_scale)
    y = torch.ops.sparsekern.cslt_linear(x2, compressed, n, k, bias, alpha, rs, act, out_dtype, alg_id, split_k)
    return y.reshape(*x.shape[:-1], n)


def cslt_linear_2d(x2: torch.Tensor, compressed: torch.Tensor, n: int, k: int, bias: Optional[torch.Tensor] = None,
                   alpha: Optional[torch.Tensor] = None, row_scale: Optional[torch.Tensor] = None,
                   activation: str = "none", out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """cslt_linear for a caller that holds a validated weight (SparseLinear's forward): x2 [M, k] 2-D, row_scale [M],
    activation a canonical name. No Python-side re-check: the C++ op enforces the same rules with the same messages,
    and skipping the duplicate keeps the per-token decode call lean."""
    return torch.ops.sparsekern.cslt_linear(x2, compressed, n, k, bias, alpha, row_scale, activation, out_dtype)


def search(
    x: torch.Tensor,
    compressed: torch.Tensor,
    n: int,
    k: int,
    bias: Optional[torch.Tensor] = None,
    alpha: Optional[torch.Tensor] = None,
    row_scale: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    out_dtype: Optional[torch.dtype] = None,
) -> dict[str, Any]:
    """Run cusparseLtMatmulSearch for the configuration ``linear`` would run with these arguments (same shapes,
    dtypes and epilogue; M is what matters of x) and remember the result for later ``cslt_linear(..., alg_id=-1)`` calls.
    Returns the record: alg_id, split_k, split_k_mode, split_k_buffers, max_alg_id and the key fields."""
    act = activation or "none"
    x2, rs = _flatten(x, row_scale)
    _linear_out_dtype(x2, compressed, n, k, bias, alpha, rs, act, out_dtype)
    _ext.require_cuda("cuSPARSELt search")
    _check_devices("cslt search", x=x, compressed=compressed, bias=bias, alpha=alpha, row_scale=row_scale)
    return dict(_ext._C.cslt_search(x2, compressed, n, k, bias, alpha, rs, act, out_dtype))


def cache_stats() -> dict[str, int]:
    """Counters of the plan cache (cumulative since process start, except ``entries``): handles_created,
    descriptors_created, plans_created, hits, misses, evictions, searches, epilogue_fallbacks, entries, max_entries."""
    _ext.require_cuda("cuSPARSELt cache statistics")
    return dict(_ext._C.cslt_cache_stats())


def clear_cache() -> None:
    """Drop every cached plan and workspace (never while a CUDA graph that used them may still replay)."""
    _ext.require_cuda("cuSPARSELt cache")
    _ext._C.cslt_cache_clear()


def runtime_version() -> str:
    """Version of the cuSPARSELt library loaded at run time, e.g. "0.8.1" (no GPU needed)."""
    _ext.require_cuda("cuSPARSELt")
    return str(_ext._C.cslt_version())


def search_results() -> list[dict[str, Any]]:
    """Every remembered search result (each keyed by GPU name, cuSPARSELt version and GEMM configuration)."""
    _ext.require_cuda("cuSPARSELt search results")
    return [dict(r) for r in _ext._C.cslt_search_records()]


def clear_search_results() -> None:
    _ext.require_cuda("cuSPARSELt search results")
    _ext._C.cslt_clear_search_records()


def _dump_records(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {"format": _SEARCH_FORMAT, "version": _SEARCH_FORMAT_VERSION, "records": records}


def _parse_records(doc: Any, path: str) -> list[dict[str, Any]]:
    if not isinstance(doc, dict) or doc.get("format") != _SEARCH_FORMAT:
        raise ValueError(f"{path}: not a sparsekern cuSPARSELt search file (format != {_SEARCH_FORMAT!r})")
    if doc.get("version") != _SEARCH_FORMAT_VERSION:
        raise ValueError(
            f"{path}: search file version {doc.get('version')!r}; "
            f"this sparsekern reads version {_SEARCH_FORMAT_VERSION}"
        )
    records = doc.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise ValueError(f"{path}: 'records' must be a list of objects")
    return records


def save_search_results(path: str | os.PathLike) -> int:
    """Write every remembered search result to ``path`` as JSON, merged with the records already there (results of
    other GPUs / cuSPARSELt versions in the file are kept). Returns the number of records written."""
    path = os.fspath(path)
    merged: dict[tuple, dict[str, Any]] = {}
    if os.path.exists(path):
        with open(path) as f:
            for r in _parse_records(json.load(f), path):
                merged[_record_key(r)] = r
    for r in search_results():
        merged[_record_key(r)] = r
    records = sorted(merged.values(), key=lambda r: tuple(str(v) for v in _record_key(r)))
    # atomic: a concurrent reader never sees half a file
    atomic_write_text(path, json.dumps(_dump_records(records), indent=1, sort_keys=True))
    return len(records)


def load_search_results(path: str | os.PathLike) -> int:
    """Load search results from ``path`` into memory; records of another GPU or cuSPARSELt version are kept but only
    those matching this process's GPU and library are ever used. Returns the number of records loaded."""
    path = os.fspath(path)
    with open(path) as f:
        records = _parse_records(json.load(f), path)
    _ext.require_cuda("cuSPARSELt search results")
    _ext._C.cslt_add_search_records(records)
    return len(records)


_KEY_FIELDS = ("gpu", "cusparselt", "m", "n", "k", "in_dtype", "d_dtype", "c_dtype", "bias", "activation",
               "alpha_vector")


def _record_key(r: dict[str, Any]) -> tuple:
    try:
        return tuple(r[f] for f in _KEY_FIELDS)
    except KeyError as e:
        raise ValueError(f"cuSPARSELt search record lacks the field {e.args[0]!r}: {r}") from None


# ---------------------------------------------------------------------------------------------------- fake kernels
def _register_fakes() -> None:
    @torch.library.register_fake("sparsekern::cslt_compress")
    def _cslt_compress_fake(w: torch.Tensor) -> torch.Tensor:
        _check_compress_args(w)
        return w.new_empty((compressed_nbytes(w.shape[0], w.shape[1], w.dtype),), dtype=torch.uint8)

    @torch.library.register_fake("sparsekern::cslt_linear")
    def _cslt_linear_fake(
        x, compressed, n, k, bias=None, alpha=None, row_scale=None, activation="none", out_dtype=None, alg_id=-1,
        split_k=1,
    ):
        check_same_device("cslt_linear", x=x, compressed=compressed, bias=bias, alpha=alpha, row_scale=row_scale)
        out = _linear_out_dtype(x, compressed, n, k, bias, alpha, row_scale, activation, out_dtype)
        return x.new_empty((x.shape[0], n), dtype=out)


if _ext.available():
    _register_fakes()
