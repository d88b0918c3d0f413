"""Shared pieces of the property-based (hypothesis) suite: tests/test_fuzz_*.py (docs/fuzzing.md).

- `fuzz_threads`: module fixture (autouse where imported) running the targets with one intra-op thread.
- `fuzz(default)`: the settings decorator every fuzz target uses. Default run (CI): `default` examples per target,
  chosen so that the whole suite runs in about two minutes on the 2-core CI machine. Long mode: the environment
  variable SPARSEKERN_FUZZ_EXAMPLES=N gives every target N examples instead. No deadline (a 2-core machine under
  load is slow at random moments), random (not derandomised) data on every run, and a failure prints the
  `@reproduce_failure` blob that replays it.
- Strategies: shapes with odd sizes next to aligned ones, dtypes, and tensors drawn from a seed (hypothesis draws the
  seed, the style and the shape; torch fills the tensor), never all zeros.
- Vectorised float64 / exact references shared by several targets (the loop-structured oracles of the pruning
  algorithms stay in test_prune_oracles.py, the GEMM tolerance policy in test_spmm_cpu.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

FUZZ_ENV = "SPARSEKERN_FUZZ_EXAMPLES"
PROFILE = "sparsekern-fuzz"

# The example database (failing examples are replayed first on the next run) lives in pytest's cache folder, which
# git ignores, not in a .hypothesis/ folder at the repository root.
_DB = DirectoryBasedExampleDatabase(str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "hypothesis"))

settings.register_profile(
    PROFILE,
    deadline=None,
    derandomize=False,
    print_blob=True,
    database=_DB,
    # Examples are tensors built from a drawn seed: a slow example is a large shape, not a generation problem.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def examples_override() -> int | None:
    """SPARSEKERN_FUZZ_EXAMPLES (declared in sparsekern.envs: a positive int, None when unset)."""
    from sparsekern import envs

    return envs.get(FUZZ_ENV)


def fuzz(default_examples: int, **overrides):
    """The settings of one fuzz target: `default_examples` in the default run, SPARSEKERN_FUZZ_EXAMPLES in the long
    mode. Use as a decorator above @given."""
    n = examples_override() or default_examples
    return settings(settings.get_profile(PROFILE), max_examples=n, **overrides)


FUZZ_THREADS = 1


@pytest.fixture(scope="module", autouse=True)
def fuzz_threads():
    """Run a fuzz module with FUZZ_THREADS intra-op threads (1), restoring the count after.

    The examples are small: waking a thread pool costs more than the work, and on a loaded 2-core machine a parallel
    region waits for a descheduled thread (7 ms instead of 60 us per call measured here, the same for torch's own
    F.linear), which would make the suite's duration depend on the machine's load. The threaded paths are exercised
    by tests/test_concurrency.py and by the op tests at larger sizes; change FUZZ_THREADS to fuzz them too. Modules use
    it with `from fuzz_support import fuzz_threads  # noqa: F401`."""
    before = torch.get_num_threads()
    torch.set_num_threads(FUZZ_THREADS)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------------ strategies
# Odd sizes next to aligned ones: SIMD tails, partial register tiles, odd numbers of 2:4 groups (padding nibble).
SIZES = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65]),
                  st.integers(1, 80))
GROUPS = st.one_of(st.sampled_from([1, 2, 3, 4, 5, 8, 15, 16, 17, 32, 33]), st.integers(1, 40))
SEEDS = st.integers(0, 2**32 - 1)
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
STYLES = ["normal", "ties", "sparse", "wide", "tiny", "inf"]
# (n, m) with 1 <= n < m <= 8 (prune_nm / the pruning engine accept any such pattern); 2:4 drawn more often
NM = st.one_of(st.just((2, 4)), st.just((4, 8)),
               st.integers(2, 8).flatmap(lambda m: st.tuples(st.integers(1, m - 1), st.just(m))))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_values(g: torch.Generator, shape, dtype: torch.dtype, style: str = "normal") -> torch.Tensor:
    """A tensor of `shape` and `dtype` filled from `g` in the given style, never all zeros.

    normal: unit Gaussian. ties: small integers (many equal magnitudes and zeros: the tie-break rules). sparse:
    mostly zeros. wide: Gaussian times 2^e, e uniform in [-40, 40] per entry (clipped to the dtype's range). tiny
    (float64 only, else normal): magnitudes around 1e-300..1e-40, below float32's range (the "counted as zero"
    bug class). inf: Gaussian with a few +-Inf (a legal, largest magnitude where the op allows it).
    """
    shape = tuple(shape)
    if style == "ties":
        x = torch.randint(-3, 4, shape, generator=g).double()
    elif style == "sparse":
        x = torch.randn(shape, generator=g, dtype=torch.float64) * (torch.rand(shape, generator=g) < 0.2)
    elif style == "wide":
        e = torch.randint(-40, 41, shape, generator=g).double()
        x = torch.randn(shape, generator=g, dtype=torch.float64) * torch.pow(2.0, e)
    elif style == "tiny" and dtype == torch.float64:
        e = torch.randint(-1000, -140, shape, generator=g).double()
        x = torch.randn(shape, generator=g, dtype=torch.float64) * torch.pow(2.0, e)
    elif style == "inf":
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        x[torch.rand(shape, generator=g) < 0.05] = float("inf")
        x[torch.rand(shape, generator=g) < 0.05] = float("-inf")
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
    if dtype.is_floating_point:
        fmax = torch.finfo(dtype).max
        finite = torch.isfinite(x)
        x = torch.where(finite, x.clamp(-fmax, fmax), x)
        if dtype == torch.float8_e4m3fn:
            x = torch.where(finite, x, torch.full_like(x, 448.0).copysign(x))  # e4m3fn has no Inf
        out = x.to(dtype)
    else:
        info = torch.iinfo(dtype)
        out = torch.nan_to_num(x * 16).round().clamp(info.min, info.max).to(dtype)
    if out.numel() and not bool((out != 0).any()):
        flat = out.view(-1)
        flat[int(torch.randint(0, flat.numel(), (1,), generator=g))] = 1
    return out


@st.composite
def tensor_case(draw, dtypes=FLOAT_DTYPES, styles=STYLES):
    """(seed, dtype, style) for make_values."""
    return draw(SEEDS), draw(st.sampled_from(dtypes)), draw(st.sampled_from(styles))


# ------------------------------------------------------------------------------------------------------ references
def nm_keep_reference(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep mask of N:M pruning by `scores` [R, K] (float64-comparable): in each aligned group of m keep the m - n
    largest; among equal scores the lower column is kept (a stable descending sort). Vectorised form of
    test_prune_oracles.nm_keep_oracle."""
    r, k = scores.shape
    groups = scores.double().reshape(r, k // m, m)
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., : m - n], True)
    return keep.reshape(r, k)


def nonzero_in_own_dtype(w: torch.Tensor) -> torch.Tensor:
    """w != 0 in w's own type (NaN is non-zero, -0.0 is zero; float8 compared through float32, exactly)."""
    if w.dtype in (torch.float8_e4m3fn, getattr(torch, "float8_e5m2", None)):
        return w.float() != 0
    return w != 0


def first_nm_violation(w: torch.Tensor, n: int, m: int) -> tuple[int, int] | None:
    """(row, group) of the first aligned group of m along the last dim (w viewed as [-1, K], row-major) with more
    than m - n non-zeros, or None."""
    k = w.shape[-1]
    nz = nonzero_in_own_dtype(w.reshape(-1, k)).reshape(-1, k // m, m).sum(-1)
    bad = (nz > m - n).nonzero()
    if bad.numel() == 0:
        return None
    return int(bad[0, 0]), int(bad[0, 1])


VALID_CODES = frozenset(i0 | (i1 << 2) for i0 in range(4) for i1 in range(i0 + 1, 4))


def codes_valid_reference(codes: torch.Tensor, cols: int) -> bool:
    """Every used nibble a valid 2:4 code (two distinct increasing positions), the padding nibble (odd number of
    groups) zero: the portable format's rule (sparsekern.weight module doc), written independently."""
    groups = cols // 4
    for row in codes.tolist():
        nibbles = [v for b in row for v in (b & 0xF, b >> 4)]
        if any(c not in VALID_CODES for c in nibbles[:groups]):
            return False
        if any(c != 0 for c in nibbles[groups:]):
            return False
    return True


def prune_nm_ref(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """A 2-D N:M-pruned copy of w (by |w|, through the vectorised reference), for building valid inputs."""
    keep = nm_keep_reference(w.double().abs(), n, m)
    return torch.where(keep, w, torch.zeros_like(w))


def random_24(g: torch.Generator, rows: int, cols: int, dtype: torch.dtype, style: str = "normal") -> torch.Tensor:
    """A random 2:4 weight [rows, cols] of `dtype` (some groups with fewer than 2 non-zeros when style allows)."""
    base = make_values(g, (rows, cols), torch.float64 if dtype.is_floating_point else dtype, style)
    if not dtype.is_floating_point:
        return prune_nm_ref(base.to(torch.float64), 2, 4).to(dtype)
    pruned = prune_nm_ref(base, 2, 4)
    fmax = torch.finfo(dtype).max
    out = torch.where(torch.isfinite(pruned), pruned.clamp(-fmax, fmax), pruned)
    out = out.to(dtype) if dtype != torch.float8_e4m3fn else out.clamp(-448, 448).to(dtype)
    if not bool(nonzero_in_own_dtype(out).any()):
        out[0, 0] = 1
    return out


def assert_close_spmm(ours, x, w, out_dtype=None, **epi) -> None:
    """test_spmm_cpu.py's tolerance policy (no worse than twice PyTorch's own error in the same precision against
    float64, plus a floor), with a floor that also covers cancellation: one float32 ulp of the largest accumulated
    magnitude sum_k |x_mk w_nk| (times the scales). Why: the fuzz draws single-output cases (M = N = 1) whose terms
    cancel (sum of |terms| 71, result -4.9); there PyTorch's one error can be luckily small, and any summation order
    is off by a few ulps of the terms' scale, not of the result's (every order this kernel family uses was at the
    median of 200 random orders). int8 inputs (exact accumulator): test_spmm_cpu's rule plus, for GELU, the float32
    cancellation of its erf form."""
    import test_spmm_cpu as policy

    ref = policy.reference(x, w, **epi)
    if x.dtype == torch.int8:
        # test_spmm_cpu's rule, plus for GELU the float32 cancellation of its erf form: 0.5 x (1 + erf(x / sqrt 2))
        # for a negative pre-activation x loses a few ulps of 1 in (1 + erf), i.e. an absolute error of a few
        # eps32 * |x| / 2, in F.gelu alike (measured: 2.1e-7 at an output of -0.010, scale 0.138), beyond the rule's
        # 2 eps relative.
        out_dtype = out_dtype or torch.float32
        tol = 2 * torch.finfo(out_dtype).eps * ref.abs() + 1e-6 * ref.abs().max()
        if epi.get("activation") == "gelu":
            pre = policy.reference(x, w, **{**epi, "activation": "none"})
            tol = tol + 2 * torch.finfo(torch.float32).eps * pre.abs()
        err = (ours.double() - ref).abs()
        assert bool((err <= tol).all()), f"int8 epilogue error {err.max().item():.3g}"
        return None
    out_dtype = out_dtype or x.dtype
    mag = x.double().abs() @ w.double().abs().t()
    if epi.get("row_scale") is not None:
        mag = mag * epi["row_scale"].double().abs()[:, None]
    if epi.get("alpha") is not None:
        mag = mag * epi["alpha"].double().abs()[None, :]
    floor = (torch.finfo(out_dtype).eps * ref.abs().max().item()
             + torch.finfo(torch.float32).eps * (mag.max().item() if mag.numel() else 0.0))
    err = (ours.double() - ref).abs().max().item() if ref.numel() else 0.0
    torch_err = (policy.torch_same_dtype(x, w, **epi).double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= 2 * torch_err + floor, f"error {err:.3g} > 2 x torch's {torch_err:.3g} + {floor:.3g}"
