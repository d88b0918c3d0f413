"""The contenders of the GEMM and host-overhead benchmarks: every way to compute y = x @ W^T with a 2:4 W.

All contenders of one (shape, dtype) share one pruned weight and the same activations, so every output can be
checked against one reference. In the int8/fp8 (W8A8) groups the values are quantised once; the dense baseline
`dense` then runs the *same values* in bf16 (exact: int8 and e4m3 values are representable in bf16), i.e. the
bf16 layer a W8A8 model replaces, and `dense_int8` / `dense_fp8` are the 8-bit dense GEMMs.

A contender that cannot run here raises Skip with the reason (no GPU, op not compiled, dtype unsupported); the
runner records it and goes on. Exceptions from PyTorch's own paths count as "cannot run" too (their limits are not
ours to fix); an unexpected exception from a sparsekern contender is recorded as an error: it is our bug.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .shapes import DTYPES


class Skip(Exception):
    """This contender cannot run in this configuration; str(self) says why."""


@dataclasses.dataclass
class Problem:
    """One weight of one (shape, dtype) group, already 2:4-pruned, on the benchmark device.

    w        [N, K] in the group dtype (int8 / float8_e4m3fn values for the W8A8 groups), contiguous.
    w_float  [N, K] the same values in the dense baseline's float dtype (w itself for fp32/fp16/bf16, else bf16).
    """

    dtype_name: str
    n: int
    k: int
    w: torch.Tensor
    w_float: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.w.dtype

    @property
    def device(self) -> torch.device:
        return self.w.device

    @property
    def is_8bit(self) -> bool:
        return self.dtype in (torch.int8, torch.float8_e4m3fn)

    @property
    def out_dtype(self) -> torch.dtype:
        """Output dtype of the sparse contenders: the input dtype, bf16 for W8A8 (dequantised output)."""
        return torch.bfloat16 if self.is_8bit else self.dtype


@dataclasses.dataclass
class Inputs:
    """One activation buffer: x [M, K] in the group dtype and x_float, the same values in w_float's dtype."""

    x: torch.Tensor
    x_float: torch.Tensor


@dataclasses.dataclass
class Prepared:
    """A contender bound to one weight.

    call(a)      the timed operation; `a` is what adapt() returned for one input buffer.
    adapt(inp)   untimed per-buffer preparation (padding, views); default: the group-dtype x.
    finish(y, m) untimed: turns call()'s result into the [M, N] output that is checked (e.g. drops padding rows).
    """

    call: Callable[[Any], torch.Tensor]
    weight_bytes: int
    compute_dtype: str
    out_dtype: torch.dtype
    adapt: Callable[[Inputs], Any] = lambda inp: inp.x
    finish: Callable[[torch.Tensor, int], torch.Tensor] = lambda y, m: y


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    description: str
    ours: bool  # a sparsekern path (unexpected exceptions are errors) or a PyTorch baseline (they are skips)
    sparse: bool
    prepare: Callable[[Problem], Prepared]
    dtypes: tuple[str, ...] | None = None  # the dtype groups it belongs to (None: all); elsewhere it is not listed

    def applies_to(self, dtype: str) -> bool:
        return self.dtypes is None or dtype in self.dtypes


def dtype_name(dtype: torch.dtype) -> str:
    for name, (dt, _) in DTYPES.items():
        if dt == dtype:
            return name
    if dtype == torch.int32:
        return "int32"
    return str(dtype).replace("torch.", "")


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _need_cuda(p: Problem, what: str) -> None:
    if p.device.type != "cuda":
        raise Skip(f"{what} needs a CUDA device")


def _need_sparsekern_op(op: str, p: Problem) -> None:
    """Skip (with the reason) unless sparsekern's extension is loaded and `op` has a kernel for p's device."""
    from .. import _ext

    if not _ext.available():
        raise Skip(f"sparsekern extension not loaded: {_ext.load_error()}")
    key = "CUDA" if p.device.type == "cuda" else "CPU"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op}", key):
        raise Skip(f"sparsekern::{op} has no {key} kernel in this build")


# -------------------------------------------------------------------------------------------- dense baselines


def _dense(p: Problem) -> Prepared:
    w = p.w_float
    return Prepared(
        call=lambda x: F.linear(x, w),
        adapt=lambda inp: inp.x_float,
        weight_bytes=_nbytes(w),
        compute_dtype=dtype_name(w.dtype),
        out_dtype=w.dtype,
    )


def _dense_int8(p: Problem) -> Prepared:
    if p.dtype != torch.int8:
        raise Skip("int8 groups only")
    wt = p.w.t()  # [K, N] column-major view: the layout cuBLASLt's int8 GEMM wants for the second operand
    return Prepared(call=lambda x: torch._int_mm(x, wt), weight_bytes=_nbytes(p.w), compute_dtype="int8",
                    out_dtype=torch.int32)


def _dense_fp8(p: Problem) -> Prepared:
    if p.dtype != torch.float8_e4m3fn:
        raise Skip("fp8 groups only")
    wt = p.w.t()
    one = torch.ones((), dtype=torch.float32, device=p.device)  # per-tensor scales of 1: values are pre-scaled
    return Prepared(
        call=lambda x: torch._scaled_mm(x, wt, one, one, out_dtype=torch.bfloat16),
        weight_bytes=_nbytes(p.w),
        compute_dtype="fp8",
        out_dtype=torch.bfloat16,
    )


# ----------------------------------------------------------------------------------------- PyTorch's 2:4 paths


def _pad_rows(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[0]) % multiple
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _torch_cslt(p: Problem) -> Prepared:
    """torch._cslt_sparse_mm: y^T = W x^T on cuSPARSELt, result transposed in the epilogue (as PyTorch's own
    SparseSemiStructuredTensorCUSPARSELT does for F.linear).

    x is padded to PyTorch's minimum dense size *outside* the timing: this is the raw kernel at its best; the
    `torch_semi` contender pays PyTorch's padding the way a user does.
    """
    _need_cuda(p, "torch._cslt_sparse_mm")
    if not torch.backends.cusparselt.is_available():
        raise Skip("this torch build has no cuSPARSELt")
    from torch.sparse import SparseSemiStructuredTensorCUSPARSELT as _C

    if p.dtype not in _C._DTYPE_SHAPE_CONSTRAINTS:
        raise Skip(f"torch._cslt_sparse_mm does not take {p.dtype_name}")
    mult = _C._DTYPE_SHAPE_CONSTRAINTS[p.dtype].dense_min_rows
    comp = torch._cslt_compress(p.w)
    out = torch.bfloat16 if p.is_8bit else None
    return Prepared(
        call=lambda xt: torch._cslt_sparse_mm(comp, xt, out_dtype=out, transpose_result=True),
        adapt=lambda inp: _pad_rows(inp.x, mult).t(),
        finish=lambda y, m: y[:m],
        weight_bytes=_nbytes(comp),
        compute_dtype=p.dtype_name,
        out_dtype=p.out_dtype,
    )


def _semi_structured(p: Problem, cutlass: bool) -> Prepared:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    _need_cuda(p, "to_sparse_semi_structured")
    if p.is_8bit:
        raise Skip("F.linear on to_sparse_semi_structured has no W8A8 path (see torch_cslt for 8-bit cuSPARSELt)")
    if not cutlass and not torch.backends.cusparselt.is_available():
        raise Skip("this torch build has no cuSPARSELt")
    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    try:
        ws = to_sparse_semi_structured(p.w)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old
    parts = [t for t in (getattr(ws, a, None) for a in ("packed", "meta")) if t is not None]
    return Prepared(call=lambda x: F.linear(x, ws), weight_bytes=_nbytes(*parts), compute_dtype=p.dtype_name,
                    out_dtype=p.dtype)


# ----------------------------------------------------------------------------------------------- sparsekern


def _sk_cslt(p: Problem) -> Prepared:
    """sparsekern's raw cuSPARSELt op on a buffer from cslt_compress (plans cached per shape: no host setup)."""
    _need_cuda(p, "sparsekern::cslt_linear")
    _need_sparsekern_op("cslt_linear", p)
    cslt = importlib.import_module("sparsekern.ops.cslt")
    comp = cslt.cslt_compress(p.w)
    out = torch.bfloat16 if p.is_8bit else None
    n, k = p.n, p.k
    return Prepared(
        call=lambda x: cslt.cslt_linear_2d(x, comp, n, k, out_dtype=out),
        weight_bytes=_nbytes(comp),
        compute_dtype=p.dtype_name,
        out_dtype=p.out_dtype,
    )


def _core_ops():
    return importlib.import_module("sparsekern.ops.core")


def _compress_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable 2:4 format of w: values [N, K/2] and codes uint8 [N, ceil(K/8)] (the op's typed wrapper)."""
    return tuple(_core_ops().compress_24(w))


def _sk_spmm24(p: Problem) -> Prepared:
    """sparsekern's 2:4 matmul reading the portable format (the CPU kernel; on CUDA the own small-M kernel)."""
    _need_sparsekern_op("compress_24", p)
    _need_sparsekern_op("spmm_24", p)
    if p.dtype == torch.float8_e4m3fn and p.device.type == "cpu":
        raise Skip("spmm_24 has no fp8 path on the CPU (SparseLinear emulates fp8 there in float32: see sk_linear)")
    values, codes = _compress_24(p.w)
    out = torch.bfloat16 if p.is_8bit else None
    spmm_24 = _core_ops().spmm_24
    return Prepared(
        call=lambda x: spmm_24(x, values, codes, out_dtype=out),
        weight_bytes=_nbytes(values, codes),
        compute_dtype=p.dtype_name,
        out_dtype=p.out_dtype,
    )


def _sk_decompress(p: Problem) -> Prepared:
    """Decompress the portable format, then the dense GEMM, per call: the large-M fallback that keeps no dense copy."""
    if p.is_8bit:
        raise Skip("decompress-and-GEMM is measured for float dtypes only")
    _need_sparsekern_op("compress_24", p)
    _need_sparsekern_op("decompress_24", p)
    values, codes = _compress_24(p.w)
    k = p.k
    decompress_24 = _core_ops().decompress_24
    call = lambda x: F.linear(x, decompress_24(values, codes, k))  # noqa: E731
    if p.device.type == "cpu":
        # SparseLinear's CPU dense fallback: panel by panel, no weight-sized buffer per call (sparsekern.linear).
        panels = getattr(importlib.import_module("sparsekern.linear"), "_dense_panels", None)
        if panels is not None:
            call = lambda x: panels(x, values, codes, None, k)  # noqa: E731
    return Prepared(
        call=call,
        weight_bytes=_nbytes(values, codes),
        compute_dtype=p.dtype_name,
        out_dtype=p.dtype,
    )


def _cslt_module():
    try:
        return importlib.import_module("sparsekern.ops.cslt")
    except ImportError:
        return None


def _cslt_search_helper():
    """sparsekern.ops.cslt.search(x, compressed, n, k, bias, alpha, row_scale, activation, out_dtype), which runs
    cusparseLtMatmulSearch and remembers the result for cslt_linear(..., alg_id=-1); None when absent."""
    fn = getattr(_cslt_module(), "search", None)
    return fn if callable(fn) else None


def forget_cslt_searches() -> None:
    """Drop remembered search results, so that the default-algorithm contenders of the next point run the
    default algorithm again (the runner calls this before each point when a search contender is measured)."""
    fn = getattr(_cslt_module(), "clear_search_results", None)
    if callable(fn):
        fn()


def _sparse_linear(p: Problem, search: bool, dense_cache: bool = False) -> Prepared:
    """sparsekern.linear.SparseLinear.from_linear on an nn.Linear holding the pruned weight; its dispatch policy
    picks the kernel per M. In the W8A8 groups the layer is quant="int8"/"fp8" and takes the bf16 activations
    (quantising them per token inside forward, as a W8A8 model does); the test values are chosen so that its
    per-row / per-token scales are exactly 1 (make_problem), so it computes the same integers as the raw ops.

    search=True: before the timing of each M, the cuSPARSELt algorithm search runs (untimed) for the layer's
    buffer, and the layer then uses the cached result (cslt_linear's alg_id=-1).
    dense_cache=True: the layer keeps a dense copy (CPU; SparseLinear(dense_cache=True)), which its policy uses where
    dense beats the 2:4 kernels."""
    from .. import _ext

    try:
        linear_mod = importlib.import_module("sparsekern.linear")
    except ImportError as e:
        raise Skip(f"sparsekern.linear is not available ({e})") from None
    sl = getattr(linear_mod, "SparseLinear", None)
    if sl is None or not hasattr(sl, "from_linear"):
        raise Skip("sparsekern.linear.SparseLinear.from_linear is not available in this checkout")
    searcher = None
    if search:
        _need_cuda(p, "cuSPARSELt algorithm search")
        searcher = _cslt_search_helper()
        if searcher is None:
            raise Skip("sparsekern.ops.cslt has no algorithm-search helper (search) in this checkout")
    if not _ext.available():
        raise Skip(f"sparsekern extension not loaded: {_ext.load_error()}")
    _need_sparsekern_op("compress_24", p)  # from_linear compresses with it on every device
    quant = p.dtype_name if p.is_8bit else None
    if dense_cache and (p.device.type != "cpu" or quant):
        raise Skip("the dense copy (dense_cache=True) is a CPU option for unquantised layers")
    dense = torch.nn.Linear(p.k, p.n, bias=False, device=p.device, dtype=p.w_float.dtype)
    with torch.no_grad():
        dense.weight.copy_(p.w_float)
    layer = (sl.from_linear(dense, quant=quant) if quant else
             sl.from_linear(dense, dense_cache=True) if dense_cache else sl.from_linear(dense))
    del dense
    # Bytes the layer's kernel reads: cuSPARSELt's buffer where it has one (CUDA), else the portable format.
    cslt_buf = getattr(layer, "cslt_buffer", None)
    nbytes = getattr(layer, "weight_nbytes", None)
    if cslt_buf is not None:
        weight_bytes = _nbytes(cslt_buf)
    else:
        weight_bytes = nbytes() if callable(nbytes) else sum(_nbytes(t) for t in layer.buffers())
    searched: set[int] = set()

    def adapt(inp: Inputs) -> torch.Tensor:
        x = inp.x_float if quant else inp.x
        m = x.shape[0]
        if searcher is not None and m not in searched:
            buf = getattr(layer, "cslt_buffer", None)
            if buf is None:
                raise Skip("the layer has no cuSPARSELt buffer for this shape: nothing to search")
            # The same configuration (epilogue included) as SparseLinear's cslt_linear call, so its alg_id=-1 call
            # finds the result.
            if quant:
                q, row_scale = _core_ops().quantize_per_token(x, p.dtype)
                searcher(q, buf, p.n, p.k, None, layer.weight_scale, row_scale, "none", x.dtype)
            else:
                searcher(x, buf, p.n, p.k)
            searched.add(m)
        return x

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return layer(x)

    return Prepared(call=call, adapt=adapt, weight_bytes=weight_bytes, compute_dtype=p.dtype_name,
                    out_dtype=p.out_dtype)


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in (
        Contender("dense", "F.linear on the dense (pruned) weight: cuBLAS / ATen CPU; bf16 in the W8A8 groups",
                  ours=False, sparse=False, prepare=_dense),
        Contender("dense_int8", "torch._int_mm, int8 x int8 -> int32 (int8 groups)", ours=False, sparse=False,
                  prepare=_dense_int8, dtypes=("int8",)),
        Contender("dense_fp8", "torch._scaled_mm, e4m3 x e4m3 -> bf16 (fp8 groups)", ours=False, sparse=False,
                  prepare=_dense_fp8, dtypes=("fp8",)),
        Contender("torch_cslt", "torch._cslt_sparse_mm (PyTorch's cuSPARSELt path), default algorithm",
                  ours=False, sparse=True, prepare=_torch_cslt),
        Contender("torch_semi", "F.linear on torch.sparse.to_sparse_semi_structured (cuSPARSELt backend)",
                  ours=False, sparse=True, prepare=lambda p: _semi_structured(p, cutlass=False)),
        Contender("torch_semi_cutlass", "F.linear on to_sparse_semi_structured, CUTLASS backend", ours=False,
                  sparse=True, prepare=lambda p: _semi_structured(p, cutlass=True)),
        Contender("sk_cslt", "torch.ops.sparsekern.cslt_linear on a cslt_compress buffer", ours=True, sparse=True,
                  prepare=_sk_cslt),
        Contender("sk_spmm24", "torch.ops.sparsekern.spmm_24 on the portable 2:4 format", ours=True, sparse=True,
                  prepare=_sk_spmm24),
        Contender("sk_decompress", "decompress_24 + F.linear per call, on CPU panel by panel (no dense copy kept)",
                  ours=True,
                  sparse=True, prepare=_sk_decompress, dtypes=("fp32", "fp16", "bf16")),
        Contender("sk_linear", "sparsekern SparseLinear.from_linear, default policy / algorithm", ours=True,
                  sparse=True, prepare=lambda p: _sparse_linear(p, search=False)),
        Contender("sk_linear_cache", "SparseLinear(dense_cache=True): also keeps a dense copy (CPU), policy picks",
                  ours=True, sparse=True, prepare=lambda p: _sparse_linear(p, search=False, dense_cache=True),
                  dtypes=("fp32", "fp16", "bf16")),
        Contender("sk_linear_search", "SparseLinear after the cuSPARSELt algorithm search (untimed) for each M",
                  ours=True, sparse=True,
                  prepare=lambda p: _sparse_linear(p, search=True)),
    )
}


def parse_contenders(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in CONTENDERS:
            raise ValueError(f"unknown contender {name!r}; known contenders: {', '.join(CONTENDERS)}")
    if not names:
        raise ValueError(f"empty contender list; known contenders: {', '.join(CONTENDERS)}")
    return names


# ------------------------------------------------------------------------------------------ problem generation


def prune_24_reference(w: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch 2:4 magnitude pruning along the last dim (keeps the 2 largest |w| of each group of 4).

    Independent of sparsekern's kernels on purpose: the benchmark must be able to run (and check) its baselines
    even where sparsekern's own prune op is missing or wrong.
    """
    rows, cols = w.shape
    g = w.reshape(rows, cols // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, dim=-1).indices, True)
    return (g * keep).reshape(rows, cols)


def _pin_row_absmax(t: torch.Tensor, qmax: float) -> torch.Tensor:
    """Set the largest-magnitude entry of every row to +-qmax (in place; keeps zeros and the 2:4 pattern).

    Then per-row / per-token symmetric quantisation (scale = absmax / qmax) has scale exactly 1 and reproduces the
    values, so quantising contenders (SparseLinear with quant=...) compute the same products as the raw 8-bit ops.
    """
    idx = t.abs().argmax(dim=1, keepdim=True)
    sign = torch.where(t.gather(1, idx) < 0, -1.0, 1.0).to(t.dtype)
    return t.scatter_(1, idx, sign * qmax)


def make_problem(dtype_name: str, n: int, k: int, device: str | torch.device, gen: torch.Generator) -> Problem:
    """A random 2:4-pruned weight [n, k]: ~N(0, 1/k) for float dtypes (outputs of order 1), full-range int8,
    N(0, 1)-scaled e4m3 for fp8."""
    dtype = DTYPES[dtype_name][0]
    base = torch.randn(n, k, generator=gen, device=device, dtype=torch.float32)
    if dtype == torch.int8:
        w = _pin_row_absmax(prune_24_reference(base.mul_(40.0).round_().clamp_(-127, 127)), 127.0).to(dtype)
    elif dtype == torch.float8_e4m3fn:
        w = _pin_row_absmax(prune_24_reference(base), 448.0).to(dtype)
    else:
        w = prune_24_reference(base.mul_(k ** -0.5)).to(dtype)
    w_float = w.to(torch.bfloat16) if dtype in (torch.int8, torch.float8_e4m3fn) else w
    return Problem(dtype_name=dtype_name, n=n, k=k, w=w.contiguous(), w_float=w_float.contiguous())


def make_inputs(p: Problem, m: int, gen: torch.Generator) -> Inputs:
    """Random activations x [m, k] of p's group (x_float: the same values in w_float's dtype)."""
    base = torch.randn(m, p.k, generator=gen, device=p.device, dtype=torch.float32)
    if p.dtype == torch.int8:
        x = _pin_row_absmax(base.mul_(40.0).round_().clamp_(-127, 127), 127.0).to(torch.int8)
    elif p.dtype == torch.float8_e4m3fn:
        x = _pin_row_absmax(base, 448.0).to(p.dtype)
    else:
        x = base.to(p.dtype)
    return Inputs(x=x, x_float=x.to(p.w_float.dtype) if p.is_8bit else x)


def reference_output(p: Problem, inp: Inputs) -> torch.Tensor:
    """x @ W^T of the exact (quantised) values, float64 (float32 on CUDA for 16-bit groups, where fp64 GEMMs are
    slow on consumer parts and fp32's error is far below every tolerance in use)."""
    acc = torch.float32 if (p.device.type == "cuda" and not p.is_8bit) else torch.float64
    return inp.x.to(acc) @ p.w.to(acc).t()


# Normwise tolerance per output dtype: max|y - ref| / max|ref|. 16-bit outputs round each element to 2^-9
# relative (bf16), int32 is exact; float32 allows accumulation-order differences over K <= 65536.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2, torch.int32: 0.0}


def max_rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.to(torch.float64)
    diff = (y.to(torch.float64) - ref).abs().max().item()
    scale = ref.abs().max().item()
    return diff / scale if scale > 0 else diff
