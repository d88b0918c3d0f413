"""Independent plain-PyTorch oracles of the pruning algorithms, written from ../shared/ALGORITHMS.md with the
references' loop structure (slow on purpose: they are the readable spec the kernels are tested against).
Conventions: W [rows, cols], groups along cols, masks bool with True = kept."""

from __future__ import annotations

import math

import torch


def realistic_activations(batch: int, tokens: int, cols: int, outliers: int = 3, seed: int = 0) -> torch.Tensor:
    """[batch, tokens, cols] float32: unit Gaussian features, a few 'massive' outlier features (x20, shifted
    mean) as in LLM hidden states, and a per-token scale so the Hessian is not a multiple of I."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, cols, generator=g)
    idx = torch.randperm(cols, generator=g)[:outliers]
    x[..., idx] = x[..., idx] * 20 + 5
    x *= torch.rand(batch, tokens, 1, generator=g) + 0.5
    return x


def hessian_oracle(batches) -> torch.Tensor:
    """The reference's add_batch: H *= n/(n+B); n += B; X = sqrt(2/n) * X; H += X^T X."""
    H, n = None, 0
    for x in batches:
        if x.dim() == 2:
            x = x.unsqueeze(0)
        b = x.shape[0]
        X = x.reshape(-1, x.shape[-1]).t().double()
        if H is None:
            H = torch.zeros(X.shape[0], X.shape[0], dtype=torch.float64)
        H *= n / (n + b)
        n += b
        X = math.sqrt(2 / n) * X
        H += X.matmul(X.t())
    return H


def act_scale_oracle(batches) -> torch.Tensor:
    """Wanda's add_batch: s *= n/(n+B); n += B; s += ||X[:, j]||^2 / n."""
    s, n = None, 0
    for x in batches:
        if x.dim() == 2:
            x = x.unsqueeze(0)
        b = x.shape[0]
        X = x.reshape(-1, x.shape[-1]).t().double()
        if s is None:
            s = torch.zeros(X.shape[0], dtype=torch.float64)
        s *= n / (n + b)
        n += b
        s += torch.norm(X, p=2, dim=1) ** 2 / n
    return s


def nm_keep_oracle(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the m - n largest of every group of m; ties keep the lower index (a stable descending sort)."""
    rows, cols = scores.shape
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for g0 in range(0, cols, m):
            order = sorted(range(m), key=lambda k: (-float(scores[r, g0 + k]), k))
            for k in order[: m - n]:
                keep[r, g0 + k] = True
    return keep


def wanda_oracle(w: torch.Tensor, s: torch.Tensor, n: int, m: int, sparsity: float):
    metric = torch.abs(w).float() * torch.sqrt(s.float()).reshape(1, -1)
    if m > 0:
        keep = nm_keep_oracle(metric, n, m)
    else:
        k = int(w.shape[1] * sparsity)
        idx = torch.sort(metric, dim=-1, stable=True)[1][:, :k]
        keep = torch.ones_like(metric, dtype=torch.bool)
        keep.scatter_(1, idx, False)
    return torch.where(keep, w, torch.zeros_like(w)), keep


def wanda_variant_oracle(w: torch.Tensor, s: torch.Tensor, sparsity: float):
    metric = torch.abs(w).float() * torch.sqrt(s.float()).reshape(1, -1)
    sort_res = torch.sort(metric, dim=-1, stable=True)
    tmp_metric = torch.cumsum(sort_res[0], dim=1)
    sum_before = metric.sum(dim=1)

    def given_alpha(alpha):
        thres_cumsum = sum_before * alpha
        sort_mask = tmp_metric <= thres_cumsum.reshape((-1, 1))
        thres = torch.gather(sort_res[0], dim=1, index=sort_mask.sum(dim=1, keepdims=True) - 1)
        pruned = metric <= thres
        return pruned, (pruned == True).sum() / pruned.numel()  # noqa: E712  (the reference's expression)

    alpha, hist = 0.4, [0.0, 0.8]
    pruned, cur = given_alpha(alpha)
    while torch.abs(cur - sparsity) > 0.001 and hist[1] - hist[0] >= 0.001:
        if cur > sparsity:
            new = (alpha + hist[0]) / 2.0
            hist[1] = alpha
        else:
            new = (alpha + hist[1]) / 2.0
            hist[0] = alpha
        alpha = new
        pruned, cur = given_alpha(alpha)
    keep = ~pruned
    return torch.where(keep, w, torch.zeros_like(w)), keep


def minmax_oracle(W: torch.Tensor, bits: int):
    maxq = 2**bits - 1
    tmp = torch.zeros(W.shape[0])
    xmin = torch.minimum(W.min(1)[0], tmp)
    xmax = torch.maximum(W.max(1)[0], tmp)
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1, +1
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale.unsqueeze(1), zero.unsqueeze(1), maxq


def quantize_oracle(x, scale, zero, maxq):
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)


def sparsegpt_oracle(w, H, n, m, sparsity, blocksize=128, percdamp=0.01, bits=None):
    """SparseGPT fasterprune, the reference's structure: a Python loop over every column."""
    W = w.clone().float()
    H = H.clone().float()
    rows, cols = W.shape
    quant = minmax_oracle(W, bits) if bits else None
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(cols)
    H[diag, diag] += damp
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    losses = torch.zeros(rows)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if m == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w_ = W1[:, i]
            d = Hinv1[i, i]
            if m > 0 and i % m == 0:
                tmp = W1[:, i : i + m] ** 2 / (torch.diag(Hinv1)[i : i + m].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, n, dim=1, largest=False)[1], True)
            q = w_.clone()
            q[mask1[:, i]] = 0
            if quant is not None:
                q = quantize_oracle(q.unsqueeze(1), *quant).flatten()
            Q1[:, i] = q
            Losses1[:, i] = (w_ - q) ** 2 / d**2
            err1 = (w_ - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~mask1
        losses += torch.sum(Losses1, 1) / 2
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W.to(w.dtype), keep, losses


# ---------------------------------------------------------------- the oracles' own checks against closed forms


def test_hessian_oracle_is_two_over_n_sum_xxT():
    xs = [realistic_activations(b, 5, 12, seed=i) for i, b in enumerate((2, 1, 3))]
    flat = torch.cat([x.reshape(-1, 12) for x in xs]).double()
    assert torch.allclose(hessian_oracle(xs), 2 / 6 * flat.t() @ flat, rtol=1e-12)
    assert torch.allclose(act_scale_oracle(xs), (flat**2).sum(0) / 6, rtol=1e-12)


def test_nm_keep_oracle_tie_rule():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 1.0]])
    assert nm_keep_oracle(scores, 2, 4).tolist() == [[True, True, False, False, False, True, True, False]]


def test_sparsegpt_oracle_prunes_and_compensates():
    torch.manual_seed(1)
    x = realistic_activations(4, 16, 32).reshape(-1, 32)
    H = (2 / 4 * x.t() @ x).float()
    w = torch.randn(6, 32)
    q, keep, loss = sparsegpt_oracle(w, H, 2, 4, 0.0, blocksize=8)
    assert (keep.view(6, 8, 4).sum(-1) == 2).all() and ((q != 0) <= keep).all()
    # The OBS update lowers the layer's output error compared to plain masking of the same weights.
    err = lambda v: torch.trace((v - w) @ H @ (v - w).t())  # noqa: E731
    assert err(q) < err(w * keep)
