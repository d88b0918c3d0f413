"""Input-channel permutation search for N:M sparsity (Pool & Yu, NeurIPS 2021; RIA, Zhang et al. ICLR 2024).

N:M pruning keeps the m-n most important of every aligned group of m consecutive input channels (columns) of a
weight [out_features, in_features]. Reordering the columns first lets important weights fall into different
groups; the permutation is free at run time where it folds into the producer of the linear's input
(sparsekern.pipeline.permute does that folding).

    perm = search_permutation(importance, 2, 4, time_budget=1.0)      # LongTensor [cols]
    kept_importance(importance[:, perm], 2, 4) >= kept_importance(importance, 2, 4)

Conventions
- importance: non-negative finite float [rows, cols]; the groups run along cols (aligned groups of m columns).
- The objective (kept_importance) is, over every row and every group, the sum of the m - n largest values of the
  group: what an N:M mask chosen by this importance keeps.
- A permutation `perm` is a LongTensor [cols]; the permuted matrix is importance[:, perm] (new column c holds old
  column perm[c]), so a consumer weight W becomes W[:, perm].
- blocks=b: the columns are b equal contiguous segments (each a multiple of m) and perm maps every segment onto
  itself (b independent permutations, searched together). Used for per-head permutations: each segment is one
  head. When several column blocks must share one permutation (the query heads of one kv head under grouped-query
  attention), the caller stacks their rows: segment j of the importance is then [rows * g, head_dim] with the g
  query heads' columns one under the other; the objective is the sum over those rows, exactly the kept importance
  of all the shared blocks (sparsekern.pipeline.permute.permutation_importance builds that matrix).

Algorithm (bounded time, pure torch, any device)
1. Start from the better of the identity and an RIA-style dealing: per segment, channels sorted by total
   importance are dealt round-robin into the groups (the most important channels end up one per group).
2. Local search by pairwise swaps: the columns of a segment are split at random into chunks of at most
   `_CHUNK` columns (a segment that fits is one chunk); within a chunk the gain of every swap (channel x of group G
   with channel y of group H) is evaluated at once: with the other m - 1 channels of G fixed, the row-wise kept sum
   after putting y in x's slot is S_x + relu(y - T_x), where S_x is the sum of the m - n largest of the other
   channels and T_x the (m - n)-th largest of them. Improving swaps are applied greedily, best first, at most one
   per group per chunk (so every applied gain is exact).
3. Where a sweep of swaps finds nothing (m <= 4): for pairs of groups (all pairs of up to _PAIR_GROUPS groups at a
   time), the best of the C(2m-1, m-1) ways to re-split their 2m columns into two groups (double swaps included:
   with two groups it is the exact optimum); the improving re-splits are applied best first, each group once.
   Repeat 2-3 until a segment stops improving (a segment held in one chunk: a local optimum for both moves; a
   larger one: _PATIENCE sweeps without a move), the time budget is spent (checked between chunks and tiles, so it
   can be exceeded by one tile's work) or max_sweeps sweeps are done.
4. Never worse than the identity: the objectives are compared in float64 and the identity is returned unless the
   result is strictly better.

Deterministic for a given seed when the search ends by convergence or max_sweeps (where the time budget ends it
depends on the machine). No linear-assignment step: on the brute-force-checkable sizes the search finds the optimum
of 8 columns and is within 1% of it for 12 (tests/test_permute.py); on SmolLM2-135M's down_proj / o_proj it adds
1-1.7% / 0.75-1% kept |W| in one second, most of what longer budgets reach.
"""

from __future__ import annotations

import itertools
import math
import time

import torch

__all__ = ["brute_force_permutation", "kept_importance", "round_robin_permutation", "search_permutation"]

_CHUNK = 128          # columns per swap-evaluation chunk of a large segment
_TILE_ELEMS = 1 << 22  # elements of one [rows, chunk, chunk] tile of the gain evaluation
_PATIENCE = 3         # sweeps without an accepted swap before a multi-chunk segment counts as converged
_BRUTE_MAX = 12       # largest segment brute_force_permutation enumerates
_PAIR_GROUPS = 32     # groups per chunk of the pair re-split phase
_MAX_SPLITS = 35      # the pair re-split phase runs for m <= 4 (35 splits of 8 columns into two groups of 4)


def _check_nm(n: int, m: int) -> int:
    if isinstance(n, bool) or isinstance(m, bool) or not isinstance(n, int) or not isinstance(m, int):
        raise ValueError(f"n and m must be ints (n pruned of every m), got n={n!r}, m={m!r}")
    if not 1 <= n < m:
        raise ValueError(f"need 1 <= n < m (n pruned of every m), got {n}:{m}")
    return m - n


def _check_importance(importance, m: int) -> torch.Tensor:
    if not isinstance(importance, torch.Tensor) or importance.dim() != 2:
        shape = tuple(importance.shape) if isinstance(importance, torch.Tensor) else type(importance).__name__
        raise ValueError(f"importance must be a 2-D tensor [rows, cols], got {shape}")
    if not importance.is_floating_point():
        raise ValueError(f"importance must be a floating tensor, got {importance.dtype}")
    cols = importance.shape[1]
    if cols % m:
        raise ValueError(f"importance has {cols} columns, not a multiple of m = {m}")
    if importance.numel():
        if not bool(torch.isfinite(importance).all()):
            raise ValueError("importance must be finite")
        if bool((importance < 0).any()):
            raise ValueError("importance must be non-negative")
    return importance.detach()


def _segments(cols: int, m: int, blocks: int | None) -> int:
    """Columns per segment (cols itself without blocks)."""
    if blocks is None:
        return cols
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"blocks must be a positive int or None, got {blocks!r}")
    if cols % blocks or (cols // blocks) % m:
        raise ValueError(f"blocks={blocks} must split the {cols} columns into equal segments that are multiples "
                         f"of m = {m}")
    return cols // blocks


def kept_importance(importance: torch.Tensor, n: int, m: int) -> float:
    """The N:M objective: over every row and every aligned group of m columns, the sum of the m - n largest
    values (what an n:m mask chosen by this importance keeps). Computed in float64."""
    k = _check_nm(n, m)
    imp = _check_importance(importance, m)
    if imp.numel() == 0:
        return 0.0
    rows, cols = imp.shape
    g = imp.to(torch.float64).reshape(rows, cols // m, m)
    return float(g.topk(k, dim=-1).values.sum())


def round_robin_permutation(importance: torch.Tensor, m: int, *, blocks: int | None = None) -> torch.Tensor:
    """RIA-style start: per segment, the channels sorted by total importance (descending, stable) are dealt
    round-robin into the segment's groups, so the g most important channels land one per group, the next g one
    per group, and so on. LongTensor [cols] on importance's device."""
    imp = _check_importance(importance, m)
    cols = imp.shape[1]
    seg = _segments(cols, m, blocks)
    score = imp.to(torch.float64).sum(0).view(-1, seg)                  # [segments, seg]
    order = torch.sort(score, dim=1, descending=True, stable=True).indices  # [segments, seg]
    groups = seg // m
    # position (group g, slot s) = g * m + s takes rank s * groups + g
    dealt = order.view(-1, m, groups).transpose(1, 2).reshape(-1, seg)
    base = torch.arange(0, cols, seg, device=imp.device).view(-1, 1)
    return (dealt + base).reshape(-1).to(torch.int64)


def _swap_gains(cur: torch.Tensor, pos: torch.Tensor, k: int, m: int) -> torch.Tensor:
    """gain[x, y] of swapping the columns at positions pos[x] and pos[y] of `cur` (their groups' other columns
    fixed): exact when the two are in different groups (-inf on pairs within one group)."""
    rows = cur.shape[0]
    b = pos.shape[0]
    grp = pos // m
    slot = pos % m
    gcols = grp.view(-1, 1) * m + torch.arange(m, device=pos.device)      # [b, m]
    vals = cur[:, gcols.reshape(-1)].view(rows, b, m)                     # [rows, b, m]
    v, idx = torch.sort(vals, dim=-1, descending=True)
    q = (idx == slot.view(1, b, 1)).to(torch.int64).argmax(-1)            # rank of the slot's own value
    topk = v[..., :k].sum(-1)                                             # group's kept sum, per row
    vk = v[..., k]                                                        # k < m always
    vk1 = v[..., k - 1]
    removed = q < k
    x_val = cur[:, pos]                                                   # [rows, b]
    rest_sum = torch.where(removed, topk - x_val + vk, topk)              # kept sum of the other m - 1
    thresh = torch.where(removed, vk, vk1)                                # their k-th largest
    base = (rest_sum - topk).sum(0)                                       # [b], <= 0
    # into[x, y] = sum_r relu(cur[r, pos[y]] - thresh[r, x]): what y adds in x's slot
    into = torch.zeros(b, b, dtype=cur.dtype, device=cur.device)
    step = max(1, _TILE_ELEMS // max(1, b * b))
    for r0 in range(0, rows, step):
        t = thresh[r0:r0 + step].unsqueeze(2)                             # [r, b(x), 1]
        y = x_val[r0:r0 + step].unsqueeze(1)                              # [r, 1, b(y)]
        into += (y - t).clamp_min_(0).sum(0)
    d = base.view(-1, 1) + into
    gain = d + d.t()
    gain.masked_fill_(grp.view(-1, 1) == grp.view(1, -1), float("-inf"))
    return gain


def _greedy_swaps(gain: torch.Tensor, pos: torch.Tensor, m: int, tol: float) -> list[tuple[int, int]]:
    """Best-first non-conflicting improving swaps (each group at most once), as position pairs."""
    b = gain.shape[0]
    upper = torch.ones(b, b, dtype=torch.bool, device=gain.device).triu(1)
    flat = gain.masked_fill(~upper, float("-inf")).reshape(-1)
    npos = int((flat > tol).sum())
    if npos == 0:
        return []
    top = torch.topk(flat, min(npos, 4 * b))
    cand = top.indices.cpu().tolist()
    p = pos.cpu().tolist()
    used: set[int] = set()
    out = []
    for c in cand:
        x, y = divmod(c, b)
        gx, gy = p[x] // m, p[y] // m
        if gx in used or gy in used:
            continue
        used.add(gx)
        used.add(gy)
        out.append((p[x], p[y]))
    return out


def _splits(m: int, device) -> torch.Tensor | None:
    """The ways to split 2m slots into two groups of m, as [S, 2m] slot orders (first m: one group, last m: the
    other; the first slot always in the first group, so each split once). None when there are too many."""
    if math.comb(2 * m - 1, m - 1) > _MAX_SPLITS:
        return None
    out = []
    for comb in itertools.combinations(range(1, 2 * m), m - 1):
        first = (0,) + comb
        out.append(list(first) + [c for c in range(2 * m) if c not in first])
    return torch.tensor(out, dtype=torch.int64, device=device)


def _pair_moves(cur: torch.Tensor, groups: torch.Tensor, k: int, m: int, splits: torch.Tensor, tol: float,
                out_of_time) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, bool]:
    """For every pair of the given groups, the best re-split of their 2m columns; the improving ones applied best
    first, each group at most once. Returns ((src, dst) positions of the column moves, or None; whether the time
    ran out: then only the pairs evaluated until then are used)."""
    rows = cur.shape[0]
    q = groups.numel()
    gi, gj = torch.triu_indices(q, q, offset=1, device=groups.device)
    gi, gj = groups[gi], groups[gj]
    slots = torch.arange(m, device=groups.device)
    pcols = torch.cat([gi.view(-1, 1) * m + slots, gj.view(-1, 1) * m + slots], dim=1)   # [P, 2m]
    gcols = groups.view(-1, 1) * m + slots
    kept_g = cur[:, gcols.reshape(-1)].view(rows, q, m).topk(k, dim=-1).values.sum(-1).sum(0)
    kept_of = torch.zeros(int(groups.max()) + 1, dtype=cur.dtype, device=cur.device)
    kept_of[groups] = kept_g
    nsplit = splits.shape[0]
    step = max(1, _TILE_ELEMS // max(1, rows * nsplit * 2 * m))
    best_val, best_idx = [], []
    stopped = False
    for p0 in range(0, pcols.shape[0], step):
        if p0 and out_of_time():
            stopped = True
            break
        pc = pcols[p0:p0 + step]
        vals = cur[:, pc.reshape(-1)].view(rows, -1, 2 * m)                            # [rows, p, 2m]
        by_split = vals[:, :, splits.reshape(-1)].view(rows, -1, nsplit, 2, m)        # [rows, p, S, 2, m]
        kept = by_split.topk(k, dim=-1).values.sum(-1).sum(-1).sum(0)                 # [p, S]
        v, i = kept.max(dim=1)
        best_val.append(v)
        best_idx.append(i)
    done = sum(v.numel() for v in best_val)
    gi, gj, pcols = gi[:done], gj[:done], pcols[:done]
    gain = torch.cat(best_val) - (kept_of[gi] + kept_of[gj])
    npos = int((gain > tol).sum())
    if npos == 0:
        return None, stopped
    top = torch.topk(gain, npos).indices
    best_split = torch.cat(best_idx)
    used: set[int] = set()
    src, dst = [], []
    gi_l, gj_l = gi.tolist(), gj.tolist()
    for pidx in top.tolist():
        a, b = gi_l[pidx], gj_l[pidx]
        if a in used or b in used:
            continue
        used.update((a, b))
        order = pcols[pidx][splits[best_split[pidx]]]     # the 2m columns in their new slots
        src.append(order)
        dst.append(pcols[pidx])
    return (torch.cat(src), torch.cat(dst)), stopped


def search_permutation(importance: torch.Tensor, n: int, m: int, *, blocks: int | None = None,
                       time_budget: float | None = 1.0, seed: int = 0,
                       max_sweeps: int | None = None) -> torch.Tensor:
    """A column permutation that keeps more N:M importance than the identity (never less).

    importance: non-negative finite float [rows, cols], cols a multiple of m (float64 is searched in float64, any
      other float in float32).
    n, m: n pruned of every m (2, 4 for 2:4); the objective is kept_importance(importance[:, perm], n, m).
    blocks: None, or b equal contiguous segments each mapped onto itself (per-head permutations; see the module
      docstring for blocks that must share one permutation: stack their rows).
    time_budget: seconds for the local search (None: no limit). max_sweeps: a cap on the search's sweeps.
    seed: the random chunking of large segments.
    Returns a LongTensor [cols] on importance's device: the identity unless the result is strictly better.
    """
    k = _check_nm(n, m)
    imp = _check_importance(importance, m)
    rows, cols = imp.shape
    seg = _segments(cols, m, blocks)
    dev = imp.device
    identity = torch.arange(cols, device=dev)
    if rows == 0 or cols == 0 or seg == m:
        return identity
    deadline = None if time_budget is None else time.perf_counter() + float(time_budget)
    work = imp.to(torch.float64 if imp.dtype == torch.float64 else torch.float32)

    start = round_robin_permutation(work, m, blocks=blocks)
    base_obj = kept_importance(work, n, m)
    perm = start if kept_importance(work[:, start], n, m) > base_obj else identity.clone()
    cur = work[:, perm].contiguous()
    # Swaps must gain more than float noise of a group's kept sum.
    tol = 1e-6 * (base_obj / max(1, cols // m)) if work.dtype == torch.float32 else 1e-12 * base_obj / max(
        1, cols // m)

    gen = torch.Generator(device="cpu")
    gen.manual_seed(int(seed))
    nseg = cols // seg
    chunk = min(seg, _CHUNK) if seg > 2 * _CHUNK else seg
    gchunk = min(seg // m, _PAIR_GROUPS)
    splits = _splits(m, dev)
    quiet = [0] * nseg             # sweeps in a row without an improvement, per segment
    done = [False] * nseg
    sweeps = 0

    def out_of_time() -> bool:
        return deadline is not None and time.perf_counter() > deadline

    def move(src: torch.Tensor, dst: torch.Tensor) -> None:
        # the columns at positions src go to positions dst (one permutation of those positions)
        cur[:, dst] = cur[:, src]
        perm[dst] = perm[src]

    stopped = False
    while not all(done) and not stopped:
        if max_sweeps is not None and sweeps >= max_sweeps:
            break
        sweeps += 1
        for s in range(nseg):
            if done[s]:
                continue
            # 1. pairwise swaps, chunk by chunk
            order = torch.randperm(seg, generator=gen) if chunk < seg else torch.arange(seg)
            improved = 0
            for c0 in range(0, seg, chunk):
                if out_of_time():
                    stopped = True
                    break
                pos = (order[c0:c0 + chunk] + s * seg).to(dev)
                if pos.numel() < 2:
                    continue
                swaps = _greedy_swaps(_swap_gains(cur, pos, k, m), pos, m, tol)
                if swaps:
                    a = torch.tensor([x for x, _ in swaps], device=dev)
                    b = torch.tensor([y for _, y in swaps], device=dev)
                    move(torch.cat([a, b]), torch.cat([b, a]))
                    improved += len(swaps)
            # 2. where swaps are stuck: the best re-split of pairs of groups (2m columns into two groups of m)
            if not stopped and not improved and splits is not None:
                gorder = torch.randperm(seg // m, generator=gen)
                for g0 in range(0, seg // m, gchunk):
                    if out_of_time():
                        stopped = True
                        break
                    groups = (gorder[g0:g0 + gchunk] + s * (seg // m)).to(dev)
                    if groups.numel() < 2:
                        continue
                    moves, stopped = _pair_moves(cur, groups, k, m, splits, tol, out_of_time)
                    if moves is not None:
                        move(*moves)
                        improved += int(moves[0].numel())
                    if stopped:
                        break
            if stopped:
                break
            quiet[s] = 0 if improved else quiet[s] + 1
            if quiet[s] >= (1 if chunk == seg and gchunk == seg // m else _PATIENCE):
                done[s] = True
    return perm if kept_importance(work[:, perm], n, m) > base_obj else identity


def brute_force_permutation(importance: torch.Tensor, n: int, m: int, *,
                            blocks: int | None = None) -> tuple[torch.Tensor, float]:
    """The optimum by enumeration of every grouping (segments of at most 12 columns: 5775 groupings of 12 into
    groups of 4). Returns (perm LongTensor [cols] on the CPU, its kept importance). For tests."""
    k = _check_nm(n, m)
    imp = _check_importance(importance, m).to(torch.float64).cpu()
    cols = imp.shape[1]
    seg = _segments(cols, m, blocks)
    if seg > _BRUTE_MAX:
        raise ValueError(f"brute force enumerates segments of at most {_BRUTE_MAX} columns, got {seg}")
    perm: list[int] = []
    for s0 in range(0, cols, seg):
        part = imp[:, s0:s0 + seg]
        cache: dict[tuple[int, ...], float] = {}

        def group_value(g: tuple[int, ...]) -> float:
            if g not in cache:
                cache[g] = float(part[:, list(g)].topk(k, dim=1).values.sum())
            return cache[g]

        best: tuple[float, list[tuple[int, ...]]] = (-math.inf, [])

        def walk(rest: tuple[int, ...], acc: float, groups: list[tuple[int, ...]]) -> None:
            nonlocal best
            if not rest:
                if acc > best[0]:
                    best = (acc, list(groups))
                return
            first, others = rest[0], rest[1:]
            for comb in itertools.combinations(others, m - 1):
                g = (first,) + comb
                remaining = tuple(c for c in others if c not in comb)
                groups.append(g)
                walk(remaining, acc + group_value(g), groups)
                groups.pop()

        walk(tuple(range(seg)), 0.0, [])
        perm.extend(s0 + c for g in best[1] for c in g)
    p = torch.tensor(perm, dtype=torch.int64)
    return p, kept_importance(imp[:, p], n, m)
