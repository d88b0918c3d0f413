"""SparseLinear and spmm_24 under torch.inference_mode(): the same numbers as without it, for every kernel family.

Regression (issue 18): the int8 K-blocked row-pair path copied x into its blocked table with tensor ops inside
at::parallel_for; the worker threads do not inherit InferenceMode, so the in-place copy into a buffer made under
inference mode raised "Inplace update to inference tensor outside InferenceMode" (found by `bench generate`).
"""

from __future__ import annotations

import pytest
import torch

from sparsekern import envs
from sparsekern.linear import SparseLinear


def _layer(n: int, k: int, dtype: torch.dtype, quant: str | None) -> tuple[SparseLinear, torch.nn.Linear]:
    lin = torch.nn.Linear(k, n, bias=True)
    with torch.no_grad():
        keep = torch.rand(n, k // 4, 4).argsort(-1) < 2
        lin.weight.mul_(keep.reshape(n, k))
    lin = lin.to(dtype)
    return SparseLinear.from_linear(lin, quant=quant), lin


@pytest.mark.parametrize("layout", ["auto", "rows", "pairs", "tokens", "amx"])
@pytest.mark.parametrize("dtype,quant", [(torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "int8")])
@pytest.mark.parametrize("m", [1, 17, 64, 300])
def test_inference_mode_matches_no_grad(layout, dtype, quant, m):
    layer, _ = _layer(96, 1544, dtype, quant)  # K = 1544: the blocked x table is > 1 MB at M = 300 (scratch reuse)
    x = torch.randn(m, 1544, dtype=dtype)
    try:
        with envs.cpu_dispatch(layout=layout):
            with torch.no_grad():
                ref = layer(x)
            with torch.inference_mode():
                got = layer(x)
            with torch.inference_mode():
                got2 = layer(x)  # a second call reuses the scratch buffers made under inference mode
            with torch.no_grad():
                after = layer(x)  # and a call outside it reuses them again
    except RuntimeError as e:
        if any(t in str(e) for t in ("needs the AVX-512 kernels", "LAYOUT=pairs needs", "LAYOUT=amx")):
            pytest.skip(f"layout {layout} not available for {dtype} on this CPU: {e}")
        raise
    assert torch.equal(got, ref) and torch.equal(got2, ref) and torch.equal(after, ref)
