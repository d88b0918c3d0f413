"""SparseLinear: a drop-in nn.Linear whose weight is 2:4 sparse and kept compressed.

    layer = SparseLinear.from_linear(linear)                 # nn.Linear or transformers' GPT-2 Conv1D, 2:4 weight
    layer = SparseLinear.from_linear(linear, quant="int8")   # W8A8 (see sparsekern.quant)
    y = layer(x)                                             # == F.linear(x, W, b) within the dtype's tolerance
    layer.kernel_for(M)                                      # which kernel runs M rows (sparsekern.policy)
    linear = layer.to_linear()                               # the dense layer back

The weight is one sparsekern.weight.Sparse24Weight (`layer.weight24`), which owns the format, its validation, the
state-dict layout, the cuSPARSELt buffer and the kernel choice; the layer holds it and delegates. Its tensors are also
the layer's buffers (the same tensor objects), so nn.Module machinery (.to(), named_buffers(), torch.compile's
buffer lifting, accelerate's device maps) sees them; every change goes through one place (_install) that keeps the
two in step, and `weight24` re-reads the buffers if something outside replaced them.

Storage (all buffers, none a Parameter: no optimizer step can touch the weight, so its 2:4 pattern cannot break):
  values        [N, K/2]  the kept weights in the portable 2:4 format (docs/format.md), dtype of the weight
                          (float32/float16/bfloat16), or int8 / float8_e4m3fn when quantised.
  codes         uint8 [N, ceil(K/8)]  4-bit pattern code per group of 4 (two groups per byte).
  weight_scale  float32 [N]  per-output-channel scale of a quantised weight (absent otherwise).
  bias          [N] in the activation dtype, or absent.
  cslt_buffer   uint8, cuSPARSELt's opaque compressed weight; only on CUDA, only when cuSPARSELt accepts the shape,
                rebuilt from values/codes by every move to a CUDA device; never saved (not portable across GPUs
                and cuSPARSELt versions). The portable values/codes stay on the device too: they feed the
                portable-format kernel, the backward pass and state_dict().
  N = out_features, K = in_features (a multiple of 4; 2:4 groups run along K).

state_dict() holds values, codes, weight_scale (quantised), bias, shape (int64 [2] = [N, K]) and format_version
(int64 [1]); loading accepts that or a dense `weight` ([N, K]; [K, N] for a Conv1D-born layer) that is 2:4.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from . import _ext
from . import calibrate as _calib
from . import policy as _policy
from ._modules import is_conv1d
from .ops import core as _core
from .ops import cslt as _cslt
from .quant import (
    QuantUnsupportedError,
    check_quant_supported,
    dequantize_weight,
    quant_dtype,
    quantize_weight,
    quantize_weight_on_grid,
    weight_grid,
)
from .weight import (
    FLOAT_DTYPES as _FLOAT_DTYPES,
    FORMAT_VERSION,
    SUPPORTED_FORMAT_VERSIONS,
    CheckpointError,
    NotTwoFourError,
    Sparse24Weight,
    check_twofour,
    codes_shape,
    twofour_violation,
)

# ---------------------------------------------------------------------------------------------- weight helpers


def _from_dense_on_grid(w: torch.Tensor, quant: str, scale: torch.Tensor, name: str,
                        check: bool) -> Sparse24Weight:
    """Sparse24Weight.from_dense(w, quant) but with the kept values quantised on a recorded grid scale (from_linear's
    doc). Off the grid (or a scale that does not fit w): warn and fit a fresh scale, as from_dense does."""
    plain = Sparse24Weight.from_dense(w, None, name=name, check=check)  # float values + codes, as from_dense
    why = None
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (w.shape[0],):
        shape = list(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
        why = f"the recorded scale has shape {shape}, not [out_features] = [{w.shape[0]}]"
    else:
        q, s, on_grid = quantize_weight_on_grid(plain.values, quant, scale)
        if on_grid:
            return Sparse24Weight(q.contiguous(), plain.codes, plain.shape, scale=s, validate=False)
        why = ("the weight is no longer on it (changed after it was pruned / quantised: its values are not the "
               "grid's codes times the scale)")
    warnings.warn(f"{name}: ignoring the {quant} grid recorded by attach_weight_grid: {why}; fitting a fresh "
                  f"per-row {quant} scale from the weight instead, which re-rounds it", stacklevel=3)
    values, s = quantize_weight(plain.values, quant)
    return Sparse24Weight(values.contiguous(), plain.codes, plain.shape, scale=s, validate=False)


def is_convertible(module: nn.Module) -> bool:
    """Modules SparseLinear.from_linear accepts: nn.Linear and transformers' Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def dense_weight_of(module: nn.Module) -> tuple[torch.Tensor, str]:
    """(W [out_features, in_features], layout) of an nn.Linear ("linear") or a Conv1D ("conv1d": stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight.detach(), "linear"
    if is_conv1d(module):
        return module.weight.detach().t(), "conv1d"
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


# ---------------------------------------------------------------------------------------------- autograd


# Dense fallback on the CPU works through the weight in panels of about this many bytes (a few MB: they stay in the
# last-level cache between their decompression and their GEMM). Why not decompress the whole weight: a fresh
# weight-sized buffer per call costs its page faults every time (50 ms for a 90 MB bf16 11008 x 4096 weight on the
# development VM, as long as the GEMM itself at M = 256), and it doubles the call's peak memory.
_PANEL_BYTES = 4 << 20


def _dense_panels(x2, values, codes, bias, k: int) -> torch.Tensor:
    """F.linear(x2, W, bias) with W decompressed panel by panel (CPU dense fallback, unquantised)."""
    n = values.shape[0]
    rows = max(16, _PANEL_BYTES // max(1, k * values.element_size()))
    if rows >= n:
        return F.linear(x2, _core.decompress_24(values, codes, k), bias)
    out = x2.new_empty(x2.shape[0], n)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        w = _core.decompress_24(values[n0:n1], codes[n0:n1], k)
        out[:, n0:n1] = F.linear(x2, w, bias[n0:n1] if bias is not None else None)
    return out


def _sparse_matmul(x2, values, codes, weight_scale, bias, cslt_buffer, kernel: str, quant: str | None, n: int,
                   k: int):
    """y [M, N] = x2 [M, K] @ W^T + bias, W held compressed; dispatch to `kernel` (see sparsekern.policy)."""
    out_dtype = x2.dtype
    if bias is not None and bias.dtype != out_dtype:
        bias = bias.to(out_dtype)
    if kernel == "dense_fallback":
        if quant is None and x2.device.type == "cpu":
            return _dense_panels(x2, values, codes, bias, k)
        w = _core.decompress_24(values, codes, k)
        if quant is None:
            return F.linear(x2, w, bias)
        # Same numbers as the quantised kernels: quantise x per token, multiply in float32.
        q, s = _core.quantize_per_token(x2, quant_dtype(quant))
        y = (q.float() * s[:, None]) @ dequantize_weight(w, weight_scale).t()
        if bias is not None:
            y = y + bias.float()
        return y.to(out_dtype)
    if quant is None:
        if kernel == "cslt":
            return _cslt.cslt_linear_2d(x2, cslt_buffer, n, k, bias)
        return _core.spmm_24(x2, values, codes, bias)
    q, s = _core.quantize_per_token(x2, quant_dtype(quant))
    if kernel == "cslt":
        return _cslt.cslt_linear_2d(q, cslt_buffer, n, k, bias, weight_scale, s, "none", out_dtype)
    if quant == "fp8" and x2.device.type == "cpu":
        # CPU fp8 emulation: fp8 numbers are exact in float32; the kernel accumulates in float32 like the GPU.
        return _core.spmm_24(q.float(), values.float(), codes, bias, weight_scale, s, "none", out_dtype)
    return _core.spmm_24(q, values, codes, bias, weight_scale, s, "none", out_dtype)


class _SparseLinearFunction(torch.autograd.Function):
    """Autograd through x only: grad_x = grad_y @ W (W dequantised for W8A8; the per-token activation quantisation
    is treated as identity, the straight-through estimator). The weight is a frozen buffer and gets no gradient."""

    @staticmethod
    def forward(x2, values, codes, weight_scale, bias, cslt_buffer, kernel, quant, n, k):
        return _sparse_matmul(x2, values, codes, weight_scale, bias, cslt_buffer, kernel, quant, n, k)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x2, values, codes, weight_scale = inputs[:4]
        ctx.save_for_backward(values, codes, weight_scale)
        ctx.k = inputs[9]
        ctx.quant = inputs[7]

    @staticmethod
    def backward(ctx, grad_y):
        values, codes, weight_scale = ctx.saved_tensors
        w = _core.decompress_24(values, codes, ctx.k)
        if ctx.quant is not None:
            w = dequantize_weight(w, weight_scale).to(grad_y.dtype)
        grad_x = grad_y @ w.to(grad_y.dtype)
        return grad_x, None, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------- the module


class SparseLinear(nn.Module):
    """y = x @ W^T + b with W [out_features, in_features] 2:4 sparse along in_features, stored compressed.

    Args:
      in_features:  K, a multiple of 4.
      out_features: N.
      bias:         whether the layer has a bias [N].
      dtype:        the weight's dtype for unquantised layers (float32 / float16 / bfloat16) = the activation dtype
                    the layer accepts; for quantised layers the dtype of the bias and of to_linear()'s weight.
      quant:        None | "int8" | "fp8" (W8A8, sparsekern.quant).
      device:       where the buffers live.
      weight_layout: "linear" (dense state dicts hold [N, K]) or "conv1d" (GPT-2 Conv1D: [K, N]).
      dense_cache:  also keep a dense copy of the weight while the layer is on the CPU (unquantised layers only),
                    for batch sizes where a dense GEMM beats the CPU 2:4 kernels (the policy's "dense_cached"). Costs
                    the dense weight's memory again; never saved in the state dict; dropped on CUDA.
    A layer built this way holds a zero weight; use from_linear() or load_state_dict() to fill it.
    Input x: [..., K] of `dtype` (any float dtype when quantised); output [..., N] of x's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype: torch.dtype = torch.float32,
                 quant: str | None = None, device: torch.device | str | None = None,
                 weight_layout: str = "linear", dense_cache: bool = False) -> None:
        super().__init__()
        if in_features % 4 != 0:
            raise ValueError(f"SparseLinear: in_features = {in_features} is not a multiple of 4; 2:4 sparsity needs "
                             "groups of 4 along in_features")
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"SparseLinear: dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
        if weight_layout not in ("linear", "conv1d"):
            raise ValueError(f"SparseLinear: weight_layout must be 'linear' or 'conv1d', got {weight_layout!r}")
        if quant is not None:
            quant_dtype(quant)
        if dense_cache and quant is not None:
            raise ValueError("SparseLinear: dense_cache=True is for unquantised layers (a quantised layer's dense "
                             "copy would not compute the same numbers as its W8A8 kernels)")
        self.dense_cache = bool(dense_cache)
        self.in_features = in_features
        self.out_features = out_features
        self.quant = quant
        self.dense_dtype = dtype
        self.weight_layout = weight_layout
        self._kernel_override: str | None = None
        device = torch.device(device) if device is not None else torch.device("cpu")
        vdtype = quant_dtype(quant) if quant else dtype
        values = torch.zeros(out_features, in_features // 2, dtype=vdtype, device=device)
        # 0x44: both groups of the byte keep positions (0, 1) -- a valid code for an all-zero weight.
        codes = torch.full(codes_shape(out_features, in_features), 0x44, dtype=torch.uint8, device=device)
        if (in_features // 4) % 2:
            codes[:, -1] = 0x04  # the unused high nibble stays 0
        scale = torch.ones(out_features, dtype=torch.float32, device=device) if quant else None
        for name in ("values", "codes", "weight_scale", "bias"):
            self.register_buffer(name, None)
        self.register_buffer("cslt_buffer", None, persistent=False)
        self.register_buffer("dense_weight_cache", None, persistent=False)
        self._install(Sparse24Weight(values, codes, (out_features, in_features), scale=scale, validate=False),
                      torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    # ------------------------------------------------------------------ the weight

    @property
    def weight24(self) -> Sparse24Weight:
        """The layer's 2:4 weight (shares its tensors with the layer's buffers)."""
        w = self.__dict__["_weight24"]
        b = self._buffers
        if b["values"] is not w.values or b["codes"] is not w.codes or b["weight_scale"] is not w.scale:
            # Something replaced a buffer directly (e.g. a device-map loader, or `layer.codes = t`): adopt what the
            # buffers hold now, validated like any compressed data from outside (shapes, dtypes, pattern codes).
            w = Sparse24Weight(b["values"], b["codes"], (self.out_features, self.in_features),
                               scale=b["weight_scale"], validate=True)
            self.__dict__["_weight24"] = w
            self._refresh_device_state()
        return w

    def _install(self, weight: Sparse24Weight, bias: torch.Tensor | None, rebuild_cslt: bool = True) -> None:
        """Make `weight` (and `bias`) the layer's: the one place the weight tensors and the buffers are set."""
        self.__dict__["_weight24"] = weight
        self._buffers.update(values=weight.values, codes=weight.codes, weight_scale=weight.scale, bias=bias)
        if self.quant is None:
            self.dense_dtype = weight.values.dtype
        elif bias is not None:
            self.dense_dtype = bias.dtype
        self._refresh_device_state(rebuild_cslt=rebuild_cslt)

    # ------------------------------------------------------------------ construction / conversion

    @classmethod
    def from_linear(cls, linear: nn.Module, *, quant: str | None = None, check: bool = True,
                    name: str | None = None, dense_cache: bool = False) -> "SparseLinear":
        """A SparseLinear holding `linear`'s (2:4) weight and bias, on the same device.

        linear: nn.Linear (weight [out, in]) or transformers Conv1D (weight [in, out], transposed here); float32,
                float16 or bfloat16. The weight must be 2:4 along in_features (prune it first).
        quant:  None | "int8" | "fp8" (see sparsekern.quant; checked against the device).
                When `linear` carries a grid of the same quant recorded by sparsekern.quant.attach_weight_grid (e.g.
                from sparsegpt(..., quant=quant)), the weight is stored on that grid's scale, not on a scale fitted
                from the final weight: the codes and the scale are the optimised ones and nothing is re-rounded.
                That needs the weight to be still on the grid (quantize_weight_on_grid's rule: the dequantised
                codes, rounded to the weight's dtype, equal the weight exactly); a weight changed since is stored
                on a freshly fitted scale, with a warning. A recorded grid of another quant (or quant=None) is
                ignored.
        check:  verify the 2:4 pattern first and name `name`, the row and the group in the error; with check=False
                the compress op still refuses a non-2:4 weight, with a less specific message.
        dense_cache: keep a dense copy on the CPU too (see the class doc).
        """
        w, layout = dense_weight_of(linear)
        name = name or type(linear).__name__
        if w.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: weight dtype {w.dtype} is not supported (float32, float16, bfloat16)")
        n, k = w.shape
        if k % 4 != 0:
            raise ValueError(f"{name}: in_features = {k} is not a multiple of 4; 2:4 sparsity needs groups of 4 "
                             "along in_features")
        _ext.require("SparseLinear")
        check_quant_supported(quant, w.device)
        grid = weight_grid(linear) if quant is not None else None
        if grid is not None and grid[0] == quant:
            weight = _from_dense_on_grid(w, quant, grid[1], name, check)
        else:
            weight = Sparse24Weight.from_dense(w, quant, name=name, check=check)
        bias = linear.bias.detach() if getattr(linear, "bias", None) is not None else None
        layer = cls(k, n, bias is not None, dtype=w.dtype, quant=quant, device="meta", weight_layout=layout,
                    dense_cache=dense_cache)
        layer._install(weight, bias.clone() if bias is not None else None)
        return layer

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The dense layer back: nn.Linear, or transformers Conv1D for a layer made from one. dtype defaults to the
        weight's dtype (quantised layers: the dequantised weight in `dense_dtype`)."""
        dtype = dtype or self.dense_dtype
        w = self.dense_weight().to(dtype)
        dev = w.device
        if self.weight_layout == "conv1d":
            from transformers.pytorch_utils import Conv1D

            lin = Conv1D(self.out_features, self.in_features).to(device=dev, dtype=dtype)
            w = w.t()
        else:
            lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=dev,
                            dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
            elif lin.bias is not None:  # Conv1D always has a bias
                lin.bias.zero_()
        return lin

    def dense_weight(self) -> torch.Tensor:
        """The 2:4 weight [N, K], decompressed (and dequantised to float32 for quantised layers)."""
        return self.weight24.dense()

    def weight_nbytes(self) -> int:
        """Bytes of the compressed weight (values + codes + scales), the cuSPARSELt buffer not counted."""
        return self.weight24.nbytes

    def device_nbytes(self) -> int:
        """Bytes the weight occupies on its device: weight_nbytes() plus the cuSPARSELt buffer on CUDA (the
        portable values are kept there too, see the module doc) plus the dense copy of a dense_cache layer."""
        extra = 0
        for buf in (self.cslt_buffer, self.dense_weight_cache):
            extra += buf.numel() * buf.element_size() if buf is not None else 0
        return self.weight_nbytes() + extra

    def set_dense_cache(self, enabled: bool) -> None:
        """Allow (build now, on the CPU) or drop the dense copy of the weight; see the class doc."""
        if enabled and self.quant is not None:
            raise ValueError("SparseLinear.set_dense_cache: dense_cache=True is for unquantised layers")
        self.dense_cache = bool(enabled)
        self._buffers["dense_weight_cache"] = self._build_dense_cache()
        self.__dict__.pop("_kernel_cache", None)

    # ------------------------------------------------------------------ dispatch

    def kernel_for(self, m: int) -> str:
        """Kernel that runs a batch of m rows (x flattened to [m, K]) on the current device (sparsekern.policy)."""
        return self.__dict__["_weight24"].kernel_for(m, layer_override=self._kernel_override,
                                                     has_dense_cache=self.dense_weight_cache is not None)

    def set_kernel(self, kernel: str | None) -> None:
        """Force this layer's kernel (a name from sparsekern.policy.KERNELS), or None to follow the policy again.
        A kernel the layer cannot run on its device falls back to the default (kernel_for shows the result)."""
        from . import policy

        self._kernel_override = policy.normalize_kernel(kernel) if kernel is not None else None
        self.__dict__.pop("_kernel_cache", None)
    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Buffers are read from _buffers directly (not through nn.Module.__getattr__): a decode step calls every
        # linear once per token, so this path's Python overhead is paid ~200 times per token by a small model.
        b = self._buffers
        k = self.in_features
        if x.shape[-1] != k:
            raise ValueError(f"SparseLinear: input has {x.shape[-1]} features in its last dim, expected "
                             f"in_features = {k}")
        if self.quant is None:
            if x.dtype != b["values"].dtype:
                raise TypeError(f"SparseLinear holds a {b['values'].dtype} weight but the input is {x.dtype}; cast "
                                "the input or the layer (layer.to(dtype))")
        elif not x.is_floating_point():
            raise TypeError(f"SparseLinear(quant={self.quant!r}) needs a floating input, got {x.dtype}")
        x2 = x.reshape(-1, k)
        if torch.compiler.is_compiling():
            kernel = self.kernel_for(x2.shape[0])
        else:
            w = self.__dict__["_weight24"]
            if b["values"] is not w.values or b["codes"] is not w.codes or b["weight_scale"] is not w.scale:
                self.weight24  # noqa: B018  (adopts and validates buffers replaced from outside)
            kernel = self._eager_kernel(x2)
        if kernel == "dense_cached":  # a plain dense layer: autograd through x as usual, the copy is a buffer
            y = F.linear(x2, b["dense_weight_cache"], b["bias"])
            return y.reshape(*x.shape[:-1], self.out_features)
        args = (x2, b["values"], b["codes"], b["weight_scale"], b["bias"], b["cslt_buffer"], kernel, self.quant,
                self.out_features, self.in_features)
        if torch.is_grad_enabled() and x2.requires_grad:
            y = _SparseLinearFunction.apply(*args)
        else:
            y = _sparse_matmul(*args)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _eager_kernel(self, x2: torch.Tensor) -> str:
        """kernel_for(M) outside torch.compile, cached per M bucket until the policy's generation changes (a table
        activated or recorded into, override() entered or left) or the layer's own facts change (_kernel_cache
        dropped by set_kernel, set_dense_cache and every device move). A CPU bucket no table covers is calibrated
        here first (sparsekern.calibrate)."""
        m = x2.shape[0]
        bucket = _policy.m_bucket(m)
        gen = _policy._state.generation
        cache = self.__dict__.get("_kernel_cache")
        if cache is not None and cache[0] == gen:  # the hot path: one dict lookup
            kernel = cache[1].get(bucket)
            if kernel is not None:
                return kernel
        if (x2.device.type == "cpu" and self._kernel_override is None and _policy.forced_kernel() is None
                and _calib.wanted(_policy.dtype_name(self.values.dtype), self.out_features, self.in_features, m)):
            self._calibrate(x2)
        kernel = self.kernel_for(m)  # may activate a table (a new generation): cache under the one in effect now
        gen = _policy._state.generation
        cache = self.__dict__.get("_kernel_cache")
        if cache is None or cache[0] != gen:
            cache = (gen, {})
            self.__dict__["_kernel_cache"] = cache
        cache[1][bucket] = kernel
        return kernel

    def _calibrate(self, x2: torch.Tensor) -> None:
        """Time this layer's CPU candidates on x2 and record the winner (sparsekern.calibrate)."""
        b = self._buffers
        n, k = self.out_features, self.in_features

        def run(kernel):
            return lambda: _sparse_matmul(x2, b["values"], b["codes"], b["weight_scale"], b["bias"], None, kernel,
                                          self.quant, n, k)

        candidates = {"spmm24": run("spmm24"), "dense_fallback": run("dense_fallback")}
        if self.quant is None:
            w = b["dense_weight_cache"]
            w = w if w is not None else self.__dict__["_weight24"].decompress()
            bias = b["bias"]
            candidates["dense"] = lambda: F.linear(x2, w, bias)
        with torch.no_grad():
            _calib.calibrate(_policy.dtype_name(self.values.dtype), n, k, x2.shape[0], candidates)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={str(self.dense_dtype).removeprefix('torch.')}, quant={self.quant}"
                + (", dense_cache=True" if self.dense_cache else ""))

    # ------------------------------------------------------------------ device moves
    # ------------------------------------------------------------------ device moves

    def _refresh_device_state(self, rebuild_cslt: bool = True) -> None:
        """Recompute what depends on the device: the cuSPARSELt buffer (the weight's, also a buffer of the layer),
        the dense copy, and the policy table (read now, not inside a traced forward)."""
        from . import policy

        weight = self.__dict__["_weight24"]
        self.__dict__.pop("_kernel_cache", None)
        if rebuild_cslt:
            self._buffers["cslt_buffer"] = weight.build_cslt() if weight.device.type == "cuda" else None
        weight.kernel_for(1)  # computes and caches the device facts the policy needs (arch, kernels compiled)
        if rebuild_cslt or (self.dense_weight_cache is None) == (self._build_dense_cache_wanted()):
            self._buffers["dense_weight_cache"] = self._build_dense_cache()
        policy.active_table()

    def _build_dense_cache_wanted(self) -> bool:
        return self.dense_cache and self.quant is None and self.codes.device.type == "cpu"

    def _build_dense_cache(self) -> torch.Tensor | None:
        if not self._build_dense_cache_wanted():
            return None
        return self.__dict__["_weight24"].decompress()

    def _apply(self, fn, recurse=True):
        # Module.to/.cuda/.half call fn on every tensor. Codes must stay uint8 and a quantised weight (int8/fp8 is
        # "floating" for fp8) and its float32 scales must keep their dtypes: only their device follows fn. Then the
        # cuSPARSELt buffer is rebuilt for the new device (or dropped). Everything is computed before anything is
        # assigned, so a failure (e.g. fp8 on a GPU below sm89) leaves the layer as it was.
        old_weight = self.weight24
        codes = fn(old_weight.codes)
        dev = codes.device
        if codes.dtype != torch.uint8:
            codes = old_weight.codes.to(dev)
        if self.quant is None:
            values = fn(old_weight.values)
            if values.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"SparseLinear weights must stay float32/float16/bfloat16, not {values.dtype}")
        else:
            check_quant_supported(self.quant, dev)
            values = old_weight.values.to(dev)
        scale = old_weight.scale.to(dev) if old_weight.scale is not None else None
        bias = fn(self.bias) if self.bias is not None else None
        # A no-op move (model.to(device) on a model already there) keeps the cuSPARSELt buffer: no recompression.
        same_weight = values is old_weight.values and codes is old_weight.codes
        weight = old_weight if same_weight and scale is old_weight.scale else Sparse24Weight(
            values, codes, old_weight.shape, old_weight.format_version, scale=scale, validate=False)
        old = dict(self._buffers), old_weight, self.dense_dtype
        try:
            self._install(weight, bias, rebuild_cslt=not same_weight)
        except BaseException:
            self._buffers.update(old[0])
            self.__dict__["_weight24"], self.dense_dtype = old[1], old[2]
            raise
        return self

    # ------------------------------------------------------------------ pickling (torch.save(model))

    def __getstate__(self):
        # The cuSPARSELt buffer is valid only on the GPU arch and cuSPARSELt version it was made on (a model saved on
        # an A100 and loaded on an H100 with map_location would otherwise run an sm80 buffer on sm90), and the dense
        # copy is derived data: neither is pickled. __setstate__ rebuilds both for wherever the tensors land.
        state = self.__dict__.copy()
        state.pop("_kernel_cache", None)  # per-process kernel choices (sparsekern.policy.generation)
        state["_buffers"] = {**self._buffers, "cslt_buffer": None, "dense_weight_cache": None}
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        b = self._buffers
        self.__dict__["_weight24"] = Sparse24Weight(b["values"], b["codes"], (self.out_features, self.in_features),
                                                    scale=b["weight_scale"], validate=False)
        self._refresh_device_state()

    # ------------------------------------------------------------------ state dict

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The layout is the weight's (Sparse24Weight.state_dict): values, codes, weight_scale, bias, shape,
        # format_version.
        for key, t in self.weight24.state_dict(prefix, bias=self.bias).items():
            destination[key] = t if keep_vars else t.detach()

    def state_from_dict(self, state_dict, prefix: str = "") -> tuple[Sparse24Weight, torch.Tensor | None]:
        """Validate this layer's entries of `state_dict` and return (weight, bias) to install with
        load_weight(), without touching the layer; CheckpointError / NotTwoFourError naming `prefix` and the rule
        otherwise. Accepts the portable entries or a dense 2:4 `weight`."""
        n, k = self.out_features, self.in_features
        where = prefix.rstrip(".") or "SparseLinear"
        if not any(prefix + key in state_dict for key in ("values", "codes", "weight", "shape", "format_version")):
            raise CheckpointError(f"{where}: the state dict has no weight for this layer (expected {prefix}values, "
                                  f"{prefix}codes, ... or a dense {prefix}weight)")
        bias = state_dict.get(prefix + "bias")
        if (bias is None) != (self.bias is None):
            raise CheckpointError(f"{where}: the layer {'has' if self.bias is not None else 'has no'} bias but the "
                                  f"state dict {'lacks' if bias is None else 'holds'} '{prefix}bias'")
        if bias is not None and tuple(bias.shape) != (n,):
            raise CheckpointError(f"{where}: bias has shape {tuple(bias.shape)}, expected ({n},)")
        dev = self.codes.device if self.codes.device.type != "meta" else None
        target = self.bias.dtype if self.bias is not None else None
        bias = bias.to(device=dev or bias.device, dtype=target) if bias is not None else None

        if prefix + "weight" in state_dict and prefix + "values" not in state_dict:
            return self._weight_from_dense(state_dict[prefix + "weight"], where, dev), bias
        weight = Sparse24Weight.from_state_dict(state_dict, prefix, expect_shape=(n, k), quant=self.quant,
                                                value_dtype=self.values.dtype, device=dev, where=where)
        return weight, (bias.clone() if bias is not None else None)

    def _weight_from_dense(self, w: torch.Tensor, where: str, dev) -> Sparse24Weight:
        n, k = self.out_features, self.in_features
        stored = tuple(w.shape)
        if self.weight_layout == "conv1d":
            w = w.t()
        if tuple(w.shape) != (n, k):
            want = (k, n) if self.weight_layout == "conv1d" else (n, k)
            raise CheckpointError(f"{where}: dense weight has shape {stored}, expected {want}")
        if not w.is_floating_point():
            raise CheckpointError(f"{where}: dense weight has dtype {w.dtype}, expected a float dtype")
        w = w.to(device=dev or w.device, dtype=self.dense_dtype)
        check_twofour(w, where)
        return Sparse24Weight.from_dense(w, self.quant, check=False)

    def load_weight(self, weight: Sparse24Weight, bias: torch.Tensor | None) -> None:
        """Install a validated weight (and bias) from state_from_dict(); the layer's shape and quant must match."""
        if tuple(weight.shape) != (self.out_features, self.in_features) or weight.quant != self.quant:
            raise ValueError(f"SparseLinear.load_weight: weight {weight.shape} quant={weight.quant!r} does not fit "
                             f"the layer [{self.out_features}, {self.in_features}] quant={self.quant!r}")
        self._install(weight, bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {"values", "codes", "weight_scale", "bias", "shape", "format_version", "weight"}
        if not any(prefix + key in state_dict for key in own):
            # Nothing of this layer in the dict: report its keys missing (strict loading then fails), like nn.Module.
            missing_keys.extend(prefix + key for key in self.state_dict())
            return
        for key in state_dict:
            if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] not in own:
                unexpected_keys.append(key)
        try:
            weight, bias = self.state_from_dict(state_dict, prefix)
        except (CheckpointError, NotTwoFourError, ValueError) as exc:
            error_msgs.append(str(exc))  # nothing of this layer was changed
            return
        self.load_weight(weight, bias)


__all__ = ["SparseLinear", "Sparse24Weight", "NotTwoFourError", "CheckpointError", "QuantUnsupportedError",
           "is_convertible", "dense_weight_of", "check_twofour", "twofour_violation", "FORMAT_VERSION",
           "SUPPORTED_FORMAT_VERSIONS"]
