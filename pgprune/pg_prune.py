"""Policy-gradient mask search on a real model: groups and budgets from the layout, initial keep-probabilities
from a metric, the masked model's LM loss on calibration batches as the reward, exact top-k final masks."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pgprune.allocation import boundary_init, keep_counts
from pgprune.config import SearchParams
from pgprune.errors import PgpruneError
from pgprune.masked_forward import MaskedModel
from pgprune.masks import Masks, segments
from pgprune.search import GroupSpec, PolicyGradientSearch, SearchResult, SearchSettings
from pgprune.search.init_map import CLIP_EPS, init_probs
from pgprune.search.projection import select_top_k


@dataclass
class PGOutcome:
    masks: Masks
    result: SearchResult
    init_probs: dict[str, torch.Tensor]


def search_settings(p: SearchParams) -> SearchSettings:
    return SearchSettings(steps=p.steps, samples=p.samples, estimator=p.estimator, baseline=p.baseline,
                          ema_window=p.ema_window, lr_schedule=p.lr_schedule, penalty_init=p.penalty_init,
                          penalty_final=p.penalty_final, eps=p.eps, seed=p.seed,
                          checkpoint_every=p.checkpoint_every)


def build_search(masked: MaskedModel, init_scores: dict[str, torch.Tensor], p: SearchParams,
                 sparsity: float | None = None) -> tuple[PolicyGradientSearch, dict[str, torch.Tensor]]:
    layout = masked.layout
    sparsity = p.sparsity if sparsity is None else sparsity
    counts = keep_counts(layout, sparsity, p.layer_sparsity)
    n = layout.n_units
    lrs = {"heads": p.lr_heads, "channels": p.lr_channels, "layers": p.lr_layers}
    groups, probs = {}, {}
    for g in p.granularity:
        if g == "layers" and set(p.granularity) == {"layers"}:
            k = max(1, round(n["layers"] * (1 - sparsity)))
        else:
            k = counts[g]
        seg = segments(layout, g)
        groups[g] = GroupSpec(size=n[g], budget=float(k), lr=lrs[g], segments=seg if g != "layers" else None)
        if g not in init_scores:
            raise PgpruneError(f"search.init scorer provides {sorted(init_scores)}, not {g!r}; "
                               "pick a scorer that scores every searched group (e.g. wanda_sp, magnitude, random)")
        if p.init_map == "const" and g != "layers":
            # exactly the metric baseline's mask (same allocation, same k): the search starts from it
            # (boundary units nearly undecided when search.init_free_<group> > 0)
            free = p.init_free_heads if g == "heads" else p.init_free_channels
            probs[g] = boundary_init(layout, g, init_scores[g], k, p.init_allocation,
                                     p.min_heads_per_layer if g == "heads" else 1, p.init_const, free)
            probs[g] = probs[g].clamp(CLIP_EPS, 1.0 - CLIP_EPS)
            continue
        per_layer = seg if (g != "layers" and p.init_allocation == "uniform") else None
        probs[g] = init_probs(init_scores[g], k / n[g], method=p.init_map, segments=per_layer, const=p.init_const)
    return PolicyGradientSearch(groups, probs, search_settings(p)), probs


def hard_masks(layout, probs: dict[str, torch.Tensor], groups: dict, p: SearchParams, sparsity: float,
               validate: bool = True) -> Masks:
    """Exact top-k by probability: layers first, then heads/channels among kept layers (min heads per layer)."""
    counts = keep_counts(layout, sparsity, p.layer_sparsity)
    flat: dict[str, torch.Tensor] = {}
    layer_keep = torch.ones(layout.num_layers, dtype=torch.bool)
    if "layers" in probs:
        k = int(groups["layers"].budget)
        layer_keep = select_top_k(probs["layers"], k)
        flat["layers"] = layer_keep
    for g, minimum in (("heads", p.min_heads_per_layer), ("channels", 1)):
        if g in probs:
            allowed = layer_keep[segments(layout, g)]
            flat[g] = select_top_k(probs[g], counts[g], segments=segments(layout, g),
                                   min_per_segment=minimum, allowed=allowed)
    masks = Masks.from_flat(layout, flat)
    if validate:
        masks.validate(layout)
    return masks


def final_masks(masked: MaskedModel, result: SearchResult, p: SearchParams, sparsity: float) -> Masks:
    """The hard mask of the best validated probabilities (``search.select: best``) or of the last ones."""
    probs = result.best_probs if (p.select == "best" and result.best_probs is not None) else result.probs
    return hard_masks(masked.layout, probs, result.groups, p, sparsity)


def make_validate_fn(masked: MaskedModel, val: torch.Tensor, groups: dict, p: SearchParams, sparsity: float,
                     device: str = "cpu"):
    """validate_fn(probs): mean LM loss of the probabilities' hard top-k mask on held-back calibration blocks."""

    def validate_fn(probs: dict[str, torch.Tensor]) -> float:
        masks = hard_masks(masked.layout, probs, groups, p, sparsity, validate=False)
        losses = [masked.loss(val[i:i + p.batch_size].to(device), masks, validate=False)
                  for i in range(0, val.shape[0], p.batch_size)]
        return float(sum(losses) / len(losses))

    return validate_fn


def make_loss_fn(masked: MaskedModel, calib: torch.Tensor, batch_size: int, device: str = "cpu"):
    """loss_fn(flat_masks, step, sample): LM loss of the masked model on calibration batch ``step`` (cycled)."""
    n = calib.shape[0]
    n_batches = max(1, n // batch_size)
    layout = masked.layout

    def loss_fn(flat: dict[str, torch.Tensor], step: int, sample: int) -> float:
        b = step % n_batches
        ids = calib[b * batch_size:(b + 1) * batch_size].to(device)
        return masked.loss(ids, Masks.from_flat(layout, flat), validate=False)

    return loss_fn


def run_pg_search(model, calib: torch.Tensor, init_scores: dict[str, torch.Tensor], p: SearchParams, *,
                  sparsity: float | None = None, checkpoint_path: str | Path | None = None, device: str = "cpu",
                  progress: bool = True, on_step=None,
                  compensation: dict[str, list[torch.Tensor]] | None = None) -> PGOutcome:
    """Search masks at ``sparsity``. ``compensation`` (calibration means of o_proj/down_proj inputs, e.g. the
    flap scorer's "bias" entry) makes every evaluated mask mean-compensated, like the final sliced model."""
    sparsity = p.sparsity if sparsity is None else sparsity
    masked = MaskedModel(model)
    masked.set_compensation(compensation)
    search, probs0 = build_search(masked, init_scores, p, sparsity)
    validate_fn = None
    train = calib
    if p.val_blocks:
        if calib.shape[0] <= p.val_blocks:
            raise PgpruneError(f"search.val_blocks={p.val_blocks} leaves no calibration blocks for the search "
                               f"(data.calib_blocks gives {calib.shape[0]}); lower it or use more blocks")
        train, val = calib[:-p.val_blocks], calib[-p.val_blocks:]
        validate_fn = make_validate_fn(masked, val, search.groups, p, sparsity, device)
    result = search.run(make_loss_fn(masked, train, p.batch_size, device), checkpoint_path=checkpoint_path,
                        progress=progress, on_step=on_step, validate_fn=validate_fn,
                        validate_every=p.validate_every)
    return PGOutcome(final_masks(masked, result, p, sparsity), result, probs0)
