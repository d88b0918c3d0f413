"""The portable 2:4 format container and the compressed-tensors "sparse-24-bitmask" import/export.

The reference for the bitmask layout is written here independently, as compressed-tensors defines it
(vllm-project/compressed-tensors, compressors/sparse_compressors/sparse_24_bitmask.py + utils pack_bitmasks):
mask = top-2 |w| per group of 4, values = w[mask] row-major, bitmask = numpy.packbits(mask, axis=-1,
bitorder="little"), shape = tensor([rows, cols]).reshape(-1, 1). All comparisons are exact.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sparsekern  # noqa: F401
from sparsekern import weight
from sparsekern import _ext
from sparsekern.weight import Compressed24, from_bitmask, to_bitmask
from sparsekern.ops import core

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}")


def ct_compress(w: torch.Tensor):
    """compressed-tensors' sparse-24-bitmask compression, restated: (compressed, bitmask, shape)."""
    rows, cols = w.shape
    g = w.reshape(-1, 4).float().abs()
    top2 = g.topk(2, dim=1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(1, top2, True).reshape(rows, cols)
    values = w[mask].reshape(rows, cols // 2)
    bitmask = torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))
    return values, bitmask, torch.tensor([rows, cols]).reshape(-1, 1)


def random_24(rows, cols, dtype, exactly_two=True):
    w = torch.randn(rows, cols) + 0.1
    keep = torch.rand(rows, cols).reshape(-1, 4).argsort(dim=1)[:, :2]
    mask = torch.zeros(rows * cols // 4, 4, dtype=torch.bool).scatter_(1, keep, True).reshape(rows, cols)
    if not exactly_two:
        mask &= torch.rand(rows, cols) > 0.3
    if dtype == torch.int8:  # non-zero integers where kept
        w = torch.randint(1, 128, (rows, cols)) * (torch.randint(0, 2, (rows, cols)) * 2 - 1)
        return (w * mask).to(torch.int8)
    return (w * mask).to(dtype)


def test_hand_built_example():
    # Row 0 groups: kept (0, 2), (2, 3), (1, 3); row 1: (0, 1), (1, 2), (0, 3). 12 columns: an odd group count.
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4, 0, 5, 0, 6],
                      [7.0, 8, 0, 0, 0, 9, 10, 0, 11, 0, 0, 12]])
    c = weight.compress_24(w)
    assert c.codes.tolist() == [[8 | (14 << 4), 13], [4 | (9 << 4), 12]]
    values, bitmask, shape = to_bitmask(c)
    # bit j of byte b <-> column 8b + j; row 0 columns {0, 2, 6, 7 | 9, 11}, row 1 {0, 1, 5, 6 | 8, 11}
    assert bitmask.tolist() == [[1 + 4 + 64 + 128, 2 + 8], [1 + 2 + 32 + 64, 1 + 8]]
    assert values.tolist() == [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]]
    assert shape.tolist() == [[2], [12]]
    back = from_bitmask(values, bitmask, shape)
    assert torch.equal(back.codes, c.codes) and torch.equal(back.decompress(), w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("shape", [(1, 4), (5, 12), (16, 64), (7, 100)])
def test_export_matches_compressed_tensors(dtype, shape):
    w = random_24(*shape, dtype)  # exactly two non-zeros per group: the top-2 mask is unambiguous
    values, bitmask, shp = to_bitmask(weight.compress_24(w))
    ref_values, ref_bitmask, ref_shape = ct_compress(w)
    assert torch.equal(bitmask, ref_bitmask)
    assert torch.equal(values, ref_values)
    assert torch.equal(shp, ref_shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("shape", [(3, 8), (9, 20), (32, 128)])
def test_import_from_compressed_tensors(dtype, shape):
    # Groups with fewer than two non-zeros: compressed-tensors' top-2 picks some zeros; any choice must import.
    w = random_24(*shape, torch.float32, exactly_two=False).to(dtype)
    values, bitmask, shp = ct_compress(w.float())
    values = values.to(dtype)
    c = from_bitmask(values, bitmask, shp)
    assert c.shape == shape and c.dtype == dtype
    assert torch.equal(c.decompress().float(), w.float())
    # and back out: the same bitmask (the selected positions are kept, zeros included)
    v2, b2, _ = to_bitmask(c)
    assert torch.equal(b2, bitmask) and torch.equal(v2.float(), values.float())


def test_round_trip_through_state_dict_and_bitmask():
    w = random_24(12, 40, torch.bfloat16, exactly_two=False)
    c = weight.compress_24(w)
    c2 = from_bitmask(*to_bitmask(c))
    assert torch.equal(c2.codes, c.codes) and torch.equal(c2.values, c.values)
    c3 = Compressed24.from_state_dict(c2.state_dict())
    assert torch.equal(c3.decompress(), w)


def test_from_bitmask_errors():
    w = random_24(4, 20, torch.float32)
    values, bitmask, shape = ct_compress(w)
    bad = bitmask.clone()
    bad[2, 1] = (bad[2, 1] & 0xF0) | 0b0111  # row 2, group 2 (columns 8..11): three bits
    with pytest.raises(ValueError, match=r"row 2, group 2 \(columns 8..11\) has bitmask 0111 .* selecting 3 columns"):
        from_bitmask(values, bad, shape)
    pad = bitmask.clone()
    pad[1, 2] |= 0x10  # column 20: past the row end (20 columns = 2.5 bytes)
    with pytest.raises(ValueError, match="row 1 sets bits past column 19"):
        from_bitmask(values, pad, shape)
    with pytest.raises(ValueError, match=r"bitmask must be uint8 \[rows, ceil\(cols/8\)\] = \[4, 3\]"):
        from_bitmask(values, bitmask[:, :2], shape)
    with pytest.raises(ValueError, match=r"values must be \[rows, cols/2\] = \[4, 10\]"):
        from_bitmask(values[:, :8], bitmask, shape)
    with pytest.raises(ValueError, match=r"cols \(18\) must be a multiple of 4"):
        from_bitmask(values, bitmask, (4, 18))
