"""SlimGPT (Ling et al., NeurIPS 2024): structured Optimal Brain Surgeon, layer by layer, with the refit.

Per decoder layer i, in order, on the calibration tokens of the already pruned and refit layers 0..i-1
(:func:`pgprune.core.refit.select_and_refit`):

1. **Heads (o_proj), batched greedy.** With H = X X^T / N of o_proj's input (damped: + damp * mean diag, dead
   inputs get diagonal 1) and Hinv = H_KK^-1 over the kept columns K, the OBS error of removing a column group S
   with the current weights W is  e(S) = tr(W_S (Hinv_SS)^-1 W_S^T)  (the least-squares output error the update
   below cannot undo). The cheapest KV group (its G query heads' G*head_dim columns) is removed, the other kept
   columns take the OBS update  W_{K\\S} -= W_S (Hinv_SS)^-1 Hinv_{S,K\\S}, Hinv is recomputed on the smaller K,
   and so on until the layer's head quota is met (one group per iteration).
2. **Channels (down_proj), Dynamic Group Size.** The same step over single channels, e_c = sum_rows W[:, c]^2 /
   Hinv_cc, removing the k cheapest channels per iteration with k = min(left, max(DGS_MIN, min(DGS_MAX,
   left // 2))): large groups first, shrinking to DGS_MIN as the quota is reached (the paper: about 1024 down to 8).
3. **Incremental Pruning Ratio.** The layer's pruned fraction rises with depth on a log curve, r_i = r_0 (1 +
   (IPR_RATIO - 1) log(i+1) / log(n)), separately for KV groups and channels, r_0 solved so that the kept counts
   sum to the global budget (the same numbers of KV groups and channels as every metric baseline keeps:
   :func:`pgprune.core.allocation.keep_counts`), each layer keeping at least search.min_heads_per_layer groups and
   one channel. IPR_RATIO = 4 is the paper's README run (r_0 = 0.0625, r_last = 0.25 at 20% on LLaMA-7B).
4. **Update.** The kept weights are then refit by :mod:`pgprune.core.refit` (its least squares, on the same
   sequential inputs), which is the closed form of the OBS updates above (the sequential updates of a removed set
   compose to W_K' = W_K + W_S H_SK H_KK^-1) plus the intercept (the bias refit too) that SlimGPT does not have.

Differences from the paper: a head unit is a KV group (the paper's code is MHA-only: one head = head_dim
columns; GQA models need the group), scored by its exact group OBS error instead of the grouped-Cholesky diagonal
approximation (GCD); the damping is relative to the mean diagonal like pgprune's refit; the final weights have an
intercept. The masks are the method's result; the refit recipe (:mod:`pgprune.core.compensation`) is stored with
them, so evaluation and export recompute the same refit.
"""
from __future__ import annotations

import math

import torch

from pgprune.core.adapters import get_adapter
from pgprune.core.allocation import keep_counts, round_to_total
from pgprune.core.masks import Masks
from pgprune.errors import BudgetError, PgpruneError

IPR_RATIO = 4.0  # last layer's pruned fraction / first layer's (the paper's README run: 0.25 / 0.0625)
DGS_MAX = 1024  # Dynamic Group Size: most channels removed in one OBS iteration
DGS_MIN = 8  # ... and the fewest (until fewer are left)


def ipr_quota(sizes: list[int], keep: int, minimum: int = 0, ratio: float = IPR_RATIO) -> list[int]:
    """Kept units per layer: the Incremental Pruning Ratio's log-increasing pruned fractions, summing to ``keep``.

    Layer i prunes c * w_i of its ``sizes[i]`` units, w_i = 1 + (ratio - 1) log(i+1) / log(n), capped so that it
    keeps at least ``minimum`` (and at most all); c is found by bisection so the pruned total is sum(sizes) - keep,
    then the counts are rounded by largest remainder to sum exactly to ``keep``."""
    n, total = len(sizes), sum(sizes)
    lo_keep = [min(minimum, s) for s in sizes]
    if not sum(lo_keep) <= keep <= total:
        raise BudgetError(f"cannot keep {keep} of {total} units with at least {minimum} in each of {n} layers")
    if not ratio >= 1:
        raise PgpruneError(f"IPR ratio={ratio}; allowed: >= 1")
    w = [1.0 + (ratio - 1.0) * (math.log(i + 1) / math.log(n) if n > 1 else 0.0) for i in range(n)]
    cap = [s - m for s, m in zip(sizes, lo_keep)]  # most units a layer may prune
    want = total - keep

    def pruned(c: float) -> list[float]:
        return [min(cp, c * wi * s) for cp, wi, s in zip(cap, w, sizes)]

    lo, hi = 0.0, 1.0
    while sum(pruned(hi)) < want and hi < 1e6:
        hi *= 2.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(pruned(mid)) < want else (lo, mid)
    exact = [s - p for s, p in zip(sizes, pruned(hi))]  # kept, fractional
    return round_to_total(exact, lo_keep, list(sizes), keep)


def dgs_sizes(n_remove: int, dgs_min: int = DGS_MIN, dgs_max: int = DGS_MAX) -> list[int]:
    """The Dynamic Group Size schedule: how many channels each OBS iteration removes (half of what is left,
    within [dgs_min, dgs_max], never more than is left)."""
    out, left = [], int(n_remove)
    while left > 0:
        k = min(left, max(dgs_min, min(dgs_max, left // 2)))
        out.append(k)
        left -= k
    return out


def damped_hessian(g: torch.Tensor, n: int, damp: float) -> torch.Tensor:
    """H = X X^T / N from the full-input sums g = sum [x; 1][x; 1]^T (the ones row last), float64 [m, m], with
    ``damp`` * mean diagonal added and dead inputs (zero diagonal) given diagonal 1 (SlimGPT's rule)."""
    h = g[:-1, :-1] / max(n, 1)  # [m, m] (a new tensor: g is left alone)
    d = torch.diagonal(h)
    dead = d <= 0
    d[dead] = 1.0
    mean = float(d.mean())
    d += damp * (mean if mean > 0 else 1.0)
    return h


def _inverse(h: torch.Tensor) -> torch.Tensor:
    """H^-1 of a damped (positive definite) Hessian, by Cholesky; raises the damping tenfold until it factors."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    extra = 0.0
    scale = float(torch.diagonal(h).mean()) or 1.0
    for _ in range(25):
        chol, info = torch.linalg.cholesky_ex(h + extra * eye)
        if int(info) == 0:
            return torch.cholesky_inverse(chol)
        extra = max(extra * 10.0, 1e-8 * scale)
    raise PgpruneError("SlimGPT: the Hessian of the calibration inputs stayed singular; check the calibration data")


def obs_prune(w: torch.Tensor, h: torch.Tensor, groups: list[torch.Tensor], steps: list[int]
              ) -> tuple[list[int], torch.Tensor]:
    """Greedy structured OBS: remove ``sum(steps)`` of the column ``groups`` of ``w`` [out, m] (``steps[t]`` groups
    in iteration t, the cheapest by their own OBS error e(g) = tr(W_g (Hinv_gg)^-1 W_g^T) under the current
    weights), updating the other kept columns after each iteration. ``h``: the damped Hessian [m, m] (float64).
    Returns (removed group indices in the order removed, the updated weights float64 [out, m] with removed columns
    zero)."""
    w = w.detach().to(torch.float64).clone()
    alive = list(range(len(groups)))
    removed: list[int] = []
    for k in steps:
        if k > len(alive):
            raise BudgetError(f"cannot remove {k} more of {len(alive)} column groups")
        cols = torch.cat([groups[a] for a in alive])  # kept columns, group by group
        pos, at = {}, 0
        for a in alive:
            pos[a] = torch.arange(at, at + groups[a].numel())
            at += groups[a].numel()
        hinv = _inverse(h[cols][:, cols])  # [|K|, |K|]
        wk = w[:, cols]  # [out, |K|]
        if all(groups[a].numel() == 1 for a in alive):  # single columns: e_c = sum_rows W[:, c]^2 / Hinv_cc
            errs = ((wk ** 2).sum(0) / torch.diagonal(hinv)).tolist()
        else:
            errs = []
            for a in alive:
                p = pos[a]
                blk = hinv[p][:, p]  # [|g|, |g|]
                wg = wk[:, p]  # [out, |g|]
                errs.append(float((wg * torch.linalg.solve(blk, wg.t()).t()).sum()))
        order = sorted(range(len(alive)), key=lambda j: (errs[j], alive[j]))[:k]
        gone = set(alive[j] for j in order)
        s = torch.cat([pos[a] for a in sorted(gone)])  # positions of the removed columns within K
        keep_pos = torch.cat([pos[a] for a in alive if a not in gone]) if len(gone) < len(alive) else None
        if keep_pos is not None:
            upd = torch.linalg.solve(hinv[s][:, s], hinv[s][:, keep_pos])  # [|S|, |K\S|]
            w[:, cols[keep_pos]] = wk[:, keep_pos] - wk[:, s] @ upd
        w[:, cols[s]] = 0.0
        removed += [alive[j] for j in sorted(order, key=lambda j: (errs[j], alive[j]))]
        alive = [a for a in alive if a not in gone]
    return removed, w


class SlimGPTSelector:
    """The ``select`` callback of :func:`pgprune.core.refit.select_and_refit`: KV groups by batched greedy OBS,
    channels by OBS with the Dynamic Group Size, to the per-layer quotas of the Incremental Pruning Ratio."""

    def __init__(self, layout, sparsity: float, *, min_heads_per_layer: int = 1, damp: float = 0.01,
                 ratio: float = IPR_RATIO):
        counts = keep_counts(layout, sparsity)
        self.layout = layout
        self.damp = float(damp)
        self.heads = ipr_quota(list(layout.kv_heads), counts["heads"], min_heads_per_layer, ratio)
        self.channels = ipr_quota(list(layout.intermediate), counts["channels"], 1, ratio)

    def __call__(self, i: int, name: str, lin, g: torch.Tensor, n: int) -> torch.Tensor:
        h = damped_hessian(g, n, self.damp)
        if name == "o_proj":
            kv, width = self.layout.kv_heads[i], self.layout.group_size * self.layout.head_dim
            groups = [torch.arange(j * width, (j + 1) * width) for j in range(kv)]
            steps = [1] * (kv - self.heads[i])
        else:
            inter = self.layout.intermediate[i]
            groups = [torch.tensor([j]) for j in range(inter)]
            steps = dgs_sizes(inter - self.channels[i])
        keep = torch.ones(len(groups), dtype=torch.bool)
        if steps:
            gone, _ = obs_prune(lin.weight.detach().to(h.device), h, groups, steps)
            keep[gone] = False
        return keep


def slimgpt(model, calib: torch.Tensor, sparsity: float, *, min_heads_per_layer: int = 1, damp: float = 0.01,
            batch_size: int = 8, progress: bool = True, sums: dict | None = None) -> tuple[Masks, dict]:
    """(masks, refit weights) of SlimGPT on ``model`` at ``sparsity`` (the fraction of KV groups and of MLP channels
    removed, like every metric baseline), chosen on the calibration blocks ``calib`` [n, T] (see the module
    docstring). The refit is :func:`pgprune.core.refit.refit_weights` of the masks (the same sequential inputs and
    solves), so whoever slices them need not refit again. With a ``sums`` dict, the full-input sums every choice
    saw are left in it ({(layer, module): (g, n)}, the sequential stream of SlimGPT's pruned, refit model):
    :meth:`pgprune.core.refit.GramRefit.from_sums` builds the search's refit loss on them without a second pass."""
    from pgprune.core.refit import recording, select_and_refit

    if calib is None:
        raise PgpruneError("slimgpt chooses its masks on calibration blocks; none were given")
    layout = get_adapter(model).layout()
    select = SlimGPTSelector(layout, sparsity, min_heads_per_layer=min_heads_per_layer, damp=damp)
    masks, refit = select_and_refit(model, calib, recording(select, sums) if sums is not None else select,
                                    damp=damp, batch_size=batch_size, progress=progress)
    masks.validate(layout)
    return masks, refit


def slimgpt_masks(model, calib: torch.Tensor, sparsity: float, **kwargs) -> Masks:
    """SlimGPT's masks (:func:`slimgpt` without its refit weights)."""
    return slimgpt(model, calib, sparsity, **kwargs)[0]


__all__ = ["IPR_RATIO", "DGS_MAX", "DGS_MIN", "ipr_quota", "dgs_sizes", "damped_hessian", "obs_prune",
           "SlimGPTSelector", "slimgpt", "slimgpt_masks"]
