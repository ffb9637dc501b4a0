"""From per-unit scores to keep-masks under a budget: the one place where budgets are counted and rounded.

Budgets (:func:`keep_counts`, one rounding rule, ``keep_count(n, r) = floor(n r + 1/2)``): with keep ratio
r = 1 - sparsity, exactly keep_count(N, r) KV groups and keep_count(N, r) MLP channel units are kept (the paper's
convention: heads and channels each keep the fraction r, so the decoder-layer linear parameters shrink by
``sparsity``); with whole layers searched next to them, keep_count(L, 1 - layer_sparsity) layers; layers alone
(``layer_drop``): keep_count(L, 1 - sparsity) layers, at least one.

Allocation of a budget over layers:
* ``global``: the top-k units of the whole model (heterogeneous widths; at least ``minimum`` per layer);
* ``uniform``: every layer keeps the same fraction, the exact total split by largest remainder
  (:func:`uniform_quota`; FLAP's UL-UM, Wanda-sp, LLM-Pruner);
* the ``uniform`` *layout* (:func:`uniform_widths`): every kept layer keeps exactly the same number of KV groups
  and of channels, so the pruned model is a stock architecture. KV groups are rounded per layer (keep_count(kv, r))
  and the MLP channels take the remainder, so the decoder-layer linear sparsity is within half a channel group of
  the target (unlike the other allocations, heads and channels then keep different fractions).

Channel blocks (:class:`UnitBlocks`): with ``channel_group`` g > 1 each layer's channels are ranked by a metric
and cut into blocks of g consecutive ranks; a block is kept or removed as a whole, so kept widths are multiples
of g (GPU-friendly) and a search has g times fewer channel units to learn.

Ties never overshoot a budget and no kept layer loses all its KV groups or channels (the reference code's ``>=``
threshold allowed both).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pgprune.core.adapters.base import Layout
from pgprune.core.masks import Masks, segments
from pgprune.errors import BudgetError, PgpruneError
from pgprune.search.projection import select_top_k

ALLOCATIONS = ("global", "uniform")
LAYOUT_KINDS = ("heterogeneous", "uniform")
UNIT_GROUPS = ("heads", "channels", "layers")


def keep_count(n: int, keep_ratio: float) -> int:
    """The one rounding rule of budgets: floor(n * keep_ratio + 1/2)."""
    return int(math.floor(n * keep_ratio + 0.5))


def _check_fraction(name: str, value: float, upper_open: bool = True) -> None:
    if not (0 <= value < 1 if upper_open else 0 <= value <= 1):
        raise BudgetError(f"{name}={value} is not allowed; allowed: 0 <= {name} < 1")


def keep_counts(layout: Layout, sparsity: float, layer_sparsity: float = 0.0,
                granularity=("heads", "channels"), blocks: "dict[str, UnitBlocks] | None" = None) -> dict[str, int]:
    """Units kept per group: {"heads", "channels", "layers"}, counted in blocks for the groups in ``blocks``."""
    _check_fraction("sparsity", sparsity)
    _check_fraction("layer_sparsity", layer_sparsity)
    bad = [g for g in granularity if g not in UNIT_GROUPS]
    if bad or not granularity:
        raise PgpruneError(f"granularity {list(granularity)} is not allowed; allowed entries: {', '.join(UNIT_GROUPS)}")
    n = dict(layout.n_units)
    for g, b in (blocks or {}).items():
        n[g] = b.n_blocks
    if set(granularity) == {"layers"}:
        return {"heads": n["heads"], "channels": n["channels"],
                "layers": max(1, keep_count(n["layers"], 1.0 - sparsity))}
    r = 1.0 - sparsity
    return {"heads": keep_count(n["heads"], r), "channels": keep_count(n["channels"], r),
            "layers": max(1, keep_count(n["layers"], 1.0 - layer_sparsity))}


def round_to_total(exact: list[float], lo: list[int], hi: list[int], k: int) -> list[int]:
    """Integer counts q_i in [lo_i, hi_i] summing to ``k``, nearest to the fractional ``exact`` counts: floors
    (clipped), then units added or taken by largest remainder (ties to the lower index). BudgetError when the
    bounds cannot sum to k."""
    quota = [min(h, max(lo_i, int(math.floor(e)))) for lo_i, h, e in zip(lo, hi, exact)]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    diff = k - sum(quota)
    while diff != 0:
        moved = False
        for i in order:
            if diff > 0 and quota[i] < hi[i]:
                quota[i], diff, moved = quota[i] + 1, diff - 1, True
            elif diff < 0 and quota[i] > lo[i]:
                quota[i], diff, moved = quota[i] - 1, diff + 1, True
            if diff == 0:
                break
        if not moved:
            raise BudgetError(f"cannot split {k} units over sizes {list(hi)}")
    return quota


def uniform_quota(sizes: list[int], k: int, minimum: int = 0) -> list[int]:
    """Split k kept units over segments proportionally to their sizes (largest remainder, ties to lower index)."""
    total = sum(sizes)
    lo = [min(minimum, s) for s in sizes]
    if not sum(lo) <= k <= total:
        raise BudgetError(f"cannot keep {k} of {total} units with at least {minimum} in each of {len(sizes)} layers")
    return round_to_total([k * s / total for s in sizes], lo, list(sizes), k)


def uniform_widths(layout: Layout, sparsity: float, *, round_to: int = 1, min_heads: int = 1) -> dict[str, int]:
    """The uniform layout: KV groups and channels every layer keeps, {"heads": q_h, "channels": q_c}.

    q_h = keep_count(kv, r) clipped to [min_heads, kv]. Whole KV groups are coarse (SmolLM2-135M has 3 per layer:
    at 50% it keeps 2, i.e. 67% of the attention), so the MLP channels take the remainder: q_c is the multiple of
    ``round_to`` nearest to the channel count that brings the layer's decoder linear parameters
    (:meth:`Layout.layer_params`) to r times the dense layer's, clipped to [round_to, inter]. The achieved sparsity
    (:func:`uniform_sparsity`) is then within half a channel group of ``sparsity`` unless the clip binds (very high
    or very low sparsity with few KV groups), which the prune summary reports (:mod:`pgprune.api`). Needs the same
    widths in every layer (a stock model) and ``round_to`` dividing the intermediate size.
    """
    _check_fraction("sparsity", sparsity)
    if len(set(layout.kv_heads)) != 1 or len(set(layout.intermediate)) != 1:
        raise BudgetError(f"the uniform layout needs the same widths in every layer; this model has KV groups "
                          f"{sorted(set(layout.kv_heads))} and channels {sorted(set(layout.intermediate))} per layer")
    kv, inter = layout.kv_heads[0], layout.intermediate[0]
    check_channel_group(layout, round_to)
    r = 1.0 - sparsity
    heads = min(kv, max(min_heads, keep_count(kv, r)))
    target = r * layout.layer_params(kv, inter)  # this layer's kept decoder linear parameters at exactly r
    room = target - heads * layout.head_unit_params() - layout.layer_fixed_params()  # left for the channels
    groups = int(math.floor(room / (layout.channel_unit_params() * round_to) + 0.5))  # nearest whole group
    channels = round_to * min(inter // round_to, max(1, groups))
    return {"heads": heads, "channels": channels}


def uniform_sparsity(layout: Layout, widths: dict[str, int]) -> float:
    """The decoder-layer linear sparsity of keeping ``widths`` (:func:`uniform_widths`) in every layer (the
    summary's ``prunable_sparsity``, without compensation biases)."""
    kv, inter = layout.kv_heads[0], layout.intermediate[0]
    return 1.0 - layout.layer_params(widths["heads"], widths["channels"]) / layout.layer_params(kv, inter)


def check_channel_group(layout: Layout, group: int) -> None:
    if group < 1:
        raise BudgetError(f"channel_group={group} is not allowed; allowed: an integer >= 1")
    bad = sorted({n for n in layout.intermediate if n % group})
    if bad:
        divisors = [d for d in (8, 16, 32, 64, 128, 256) if all(n % d == 0 for n in layout.intermediate)]
        raise BudgetError(f"channel_group={group} does not divide the MLP widths {bad}; allowed: divisors of "
                          f"every layer's width, e.g. {divisors or [1]}")


@dataclass(frozen=True)
class UnitBlocks:
    """Units of one group (KV groups or MLP channels) regrouped per layer: each layer's units ranked by a metric and
    cut into blocks of ``size`` consecutive ranks, block ids running in rank order within a layer.

    ``unit_block[u]``: block id of flat unit u; ``block_layer[b]``: layer of block b. Size 1 without a ranking is the
    identity (block b = unit b); size 1 with a ranking is the rank-order permutation (the ``widths`` search policy,
    whose units must be in rank order within each layer)."""

    size: int
    unit_block: torch.Tensor  # [N_units] long
    block_layer: torch.Tensor  # [N_blocks] long

    @classmethod
    def identity(cls, sizes: list[int] | tuple[int, ...]) -> "UnitBlocks":
        seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes), dtype=torch.long))
        return cls(1, torch.arange(seg.numel()), seg)

    @classmethod
    def ranked(cls, sizes: list[int] | tuple[int, ...], ranking: torch.Tensor, size: int = 1) -> "UnitBlocks":
        n = sum(sizes)
        if ranking is None or ranking.numel() != n:
            raise PgpruneError(f"ranked blocks of {size} need a ranking score per unit ({n}), got "
                               f"{None if ranking is None else ranking.numel()}")
        ranking = ranking.detach().float().cpu().reshape(-1)
        block = torch.empty(n, dtype=torch.long)
        layers, offset, start = [], 0, 0
        for i, width in enumerate(sizes):
            order = torch.sort(ranking[start:start + width], descending=True, stable=True).indices
            ids = torch.empty(width, dtype=torch.long)
            ids[order] = offset + torch.arange(width) // size  # rank r -> block offset + r // size
            block[start:start + width] = ids
            layers += [i] * (width // size)
            offset += width // size
            start += width
        return cls(size, block, torch.tensor(layers, dtype=torch.long))

    @classmethod
    def build(cls, layout: Layout, ranking: torch.Tensor | None, size: int = 1, group: str = "channels",
              ranked: bool = False) -> "UnitBlocks":
        """Blocks of ``group`` ("channels": ``size`` must divide every layer's width; "heads": size 1)."""
        sizes = layout.intermediate if group == "channels" else layout.kv_heads
        if group == "channels":
            check_channel_group(layout, size)
        elif size != 1:
            raise BudgetError(f"KV groups are searched one by one; got a block size of {size}")
        if size == 1 and not ranked:
            return cls.identity(sizes)
        return cls.ranked(sizes, ranking, size)

    @property
    def n_blocks(self) -> int:
        return self.block_layer.numel()

    def expand(self, values: torch.Tensor) -> torch.Tensor:
        """[N_blocks] -> [N_units]: each unit takes its block's value."""
        if values.numel() != self.n_blocks:
            raise PgpruneError(f"{values.numel()} block values for {self.n_blocks} blocks")
        return values.reshape(-1)[self.unit_block.to(values.device)]

    def reduce(self, unit_scores: torch.Tensor) -> torch.Tensor:
        """[N_units] -> [N_blocks]: the mean score of each block's units."""
        x = unit_scores.detach().float().cpu().reshape(-1)
        out = torch.zeros(self.n_blocks).index_add_(0, self.unit_block, x)
        return out / self.size


def _group_segments(layout: Layout, group: str, blocks: dict | None) -> torch.Tensor:
    b = (blocks or {}).get(group)
    return b.block_layer if b is not None else segments(layout, group)


def select_units(score: torch.Tensor, seg: torch.Tensor, *, k: int | None = None, quota: list[int] | None = None,
                 allocation: str = "global", minimum: int = 0, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """The one selection of units: a flat keep-mask by ``score`` (higher = keep), ties to the lower index.

    ``quota`` (one count per segment): exactly that many per segment (the uniform layout). Otherwise exactly ``k``:
    ``global``ly (top-k of all, at least ``minimum`` per segment) or ``uniform``ly (the same fraction of every
    segment that has allowed units, largest remainder). Units with ``allowed`` False are never kept.
    """
    if allocation not in ALLOCATIONS:
        raise PgpruneError(f"allocation={allocation!r} is not allowed; allowed: {', '.join(ALLOCATIONS)}")
    score = score.detach().float().cpu().reshape(-1)
    seg = seg.reshape(-1).to(torch.long).cpu()
    if score.numel() != seg.numel():
        raise PgpruneError(f"{score.numel()} scores for {seg.numel()} units")
    n_seg = int(seg.max()) + 1 if seg.numel() else 0
    if quota is None and allocation == "global":
        return select_top_k(score, int(k), segments=seg, min_per_segment=minimum, allowed=allowed)
    live = [j for j in range(n_seg) if allowed is None or bool(allowed[seg == j].any())]
    if quota is None:
        sizes = [int((seg == j).sum()) for j in live]
        quota = uniform_quota(sizes, int(k), minimum)
        quota_of = dict(zip(live, quota))
    else:
        if len(quota) != n_seg:
            raise BudgetError(f"{len(quota)} quotas for {n_seg} layers")
        quota_of = {j: quota[j] for j in live}
    keep = torch.zeros(seg.numel(), dtype=torch.bool)
    for j, q in quota_of.items():
        idx = torch.nonzero(seg == j).flatten()
        if q > idx.numel():
            raise BudgetError(f"layer {j}: cannot keep {q} of {idx.numel()} units")
        keep[idx] = select_top_k(score[idx], q)
    return keep


def masks_from_scores(layout: Layout, scores: dict[str, torch.Tensor], sparsity: float, *,
                      allocation: str = "global", granularity=("heads", "channels"), layer_sparsity: float = 0.0,
                      min_heads_per_layer: int = 1, layout_kind: str = "heterogeneous",
                      blocks: dict[str, UnitBlocks] | None = None, round_to: int = 1) -> Masks:
    """Keep the top units by score within the budget (:func:`keep_counts`). Groups outside ``granularity`` are all
    kept. Used by the metric baselines and by the search's final (hard) masks alike.

    With 'layers' in granularity the lowest-scoring layers are dropped first; the head/channel budget (counted over
    the whole model) is then filled from the kept layers, so the total stays at ``sparsity``. ``scores["channels"]``
    has one entry per channel or, with ``blocks["channels"]``, one per block (likewise heads; selection then runs
    over blocks, ties broken by the blocks' rank order). ``layout_kind="uniform"`` keeps the same number of
    KV groups and channels in every kept layer (:func:`uniform_widths`, channels a multiple of ``round_to`` or of the
    block size).
    """
    if layout_kind not in LAYOUT_KINDS:
        raise PgpruneError(f"layout={layout_kind!r} is not allowed; allowed: {', '.join(LAYOUT_KINDS)}")
    missing = [g for g in granularity if g not in scores]
    if missing:
        raise PgpruneError(f"no scores for {missing}; this scorer provides {sorted(scores)}")
    counts = keep_counts(layout, sparsity, layer_sparsity, granularity, blocks)
    flat: dict[str, torch.Tensor] = {}
    layer_keep = torch.ones(layout.num_layers, dtype=torch.bool)
    if "layers" in granularity:
        layer_keep = select_top_k(scores["layers"].float(), counts["layers"])
        flat["layers"] = layer_keep
    if layout_kind == "uniform" and {"heads", "channels"} & set(granularity):
        if "layers" in granularity:
            raise BudgetError("the uniform layout prunes heads and channels; it cannot also drop layers "
                              "(use the heterogeneous layout, or layer_drop alone)")
        cb = (blocks or {}).get("channels")
        widths = uniform_widths(layout, sparsity, round_to=cb.size if cb is not None else round_to,
                                min_heads=min_heads_per_layer)
    for group, minimum in (("heads", min_heads_per_layer), ("channels", 1)):
        if group not in granularity:
            continue
        gb = (blocks or {}).get(group)
        seg = _group_segments(layout, group, blocks)
        score = scores[group].float().reshape(-1)
        if gb is not None and score.numel() == layout.n_units[group] and score.numel() != gb.n_blocks:
            score = gb.reduce(score)
        if score.numel() != seg.numel():
            raise PgpruneError(f"{group} scores have {score.numel()} entries, the model has {seg.numel()} units")
        allowed = layer_keep[seg]
        if layout_kind == "uniform":
            per = widths[group] // (gb.size if gb is not None else 1)
            keep = select_units(score, seg, quota=[per] * layout.num_layers, allowed=allowed)
        else:
            k = counts[group]
            if k > int(allowed.sum()):
                raise BudgetError(f"keeping {k} {group} does not fit in the {int(layer_keep.sum())} kept layers "
                                  f"({int(allowed.sum())} units); lower layer_sparsity or raise sparsity")
            keep = select_units(score, seg, k=k, allocation=allocation, minimum=minimum, allowed=allowed)
        if gb is not None:
            keep = gb.expand(keep)
        flat[group] = keep
    masks = Masks.from_flat(layout, flat)
    masks.validate(layout)
    return masks


def boundary_init(score: torch.Tensor, seg: torch.Tensor, *, k: int | None = None, quota: list[int] | None = None,
                  allocation: str = "global", minimum: int = 0, const: float = 0.95,
                  free: float = 0.0, margin: float = 0.05) -> torch.Tensor:
    """Initial keep-probabilities (float32) centred on the metric's mask of exactly ``k`` units (or ``quota``
    per segment).

    The metric's top ``(1 - free)`` share of the kept units start at ``const``, its other kept units at
    1/2 + ``margin``, the next ``free`` share of units below the cut at 1/2 - ``margin`` and the rest at
    ``1 - const`` (per segment with quotas). The hard top-k of these probabilities is exactly the metric's mask (the
    search starts from the baseline), while the units around the cut are undecided and the sampled masks trade them:
    a small margin samples them nearly at random, a larger one keeps samples close to the metric's mask and makes
    single swaps. ``free = 0`` gives ``const`` / ``1 - const``. (The reference code maps the metric to
    probabilities with a sigmoid instead: ``init_map``.)
    """
    if not 0.0 <= free < 1.0:
        raise PgpruneError(f"free={free} is not allowed; allowed: 0 <= free < 1")
    if not 0.0 < margin < 0.5 or 0.5 + margin > const:
        raise PgpruneError(f"margin={margin} is not allowed; allowed: 0 < margin < 0.5 and 1/2 + margin <= const "
                           f"({const})")
    if not 0.5 < const <= 1.0:
        raise PgpruneError(f"const={const} is not allowed; allowed: 0.5 < const <= 1")
    n = score.numel()
    n_seg = int(seg.max()) + 1

    def pick(count_or_quota):
        if quota is not None:
            return select_units(score, seg, quota=count_or_quota)
        return select_units(score, seg, k=count_or_quota, allocation=allocation, minimum=minimum)

    def shifted(delta_frac: float, sign: int):
        if quota is not None:
            sizes = [int((seg == j).sum()) for j in range(n_seg)]
            return [min(sizes[j], max(0, q + sign * int(round(delta_frac * q)))) for j, q in enumerate(quota)]
        width = int(round(delta_frac * k))
        return min(n, k + width) if sign > 0 else max(k - width, minimum * n_seg)

    base = quota if quota is not None else k
    keep = pick(base)
    probs = torch.full((n,), 1.0 - const, dtype=torch.float32)
    if free > 0:
        probs[pick(shifted(free, +1))] = 0.5 - margin
        probs[keep] = 0.5 + margin
        probs[pick(shifted(free, -1)) & keep] = const
    else:
        probs[keep] = const
    return probs


def ramp_init(score: torch.Tensor, seg: torch.Tensor, *, k: int | None = None, quota: list[int] | None = None,
              allocation: str = "global", minimum: int = 0, free: float = 0.0) -> torch.Tensor:
    """Initial keep-probabilities (float32) of the ``widths`` policy: units in rank order within each segment.

    The metric's mask keeps the first k_l units of segment l (exactly ``k`` in all, or ``quota``). With a = round(free
    * k_l) (at least 1 when free > 0), the first k_l - a units start at 1, the next 2a units on a ramp
    1 - (i + 1/2) / (2a), i = 0..2a-1, and the rest at 0: the sampled width of segment l is then uniform on
    [k_l - a, k_l + a), its expectation is k_l, and the hard top-k at step 0 is the metric's mask. (Unlike
    independent units, a width policy must start its sure units at exactly 1: any u above s_1 would drop the whole
    segment.)"""
    if not 0.0 <= free < 1.0:
        raise PgpruneError(f"free={free} is not allowed; allowed: 0 <= free < 1")
    seg = seg.reshape(-1).to(torch.long).cpu()
    keep = select_units(score, seg, k=k, quota=quota, allocation=allocation, minimum=minimum)
    probs = torch.zeros(seg.numel(), dtype=torch.float32)
    for j in range(int(seg.max()) + 1):
        idx = (seg == j).nonzero().reshape(-1)
        if not idx.numel():
            continue
        # the metric keeps the first k_l units of the segment (rank order = index order for a widths policy)
        order = torch.sort(score.detach().float().cpu().reshape(-1)[idx], descending=True, stable=True).indices
        idx = idx[order]
        k_l = int(keep[idx].sum())
        a = max(1, int(round(free * k_l))) if free > 0 else 0
        a = min(a, k_l, idx.numel() - k_l) if free > 0 else 0
        probs[idx[:k_l - a]] = 1.0
        if a:
            ramp = 1.0 - (torch.arange(2 * a, dtype=torch.float32) + 0.5) / (2 * a)
            probs[idx[k_l - a:k_l + a]] = ramp
    return probs
