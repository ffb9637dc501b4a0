"""Run a pruning method at one sparsity: the scores it needs, its masks (a metric baseline's allocation or one
policy-gradient search per seed) and the compensation of the pruned model (the mean-compensation biases and the
recipe, :mod:`pgprune.core.compensation`: none, bias or refit).

The stages, ``pgprune prune`` and :func:`pgprune.prune` all call :func:`method_masks`; its result
(:class:`~pgprune.core.handoff.MethodResult`) is what :func:`~pgprune.core.handoff.save_masks` writes.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pgprune.core.allocation import masks_from_scores
from pgprune.core.compensation import Recipe
from pgprune.core.handoff import MethodResult
from pgprune.core.masks import Masks
from pgprune.errors import PgpruneError
from pgprune.methods import check_compensation, get_method

if TYPE_CHECKING:
    from pgprune.config import Params

log = logging.getLogger("pgprune")


CHECKPOINT_DIR_ENV = "PGPRUNE_CHECKPOINT_DIR"


DEFAULT_CHECKPOINT_DIR = "artifacts/checkpoints"


def setup_torch(params: Params) -> None:
    """torch's CPU threads from model.threads (0: torch's default). The stages do the same in stages/_common.py,
    which must not import this package for it (every stage would then depend on the pruning code)."""
    if params.model.threads:
        torch.set_num_threads(params.model.threads)


def checkpoint_dir(default: str | Path = DEFAULT_CHECKPOINT_DIR) -> Path:
    """Where search checkpoints live: $PGPRUNE_CHECKPOINT_DIR, else ``default`` (never a DVC output)."""
    return Path(os.environ.get(CHECKPOINT_DIR_ENV) or default)


def compensation_of(method: str, params: Params, override: str | None = None) -> str:
    """The compensation a method's masks get: ``override`` (`pgprune prune --compensation`), else a metric
    baseline's own (pgprune/methods.py), else search.compensation. A metric's ``bias`` needs
    init.flap_bias_compensation (off: none, as before)."""
    if override is not None:
        return check_compensation(override)
    m = get_method(method)
    if m.kind == "search":
        return params.search.compensation
    if m.compensation == "bias" and not params.init.flap_bias_compensation:
        return "none"
    return m.compensation or "none"


def recipe_of(kind: str, params: Params) -> Recipe:
    """The recipe of compensation ``kind`` with the params' refit settings (section refit)."""
    r = params.refit
    return Recipe(kind, damp=r.damp, blocks=r.blocks, batch_size=r.batch_size)


def scorers_needed(method: str, params: Params, compensation: str | None = None) -> list[str]:
    """The scorers a method needs: its own metric, or the search's init metric (+ flap for the calibration means
    of bias compensation, and of a search compensated by bias or refit: its sampled masks are mean-compensated)."""
    m = get_method(method)
    need = ([m.scorer] if m.scorer else []) if m.kind == "metric" else [params.search.init]
    kind = compensation_of(method, params, compensation)
    if kind == "bias" or (m.kind == "search" and kind != "none"):
        need.append("flap")
    return list(dict.fromkeys(need))


def compensation_biases(model, masks: Masks, flap_scores: dict) -> dict[int, dict[str, torch.Tensor]]:
    """FLAP bias compensation for ``masks``: {layer: {"o_proj"|"down_proj": bias to add}}."""
    from pgprune.scorers.flap import as_extra_bias, flap_compensation_biases

    if "bias" not in flap_scores:
        raise PgpruneError("FLAP scores were computed without bias compensation; set init.flap_bias_compensation")
    return as_extra_bias(flap_compensation_biases(model, masks, flap_scores))


def search_compensation(kind: str, all_scores: dict) -> dict | None:
    """The calibration means the search compensates its sampled masks with (None for compensation none)."""
    if kind == "none":
        return None
    flap = all_scores.get("flap", {})
    if "bias" not in flap:
        raise PgpruneError(f"compensation {kind!r} of a search needs the flap scorer's calibration means (init scores "
                           "computed with init.flap_bias_compensation: true); rerun the init stage")
    return flap["bias"]


def metric_masks(method: str, layout, scores: dict, sparsity: float, params: Params,
                 layout_kind: str = "heterogeneous", round_to: int = 1) -> Masks:
    """Masks of a metric baseline at ``sparsity``, by the registry's scorer/allocation/granularity."""
    m = get_method(method)
    if m.kind != "metric" or m.selector:
        raise PgpruneError(f"{method!r} is not a scored metric baseline (a search, or a method that selects its own "
                           "units: method_masks runs it)")
    if m.scorer not in scores:
        raise PgpruneError(f"method {method!r} needs the scorer {m.scorer!r}; scores exist for {sorted(scores)}")
    return masks_from_scores(layout, scores[m.scorer], sparsity, allocation=m.allocation, granularity=m.granularity,
                             min_heads_per_layer=params.search.min_heads_per_layer,
                             layout_kind=layout_kind if m.granularity != ("layers",) else "heterogeneous",
                             round_to=round_to)


def masks_as_scores(masks: Masks, metric: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scores whose top units, group by group, are exactly ``masks``' kept ones: 1 + r for a kept unit, r for a
    removed one, with r in [0, 1/2) the unit's rank under ``metric`` (so the metric still orders the units within
    the kept and within the removed ones: the widths policy's prefixes, the boundary's undecided units)."""
    flat = masks.flat()
    out = {}
    for g in ("heads", "channels"):
        s = metric[g].float().reshape(-1)
        rank = torch.empty_like(s)
        rank[torch.argsort(s, stable=True)] = torch.arange(s.numel(), dtype=s.dtype)
        out[g] = flat[g].float() + 0.5 * rank / max(1, s.numel())
    if "layers" in metric:
        out["layers"] = metric["layers"]
    return out


def search_init(model, calib: torch.Tensor, scores: dict, p, sparsity: float, layout_kind: str, recipe: Recipe,
                progress: bool = True, sums: dict | None = None):
    """(init scores, search settings, start masks) a search starts from: search.init's metric scores (start None),
    or with ``init_allocation: slimgpt`` (heterogeneous layout) SlimGPT's masks at ``sparsity`` (the start) as
    scores (:func:`masks_as_scores`, the metric ordering the units within) allocated globally, so the search's
    step-0 mask is SlimGPT's (channel blocks of search.channel_group rounded). The uniform layout starts from the
    metric. A ``sums`` dict receives the Gram sums of SlimGPT's sequential stream (for
    :func:`search_refit`; untouched when the start is not SlimGPT's)."""
    if p.init not in scores:
        raise PgpruneError(f"search.init={p.init!r} scores are missing; computed scorers: {sorted(scores)}")
    if p.init_allocation != "slimgpt":
        return scores[p.init], p, None
    p = p.model_copy(update={"init_allocation": "global" if layout_kind == "heterogeneous" else "uniform"})
    if layout_kind != "heterogeneous":
        log.info("search.init_allocation slimgpt applies to the heterogeneous layout; the uniform layout starts "
                 "from %s's mask", p.init)
        return scores[p.init], p, None
    from pgprune.pruning.slimgpt import slimgpt_masks

    sg = slimgpt_masks(model, calib[:recipe.blocks], sparsity, min_heads_per_layer=p.min_heads_per_layer,
                       damp=recipe.damp, batch_size=recipe.batch_size, progress=progress, sums=sums)
    return masks_as_scores(sg, scores[p.init]), p, sg


def search_refit(model, calib: torch.Tensor, p, recipe: Recipe, start: Masks | None, sums: dict | None = None,
                 progress: bool = True):
    """The search's refit loss (:class:`pgprune.core.refit.GramRefit`), or None when the search does not use one
    (compensation not refit, or search.refit_loss false): on the start's sequential stream with
    search.refit_reference and a start (from ``sums`` when :func:`search_init` left them: no second pass), else on
    the dense model's."""
    if recipe.kind != "refit" or not p.refit_loss:
        return None
    from pgprune.core.refit import GramRefit

    reference = start if p.refit_reference else None
    if reference is not None and sums:
        return GramRefit.from_sums(model, sums, damp=recipe.damp)
    return GramRefit(model, calib[:recipe.blocks], damp=recipe.damp, batch_size=recipe.batch_size,
                     progress=progress, reference=reference)


def method_masks(method: str, model, calib: torch.Tensor, scores: dict, params: Params, sparsity: float, *,
                 seeds: list[int] | None = None, layout_kind: str | None = None, round_to: int = 1,
                 checkpoint_root: str | Path | None = None, progress: bool = True,
                 compensation: str | None = None) -> MethodResult:
    """Masks (and compensation) of ``method`` at ``sparsity``. Search methods run one search per seed (default
    search.seeds; the first seed's masks are the result). ``layout_kind`` overrides the method's layout (the
    `pgprune prune --layout` option); ``round_to`` rounds a uniform metric layout's channels; ``compensation``
    overrides the method's (:func:`compensation_of`). The result's ``recipe`` says how the sliced model is
    compensated; with ``refit`` the biases (``extra_bias``) are those of mean compensation, which the refit
    replaces when the masks are sliced (:func:`pgprune.core.compensation.compensated_source`)."""
    from pgprune.core.adapters import get_adapter
    from pgprune.pruning.pg import run_pg_search

    m = get_method(method)
    layout = get_adapter(model).layout()
    kind = layout_kind or m.layout
    t0 = time.perf_counter()
    comp_kind = compensation_of(method, params, compensation)
    recipe = recipe_of(comp_kind, params)
    if m.kind == "metric":
        if m.selector == "slimgpt":
            from pgprune.pruning.slimgpt import slimgpt

            if kind != "heterogeneous":
                raise PgpruneError(f"{method} sets per-layer widths by its Incremental Pruning Ratio; layout={kind!r} "
                                   "is not allowed for it (allowed: heterogeneous)")
            if calib is None:
                raise PgpruneError(f"{method} chooses its masks on the calibration blocks; none were given")
            masks, refit = slimgpt(model, calib[:recipe.blocks], sparsity,
                                   min_heads_per_layer=params.search.min_heads_per_layer, damp=recipe.damp,
                                   batch_size=recipe.batch_size, progress=progress)
            if recipe.kind != "refit":  # --compensation none/bias: SlimGPT's masks without its refit
                refit = None
        else:
            refit = None
            masks = metric_masks(method, layout, scores, sparsity, params, kind, round_to)
        extra, means = None, None
        if comp_kind == "bias":
            extra = compensation_biases(model, masks, scores["flap"])
            means = scores["flap"]["bias"]
        return MethodResult(method, sparsity, masks, extra, {"time_s": time.perf_counter() - t0, "layout": kind},
                            compensation_means=means, recipe=recipe, refit=refit)
    p = params.search.at(sparsity, kind)
    comp = search_compensation(comp_kind, scores)
    t1 = time.perf_counter()
    # SlimGPT's Gram sums, when the refit loss is taken on its stream: no second pass
    sums = {} if recipe.kind == "refit" and p.refit_loss and p.refit_reference else None
    init_scores, p_run, start = search_init(model, calib, scores, p, sparsity, kind, recipe, progress, sums)
    init_s = time.perf_counter() - t1
    seeds = list(seeds or p.seeds)
    # the settings this cell ran with (search.at_sparsity resolved), less the knobs that only place the work
    settings = p.model_dump(mode="json", exclude={"seeds", "at_sparsity", "devices", "sample_mode",
                                                   "checkpoint_every"})
    outcomes, info = [], {"seeds": {}, "layout": kind, "device": params.model.device, "settings": settings}
    if p.init_allocation == "slimgpt":
        info["init_masks_s"] = init_s
    t1 = time.perf_counter()  # the search's refit loss: Gram matrices once per cell
    gram_refit = search_refit(model, calib, p, recipe, start, sums, progress)
    if gram_refit is not None:
        info["refit_grams_s"] = time.perf_counter() - t1
    del sums
    for i, seed in enumerate(seeds):
        out = run_pg_search(model, calib, init_scores, p_run, sparsity=sparsity, layout=kind, seed=seed,
                            checkpoint_dir=checkpoint_root, device=params.model.device, progress=progress,
                            compensation=comp, record_trajectory=i == 0, refit=gram_refit)
        r = out.result
        info["seeds"][str(seed)] = {
            "time_s": r.elapsed_s, "resumed_from_step": r.resumed_from, "steps": r.steps_done,
            "stopped_early": r.stopped_early,
            "forward_passes": r.forward_passes, "best_step": r.best_step,
            "best_val_loss": min((v["val_loss"] for v in r.validation), default=None),
            "init_val_loss": r.validation[0]["val_loss"] if r.validation else None}
        outcomes.append(out)
    per_seed = {o.seed: (o.masks, compensation_biases(model, o.masks, scores["flap"]) if comp is not None else None)
                for o in outcomes}
    main = outcomes[0]
    info["time_s"] = (sum(v["time_s"] for v in info["seeds"].values()) + info.get("refit_grams_s", 0.0)
                      + info.get("init_masks_s", 0.0))
    info["trajectory_s"] = [t["elapsed_s"] for t in main.trajectory]
    return MethodResult(method, sparsity, main.masks, per_seed[main.seed][1], info, history=main.result.history,
                        seeds=per_seed, trajectory=main.trajectory, compensation_means=comp, recipe=recipe)


__all__ = ["CHECKPOINT_DIR_ENV", "DEFAULT_CHECKPOINT_DIR", "setup_torch", "checkpoint_dir", "compensation_of",
           "recipe_of", "scorers_needed",
           "compensation_biases", "search_compensation", "metric_masks", "masks_as_scores", "search_init",
           "search_refit", "method_masks"]
