"""Budget projection of keep-probabilities and exact top-k selection of the final masks."""
from __future__ import annotations

from typing import Mapping

import torch

from pgprune.errors import BudgetError, PgpruneError


def _check_finite(t: torch.Tensor, what: str) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise PgpruneError(f"{what} contains NaN or inf values; cannot project/select.")


def project_budget(s: torch.Tensor, budget: float, *, tol: float = 1e-7, max_iter: int = 100) -> torch.Tensor:
    """Euclidean projection of ``s`` onto {x in [0,1]^N : sum(x) <= budget}.

    The solution is x = clamp(s - v, 0, 1) with the smallest shift v >= 0 that satisfies the budget,
    found in float64 by bisection safeguarded with exact Newton steps (stops once |sum(x) - budget| <= tol;
    casting back to a lower-precision dtype may move the sum by rounding). Scores are never pushed
    up: if the clamped ``s`` already fits, it is returned as is. The result has ``s``'s dtype and shape.
    """
    n = s.numel()
    budget = float(budget)
    if not (0.0 <= budget <= n):
        raise BudgetError(f"budget {budget} is outside the allowed range [0, {n}] for a group of {n} units.")
    _check_finite(s, "score vector")
    x = s.detach().to(torch.float64).reshape(-1)
    clamped = x.clamp(0.0, 1.0)
    if n == 0 or float(clamped.sum()) <= budget:
        return clamped.reshape(s.shape).to(s.dtype)
    # f(v) = sum(clamp(s - v, 0, 1)) is decreasing and piecewise linear: safeguarded Newton (the exact root of
    # the current linear piece) inside a bisection bracket [lo, hi] with f(lo) > budget >= f(hi).
    lo, hi, v = 0.0, float(x.max()), 0.0
    for _ in range(max_iter):
        y = x - v
        active = (y > 0) & (y < 1)
        n_act = int(active.sum())
        total = float(y[active].sum()) + int((y >= 1).sum())
        if abs(total - budget) <= tol:
            hi = v
            break
        if total > budget:
            lo = v
        else:
            hi = v
        step = v + (total - budget) / n_act if n_act else None
        v = step if step is not None and lo < step < hi else 0.5 * (lo + hi)
        if not lo < v < hi:  # bracket exhausted at float64 resolution
            break
    return (x - hi).clamp(0.0, 1.0).reshape(s.shape).to(s.dtype)


def isotonic_nonincreasing(s: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of each segment's entries (in index order) onto the non-increasing sequences: the
    pool-adjacent-violators algorithm, in float64. (Projecting onto {non-increasing, in [0,1], sum <= b} is then
    a clamp of this minus a shift, see :func:`project_budget`, since the shift and the clamp keep the order.)"""
    x = s.detach().to(torch.float64).reshape(-1).cpu()
    seg = segments.reshape(-1).to(torch.long).cpu()
    if seg.numel() != x.numel():
        raise BudgetError(f"segments has {seg.numel()} entries but there are {x.numel()} scores.")
    out = x.clone()
    for j in torch.unique(seg).tolist():
        idx = (seg == j).nonzero().reshape(-1)
        vals = x[idx].tolist()
        blocks: list[list[float]] = []  # [sum, count]
        for v in vals:
            blocks.append([v, 1.0])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
                total, count = blocks.pop()
                blocks[-1][0] += total
                blocks[-1][1] += count
        fitted = [b[0] / b[1] for b in blocks for _ in range(int(b[1]))]
        out[idx] = torch.tensor(fitted, dtype=torch.float64)
    return out.reshape(s.shape).to(s.dtype)


def project_segments(s: torch.Tensor, segments: torch.Tensor, budgets, **kw) -> torch.Tensor:
    """Project each segment's entries of ``s`` onto its own budget (``budgets[j]`` for segment id j): the
    Euclidean projection onto the product of the per-segment sets {x_seg in [0,1]^n_seg : sum(x_seg) <= b_j}."""
    flat = s.detach().reshape(-1)
    seg = segments.reshape(-1).to(torch.long).cpu()
    if seg.numel() != flat.numel():
        raise BudgetError(f"segments has {seg.numel()} entries but there are {flat.numel()} scores.")
    out = torch.empty_like(flat)
    for j, b in enumerate(budgets):
        idx = (seg == j).nonzero().reshape(-1)
        if idx.numel():
            out[idx] = project_budget(flat[idx], float(b), **kw)
    return out.reshape(s.shape)


def project_groups(probs: Mapping[str, torch.Tensor], budgets: Mapping[str, float], **kw) -> dict[str, torch.Tensor]:
    """Project every group's probabilities onto its own budget (see :func:`project_budget`)."""
    missing = sorted(set(probs) - set(budgets))
    if missing:
        raise BudgetError(f"no budget given for group(s) {missing}; budgets exist for {sorted(budgets)}.")
    return {name: project_budget(p, budgets[name], **kw) for name, p in probs.items()}


def select_top_k(scores: torch.Tensor, k: int, *, segments: torch.Tensor | None = None, min_per_segment: int = 0,
                 allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask with exactly ``k`` True entries at the highest scores.

    Ties are broken deterministically (higher score first, then lower index). With ``segments`` (one id per
    unit, e.g. the layer index) the best ``min_per_segment`` allowed units of each segment are reserved first
    (all of them when a segment has fewer allowed units; segments without allowed units are exempt) and the
    remaining slots are filled globally. Units with ``allowed`` False are never selected.
    """
    shape = scores.shape
    scores = scores.detach().reshape(-1)
    n = scores.numel()
    _check_finite(scores, "score vector")
    if allowed is None:
        allowed = torch.ones(n, dtype=torch.bool)
    allowed = allowed.reshape(-1).to(torch.bool).cpu()
    if allowed.numel() != n:
        raise BudgetError(f"allowed has {allowed.numel()} entries but there are {n} scores.")
    n_allowed = int(allowed.sum())
    k = int(k)
    if not 0 <= k <= n_allowed:
        raise BudgetError(f"cannot keep k={k} units: allowed range is [0, {n_allowed}] "
                          f"({n_allowed} selectable units out of {n}).")
    if min_per_segment < 0:
        raise BudgetError(f"min_per_segment must be >= 0, got {min_per_segment}.")

    order = torch.sort(scores.to(torch.float64).cpu(), descending=True, stable=True).indices
    order = order[allowed[order]]  # allowed units, best first, lower index first among ties
    reserved = torch.zeros(order.numel(), dtype=torch.bool)
    if segments is not None and min_per_segment > 0:
        seg = segments.reshape(-1).to(torch.long).cpu()
        if seg.numel() != n:
            raise BudgetError(f"segments has {seg.numel()} entries but there are {n} scores.")
        seg_o = seg[order]
        perm = torch.sort(seg_o, stable=True).indices  # grouped by segment, best first inside each
        counts = torch.unique_consecutive(seg_o[perm], return_counts=True)[1]
        starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rank = torch.empty_like(perm)
        rank[perm] = torch.arange(perm.numel()) - starts
        reserved = rank < min_per_segment
        required = int(reserved.sum())
        if k < required:
            raise BudgetError(f"k={k} is smaller than the {required} units reserved by min_per_segment="
                              f"{min_per_segment} over {counts.numel()} segments; raise k or lower min_per_segment.")
    fill = (~reserved).nonzero().reshape(-1)[: k - int(reserved.sum())]
    chosen = reserved.clone()
    chosen[fill] = True
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[chosen]] = True
    return keep.reshape(shape)
