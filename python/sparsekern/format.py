"""The portable 2:4 format (docs/format.md) and the compressed-tensors "sparse-24-bitmask" import/export.

Portable format, version 1 (FORMAT_VERSION), for a 2:4 weight W [rows, cols] (cols a multiple of 4, groups of 4
consecutive columns aligned at column 0):

- ``values`` [rows, cols/2], W's dtype: the two kept entries of every group, in column order (i0 < i1).
- ``codes`` uint8 [rows, ceil(cols/8)]: one 4-bit code per group, ``i0 | (i1 << 2)``; two codes per byte, the even
  group in the low nibble. With an odd number of groups per row the last high nibble is padding and is 0.

compressed-tensors "sparse-24-bitmask" (what llm-compressor writes for 2:4 checkpoints), as implemented in
vllm-project/compressed-tensors, src/compressed_tensors/compressors/sparse_compressors/sparse_24_bitmask.py and
src/compressed_tensors/utils (pack_bitmasks): ``compressed`` [rows, cols/2] = W[mask] in row-major order (the two
selected entries of each group, in column order: the same layout as our ``values``), ``bitmask`` uint8
[rows, ceil(cols/8)] = numpy.packbits(mask, axis=-1, bitorder="little") (bit j of byte b is column 8b + j, rows
padded with zero bits), and ``shape`` = torch.tensor([rows, cols]).reshape(-1, 1). Its mask selects exactly two
entries per group (top-2 |w|), which may include zeros. So a group's bitmask nibble and our code carry the same
information, and conversion is a 16-entry table lookup on each nibble; the values are shared unchanged.
"""

from __future__ import annotations

import dataclasses

import torch

FORMAT_VERSION = 1
FORMAT_NAME = "sparsekern-2:4-portable"

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


@dataclasses.dataclass
class Compressed24:
    """A 2:4 weight W [rows, cols] in the portable format (see the module docstring and docs/format.md).

    values: Tensor [rows, cols/2], dtype = W's dtype (float32/float16/bfloat16/int8/float8/float64).
    codes: uint8 Tensor [rows, ceil(cols/8)] (4-bit pattern code per group of 4).
    shape: (rows, cols) of the dense weight.
    cslt: optional cuSPARSELt opaque buffer (uint8, CUDA) of the same weight, made by ``.to("cuda")`` when the
        CUDA build and the shape allow; sparse_linear uses it on CUDA. The portable tensors are always kept, so the
        weight can be saved or moved back without decompressing the opaque buffer.
    """

    values: torch.Tensor
    codes: torch.Tensor
    shape: tuple[int, int]
    format_version: int = FORMAT_VERSION
    cslt: torch.Tensor | None = None

    def __post_init__(self):
        rows, cols = (int(s) for s in self.shape)
        self.shape = (rows, cols)
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"Compressed24: format_version {self.format_version} is not supported by this sparsekern "
                f"(it reads version {FORMAT_VERSION}); upgrade sparsekern"
            )
        if cols % 4 != 0:
            raise ValueError(f"Compressed24: cols ({cols}) must be a multiple of 4")
        if tuple(self.values.shape) != (rows, cols // 2):
            raise ValueError(
                f"Compressed24: values must be [rows, cols/2] = [{rows}, {cols // 2}] for shape {self.shape} "
                f"(got {list(self.values.shape)})"
            )
        if self.codes.dtype != torch.uint8 or tuple(self.codes.shape) != (rows, (cols // 4 + 1) // 2):
            raise ValueError(
                f"Compressed24: codes must be uint8 [rows, ceil(cols/8)] = [{rows}, {(cols // 4 + 1) // 2}] "
                f"(got {self.codes.dtype} {list(self.codes.shape)})"
            )
        if self.codes.device != self.values.device:
            raise ValueError(
                f"Compressed24: codes is on {self.codes.device} but values is on {self.values.device}; "
                "both must be on the same device"
            )

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Bytes of the portable tensors (values + codes)."""
        return self.values.numel() * self.values.element_size() + self.codes.numel()

    def decompress(self) -> torch.Tensor:
        """The dense weight [rows, cols] (values' dtype and device); exact."""
        from .ops.core import decompress_24

        return decompress_24(self)

    def to(self, device, cslt: bool | None = None) -> "Compressed24":
        """Copy to `device`. On CUDA also build the cuSPARSELt buffer: cslt=None builds it when the CUDA build and
        the shape allow (and skips it otherwise), True requires it (errors say why not), False never builds it."""
        device = torch.device(device)
        out = Compressed24(self.values.to(device), self.codes.to(device), self.shape, self.format_version)
        if device.type == "cuda" and cslt is not False:
            from .ops.core import _cslt_compress_or_none

            # Decompress where the tensors are now (the CPU kernel always exists) and move the dense weight.
            out.cslt = _cslt_compress_or_none(out, required=bool(cslt),
                                              dense_fn=lambda: self.decompress().to(device))
        return out

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors to store (e.g. in safetensors): values, codes, shape (int64 [2]) and format_version (int64 [1])."""
        return {
            prefix + "values": self.values,
            prefix + "codes": self.codes,
            prefix + "shape": torch.tensor(self.shape, dtype=torch.int64),
            prefix + "format_version": torch.tensor([self.format_version], dtype=torch.int64),
        }

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], prefix: str = "") -> "Compressed24":
        """Inverse of state_dict; refuses a format version this code does not read."""
        version = int(sd[prefix + "format_version"].reshape(-1)[0]) if prefix + "format_version" in sd else None
        if version is None:
            raise ValueError(f"Compressed24.from_state_dict: '{prefix}format_version' is missing; not a sparsekern "
                             "portable 2:4 tensor")
        shape = tuple(int(s) for s in sd[prefix + "shape"].reshape(-1).tolist())
        return cls(sd[prefix + "values"], sd[prefix + "codes"], shape, version)

    def __repr__(self) -> str:
        extra = ", cslt" if self.cslt is not None else ""
        return (f"Compressed24(shape={self.shape}, dtype={self.dtype}, device={self.device}, "
                f"format_version={self.format_version}{extra})")


def from_bitmask(values: torch.Tensor, bitmask: torch.Tensor, shape) -> Compressed24:
    """Import a compressed-tensors "sparse-24-bitmask" weight.

    values: [rows, cols/2] (the checkpoint's ``<name>.compressed``), any dtype the portable format holds.
    bitmask: uint8 [rows, ceil(cols/8)] (``<name>.bitmask``), little-endian bit order per byte.
    shape: (rows, cols), a sequence or the checkpoint's ``<name>.shape`` tensor (any shape holding two integers).
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
    return Compressed24(values.contiguous(), codes.contiguous(), (rows, cols))


def to_bitmask(c: Compressed24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Export to compressed-tensors "sparse-24-bitmask": (compressed [rows, cols/2], bitmask uint8
    [rows, ceil(cols/8)], shape int64 [2, 1]) — the tensors stored as ``<name>.compressed``, ``.bitmask``,
    ``.shape``. The values are shared with `c` (no copy)."""
    rows, cols = c.shape
    lut = _lut(_CODE_TO_MASK, c.codes.device)
    lo = lut[(c.codes & 0xF).long()]
    hi = lut[(c.codes >> 4).long()]
    bitmask = (lo | (hi << 4)).to(torch.uint8)
    shape = torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1)
    return c.values, bitmask, shape
