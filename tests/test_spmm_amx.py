"""The AMX kernel family of the CPU 2:4 GEMM (spmm_24, csrc/cpu/spmm_24_amx.cpp) against a float64 reference.

The reference is independent of the library's own decompression: the dense weight is rebuilt from the portable
tensors (values, codes) with plain torch indexing here, and checked against the dense 2:4 weight it was compressed
from. Tolerances: int8 x int8 with int32 output and no epilogue is exact; bfloat16 follows tests/test_spmm_cpu.py
(no worse than twice PyTorch's own error in the same dtype, plus two output ulps at the output's scale); int8 inputs
with a floating epilogue: |ours - ref64| <= 2 eps(out) |ref64| + 1e-6 max |ref64|.

The family is forced with sparsekern.envs.cpu_dispatch(layout="amx"). Sizes mix odd and aligned M, K and N so that
every path of the kernel runs: M tails (x rows read from a zero-padded copy), K not a multiple of the 32 / 64-column
chunk (x from the kernel's table), K strides that are multiples of 1 KB (table), K-blocked accumulation (K > 1024
bf16 / 2048 int8), 32- and 64-row weight tiles with N tails, slabs (amx_slab_rows), the fused epilogue (float32 /
bfloat16 / raw int32 out, bias, alpha, row_scale, relu) and the driver's epilogue (gelu, float16 / int8 out).
"""

from __future__ import annotations

import pytest
import torch

from sparsekern import _ext, envs
from sparsekern.ops import core

pytestmark = pytest.mark.skipif(not _ext.available(), reason=f"extension not built: {_ext.load_error()}")

from cpuinfo import FLAGS  # noqa: E402  (tests/cpuinfo.py: /proc/cpuinfo, independent of the library)
from test_spmm_cpu import reference, torch_same_dtype  # noqa: E402  (the float64 spec of spmm_24 and torch's error)

_AVX512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vbmi2"}
AMX_BF16 = {"amx_tile", "amx_bf16", "avx512_bf16"} | _AVX512 <= FLAGS
AMX_I8 = {"amx_tile", "amx_int8"} | _AVX512 <= FLAGS
needs_amx_bf16 = pytest.mark.skipif(not AMX_BF16, reason="CPU lacks AMX-BF16 (amx_tile, amx_bf16, avx512_bf16)")
needs_amx_i8 = pytest.mark.skipif(not AMX_I8, reason="CPU lacks AMX-INT8 (amx_tile, amx_int8)")


# ------------------------------------------------------------------------------------------------- reference
def dense_from_portable(values: torch.Tensor, codes: torch.Tensor, k: int) -> torch.Tensor:
    """W [N, K] from values [N, K/2] and codes [N, ceil(K/8)] (two 4-bit codes a byte, low nibble = even group;
    code = i0 | i1 << 2), in plain torch."""
    n, g = values.shape[0], k // 4
    nib = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(n, -1)[:, :g].long()  # [N, G]
    i0, i1 = nib & 3, nib >> 2
    w = torch.zeros(n, g, 4, dtype=torch.float64)
    v = values.double().reshape(n, g, 2)
    w.scatter_(2, i0.unsqueeze(-1), v[:, :, :1])
    w.scatter_(2, i1.unsqueeze(-1), v[:, :, 1:])
    return w.reshape(n, k)


def random_24(n: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand(n, k // 4, 4, generator=gen).argsort(-1) < 2
    if dtype == torch.int8:
        w = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int16)
        w = torch.where(w == 0, torch.ones_like(w), w)  # exactly two non-zeros a group: the codes are unique
        return (w * keep.reshape(n, k)).to(torch.int8)
    w = torch.randn(n, k, generator=gen)
    w = torch.where(w == 0, torch.ones_like(w), w)
    return (w * keep.reshape(n, k)).to(dtype)


def random_x(m: int, k: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.int8:
        return torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    return torch.randn(m, k, generator=gen).to(dtype)


def weight(n: int, k: int, dtype: torch.dtype, gen: torch.Generator):
    w = random_24(n, k, dtype, gen)
    values, codes = core.compress_24(w)
    w64 = dense_from_portable(values, codes, k)
    assert torch.equal(w64, w.double()), "the independent decompression disagrees with the compressed weight"
    return w, w64, values, codes


def check(ours, x, w, w64, out_dtype=None, **epi):
    ref = reference(x, w64, **epi)  # float64 throughout: w64 is the float64 weight
    out_dtype = out_dtype or (torch.int32 if x.dtype == torch.int8 else x.dtype)
    assert ours.dtype == out_dtype and ours.shape == ref.shape
    if x.dtype == torch.int8:
        if out_dtype == torch.int32 and not any(v is not None for v in epi.values() if not isinstance(v, str)) \
                and epi.get("activation", "none") == "none":
            assert torch.equal(ours.long(), (x.long() @ w.long().t())), "int8 -> int32 must be exact"
            return
        scale = ref.abs().max().item()
        if out_dtype in (torch.int32, torch.int8):
            lo, hi = (-128, 127) if out_dtype == torch.int8 else (-2**31, 2**31 - 1)
            expect = ref.round().clamp(lo, hi)
            # fp32 epilogue of an exact int32 accumulator: at most one unit off after rounding (fp32 rounding of the
            # scaled value next to a .5 boundary)
            assert (ours.double() - expect).abs().max().item() <= 1 + 2 ** -23 * scale
            return
        tol = 2 * torch.finfo(out_dtype).eps * ref.abs() + 1e-6 * scale
        assert bool(((ours.double() - ref).abs() <= tol).all()), (ours.double() - ref).abs().max().item()
        return
    scale = ref.abs().max().item()
    floor = 2 * torch.finfo(out_dtype).eps * scale
    err = (ours.double() - ref).abs().max().item()
    torch_err = (torch_same_dtype(x, w, **epi).double() - ref).abs().max().item()
    assert err <= 2 * torch_err + floor, f"error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:.3g}"


def run_amx(x, values, codes, **kw):
    with envs.cpu_dispatch(layout="amx"):
        return core.spmm_24(x, values, codes, **kw)


# ------------------------------------------------------------------------------------------------- results
MS = [1, 15, 16, 17, 33, 64, 257, 300]
KS = [4, 28, 32, 36, 576, 1000]
NS = [1, 17, 32, 33, 192]


@needs_amx_bf16
@pytest.mark.parametrize("m", MS)
def test_bf16_sizes(m):
    gen = torch.Generator().manual_seed(1000 + m)
    for k in KS:
        for n in NS:
            w, w64, values, codes = weight(n, k, torch.bfloat16, gen)
            x = random_x(m, k, torch.bfloat16, gen)
            check(run_amx(x, values, codes), x, w, w64)


@needs_amx_i8
@pytest.mark.parametrize("m", MS)
def test_int8_sizes_exact(m):
    gen = torch.Generator().manual_seed(2000 + m)
    for k in KS:
        for n in NS:
            w, w64, values, codes = weight(n, k, torch.int8, gen)
            x = random_x(m, k, torch.int8, gen)
            y = run_amx(x, values, codes)
            assert y.dtype == torch.int32
            assert torch.equal(y.long(), x.long() @ w.long().t()), (m, k, n)


# Shapes for the other paths: wide weights (64-row tiles; N tail), K-blocked accumulation, K strides of a multiple of
# 1 KB (x table), K not a multiple of the chunk (x table), M tails.
BIG = [(300, 520, 576), (257, 520, 1088), (64, 129, 4096), (33, 600, 1000), (100, 64, 512)]


@needs_amx_bf16
@pytest.mark.parametrize("m,n,k", BIG)
@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_paths(m, n, k, threads):
    gen = torch.Generator().manual_seed(m * 7 + n * 13 + k)
    w, w64, values, codes = weight(n, k, torch.bfloat16, gen)
    x = random_x(m, k, torch.bfloat16, gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check(run_amx(x, values, codes), x, w, w64)
        with envs.cpu_dispatch(layout="amx", amx_slab_rows=64):  # slabs: panels rebuilt, epilogue pending across
            check(core.spmm_24(x, values, codes), x, w, w64)
    finally:
        torch.set_num_threads(before)


@needs_amx_i8
@pytest.mark.parametrize("m,n,k", BIG + [(65, 200, 2112), (31, 96, 2048)])
@pytest.mark.parametrize("threads", [1, 2])
def test_int8_paths_exact(m, n, k, threads):
    gen = torch.Generator().manual_seed(m * 5 + n * 11 + k)
    w, w64, values, codes = weight(n, k, torch.int8, gen)
    x = random_x(m, k, torch.int8, gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert torch.equal(run_amx(x, values, codes).long(), x.long() @ w.long().t())
        with envs.cpu_dispatch(layout="amx", amx_slab_rows=48):
            assert torch.equal(core.spmm_24(x, values, codes).long(), x.long() @ w.long().t())
    finally:
        torch.set_num_threads(before)


EPILOGUES = [
    {},
    {"bias": True},
    {"alpha": True},
    {"row_scale": True},
    {"bias": True, "alpha": True, "row_scale": True, "activation": "relu"},
    {"bias": True, "activation": "gelu"},
    {"activation": "relu"},
]


def make_epi(spec, m, n, gen):
    epi = {}
    if spec.get("bias"):
        epi["bias"] = torch.randn(n, generator=gen)
    if spec.get("alpha"):
        epi["alpha"] = torch.rand(n, generator=gen) + 0.5
    if spec.get("row_scale"):
        epi["row_scale"] = torch.rand(m, generator=gen) + 0.5
    if "activation" in spec:
        epi["activation"] = spec["activation"]
    return epi


@needs_amx_bf16
@pytest.mark.parametrize("spec", EPILOGUES, ids=lambda s: "+".join(f"{k}" if v is True else f"{v}"
                                                                  for k, v in s.items()) or "none")
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.float16])
def test_bf16_epilogue_and_out_dtypes(spec, out_dtype):
    gen = torch.Generator().manual_seed(77)
    for m, n, k in [(70, 97, 576), (17, 520, 64)]:
        w, w64, values, codes = weight(n, k, torch.bfloat16, gen)
        x = random_x(m, k, torch.bfloat16, gen)
        epi = make_epi(spec, m, n, gen)
        ours = run_amx(x, values, codes, out_dtype=out_dtype, **epi)
        check(ours, x, w, w64, out_dtype=out_dtype, **epi)


@needs_amx_i8
@pytest.mark.parametrize("spec", EPILOGUES, ids=lambda s: "+".join(f"{k}" if v is True else f"{v}"
                                                                  for k, v in s.items()) or "none")
@pytest.mark.parametrize("out_dtype", [None, torch.float32, torch.bfloat16, torch.int8])
def test_int8_epilogue_and_out_dtypes(spec, out_dtype):
    gen = torch.Generator().manual_seed(78)
    for m, n, k in [(70, 97, 576), (17, 520, 128)]:
        w, w64, values, codes = weight(n, k, torch.int8, gen)
        x = random_x(m, k, torch.int8, gen)
        epi = make_epi(spec, m, n, gen)
        if out_dtype == torch.int8:  # keep the outputs in range so that rounding, not saturation, is checked
            epi["alpha"] = torch.full((n,), 1e-4)
        ours = run_amx(x, values, codes, out_dtype=out_dtype, **epi)
        check(ours, x, w, w64, out_dtype=out_dtype, **epi)


@needs_amx_bf16
def test_matches_other_families_and_repeated_calls():
    """Same numbers as the row-pair family to bf16 rounding, and the same bits call after call (thread-local panels
    and the pending epilogue must not leak between calls)."""
    gen = torch.Generator().manual_seed(5)
    w, w64, values, codes = weight(256, 576, torch.bfloat16, gen)
    x1, x2 = random_x(200, 576, torch.bfloat16, gen), random_x(33, 576, torch.bfloat16, gen)
    a1 = run_amx(x1, values, codes)
    a2 = run_amx(x2, values, codes)
    assert torch.equal(run_amx(x1, values, codes), a1) and torch.equal(run_amx(x2, values, codes), a2)
    with envs.cpu_dispatch(layout="pairs"):
        p1 = core.spmm_24(x1, values, codes)
    ref = (x1.double() @ w64.t())
    assert (a1.double() - ref).abs().max() <= 2 * (p1.double() - ref).abs().max() + 1e-2 * ref.abs().max()


# ------------------------------------------------------------------------------------------------- dispatch
def kern(m, k, dtype):
    return _ext._C.cpu_spmm_kernel(m, k, dtype)


@needs_amx_bf16
def test_auto_takes_amx_at_large_m():
    d = envs.cpu_dispatch_defaults()
    assert {"amx_bf16_min_m", "amx_i8_min_m", "amx_slab_rows"} <= set(d)
    assert kern(d["amx_bf16_min_m"], 576, "bfloat16") == ("amx", "amx-bf16")
    assert kern(2048, 4096, "bfloat16") == ("amx", "amx-bf16")
    assert kern(d["amx_bf16_min_m"] - 1, 576, "bfloat16")[0] != "amx"
    if AMX_I8:
        assert kern(d["amx_i8_min_m"], 576, "int8") == ("amx", "amx-i8")
        assert kern(d["amx_i8_min_m"] - 1, 576, "int8")[0] != "amx"
    assert kern(4096, 576, "float32")[0] != "amx"  # no AMX kernel for float32 / float16
    with envs.cpu_dispatch(amx_bf16_min_m=None, amx_i8_min_m=None):
        assert kern(4096, 576, "bfloat16")[0] != "amx"
    with envs.cpu_dispatch(isa="avx512-base"):  # the AVX-512 F/BW/VL/DQ kernels only: never AMX
        assert kern(4096, 576, "bfloat16")[0] != "amx"
        assert kern(4096, 576, "int8")[0] != "amx"
    with envs.cpu_dispatch(layout="pairs"):
        assert kern(4096, 576, "bfloat16")[0] == "pairs"
    with envs.cpu_dispatch(layout="amx"):
        assert kern(1, 4, "bfloat16") == ("amx", "amx-bf16")
    # What auto runs is what the op computes (bit for bit against the forced family).
    gen = torch.Generator().manual_seed(9)
    w, w64, values, codes = weight(96, 576, torch.bfloat16, gen)
    x = random_x(max(d["amx_bf16_min_m"], 16) + 3, 576, torch.bfloat16, gen)
    assert torch.equal(core.spmm_24(x, values, codes), run_amx(x, values, codes))


@needs_amx_bf16
def test_forced_amx_errors_where_it_cannot_run():
    gen = torch.Generator().manual_seed(3)
    _, _, values, codes = weight(8, 64, torch.bfloat16, gen)
    x = random_x(4, 64, torch.bfloat16, gen)
    with envs.cpu_dispatch(isa="avx512-base", layout="amx"):
        with pytest.raises(RuntimeError, match="SPARSEKERN_CPU_SPMM_LAYOUT=amx needs Intel AMX.*not avx512"):
            core.spmm_24(x, values, codes)
    _, _, v32, c32 = weight(8, 64, torch.float32, gen)
    with envs.cpu_dispatch(layout="amx"):
        with pytest.raises(RuntimeError, match="SPARSEKERN_CPU_SPMM_LAYOUT=amx needs Intel AMX.*no AMX kernel"):
            core.spmm_24(x.float(), v32, c32)


@pytest.mark.skipif(AMX_BF16 or AMX_I8, reason="this CPU has AMX (the error is for CPUs without it)")
def test_forced_amx_without_amx_is_a_clear_error():
    gen = torch.Generator().manual_seed(4)
    _, _, values, codes = weight(8, 64, torch.bfloat16, gen)
    x = random_x(4, 64, torch.bfloat16, gen)
    with envs.cpu_dispatch(layout="amx"):
        with pytest.raises(RuntimeError, match="SPARSEKERN_CPU_SPMM_LAYOUT=amx needs Intel AMX"):
            core.spmm_24(x, values, codes)
    assert kern(4096, 576, "bfloat16")[0] != "amx"


def test_layout_amx_is_a_known_setting():
    with envs.cpu_dispatch(layout="amx"):
        assert envs.cpu_dispatch_settings()["layout"] == "amx"
    with pytest.raises(RuntimeError, match=r"use auto \(default\), rows, pairs or tokens, or amx"):
        with envs.cpu_dispatch(layout="amx2"):
            pass
