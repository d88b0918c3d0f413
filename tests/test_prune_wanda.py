"""Wanda and magnitude pruning (sparsekern.prune.wanda / magnitude, op sparsekern::wanda_prune) against the
plain-PyTorch oracles of test_prune_oracles.py. Masks and pruned weights are exact: the metric is one rounded
float32 product in both, and the selection rule is defined (N:M ties keep the lower column; unstructured ties
prune the lower column first)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys

import pytest
import torch

import sparsekern
import sparsekern.prune as P
from sparsekern import envs
from sparsekern.ops import prune as ops
from test_prune_oracles import act_scale_oracle, nm_keep_oracle, realistic_activations, wanda_oracle, wanda_variant_oracle


def _layer(rows, cols, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)
    s = act_scale_oracle([realistic_activations(4, 16, cols, seed=seed)]).float()
    return w, s


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4", "4:8", "2:8", "3:6"])
@pytest.mark.parametrize("rows,cols", [(1, 24), (33, 48), (64, 96)])
def test_wanda_nm_matches_oracle(device, pattern, rows, cols):
    n, m = map(int, pattern.split(":"))
    w, s = _layer(rows, cols, seed=rows + cols)
    ref_w, ref_keep = wanda_oracle(w, s, n, m, 0.0)
    r = P.wanda(w.to(device), s.to(device), pattern)
    assert torch.equal(r.mask.cpu(), ref_keep)
    assert torch.equal(r.weight.cpu(), ref_w)
    assert r.loss is None
    assert (r.mask.view(rows, -1, m).sum(-1) == m - n).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wanda_half_weights(device, dtype):
    w, s = _layer(37, 64, seed=3, dtype=dtype)
    ref_w, ref_keep = wanda_oracle(w, s, 2, 4, 0.0)
    r = P.wanda(w.to(device), s.to(device), "2:4")
    assert r.weight.dtype == dtype
    assert torch.equal(r.mask.cpu(), ref_keep) and torch.equal(r.weight.cpu(), ref_w)


def test_nm_tie_rule_on_all_small_integer_groups(device):
    # Every group of four values in {0, 1, 2} (81 groups, ties everywhere): the fast m = 4 path and the generic
    # path must both follow core/nm.h's rule, keep the largest, ties keep the lower column.
    vals = torch.cartesian_prod(*[torch.arange(3.0)] * 4).reshape(1, -1)  # 81 groups in one row
    w = vals + 0.0  # |w| = value, act_scale = 1 -> metric = value exactly
    ones = torch.ones(w.shape[1])
    for n in (1, 2, 3):
        _, keep = ops.wanda_prune(w.to(device), ones.to(device), n, 4, 0.0)
        assert torch.equal(keep.cpu(), nm_keep_oracle(w, n, 4)), n
    w8 = vals[:, :320]
    _, keep8 = ops.wanda_prune(w8.to(device), torch.ones(w8.shape[1], device=device), 4, 8, 0.0)
    assert torch.equal(keep8.cpu(), nm_keep_oracle(w8, 4, 8))


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.75])
@pytest.mark.parametrize("rows,cols", [(1, 40), (33, 100), (64, 128)])
def test_wanda_unstructured_matches_oracle(device, sparsity, rows, cols):
    w, s = _layer(rows, cols, seed=7)
    ref_w, ref_keep = wanda_oracle(w, s, 0, 0, sparsity)
    r = P.wanda(w.to(device), s.to(device), sparsity)
    assert torch.equal(r.mask.cpu(), ref_keep) and torch.equal(r.weight.cpu(), ref_w)
    assert (r.mask.sum(1) == cols - int(cols * sparsity)).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (0, 0)])
def test_wanda_op_refuses_non_finite_scores(device, bad, n, m):
    w = torch.rand(5, 16)
    w[3, 9] = bad
    with pytest.raises(RuntimeError, match="w contains NaN or Inf .* first in row 3"):
        ops.wanda_prune(w.to(device), torch.ones(16, device=device), n, m, 0.5 if m == 0 else 0.0)


def test_wanda_unstructured_ties_prune_lower_column_first(device):
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 0.5]])
    _, keep = ops.wanda_prune(w.to(device), torch.ones(6, device=device), 0, 0, 0.5)  # k = 3
    assert keep.cpu().tolist() == [[False, False, True, True, True, False]]


def test_wanda_variant_matches_oracle(device):
    w, s = _layer(45, 160, seed=11)
    ref_w, ref_keep = wanda_variant_oracle(w, s, 0.5)
    r = P.wanda(w.to(device), s.to(device), 0.5, use_variant=True)
    assert torch.equal(r.mask.cpu(), ref_keep) and torch.equal(r.weight.cpu(), ref_w)
    assert abs(1 - r.mask.float().mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("pattern,n,m", [("2:4", 2, 4), ("4:8", 4, 8)])
def test_magnitude_nm_is_exact(device, pattern, n, m):
    w, _ = _layer(33, 64, seed=5)
    keep = nm_keep_oracle(w.abs(), n, m)
    r = P.magnitude(w.to(device), pattern)
    assert torch.equal(r.mask.cpu(), keep) and torch.equal(r.weight.cpu(), w * keep)


def test_magnitude_unstructured_reference_threshold(device):
    w, _ = _layer(33, 64, seed=6)
    thresh = torch.sort(w.abs().flatten())[0][int(w.numel() * 0.5)]
    keep = ~(w.abs() <= thresh)
    r = P.magnitude(w.to(device), 0.5)
    assert torch.equal(r.mask.cpu(), keep) and torch.equal(r.weight.cpu(), w * keep)
    assert r.mask.sum().item() == w.numel() - int(w.numel() * 0.5) - 1  # the reference prunes k + 1


def test_wanda_does_not_modify_inputs():
    w, s = _layer(8, 16)
    w0, s0 = w.clone(), s.clone()
    P.wanda(w, s, "2:4")
    P.magnitude(w, 0.5)
    assert torch.equal(w, w0) and torch.equal(s, s0)


# ---------------------------------------------------------------- every CPU code path (AVX-512, AVX2, scalar)
# The CPU kernel picks its N:M path at run time (vector kernels for m = 2, 4, 8 (AVX2) and 16 (AVX-512), nm.h's
# scalar rule otherwise); SPARSEKERN_CPU_ISA (read once, at load) or its run-time form sparsekern.envs.cpu_dispatch
# forces one, so each path this CPU supports is checked against the oracle on row lengths that end in every kind of
# partial vector. Weights are compared bit for bit (kept -0.0 stays -0.0, pruned entries are +0.0 as the reference's
# W[mask] = 0).

CPU_ISAS = ["avx512", "avx2", "scalar"]


@pytest.fixture
def force_isa():
    """force_isa(name): run the rest of the test on that ISA (skipped where the CPU lacks it); restored afterwards."""
    with contextlib.ExitStack() as stack:
        def force(isa):
            try:
                stack.enter_context(envs.cpu_dispatch(isa=isa))
            except RuntimeError as e:
                if "does not support" in str(e):
                    pytest.skip(f"this CPU has no {isa}")
                raise
            ops.wanda_prune(torch.ones(1, 4), torch.ones(4), 2, 4)

        yield force


def _bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4", "1:2", "4:8", "2:8", "8:16", "3:6"])
def test_wanda_nm_every_cpu_path(force_isa, isa, pattern):
    force_isa(isa)
    n, m = map(int, pattern.split(":"))
    # cols % 16 in {4, 8, 12, 0} and cols % 8 in {0, 4}: every partial last vector of the AVX-512 / AVX2 loops.
    for rows, cols in [(3, 4), (5, 20), (33, 56), (7, 48), (2, 200), (9, 1008)]:
        if cols % m:
            continue
        w, s = _layer(rows, cols, seed=rows * cols + m)
        w[0, :m] = -0.0  # a group of zero weights (all ties) whose kept entries must stay -0.0
        ref_w, ref_keep = wanda_oracle(w, s, n, m, 0.0)
        got_w, got_keep = ops.wanda_prune(w, s, n, m)
        assert torch.equal(got_keep, ref_keep), (rows, cols)
        assert torch.equal(_bits(got_w), _bits(ref_w)), (rows, cols)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:2", "8:16"])
def test_wanda_half_weights_every_cpu_path(force_isa, isa, dtype, pattern):
    force_isa(isa)
    n, m = map(int, pattern.split(":"))
    for rows, cols in [(5, 48), (3, 208)]:
        w, s = _layer(rows, cols, seed=cols + m, dtype=dtype)
        ref_w, ref_keep = wanda_oracle(w, s, n, m, 0.0)
        got_w, got_keep = ops.wanda_prune(w, s, n, m)
        assert got_w.dtype == dtype
        assert torch.equal(got_keep, ref_keep) and torch.equal(_bits(got_w), _bits(ref_w)), (rows, cols)


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_nm_tie_rule_every_cpu_path(force_isa, isa, m):
    # Scores from {0, 1, 2}: ties in almost every group. m = 4: all 81 groups; other m: random groups.
    force_isa(isa)
    if m == 4:
        w = torch.cartesian_prod(*[torch.arange(3.0)] * 4).reshape(1, -1)
    else:
        g = torch.Generator().manual_seed(m)
        w = torch.randint(0, 3, (5, m * 13), generator=g).float()
    ones = torch.ones(w.shape[1])
    for n in range(1, m):
        _, keep = ops.wanda_prune(w, ones, n, m, 0.0)
        assert torch.equal(keep, nm_keep_oracle(w, n, m)), n


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,m", [(2, 4), (1, 2), (4, 8), (8, 16), (3, 6)])
def test_wanda_non_finite_found_in_every_position(force_isa, isa, dtype, n, m):
    # The vector kernels check finiteness in the same pass as the selection: a NaN / Inf anywhere (first column,
    # inside a vector, the partial last vector) must be reported with its row.
    force_isa(isa)
    cols = 48 if m != 16 else 64
    cols = cols - cols % m + (m if cols % m else 0)
    for col, bad in [(0, float("nan")), (cols // 2 + 1, float("inf")), (cols - 1, float("-inf"))]:
        w = (torch.rand(7, cols) + 0.1).to(dtype)
        w[5, col] = bad
        with pytest.raises(RuntimeError, match="w contains NaN or Inf .* first in row 5"):
            ops.wanda_prune(w, torch.ones(cols), n, m)
    w = torch.full((2, cols), 3e38)  # finite weights whose metric overflows to +inf
    with pytest.raises(RuntimeError, match="first in row 0"):
        ops.wanda_prune(w, torch.full((cols,), 4.0), n, m)


_CHILD = """
import torch
from sparsekern.ops import prune as ops
try:
    ops.wanda_prune(torch.ones(4, 16), torch.ones(16), 2, 4)
    print("no error")
except RuntimeError as e:
    print(type(e).__name__, e)
"""


def test_wanda_cpu_isa_variable_errors():
    # The variable is read once, when the extension loads (a fresh process here): a value that is not understood
    # does not fail the import; the first wanda_prune call refuses it with its message.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(sparsekern.__file__)))
    env = envs.child_env(SPARSEKERN_CPU_ISA="sse9")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("RuntimeError"), out.stdout
    assert re.search("SPARSEKERN_CPU_ISA=sse9 is not understood; use avx512, avx2 or scalar", out.stdout), out.stdout


def test_wanda_unstructured_negative_zero_scale_ties_with_zero(device):
    # act_scale = -0.0 gives the metric -0.0, equal to +0.0 in the reference's stable sort (ties: lower column
    # pruned first), although its bits would order it above every positive float.
    w = torch.tensor([[1.0, 1.0, 1.0, 1.0, 2.0, 3.0], [4.0, -2.0, 0.5, 1.0, 1.0, 1.0]])
    s = torch.tensor([-0.0, 0.0, -0.0, 0.0, 1.0, 1.0])
    ref_w, ref_keep = wanda_oracle(w, s, 0, 0, 0.5)
    r = P.wanda(w.to(device), s.to(device), 0.5)
    assert torch.equal(r.mask.cpu(), ref_keep) and torch.equal(r.weight.cpu(), ref_w)
    assert ref_keep.tolist()[0] == [False, False, False, True, True, True]


# ---------------------------------------------------------------- patterns and bad input


@pytest.mark.parametrize(
    "pattern,expected",
    [("2:4", (2, 4, 0.5)), (" 4 : 8 ", (4, 8, 0.5)), ("1:32", (1, 32, 1 / 32)), (0.5, (0, 0, 0.5)), ("0.7", (0, 0, 0.7))],
)
def test_parse_pattern(pattern, expected):
    assert tuple(P.parse_pattern(pattern)) == expected


@pytest.mark.parametrize(
    "pattern,msg",
    [("3:2", "1 <= n < m"), ("4:4", "1 <= n < m"), ("0:4", "1 <= n < m"), ("2:64", "m must be <= 32"),
     ("abc", "'n:m' string"), ("2-4", "'n:m' string"), (1.5, "float in \\(0, 1\\)"), (0.0, "float in \\(0, 1\\)"),
     (True, "'n:m' string"), (None, "'n:m' string")],
)
def test_parse_pattern_rejects(pattern, msg):
    with pytest.raises(ValueError, match=msg):
        P.parse_pattern(pattern)


def test_wanda_bad_inputs():
    w, s = _layer(4, 20)
    with pytest.raises(ValueError, match="divisible by m = 8"):
        P.wanda(w, s, "4:8")
    with pytest.raises(ValueError, match="divisible by m = 5"):
        P.wanda(w[:, :16], s[:16], "2:5")
    with pytest.raises(ValueError, match=r"act_scale must be a 1-D tensor \[in_features\] = \[20\]"):
        P.wanda(w, s[:16], "2:4")
    bad = w.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="w contains NaN or Inf"):
        P.wanda(bad, s, "2:4")
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="w contains NaN or Inf"):
        P.magnitude(bad, "2:4")
    with pytest.raises(ValueError, match="act_scale contains NaN or Inf"):
        P.wanda(w, torch.full((20,), float("nan")), "2:4")
    with pytest.raises(ValueError, match="act_scale must be >= 0"):
        P.wanda(w, -s, "2:4")
    with pytest.raises(ValueError, match="does not apply to n:m"):
        P.wanda(w, s, "2:4", use_variant=True)
    with pytest.raises(ValueError, match="2-D tensor"):
        P.wanda(w[0], s, "2:4")


def test_wanda_op_errors():
    w, s = _layer(4, 20)
    with pytest.raises(RuntimeError, match=r"in_features \(20\) must be divisible by m \(8\)"):
        ops.wanda_prune(w, s, 4, 8)
    with pytest.raises(RuntimeError, match="1 <= n < m"):
        ops.wanda_prune(w, s, 4, 4)
    with pytest.raises(RuntimeError, match=r"sparsity must be in \[0, 1\)"):
        ops.wanda_prune(w, s, 0, 0, 1.0)
    with pytest.raises(RuntimeError, match="act_scale must be float32"):
        ops.wanda_prune(w, s.double(), 2, 4)
    with pytest.raises(RuntimeError, match="w must be float32, float16 or bfloat16"):
        ops.wanda_prune(w.double(), s, 2, 4)


@pytest.mark.parametrize("n,m,sparsity", [(2, 4, 0.0), (4, 8, 0.0), (0, 0, 0.5)])
def test_opcheck_wanda_prune(device, n, m, sparsity):
    w, s = _layer(9, 32)
    torch.library.opcheck(torch.ops.sparsekern.wanda_prune.default, (w.to(device), s.to(device), n, m, sparsity))
