"""SparseGPT (Frantar & Alistarh 2023): prune with the OBS weight update, optionally quantising jointly.

Steps (ALGORITHMS.md, the reference's exact arithmetic in float32):
  1. dead input features (diag(H) == 0): H[j, j] = 1, W[:, j] = 0
  2. H += percdamp * mean(diag(H)) * I
  3. U = upper Cholesky factor of H^-1 (the reference's cholesky(cholesky_inverse(cholesky(H)), upper=True); computed
     here as the inverse of the reversed-order Cholesky factor: same matrix, half the flops, in place)
  4. per block of `blocksize` columns: the fused kernel sparsegpt_prune_block_ runs the block's column loop
     (N:M chosen inside the loop; unstructured from a block-global threshold chosen here), then one GEMM
     W[:, i2:] -= Err1 @ U[i1:i2, i2:]
  5. cast back to w's dtype.

Memory: besides the inputs and the outputs (weight, mask, loss), one [cols, cols] float32 buffer (H's copy, turned
into U in place by the Cholesky and the triangular inverse; their temporaries are [cols, 128]) and a few [rows, blocksize] blocks (the kernel's err and
mask; the unstructured scores). The trailing update writes into W through a view, without a temporary.
"""

from __future__ import annotations

import warnings

import torch

from ..ops import prune as _ops
from ..quant import fit_weight_scale
from .pattern import PruneResult, check_divisible, check_hessian, check_weight, parse_pattern

# Joint quantisation grids. "int8" / "fp8": the symmetric per-row grids of sparsekern.quant (what SparseLinear's
# W8A8 kernels store); "int8-minmax" / "int4": the reference's asymmetric min-max grids (a dense export only).
_DEPLOYED_QUANTS = ("int8", "fp8")
_MINMAX_BITS = {"int8-minmax": 8, "int4": 4}
QUANT_CHOICES = _DEPLOYED_QUANTS + tuple(_MINMAX_BITS)
# The kernel's selectors: "int8" runs the min-max formula with zero = 127, maxq = 254, which is exactly
# clamp(round(w / s), -127, 127) (every term is a small integer in float); "fp8" is maxq = -1 (zero ignored).
_INT8_ZERO, _INT8_MAXQ = 127, 254
_FP8_MAXQ = -1
_MAX_DAMP_RETRIES = 3  # percdamp, x10, x100, x1000


def minmax_quantizer(W: torch.Tensor, bits: int):
    """Per-output-row asymmetric min-max quantiser of SparseGPT/GPTQ (`Quantizer.find_params(weight=True)`).

    W: float32 [rows, cols]. Returns (scale [rows], zero [rows], maxq) with q = scale * (clamp(round(w / scale) +
    zero, 0, maxq) - zero); the range always contains 0, so a pruned 0 stays exactly 0.
    """
    maxq = 2**bits - 1
    zeros = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
    xmin = torch.minimum(W.min(dim=1).values, zeros)
    xmax = torch.maximum(W.max(dim=1).values, zeros)
    flat = (xmin == 0) & (xmax == 0)
    xmin[flat] = -1
    xmax[flat] = +1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale, zero, maxq


_CHUNK = 128  # columns / rows per temporary in the in-place helpers below: temporaries stay [cols, 128]


def _reverse_(A: torch.Tensor) -> torch.Tensor:
    """In place A <- A.flip(0, 1) for a contiguous square A (= reversing its flat storage), in chunk swaps."""
    flat = A.view(-1)
    total = flat.numel()
    step = _CHUNK * A.shape[0]
    i = 0
    while i < total // 2:
        length = min(step, total // 2 - i)
        a = flat[i : i + length]
        b = flat[total - i - length : total - i]
        head = a.flip(0)
        a.copy_(b.flip(0))
        b.copy_(head)
        i += length
    return A


def _triangular_inverse_upper_(R: torch.Tensor, base: int = _CHUNK) -> torch.Tensor:
    """In place R <- R^-1 for an upper-triangular R (zeros below the diagonal), by recursive halving:
    [[A, B], [0, C]]^-1 = [[A^-1, -A^-1 B C^-1], [0, C^-1]]. Both products run as GEMMs on 128-wide slices that
    skip the zero triangle of A^-1 / C^-1 (n^3 / 3 flops in all, as LAPACK's trtri), in place: rows of A^-1 B top
    down (row slice r needs rows >= r of B, not yet overwritten), columns of (A^-1 B) C^-1 right to left. No
    temporary is larger than [128, n]."""
    n = R.shape[0]
    if n <= base:
        eye = torch.eye(n, dtype=R.dtype, device=R.device)
        R.copy_(torch.linalg.solve_triangular(R, eye, upper=True))
        return R
    h = max(base, (n // 2) // base * base)
    A, B, C = R[:h, :h], R[:h, h:], R[h:, h:]
    _triangular_inverse_upper_(A, base)
    _triangular_inverse_upper_(C, base)
    for r0 in range(0, h, _CHUNK):
        r1 = min(r0 + _CHUNK, h)
        B[r0:r1].copy_(torch.mm(A[r0:r1, r0:], B[r0:]))  # A^-1 B, row slice by row slice
    nc = n - h
    for c1 in range(nc, 0, -_CHUNK):
        c0 = max(0, c1 - _CHUNK)
        B[:, c0:c1].copy_(torch.mm(B[:, :c1], C[:c1, c0:c1])).neg_()  # -(A^-1 B) C^-1, right to left
    return R


def _upper_inverse_cholesky_(Hd: torch.Tensor, H: torch.Tensor, dead: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Turn Hd (a float32 copy of H with dead columns fixed) into U = cholesky(H^-1, upper=True) in place.

    With P the reversal permutation, P H P = U'^T U' gives H = R R^T with R = P U'^T P upper-triangular, and then
    H^-1 = R^-T R^-1, so U = R^-1 (the Cholesky factor is unique). One Cholesky and one triangular inverse
    (2/3 n^3 flops) instead of the reference's Cholesky, cholesky_inverse and second Cholesky (4/3 n^3), all in
    place in Hd. On failure: retry with 10x the damping, and warn with the value that worked."""
    info = torch.empty((), dtype=torch.int32, device=Hd.device)
    damp_pct = percdamp
    for attempt in range(_MAX_DAMP_RETRIES + 1):
        if attempt > 0:
            Hd.copy_(H)
            Hd.diagonal()[dead] = 1
        damp = damp_pct * torch.mean(torch.diagonal(Hd))
        Hd.diagonal().add_(damp)
        _reverse_(Hd)  # P H P
        # Factorise through the transposed (column-major) view: LAPACK works in place there, while a row-major
        # argument makes torch copy the whole matrix. Hd^T = U' with P H P = U'^T U', so Hd = U'^T afterwards.
        torch.linalg.cholesky_ex(Hd.t(), upper=True, out=(Hd.t(), info))
        if int(info) == 0:
            _reverse_(Hd)  # R = P U'^T P, upper-triangular, H = R R^T
            _triangular_inverse_upper_(Hd)  # U = R^-1
            if attempt > 0:
                warnings.warn(
                    f"sparsegpt: Cholesky of the damped Hessian failed with percdamp={percdamp:g}; succeeded with "
                    f"percdamp={damp_pct:g} (damp={float(damp):.4g} added to the diagonal)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return Hd
        damp_pct *= 10
    raise RuntimeError(
        f"sparsegpt: the Hessian is not positive definite even with percdamp={damp_pct / 10:g} "
        f"({_MAX_DAMP_RETRIES} retries from percdamp={percdamp:g}, x10 each); check the calibration data "
        "(enough samples, no degenerate inputs). sparsekern does not fall back to an identity inverse."
    )


def _check_args(w, hessian, pattern, blocksize, percdamp, quant, mask):
    """sparsegpt's argument checks (ValueError naming the argument and the rule); returns the parsed pattern."""
    check_weight(w)
    cols = w.shape[1]
    check_hessian(hessian, w)
    p = parse_pattern(pattern)
    check_divisible(p, cols)
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    if p.structured and blocksize % p.m != 0:
        raise ValueError(f"blocksize ({blocksize}) must be a multiple of m = {p.m} for pattern {p.n}:{p.m}")
    if not percdamp > 0:
        raise ValueError(f"percdamp must be > 0, got {percdamp!r}")
    if quant is not None and quant not in QUANT_CHOICES:
        choices = ", ".join(repr(q) for q in QUANT_CHOICES)
        raise ValueError(f"quant must be None or one of {choices}, got {quant!r}")
    if mask is not None:
        from .refit import check_mask

        check_mask(mask, w, pattern, who="sparsegpt")
    return p


def sparsegpt(w: torch.Tensor, hessian: torch.Tensor, pattern, blocksize: int = 128, percdamp: float = 0.01,
              quant: str | None = None, mask: torch.Tensor | None = None) -> PruneResult:
    """SparseGPT pruning of one Linear weight; w and hessian are not modified.

    w: floating [out_features, in_features] (computed in float32, float64 for float64 w; the result has w.dtype).
    hessian: [in_features, in_features] float (HessianStats.value: 2/N sum x x^T), on w's device.
    pattern: "n:m" (n pruned in each aligned group of m along in_features, chosen inside the column loop) or a
      float s in (0, 1) (per block of columns, prune the scores w^2 / diag(U)^2 <= the block's k-th smallest).
    blocksize: columns per fused block (a multiple of m for n:m; the last block may be narrower).
    percdamp: damping as a fraction of mean(diag(H)); multiplied by 10 (with a warning) when Cholesky fails.
    quant: joint quantisation inside the column loop (the returned weight holds the dequantised values; the grid
      is fitted on each row of w before pruning, as the reference fits its quantiser):
      None      no quantisation;
      "int8"    the int8 W8A8 grid of sparsekern.quant / SparseLinear: s[r] = absmax(w[r]) / 127 (float32; an
                all-zero row: 1), q = s * clamp(round_half_even(w / s), -127, 127);
      "fp8"     the fp8 (float8_e4m3fn) W8A8 grid: s[r] = absmax(w[r]) / 448 (all-zero row: 1),
                q = s * e4m3(clamp(w / s, -448, 448)), e4m3 = torch's round-to-nearest-even cast;
      "int8-minmax", "int4": the reference's asymmetric per-row min-max grid (zero point, 2^bits - 1 levels;
                minmax_quantizer); not the SparseLinear grid, so for a dense export only.
    mask: optional fixed keep mask (bool [out_features, in_features], True = kept; for an N:M pattern at most m - n
      kept per group, checked): the OBS column loop then prunes exactly ~mask instead of choosing, i.e. GPTQ on a
      given sparsity pattern (how a refitted weight is quantised jointly: refit, then sparsegpt(..., mask=,
      quant=)).
    Returns PruneResult(weight (w's dtype), mask (bool, True = kept), loss ([out_features], float32; float64 for
    float64 w), scale, quant): for "int8" / "fp8" scale is the float32 [out_features] grid scale (on w's device)
    and quant the name (pass both to sparsekern.quant.attach_weight_grid before sparsify), else None.
    """
    p = _check_args(w, hessian, pattern, blocksize, percdamp, quant, mask)
    rows, cols = w.shape

    # float32 working copy as the references (W.float()); float64 weights are processed in float64 throughout.
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    W = torch.empty((rows, cols), dtype=work, device=w.device)
    W.copy_(w.detach())
    qscale = qzero = grid_scale = None
    maxq = 0
    # Grids are fitted before the dead columns are zeroed, as the reference fits its quantiser.
    if quant in _MINMAX_BITS:
        qscale, qzero, maxq = minmax_quantizer(W, _MINMAX_BITS[quant])
    elif quant is not None:
        grid_scale = fit_weight_scale(w.detach(), quant)  # float32, the one quantize_weight fits; no [rows, cols] temp
        qscale = grid_scale.to(work)  # exact (float64 holds every float32)
        if quant == "int8":
            qzero, maxq = torch.full_like(qscale, _INT8_ZERO), _INT8_MAXQ
        else:
            qzero, maxq = torch.zeros_like(qscale), _FP8_MAXQ

    Hd = torch.empty((cols, cols), dtype=work, device=w.device)
    Hd.copy_(hessian.detach())
    dead = torch.diagonal(Hd) == 0
    Hd.diagonal()[dead] = 1
    W[:, dead] = 0
    U = _upper_inverse_cholesky_(Hd, hessian.detach(), dead, percdamp)

    keep = torch.empty((rows, cols), dtype=torch.bool, device=w.device)
    loss = torch.zeros(rows, dtype=work, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2]
        Hinv1 = U[i1:i2, i1:i2]
        prune_mask = None
        if mask is not None:
            prune_mask = ~mask[:, i1:i2]
        elif not p.structured:
            score = W1.square() / torch.diagonal(Hinv1).square().reshape(1, -1)
            k = int(score.numel() * p.sparsity)
            thresh = torch.kthvalue(score.flatten(), k + 1).values  # sorted(score.flatten())[k]
            prune_mask = score <= thresh
            del score
        n, m = (0, 0) if mask is not None else (p.n, p.m)
        err, block_loss, block_keep = _ops.sparsegpt_prune_block_(W1, Hinv1, n, m, prune_mask, qscale, qzero, maxq)
        keep[:, i1:i2] = block_keep
        loss += block_loss
        if i2 < cols:
            W[:, i2:].addmm_(err, U[i1:i2, i2:], alpha=-1)
        del err, block_keep, prune_mask
    weight = W if w.dtype == work else W.to(w.dtype)
    return PruneResult(weight, keep, loss, grid_scale, quant if grid_scale is not None else None)
