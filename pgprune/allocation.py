"""From per-unit scores to keep-masks under an exact budget, with global or uniform (per-layer) allocation.

Budgets (``keep_counts``): with keep ratio r = 1 - sparsity, exactly round(r * N) KV groups and round(r * N)
MLP channels are kept (the paper's convention: heads and channels each keep the fraction r, so the decoder-layer
linear parameters shrink by ``sparsity``); layers keep round((1 - layer_sparsity) * L). Ties never overshoot the
budget and no kept layer loses all its KV groups (the reference code's ``>=`` threshold allowed both).
"""
from __future__ import annotations

import math

import torch

from pgprune.adapters.base import Layout
from pgprune.errors import BudgetError, PgpruneError
from pgprune.masks import Masks, segments
from pgprune.search.projection import select_top_k

ALLOCATIONS = ("global", "uniform")


def keep_count(n: int, keep_ratio: float) -> int:
    return int(math.floor(n * keep_ratio + 0.5))


def keep_counts(layout: Layout, sparsity: float, layer_sparsity: float = 0.0) -> dict[str, int]:
    if not 0 <= sparsity < 1:
        raise BudgetError(f"sparsity={sparsity} is not allowed; allowed: 0 <= sparsity < 1")
    if not 0 <= layer_sparsity < 1:
        raise BudgetError(f"layer_sparsity={layer_sparsity} is not allowed; allowed: 0 <= layer_sparsity < 1")
    r = 1.0 - sparsity
    n = layout.n_units
    return {"heads": keep_count(n["heads"], r), "channels": keep_count(n["channels"], r),
            "layers": max(1, keep_count(n["layers"], 1.0 - layer_sparsity))}


def uniform_quota(sizes: list[int], k: int, minimum: int = 0) -> list[int]:
    """Split k kept units over segments proportionally to their sizes (largest remainder, ties to lower index)."""
    total = sum(sizes)
    if not sum(min(minimum, s) for s in sizes) <= k <= total:
        raise BudgetError(f"cannot keep {k} of {total} units with at least {minimum} in each of {len(sizes)} layers")
    exact = [k * s / total for s in sizes]
    quota = [max(min(minimum, s), min(s, int(math.floor(e)))) for s, e in zip(sizes, exact)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    diff = k - sum(quota)
    while diff != 0:
        moved = False
        for i in order:
            if diff > 0 and quota[i] < sizes[i]:
                quota[i] += 1
                diff -= 1
                moved = True
            elif diff < 0 and quota[i] > min(minimum, sizes[i]):
                quota[i] -= 1
                diff += 1
                moved = True
            if diff == 0:
                break
        if not moved:
            raise BudgetError(f"cannot split {k} units over sizes {sizes}")
    return quota


def _select(layout: Layout, group: str, score: torch.Tensor, k: int, allocation: str, minimum: int,
            allowed: torch.Tensor | None) -> torch.Tensor:
    seg = segments(layout, group)
    if score.numel() != seg.numel():
        raise PgpruneError(f"{group} scores have {score.numel()} entries, the model has {seg.numel()} units")
    if allocation == "global":
        return select_top_k(score, k, segments=seg, min_per_segment=minimum, allowed=allowed)
    sizes = layout.kv_heads if group == "heads" else layout.intermediate
    live = [i for i in range(layout.num_layers) if allowed is None or bool(allowed[seg == i].any())]
    quota = uniform_quota([sizes[i] for i in live], k, minimum)
    keep = torch.zeros(seg.numel(), dtype=torch.bool)
    for i, q in zip(live, quota):
        idx = torch.nonzero(seg == i).flatten()
        keep[idx] = select_top_k(score[idx], q)
    return keep


def select_units(layout: Layout, group: str, score: torch.Tensor, k: int, allocation: str = "global",
                 minimum: int = 0, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Flat keep-mask of exactly ``k`` units of ``group`` by ``score`` (higher = keep), allocated "global"ly
    (top-k over the model, at least ``minimum`` per layer) or "uniform"ly (the same fraction in every layer)."""
    if allocation not in ALLOCATIONS:
        raise PgpruneError(f"allocation={allocation!r} is not allowed; allowed: {ALLOCATIONS}")
    return _select(layout, group, score.float(), k, allocation, minimum, allowed)


def masks_from_scores(layout: Layout, scores: dict[str, torch.Tensor], sparsity: float, *,
                      allocation: str = "global", granularity=("heads", "channels"), layer_sparsity: float = 0.0,
                      min_heads_per_layer: int = 1) -> Masks:
    """Keep the top units by score within the budget. Groups outside ``granularity`` are all kept.

    With 'layers' in granularity, the lowest-scoring layers are dropped first; the head/channel budget (counted
    over the whole model) is then filled from the kept layers, so the total stays at ``sparsity``.
    """
    if allocation not in ALLOCATIONS:
        raise PgpruneError(f"allocation={allocation!r} is not allowed; allowed: {ALLOCATIONS}")
    bad = [g for g in granularity if g not in ("heads", "channels", "layers")]
    if bad:
        raise PgpruneError(f"granularity entries {bad} are not allowed; allowed: heads, channels, layers")
    missing = [g for g in granularity if g not in scores]
    if missing:
        raise PgpruneError(f"no scores for {missing}; this scorer provides {sorted(scores)}")
    counts = keep_counts(layout, sparsity if set(granularity) != {"layers"} else 0.0, layer_sparsity)
    flat: dict[str, torch.Tensor] = {}
    layer_keep = torch.ones(layout.num_layers, dtype=torch.bool)
    if "layers" in granularity:
        k_layers = counts["layers"] if set(granularity) != {"layers"} else max(1, keep_count(layout.num_layers, 1 - sparsity))
        layer_keep = select_top_k(scores["layers"].float(), k_layers)
        flat["layers"] = layer_keep
    for group, minimum in (("heads", min_heads_per_layer), ("channels", 1)):
        if group not in granularity:
            continue
        allowed = layer_keep[segments(layout, group)]
        k = counts[group]
        if k > int(allowed.sum()):
            raise BudgetError(f"keeping {k} {group} does not fit in the {int(layer_keep.sum())} kept layers "
                              f"({int(allowed.sum())} units); lower layer_sparsity or raise sparsity")
        flat[group] = _select(layout, group, scores[group].float(), k, allocation, minimum, allowed)
    masks = Masks.from_flat(layout, flat)
    masks.validate(layout)
    return masks


FREE_INSIDE, FREE_OUTSIDE = 0.55, 0.45


def boundary_init(layout: Layout, group: str, score: torch.Tensor, k: int, allocation: str = "global",
                  minimum: int = 0, const: float = 0.95, free: float = 0.0) -> torch.Tensor:
    """Initial keep-probabilities (float32) centred on the metric's mask of exactly ``k`` units.

    The metric's top ``round((1 - free) k)`` units start at ``const``, its other kept units at 0.55, the next
    ``round(free k)`` units below the cut at 0.45 and the rest at ``1 - const``. The hard top-k of these
    probabilities is exactly the metric's mask (the search starts from the baseline), while the units around the
    cut are nearly undecided and the sampled masks trade them. ``free = 0`` gives ``const`` / ``1 - const``.
    """
    if not 0.0 <= free < 1.0:
        raise PgpruneError(f"free={free} is not allowed; allowed: 0 <= free < 1")
    if not 0.5 < const <= 1.0:
        raise PgpruneError(f"const={const} is not allowed; allowed: 0.5 < const <= 1")
    n = score.numel()
    keep = select_units(layout, group, score, k, allocation, minimum)
    probs = torch.full((n,), 1.0 - const, dtype=torch.float32)
    width = int(round(free * k))
    if width:
        probs[select_units(layout, group, score, min(n, k + width), allocation, minimum)] = FREE_OUTSIDE
        probs[keep] = FREE_INSIDE
        sure = select_units(layout, group, score, max(k - width, minimum * layout.num_layers), allocation, minimum)
        probs[sure & keep] = const
    else:
        probs[keep] = const
    return probs
