"""Refit: the least-squares weight update on a fixed sparsity mask (and ADMM with a gradual mask).

Given a layer's dense weight W [rows, cols], its calibration Hessian H = 2/N sum x x^T [cols, cols] and a keep
mask M (any source: magnitude, Wanda, SparseGPT), refit solves, for every row r independently,

    min over w_hat with w_hat[j] = 0 where M[r, j] is False of  (w_hat - w)^T (H + lambda D) (w_hat - w)

with D = diag(H) and lambda = percdamp (a ridge towards the dense weight, scaled per input channel; the
objective without it is the layer's output error ||W X - W_hat X||^2 up to the factor 2/N). The exact solution of
row r is w_hat[S] = A[S, S]^-1 (A w)[S] with A = H + lambda D and S the kept columns of the row: one linear system
per row, each with its own S. Instead of rows factorisations, refit follows Boza ("Fast and Effective Weight Update
for Pruned Large Language Models", TMLR 2024): in the channel-normalised space (H_n = D^-1/2 H D^-1/2, W_n = W
D^1/2, where ADMM's single penalty rho fits every channel), ADMM on the split V = Z, Z masked:

    factor once:    (A_n + rho I)^-1                                    one Cholesky + inverse, cols^3
    per iteration:  Z = (V + U) * M;   U += V - Z;   V = (B + rho (Z - U)) (A_n + rho I)^-1,   B = W_n A_n
                    (one [rows, cols] x [cols, cols] GEMM and four elementwise passes)

(the three updates fused algebraically into three elementwise passes: S = V + U; T = B + rho S (2M - 1);
U = S (1 - M)), then conjugate gradients on the masked system (every row its own CG scalars, one GEMM per iteration), starting
from ADMM's point: ADMM gets within ~0.1 % of the optimum in 20 iterations, CG removes the rest (the ALPS
refinement, Meng et al. 2024). Stopping rule: a fixed number of iterations (iters ADMM + cg_iters CG), no
data-dependent test, so the cost is known in advance: (iters + cg_iters) GEMMs of rows x cols x cols.

admm_gradual (Boza's "ADMM with gradual pruning") chooses its own mask during the first `gradual_iters` ADMM
iterations: the N:M top m - n of |V + U| per group are always kept and the rest is pruned by a layer-wide threshold
on |V + U| whose sparsity rises cubically to the target; then the mask is fixed and the iterations continue.

Everything is plain torch (GEMMs and elementwise ops on the weight's device): the same code is the CPU and the CUDA
path. The per-iteration elementwise work is ~5 passes over [rows, cols] against a GEMM of 2 cols flops per
element, so a fused kernel would save little (docs/pruning.md has the measured split).
"""

from __future__ import annotations

import warnings

import torch

from .pattern import PruneResult, check_divisible, check_finite, check_hessian, check_weight, parse_pattern

REFITS = ("admm", "admm-gradual")
_MAX_DAMP_RETRIES = 3


def check_mask(mask, w: torch.Tensor, pattern, who: str = "refit"):
    """The keep mask is bool, w's shape and device, and (for an N:M pattern) keeps at most m - n of every aligned
    group of m along in_features. Returns the parsed pattern (None when pattern is None)."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != w.shape:
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{who}: mask must be a bool tensor of w's shape {tuple(w.shape)} (True = kept), got {got}")
    if mask.device != w.device:
        raise ValueError(f"{who}: mask is on {mask.device} but w is on {w.device}")
    if pattern is None:
        return None
    p = parse_pattern(pattern)
    if p.structured:
        check_divisible(p, w.shape[1])
        kept = mask.reshape(w.shape[0], -1, p.m).sum(dim=2)
        bad = kept > p.m - p.n
        if bool(bad.any()):
            r, g = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{who}: mask is not {p.n}:{p.m}: row {r}, columns {g * p.m}..{g * p.m + p.m - 1} keep "
                             f"{int(kept[r, g])} weights; the pattern allows at most {p.m - p.n} of every {p.m}")
    return p


class RefitSolver:
    """The per-Hessian part of refit, computed once and shared by every linear reading the same input (q/k/v,
    gate/up): the channel normalisation, the damped normalised Hessian A_n and the ADMM inverse (A_n + rho I)^-1.

    hessian: float [cols, cols] (HessianStats.value); percdamp: lambda above, > 0; rho: ADMM penalty, > 0.
    Work dtype float32 (float64 for a float64 hessian). On a Cholesky failure the damping is multiplied by 10 (up
    to 3 times, with a warning), then RuntimeError, as sparsegpt.
    """

    def __init__(self, hessian: torch.Tensor, percdamp: float = 0.01, rho: float = 1.0):
        if not isinstance(hessian, torch.Tensor) or hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
            shape = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
            raise ValueError(f"refit: hessian must be a square 2-D tensor [in_features, in_features], got {shape}")
        check_finite(hessian, "hessian")
        if not percdamp > 0:
            raise ValueError(f"refit: percdamp must be > 0, got {percdamp!r}")
        if not rho > 0:
            raise ValueError(f"refit: rho must be > 0, got {rho!r}")
        self.work = torch.float64 if hessian.dtype == torch.float64 else torch.float32
        self.rho = float(rho)
        H = hessian.detach().to(self.work)
        d = torch.diagonal(H).clone()
        if bool((d < 0).any()):
            j = int((d < 0).nonzero()[0])
            raise ValueError(f"refit: hessian has a negative diagonal entry H[{j}, {j}] = {float(d[j]):.4g}; a "
                             "Hessian X X^T is positive semi-definite (check the statistics)")
        self.dead = d == 0
        self.norm = torch.where(self.dead, torch.ones_like(d), d.sqrt())
        An = H / self.norm[:, None]
        An /= self.norm[None, :]
        An.diagonal()[self.dead] = 1
        damp_pct = float(percdamp)
        mean = torch.diagonal(An).mean()
        for attempt in range(_MAX_DAMP_RETRIES + 1):
            A = An.clone()
            A.diagonal().add_(damp_pct * mean)
            Ar = A.clone()
            Ar.diagonal().add_(self.rho)
            L, info = torch.linalg.cholesky_ex(Ar)
            # A itself must be positive definite for the CG refinement (ADMM's A + rho I is, for any PSD A).
            _, info_a = torch.linalg.cholesky_ex(A)
            if int(info) == 0 and int(info_a) == 0:
                break
            damp_pct *= 10
        else:
            raise RuntimeError(
                f"refit: the damped Hessian is not positive definite even with percdamp={damp_pct / 10:g} "
                f"({_MAX_DAMP_RETRIES} retries from percdamp={percdamp:g}, x10 each); check the calibration data")
        if damp_pct != percdamp:
            warnings.warn(f"refit: the Hessian with percdamp={percdamp:g} is not positive definite; used "
                          f"percdamp={damp_pct:g}", RuntimeWarning, stacklevel=2)
        self.percdamp = damp_pct
        self.A = A                                   # H_n + lambda I (normalised space: diag(H_n) = 1)
        self.Ainv = torch.cholesky_inverse(L)        # (A + rho I)^-1
        self.H = H
        self.cols = H.shape[0]

    # -- the two solvers ---------------------------------------------------------------------------------------

    def _start(self, w: torch.Tensor):
        W = w.detach().to(self.work).clone()
        W[:, self.dead] = 0
        Wn = W * self.norm
        return W, Wn, torch.mm(Wn, self.A)

    def _admm(self, Wn, B, M, iters: int, choose=None):
        """ADMM from V = W_n, U = 0; `choose(it, V + U)` may return a new mask (gradual). Returns (Z, M).

        The three updates of an iteration, Z = (V + U) * M; U += V - Z; T = B + rho (Z - U), collapse with
        S = V + U to  S = V + U;  T = B + S * rho (2M - 1);  U = S * (1 - M)  (Z is only formed at the end): three
        elementwise passes instead of six, then the GEMM V = T (A + rho I)^-1."""
        rho = self.rho
        V = Wn.clone()
        U = torch.zeros_like(Wn)  # holds S = V + U during an iteration
        T = torch.empty_like(Wn)
        signed = keep_out = None

        def set_mask(mask):
            nonlocal M, signed, keep_out
            M = mask
            Mf = mask.to(self.work)
            signed = Mf.mul(2 * rho).sub_(rho)   # rho (2M - 1)
            keep_out = Mf.neg().add_(1)         # 1 - M

        if M is not None:
            set_mask(M)
        for it in range(iters):
            U.add_(V)                                   # S = V + U
            if choose is not None:
                new = choose(it, U)
                if new is not None:
                    set_mask(new)
            torch.addcmul(B, U, signed, out=T)          # B + rho (Z - U_new) = B + rho S (2M - 1)
            U.mul_(keep_out)                            # U_new = S - Z = S (1 - M)
            torch.mm(T, self.Ainv, out=V)
        Z = torch.add(V, U).mul_(M) if iters else Wn * M
        return Z, M

    def _cg(self, X, B, Mf, iters: int):
        """Conjugate gradients on min_x x^T A x / 2 - b^T x over the kept entries, all rows at once (each row its
        own step sizes); X is updated in place."""
        if iters <= 0:
            return X
        R = (B - torch.mm(X, self.A)).mul_(Mf)
        P = R.clone()
        rs = (R * R).sum(1)
        AP = torch.empty_like(X)
        for _ in range(iters):
            torch.mm(P, self.A, out=AP).mul_(Mf)
            den = (P * AP).sum(1)
            alpha = torch.where(den > 0, rs / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(rs))
            X.addcmul_(alpha[:, None], P)
            R.addcmul_(alpha[:, None], AP, value=-1)
            rs_new = (R * R).sum(1)
            beta = torch.where(rs > 0, rs_new / rs.clamp_min(torch.finfo(rs.dtype).tiny), torch.zeros_like(rs))
            P.mul_(beta[:, None]).add_(R)
            rs = rs_new
        return X

    def _finish(self, w, W, Xn, M) -> PruneResult:
        out = Xn.div_(self.norm)
        out.mul_(M)  # exact zeros where pruned (also -0 -> 0)
        D = out - W
        loss = (torch.mm(D, self.H) * D).sum(1).mul_(0.5)  # 1/2 (w_hat - w) H (w_hat - w)^T, undamped H
        weight = out if w.dtype == self.work else out.to(w.dtype)
        return PruneResult(weight, M, loss)

    def refit(self, w: torch.Tensor, mask: torch.Tensor, pattern=None, *, iters: int = 20,
              cg_iters: int = 10) -> PruneResult:
        """Least-squares weights of w on `mask` (module docstring). pattern: when given, the mask is checked to
        be N:M for it (ValueError otherwise)."""
        check_weight(w)
        self._check_w(w)
        check_mask(mask, w, pattern)
        _check_iters(iters, cg_iters)
        W, Wn, B = self._start(w)
        Z, M = self._admm(Wn, B, mask, iters)
        self._cg(Z, B, M.to(self.work), cg_iters)
        return self._finish(w, W, Z, M)

    def admm_gradual(self, w: torch.Tensor, pattern, *, iters: int = 40, gradual_iters: int = 30,
                     cg_iters: int = 10) -> PruneResult:
        """Boza's ADMM with gradual pruning: the mask is chosen during the first gradual_iters iterations."""
        check_weight(w)
        self._check_w(w)
        p = parse_pattern(pattern)
        check_divisible(p, w.shape[1])
        _check_iters(iters, cg_iters)
        if not isinstance(gradual_iters, int) or not 1 <= gradual_iters <= iters:
            raise ValueError(f"admm_gradual: gradual_iters must be an int in [1, iters = {iters}], got "
                             f"{gradual_iters!r}")
        from .magnitude import magnitude

        rows, cols = w.shape
        target = p.sparsity

        def choose(it: int, VU: torch.Tensor):
            if it >= gradual_iters:
                return None
            cur = target - target * (1 - (it + 1) / gradual_iters) ** 3
            score = VU.abs()
            if p.structured:
                forced = magnitude(score.float(), f"{p.n}:{p.m}").mask  # the m - n largest of each group always stay
                k = int(score.numel() * cur)
                if k >= score.numel() * target:
                    return forced
                rest = score.masked_fill(forced, float("inf"))
            else:
                k = int(score.numel() * cur)
                rest = score
            if k <= 0:
                return torch.ones_like(score, dtype=torch.bool)
            thresh = torch.kthvalue(rest.flatten(), k).values
            keep = rest > thresh
            return keep

        W, Wn, B = self._start(w)
        Z, M = self._admm(Wn, B, None, iters, choose=choose)
        self._cg(Z, B, M.to(self.work), cg_iters)
        return self._finish(w, W, Z, M)

    def _check_w(self, w: torch.Tensor) -> None:
        if w.shape[1] != self.cols:
            raise ValueError(f"refit: hessian is [{self.cols}, {self.cols}] but w has in_features = {w.shape[1]}")
        if w.device != self.H.device:
            raise ValueError(f"refit: hessian is on {self.H.device} but w is on {w.device}")


def _check_iters(iters, cg_iters) -> None:
    for name, v in (("iters", iters), ("cg_iters", cg_iters)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"refit: {name} must be an int >= 0, got {v!r}")
    if iters + cg_iters == 0:
        raise ValueError("refit: iters + cg_iters must be >= 1 (no iteration would leave the masked weights "
                         "unfitted)")


def refit(w: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, pattern=None, *, iters: int = 20,
          cg_iters: int = 10, percdamp: float = 0.01, rho: float = 1.0) -> PruneResult:
    """Least-squares refit of one Linear weight on a fixed keep mask (module docstring); inputs are not modified.

    w: floating [out_features, in_features] (the DENSE weight: the refit target is its output W X).
    hessian: [in_features, in_features] (HessianStats.value), on w's device.
    mask: bool [out_features, in_features], True = kept (e.g. the .mask of magnitude / wanda / sparsegpt).
    pattern: optional "n:m" (or sparsity): the mask must keep at most m - n of each group (checked).
    iters, cg_iters: ADMM then conjugate-gradient iterations (fixed counts: the stopping rule).
    percdamp: ridge lambda, as a fraction of diag(H) per channel (> 0); rho: ADMM penalty in normalised units.
    Returns PruneResult(weight (w's dtype, zeros exactly where mask is False), mask, loss float32 [rows] =
    1/2 (w_hat - w) H (w_hat - w)^T per row).
    """
    check_weight(w)
    check_hessian(hessian, w, "refit: ", finite=False)  # RefitSolver checks finiteness (one pass over H)
    return RefitSolver(hessian, percdamp, rho).refit(w, mask, pattern, iters=iters, cg_iters=cg_iters)


def admm_gradual(w: torch.Tensor, hessian: torch.Tensor, pattern, *, iters: int = 40, gradual_iters: int = 30,
                 cg_iters: int = 10, percdamp: float = 0.01, rho: float = 1.0) -> PruneResult:
    """Prune w to `pattern` with ADMM and a gradually growing mask (Boza), then refit on the final mask."""
    check_weight(w)
    check_hessian(hessian, w, "admm_gradual: ", finite=False)  # RefitSolver checks finiteness
    return RefitSolver(hessian, percdamp, rho).admm_gradual(w, pattern, iters=iters, gradual_iters=gradual_iters,
                                                            cg_iters=cg_iters)
