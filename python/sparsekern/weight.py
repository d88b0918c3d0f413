"""Sparse24Weight: the one owner of a 2:4 weight — its tensors, its rules, its file layout, its kernel choice.

    w24 = sparsekern.compress_24(pruned)                 # Sparse24Weight of a dense 2:4 weight [rows, cols]
    w24 = Sparse24Weight.from_dense(w, quant="int8")      # W8A8: int8 values + per-row float32 scale
    y = sparsekern.sparse_linear(x, w24, bias)            # == F.linear(x, W, bias)
    sd = w24.state_dict("layer.")                         # portable layout (docs/format.md), format version 1
    w24 = Sparse24Weight.from_state_dict(sd, "layer.")    # validated: CheckpointError naming the entry and the rule
    w24.to("cuda")                                        # + cuSPARSELt buffer, tagged with the GPU it was made for
    w24.kernel_for(m)                                     # which kernel runs m rows here (sparsekern.policy)

Portable format, version 1 (FORMAT_VERSION), of a 2:4 weight W [rows, cols] (cols a multiple of 4, groups of 4
consecutive columns aligned at column 0):

- ``values`` [rows, cols/2], W's dtype: the two kept entries of every group, in column order (i0 < i1). Quantised
  weights (W8A8, sparsekern.quant) hold int8 / float8_e4m3fn values plus ``weight_scale`` float32 [rows].
- ``codes`` uint8 [rows, ceil(cols/8)]: one 4-bit code per group, ``i0 | (i1 << 2)``; two codes per byte, the even
  group in the low nibble. With an odd number of groups per row the last high nibble is padding and is 0.
- state dict / checkpoint entries: ``values``, ``codes``, ``weight_scale`` (quantised only), ``shape`` (int64 [2] =
  [rows, cols]) and ``format_version`` (int64 [1]). SparseLinear adds its ``bias`` between weight_scale and shape.

compressed-tensors "sparse-24-bitmask" (what llm-compressor writes for 2:4 checkpoints; vllm-project/
compressed-tensors, sparse_compressors/sparse_24_bitmask.py and utils pack_bitmasks): ``compressed`` [rows, cols/2] =
W[mask] in row-major order (our ``values`` layout), ``bitmask`` uint8 [rows, ceil(cols/8)] = numpy.packbits(mask,
axis=-1, bitorder="little"), ``shape`` = torch.tensor([rows, cols]).reshape(-1, 1). Its mask selects exactly two
entries per group, so a group's bitmask nibble and our code carry the same information: conversion is a 16-entry
table lookup per nibble, the values are shared unchanged (from_bitmask / to_bitmask).

The cuSPARSELt buffer is device-specific: built from the portable tensors when the weight moves to a CUDA device
whose build and shape allow it (the shape rule is sparsekern.ops.cslt.shape_supported, whose numbers come from the C++
header csrc/core/cslt_shape.h), tagged with (device, GPU arch, cuSPARSELt version), never pickled or saved.

Layering: this module builds on sparsekern.ops (typed op wrappers), sparsekern.quant and sparsekern.policy; the layers
above (SparseLinear, serialization, conversion) hold a Sparse24Weight and never re-implement its rules.
"""

from __future__ import annotations

from typing import Mapping

import torch

from . import _ext, policy
from .ops import core as _core
from .ops import cslt as _cslt
from .quant import dequantize_weight, quant_of_dtype, quantize_weight

FORMAT_VERSION = 1
FORMAT_NAME = "sparsekern-2:4-portable"
SUPPORTED_FORMAT_VERSIONS = (FORMAT_VERSION,)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The portable format stores these value dtypes (float64 for exact references, 8-bit ones for W8A8).
VALUE_DTYPES = FLOAT_DTYPES + (torch.float64, torch.int8, torch.float8_e4m3fn)


class NotTwoFourError(ValueError):
    """A weight that must be 2:4 along its last dim (in_features) is not."""


class CheckpointError(ValueError):
    """A state dict / checkpoint entry is missing, truncated, mismatched or of an unknown format version."""


# --------------------------------------------------------------------------------------------- pattern codes
# 4-bit group bitmask (bit j = column j kept) -> 2:4 code i0 | (i1 << 2); 0xFF where the mask does not hold exactly
# two bits. And the inverse, code -> bitmask nibble (0 for invalid codes, including the padding code 0).
_MASK_TO_CODE = [0xFF] * 16
_CODE_TO_MASK = [0] * 16
for _i0 in range(4):
    for _i1 in range(_i0 + 1, 4):
        _MASK_TO_CODE[(1 << _i0) | (1 << _i1)] = _i0 | (_i1 << 2)
        _CODE_TO_MASK[_i0 | (_i1 << 2)] = (1 << _i0) | (1 << _i1)


def _lut(table: list[int], device) -> torch.Tensor:
    return torch.tensor(table, dtype=torch.uint8, device=device)


def codes_shape(rows: int, cols: int) -> tuple[int, int]:
    """Shape of the codes tensor of a [rows, cols] weight: [rows, ceil(cols/8)] (two 4-bit codes per byte)."""
    return rows, (cols // 4 + 1) // 2


def codes_violation(codes: torch.Tensor, cols: int) -> str | None:
    """A message naming the first invalid entry of a codes tensor [rows, ceil(cols/8)] (a code must hold two distinct
    increasing positions; the padding nibble after an odd number of groups must be 0), else None. One table lookup
    per nibble, on the codes' own device."""
    groups = cols // 4
    valid = _lut([1 if _CODE_TO_MASK[c] else 0 for c in range(16)], codes.device)
    nib = torch.stack((codes & 0xF, codes >> 4), dim=-1).reshape(codes.shape[0], -1)
    used, pad = nib[:, :groups], nib[:, groups:]
    bad = valid[used.long()] == 0
    if bool(bad.any()):
        r, g = (int(v) for v in bad.nonzero()[0])
        return f"codes[{r}] group {g} holds the invalid pattern code {int(used[r, g])} (corrupt or not 2:4 codes)"
    if pad.numel() and bool((pad != 0).any()):
        return "codes: the padding nibble after the last group is not 0 (corrupt codes)"
    return None


def twofour_violation(w: torch.Tensor) -> tuple[int, int, int] | None:
    """(row, group, non-zeros in that group) of the first group of 4 along dim 1 of w [N, K] with more than two
    non-zeros, else None. K a multiple of 4."""
    bad = _core.nm_violation(w, 2, 4)
    if bad is None:
        return None
    row, group = bad
    nnz = int((w[row, 4 * group: 4 * group + 4] != 0).sum())
    return row, group, nnz


def check_twofour(w: torch.Tensor, name: str) -> None:
    """Raise ValueError / NotTwoFourError naming `name` when w [N, K] is not a 2:4 weight along K."""
    k = w.shape[1]
    if k % 4 != 0:
        raise ValueError(f"{name}: in_features = {k} is not a multiple of 4; 2:4 sparsity needs groups of 4 along "
                         "in_features")
    bad = twofour_violation(w)
    if bad is not None:
        row, group, nnz = bad
        raise NotTwoFourError(
            f"{name}: weight is not 2:4 along in_features: row {row}, group {group} (columns {4 * group}.."
            f"{4 * group + 3}) has {nnz} non-zeros (at most 2 of every 4 allowed); prune it first, e.g. with "
            "sparsekern.prune_nm(w, 2, 4)"
        )


def _owned(t: torch.Tensor, given: torch.Tensor, copy: bool) -> torch.Tensor:
    """`t` (possibly `given` itself, when .to() had nothing to do) as a tensor the weight may keep: a fresh copy
    unless copy=False; always contiguous."""
    if copy and t is given:
        return t.clone(memory_format=torch.contiguous_format)
    return t.contiguous()


def _check_entry(t, key: str, where: str) -> None:
    """A state-dict entry the loader can use: a dense (strided) tensor with data (not on the meta device)."""
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{where}: '{key}' is a {type(t).__name__}, not a tensor")
    if t.layout != torch.strided:
        raise CheckpointError(f"{where}: '{key}' is a {t.layout} tensor; the portable format stores dense "
                              "(strided) tensors")
    if t.device.type == "meta":
        raise CheckpointError(f"{where}: '{key}' is on the meta device (it holds no data); load a state dict with "
                              "real tensors")


# --------------------------------------------------------------------------------------------- the weight


class Sparse24Weight:
    """A 2:4 weight W [rows, cols] in the portable format (module doc), plus what depends on its device.

    values: Tensor [rows, cols/2] (float32/float16/bfloat16/float64, or int8/float8_e4m3fn when quantised).
    codes:  uint8 Tensor [rows, ceil(cols/8)], on values' device.
    shape:  (rows, cols) of the dense weight; cols a multiple of 4.
    format_version: the portable format version (only FORMAT_VERSION is read).
    cslt:   optional cuSPARSELt buffer (uint8, CUDA) of the same weight; normally built by ``.to("cuda")``.
    scale:  float32 [rows] per-row weight scale; required for int8/float8 values (W8A8), absent otherwise.
    validate: check the codes (one table lookup per byte); False only for codes this library just produced.
    The portable tensors are always kept, so the weight can be saved or moved back without touching the opaque
    buffer. Compressed24 is this class (its former name).
    """

    __slots__ = ("values", "codes", "shape", "format_version", "scale", "_cslt", "_cslt_tag", "_facts")

    def __init__(self, values: torch.Tensor, codes: torch.Tensor, shape, format_version: int = FORMAT_VERSION,
                 cslt: torch.Tensor | None = None, *, scale: torch.Tensor | None = None, validate: bool = True):
        rows, cols = (int(s) for s in shape)
        self.values, self.codes, self.shape = values, codes, (rows, cols)
        self.format_version, self.scale = format_version, scale
        self._cslt, self._cslt_tag, self._facts = None, None, None
        self._check_layout(validate)
        if cslt is not None:
            self._cslt, self._cslt_tag = cslt, _cslt.buffer_tag(cslt.device)

    def _check_layout(self, validate_codes: bool) -> None:
        rows, cols = self.shape
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise ValueError(
                f"Compressed24: format_version {self.format_version} is not supported by this sparsekern "
                f"(it reads version {FORMAT_VERSION}); upgrade sparsekern"
            )
        if rows < 0 or cols < 0 or cols % 4 != 0:
            raise ValueError(f"Compressed24: cols ({cols}) must be a non-negative multiple of 4 (rows {rows})")
        if tuple(self.values.shape) != (rows, cols // 2):
            raise ValueError(
                f"Compressed24: values must be [rows, cols/2] = [{rows}, {cols // 2}] for shape {self.shape} "
                f"(got {list(self.values.shape)})"
            )
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != codes_shape(rows, cols):
            raise ValueError(
                f"Compressed24: codes must be uint8 [rows, ceil(cols/8)] = {list(codes_shape(rows, cols))} "
                f"(got {self.codes.dtype} {list(self.codes.shape)})"
            )
        if self.codes.device != self.values.device:
            raise ValueError(
                f"Compressed24: codes is on {self.codes.device} but values is on {self.values.device}; "
                "both must be on the same device"
            )
        if self.scale is not None and quant_of_dtype(self.values.dtype) is None:
            raise ValueError(f"Compressed24: a scale is for quantised (int8 / float8_e4m3fn) values, not "
                             f"{self.values.dtype}")
        if self.scale is not None and (self.scale.dtype != torch.float32 or tuple(self.scale.shape) != (rows,)
                                       or self.scale.device != self.values.device):
            raise ValueError(f"Compressed24: scale must be float32 [rows = {rows}] on {self.values.device} (got "
                             f"{self.scale.dtype} {list(self.scale.shape)} on {self.scale.device})")
        if validate_codes and self.codes.device.type != "meta":
            bad = codes_violation(self.codes, cols)
            if bad:
                raise ValueError(f"Compressed24: {bad}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_dense(cls, w: torch.Tensor, quant: str | None = None, *, name: str | None = None,
                   check: bool = True) -> "Sparse24Weight":
        """Compress a dense 2:4 weight w [rows, cols] (float32/float16/bfloat16/float64, or int8/float8 already
        stored in that dtype). quant "int8"/"fp8" compresses the float weight first and quantises its kept values
        (the per-row absmax over the kept values is the row's absmax; the codes stay those of the float weight).
        check: name `name`, the row and the group of a non-2:4 weight (else the op's own, less specific error)."""
        if w.dim() != 2:
            raise ValueError(f"compress_24: w must be 2-D [rows, cols] (got shape {list(w.shape)})")
        if check:
            check_twofour(w, name or "compress_24")
        values, codes = _core.compress_24(w.contiguous())
        scale = None
        if quant is not None:
            values, scale = quantize_weight(values, quant)
            values = values.contiguous()
        return cls(values, codes, (w.shape[0], w.shape[1]), scale=scale, validate=False)

    @classmethod
    def from_bitmask(cls, values: torch.Tensor, bitmask: torch.Tensor, shape) -> "Sparse24Weight":
        """Import a compressed-tensors "sparse-24-bitmask" weight (module doc).

        values: [rows, cols/2] (the checkpoint's ``<name>.compressed``), a dtype the portable format holds.
        bitmask: uint8 [rows, ceil(cols/8)] (``<name>.bitmask``), little-endian bit order per byte.
        shape: (rows, cols), a sequence or the checkpoint's ``<name>.shape`` tensor (any shape holding two ints).
        Every group of 4 must select exactly two columns; the error names the first row and group that does not.
        """
        if isinstance(shape, torch.Tensor):
            shape = shape.reshape(-1).tolist()
        rows, cols = (int(s) for s in shape)
        if cols % 4 != 0:
            raise ValueError(f"from_bitmask: cols ({cols}) must be a multiple of 4 for a 2:4 weight")
        nbytes = (cols + 7) // 8
        if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, nbytes):
            raise ValueError(f"from_bitmask: bitmask must be uint8 [rows, ceil(cols/8)] = [{rows}, {nbytes}] "
                             f"(got {bitmask.dtype} {list(bitmask.shape)})")
        if tuple(values.shape) != (rows, cols // 2):
            raise ValueError(f"from_bitmask: values must be [rows, cols/2] = [{rows}, {cols // 2}] "
                             f"(got {list(values.shape)})")
        if values.device != bitmask.device:
            raise ValueError(f"from_bitmask: bitmask is on {bitmask.device} but values is on {values.device}")
        lut = _lut(_MASK_TO_CODE, bitmask.device)
        lo = lut[(bitmask & 0xF).long()]
        hi = lut[(bitmask >> 4).long()]
        if cols % 8 == 4:
            # The last byte's high nibble covers columns past the row end: packbits padding, not a group.
            pad = bitmask[:, -1] >> 4
            if bool((pad != 0).any()):
                r = int((pad != 0).nonzero()[0, 0])
                raise ValueError(f"from_bitmask: row {r} sets bits past column {cols - 1} in its last bitmask byte")
            hi[:, -1] = 0  # the portable format's padding nibble is code 0
        bad = torch.stack([lo == 0xFF, hi == 0xFF], dim=-1).reshape(rows, -1)[:, : cols // 4]
        if bool(bad.any()):
            r, g = (int(v) for v in bad.nonzero()[0])
            nib = int(bitmask[r, g // 2]) >> (4 * (g % 2)) & 0xF
            raise ValueError(f"from_bitmask: row {r}, group {g} (columns {4 * g}..{4 * g + 3}) has bitmask "
                             f"{nib:04b} (bit j = column 4g+j), selecting {bin(nib).count('1')} columns; a 2:4 "
                             "bitmask selects exactly 2 per group of 4")
        codes = (lo | (hi << 4)).to(torch.uint8)
        return cls(values.contiguous(), codes.contiguous(), (rows, cols), validate=False)

    def to_bitmask(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Export to compressed-tensors "sparse-24-bitmask": (compressed [rows, cols/2], bitmask uint8
        [rows, ceil(cols/8)], shape int64 [2, 1]), the tensors stored as ``<name>.compressed``, ``.bitmask``,
        ``.shape``. The values are shared (no copy)."""
        rows, cols = self.shape
        lut = _lut(_CODE_TO_MASK, self.codes.device)
        lo = lut[(self.codes & 0xF).long()]
        hi = lut[(self.codes >> 4).long()]
        bitmask = (lo | (hi << 4)).to(torch.uint8)
        return self.values, bitmask, torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1)

    # ------------------------------------------------------------------ facts

    @property
    def dtype(self) -> torch.dtype:
        """The stored values' dtype (int8 / float8_e4m3fn for quantised weights)."""
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def quant(self) -> str | None:
        """"int8" or "fp8" for a W8A8 weight (8-bit values with their per-row scale), else None. (8-bit values
        without a scale are a plain int8 / float8 weight, as compress_24 of an int8 tensor gives.)"""
        return quant_of_dtype(self.values.dtype) if self.scale is not None else None

    @property
    def nbytes(self) -> int:
        """Bytes of the portable tensors (values + codes, + scale when quantised); the cuSPARSELt buffer not
        counted."""
        extra = self.scale.numel() * 4 if self.scale is not None else 0
        return self.values.numel() * self.values.element_size() + self.codes.numel() + extra

    @property
    def cslt(self) -> torch.Tensor | None:
        """The cuSPARSELt buffer, or None (not on CUDA, not allowed, or not built)."""
        return self._cslt

    @property
    def cslt_tag(self) -> tuple | None:
        """(device, "sm<maj><min>", cuSPARSELt version) the cuSPARSELt buffer was made for, or None."""
        return self._cslt_tag

    def decompress(self) -> torch.Tensor:
        """The dense weight [rows, cols] in the stored dtype (quantised values stay quantised); exact."""
        return _core.decompress_24(self.values, self.codes, self.shape[1])

    def dense(self) -> torch.Tensor:
        """The dense weight [rows, cols]: decompressed, and dequantised to float32 for quantised weights."""
        w = self.decompress()
        return dequantize_weight(w, self.scale) if self.quant else w

    # ------------------------------------------------------------------ cuSPARSELt buffer

    def cslt_unsupported(self) -> str | None:
        """Why this weight cannot have a cuSPARSELt buffer where it is (None when it can)."""
        if self.device.type != "cuda":
            return f"the weight is on {self.device}, cuSPARSELt runs on CUDA devices"
        why = _cslt.unsupported_reason(self.shape[0], self.shape[1], self.values.dtype)
        return why or _cslt.capability_reason(torch.cuda.get_device_capability(self.device), self.values.dtype)

    def build_cslt(self, required: bool = False, dense: torch.Tensor | None = None) -> torch.Tensor | None:
        """Build (or keep, when still valid for this device) the cuSPARSELt buffer; returns it. When this build,
        device or shape does not allow one: None, or ValueError saying why when `required`. `dense`: the
        decompressed weight if the caller has it already (on this device)."""
        why = self.cslt_unsupported()
        if why is not None:
            if required:
                raise ValueError(f"Sparse24Weight.to(cslt=True): {why}")
            self._cslt, self._cslt_tag = None, None
            return None
        tag = _cslt.buffer_tag(self.device)
        if self._cslt is None or self._cslt_tag != tag:
            self._cslt = _cslt.cslt_compress(dense if dense is not None else self.decompress())
            self._cslt_tag = tag
        return self._cslt

    def drop_cslt(self) -> None:
        self._cslt, self._cslt_tag = None, None

    def to(self, device, cslt: bool | None = None) -> "Sparse24Weight":
        """A copy on `device`. On CUDA also the cuSPARSELt buffer: cslt=None builds it when the build and the shape
        allow (and skips it otherwise), True requires it (errors say why not), False never builds it."""
        device = torch.device(device)
        scale = self.scale.to(device) if self.scale is not None else None
        out = Sparse24Weight(self.values.to(device), self.codes.to(device), self.shape, self.format_version,
                             scale=scale, validate=False)
        if device.type == "cuda" and cslt is not False:
            out.build_cslt(required=bool(cslt))
        return out

    # ------------------------------------------------------------------ kernel choice

    def _device_facts(self) -> tuple[str, str, bool]:
        """(device type, arch "cpu" / "sm<maj><min>", CUDA spmm_24 compiled), computed once per weight object (a
        weight never changes device: .to() makes a new one), so kernel_for does no device query per call."""
        if self._facts is None:
            dev = self.values.device
            arch = policy.arch_of(dev) if dev.type == "cuda" else dev.type
            self._facts = (dev.type, arch, dev.type == "cuda" and policy.cuda_kernel_compiled("spmm_24"))
        return self._facts

    def kernel_for(self, m: int, *, layer_override: str | None = None, has_dense_cache: bool = False) -> str:
        """The kernel that runs m rows (x flattened to [m, cols]) of this weight where it is: sparsekern.policy's
        choice from the table in use, given what this weight can run (its cuSPARSELt buffer, the kernels compiled
        for its device). layer_override: a layer's set_kernel(); has_dense_cache: the holder keeps a dense copy."""
        device_type, arch, has_cuda_spmm24 = self._device_facts()
        return policy.choose_kernel(
            device_type=device_type, arch=arch, dtype=policy.dtype_name(self.values.dtype), n=self.shape[0],
            k=self.shape[1], m=m, has_cslt=self._cslt is not None, has_cuda_spmm24=has_cuda_spmm24,
            layer_override=layer_override, has_dense_cache=has_dense_cache)

    # ------------------------------------------------------------------ state dict

    def state_dict(self, prefix: str = "", *, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Tensors to store: values, codes, weight_scale (quantised), [bias], shape (int64 [2]), format_version
        (int64 [1]) — the layout SparseLinear checkpoints have held since format version 1."""
        out = {prefix + "values": self.values, prefix + "codes": self.codes}
        if self.scale is not None:
            out[prefix + "weight_scale"] = self.scale
        if bias is not None:
            out[prefix + "bias"] = bias
        out[prefix + "shape"] = torch.tensor(self.shape, dtype=torch.int64)
        out[prefix + "format_version"] = torch.tensor([self.format_version], dtype=torch.int64)
        return out

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], prefix: str = "", *,
                        expect_shape: tuple[int, int] | None = None, quant: str | None | type(...) = ...,
                        value_dtype: torch.dtype | None = None, device: torch.device | None = None,
                        where: str | None = None, copy: bool = True) -> "Sparse24Weight":
        """Read and validate the portable entries under `prefix` (values, codes, shape, format_version, and
        weight_scale for quantised values); the result owns fresh copies (nothing shared with `sd`).

        expect_shape: the (rows, cols) the caller needs. quant: the quantisation the caller needs (None = float;
        the default ... accepts what is stored). value_dtype: cast float values to this dtype. device: where to put
        the tensors (default: where they are). where: the name errors start with (default the prefix). copy=False:
        keep the given tensors when no cast or move is needed (a loader handing over tensors it owns, e.g.
        memory-mapped from a checkpoint file, whose pages are then read only when the weight is first used).
        Raises CheckpointError naming the entry and the rule; a file this code cannot read says to upgrade."""
        where = where or prefix.rstrip(".") or "Sparse24Weight"
        missing = [key for key in ("values", "codes", "shape", "format_version") if prefix + key not in sd]
        if quant is not ... and quant is not None and prefix + "weight_scale" not in sd:
            missing.append("weight_scale")
        if missing:
            also = (f"; '{prefix}format_version' is missing; not a sparsekern portable 2:4 tensor"
                    if "format_version" in missing else "")
            raise CheckpointError(f"{where}: state dict lacks {', '.join(prefix + m for m in missing)} (neither the "
                                  f"portable 2:4 entries nor a dense weight){also}")
        for key in ("values", "codes", "shape", "format_version", "weight_scale"):
            if prefix + key in sd:
                _check_entry(sd[prefix + key], prefix + key, where)
        values = sd[prefix + "values"]
        stored_quant = quant_of_dtype(values.dtype)
        version = sd[prefix + "format_version"]
        if version.dtype.is_floating_point or version.dtype == torch.bool or version.is_complex():
            raise CheckpointError(f"{where}: format_version must be an integer tensor, got {version.dtype}")
        if version.numel() != 1 or int(version.reshape(-1)[0]) not in SUPPORTED_FORMAT_VERSIONS:
            raise CheckpointError(f"{where}: unknown 2:4 format version {version.tolist()}; this sparsekern reads "
                                  f"versions {SUPPORTED_FORMAT_VERSIONS} (upgrade sparsekern)")
        shape = sd[prefix + "shape"].reshape(-1).tolist()
        if len(shape) != 2:
            raise CheckpointError(f"{where}: shape must hold two integers [rows, cols], got {shape}")
        if expect_shape is not None and shape != list(expect_shape):
            raise CheckpointError(f"{where}: checkpoint weight shape {shape} != layer shape {list(expect_shape)}")
        n, k = (int(s) for s in shape)
        if k % 4 != 0 or n < 0:
            raise CheckpointError(f"{where}: shape {shape}: cols must be a multiple of 4")
        codes = sd[prefix + "codes"]
        if tuple(values.shape) != (n, k // 2):
            raise CheckpointError(f"{where}: values has shape {tuple(values.shape)}, expected ({n}, {k // 2}) "
                                  "(truncated or mismatched)")
        cshape = codes_shape(n, k)
        if codes.dtype != torch.uint8 or tuple(codes.shape) != cshape:
            raise CheckpointError(f"{where}: codes must be uint8 of shape {cshape}; got {codes.dtype} "
                                  f"{tuple(codes.shape)} (truncated or mismatched)")
        if quant is not ... and stored_quant != quant:
            raise CheckpointError(f"{where}: checkpoint values are {values.dtype} (quant={stored_quant!r}) but the "
                                  f"layer has quant={quant!r}")
        if values.dtype not in VALUE_DTYPES or values.layout != torch.strided:
            raise CheckpointError(f"{where}: values dtype {values.dtype} is not a float dtype")
        bad = codes_violation(codes, k)
        if bad:
            raise CheckpointError(f"{where}: {bad}")
        scale = None
        if stored_quant is not None and (quant is not ... or prefix + "weight_scale" in sd):
            scale = sd[prefix + "weight_scale"]
            if tuple(scale.shape) != (n,) or scale.dtype != torch.float32:
                raise CheckpointError(f"{where}: weight_scale must be float32 of shape ({n},); got {scale.dtype} "
                                      f"{tuple(scale.shape)}")
            scale = _owned(scale.to(device or scale.device), scale, copy)
        elif value_dtype is not None:
            values = values.to(value_dtype)
        given_values, given_codes = sd[prefix + "values"], sd[prefix + "codes"]
        values = _owned(values.to(device or values.device), given_values, copy)
        codes = _owned(codes.to(device or codes.device), given_codes, copy)
        return cls(values, codes, (n, k), int(version.reshape(-1)[0]), scale=scale, validate=False)

    # ------------------------------------------------------------------ python protocol

    def __getstate__(self):
        # The cuSPARSELt buffer is valid only on the GPU arch and library version it was made on: never pickled.
        return {"values": self.values, "codes": self.codes, "shape": self.shape,
                "format_version": self.format_version, "scale": self.scale}

    def __setstate__(self, state):
        self.values, self.codes, self.shape = state["values"], state["codes"], tuple(state["shape"])
        self.format_version, self.scale = state["format_version"], state.get("scale")
        self._cslt, self._cslt_tag, self._facts = None, None, None

    def __repr__(self) -> str:
        extra = (", quant=" + repr(self.quant)) if self.quant else ""
        extra += ", cslt" if self._cslt is not None else ""
        return (f"Sparse24Weight(shape={self.shape}, dtype={self.dtype}, device={self.device}, "
                f"format_version={self.format_version}{extra})")


Compressed24 = Sparse24Weight  # the name this type had before it owned everything about the 2:4 weight


# --------------------------------------------------------------------------------------------- functional API


def compress_24(w: torch.Tensor) -> Sparse24Weight:
    """Compress a 2:4 weight w [rows, cols] (cols % 4 == 0; float32/float64/float16/bfloat16/int8/float8) into the
    portable format. Raises naming the first (row, group) with more than two non-zeros; prune first."""
    if w.dim() != 2:
        raise ValueError(f"compress_24: w must be 2-D [rows, cols] (got shape {list(w.shape)})")
    values, codes = _core.compress_24(w)
    return Sparse24Weight(values, codes, (w.shape[0], w.shape[1]), validate=False)


def decompress_24(c: Sparse24Weight) -> torch.Tensor:
    """Dense weight [rows, cols] of a Sparse24Weight (its dtype and device); exact inverse of compress_24."""
    return c.decompress()


def sparse_linear(
    x: torch.Tensor,
    c: Sparse24Weight,
    bias: torch.Tensor | None = None,
    alpha: torch.Tensor | None = None,
    activation: str | None = None,
    out_dtype: torch.dtype | None = None,
    row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = act(row_scale[:, None] * alpha[None, :] * (x @ W^T) + bias): F.linear on the decompressed weight W.

    x: [..., K] (any strides), dtype = W's dtype: float32/float16/bfloat16 (fp32 accumulation) or int8 (W8A8,
       exact int32 accumulation). Leading dims are flattened and restored: y is [..., N].
    c: Sparse24Weight of W [N, K] on x's device.
    bias, alpha: optional floating [N] (alpha = per-output-channel scale). row_scale: optional floating [M] with
       M = x.numel() / K (per-token scale, e.g. from quantize_per_token). All on x's device.
    activation: None/"none", "relu" or "gelu" (erf form, like F.gelu's default).
    out_dtype: default x's dtype (int32 for int8 x); floating inputs allow float32/float16/bfloat16, int8 inputs
       also int32/int8 (rounded half-to-even, saturated).
    On CPU this runs spmm_24 on the portable tensors. On CUDA it runs cslt_linear when `c` holds a cuSPARSELt
    buffer (Sparse24Weight.to("cuda")), else spmm_24's CUDA kernel.
    """
    act = _core.check_activation("sparse_linear", activation)
    rows, cols = c.shape
    if x.shape[-1] != cols:
        raise ValueError(f"sparse_linear: x's last dim ({x.shape[-1]}) must equal the weight's in_features ({cols})")
    if x.device != c.device:
        raise ValueError(f"sparse_linear: the weight is on {c.device} but x is on {x.device}; move one of them")
    for name, t in (("bias", bias), ("alpha", alpha), ("row_scale", row_scale)):
        if t is not None and t.device != x.device:
            raise ValueError(f"sparse_linear: {name} is on {t.device} but x is on {x.device}; all tensors must be "
                             "on one device")
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), cols)
    if row_scale is not None and row_scale.numel() != x2.shape[0]:
        raise ValueError(f"sparse_linear: row_scale must hold one scale per row of x ({x2.shape[0]}), "
                         f"got {row_scale.numel()}")
    if row_scale is not None:
        row_scale = row_scale.reshape(-1)
    if x.device.type == "cuda" and c.cslt is not None:
        y = _cslt.cslt_linear(x2, c.cslt, rows, cols, bias, alpha, row_scale, act, out_dtype)
    else:
        y = _core.spmm_24(x2, c.values, c.codes, bias, alpha, row_scale, act, out_dtype)
    return y.reshape(*lead, rows)


def from_bitmask(values: torch.Tensor, bitmask: torch.Tensor, shape) -> Sparse24Weight:
    """Sparse24Weight.from_bitmask (compressed-tensors import)."""
    return Sparse24Weight.from_bitmask(values, bitmask, shape)


def to_bitmask(c: Sparse24Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """c.to_bitmask() (compressed-tensors export)."""
    return c.to_bitmask()


__all__ = ["Sparse24Weight", "Compressed24", "FORMAT_VERSION", "FORMAT_NAME", "SUPPORTED_FORMAT_VERSIONS",
           "NotTwoFourError", "CheckpointError", "compress_24", "decompress_24", "sparse_linear", "from_bitmask",
           "to_bitmask", "check_twofour", "twofour_violation", "codes_violation", "codes_shape"]
