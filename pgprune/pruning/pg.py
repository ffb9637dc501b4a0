"""Policy-gradient mask search on a real model: unit groups and budgets from the layout, initial keep-probabilities
from a metric, the masked model's LM loss on calibration batches as the reward, exact top-k final masks.

Units: one per KV group, one per MLP channel block (``search.channel_group`` channels ranked together by the init
metric; 1 = single channels) and, optionally, one per layer. Policies (``search.policy``): ``units`` (the paper's:
an independent Bernoulli keep-probability per unit) or ``widths`` (per layer, a distribution over how many of its
units it keeps, in the init metric's order: one uniform per layer samples a prefix of the ranked units, and the
keep-probabilities stay non-increasing in rank; far fewer effective degrees of freedom, so the policy gradient can
move MLP width between layers). Layouts (pgprune/methods.py): ``heterogeneous`` projects
each group onto one global budget (layers end up with different widths, as in the paper); ``uniform`` projects every
layer onto its own budget (the same width everywhere, so the result is a stock architecture).

A search is identified by :func:`search_key` (model weights, dtype, device, calibration data, init scores,
compensation, sparsity, layout, library versions) together with every setting and its seed: its checkpoint, in
``checkpoint_dir``, is named by that fingerprint and verified on load, so it is only ever resumed by the very same
search and it is deleted once the search completes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pgprune.config import SearchParams
from pgprune.core.allocation import UnitBlocks, boundary_init, keep_counts, masks_from_scores, ramp_init, uniform_widths
from pgprune.core.masked_forward import MaskedModel
from pgprune.core.masks import Masks, segments
from pgprune.errors import ConfigError, PgpruneError
from pgprune.io import tensor_digest
from pgprune.methods import LAYOUTS
from pgprune.search import GroupSpec, PolicyGradientSearch, SearchResult
from pgprune.search.init_map import CLIP_EPS, init_probs


@dataclass
class PGOutcome:
    masks: Masks
    result: SearchResult
    init_probs: dict[str, torch.Tensor]
    blocks: dict[str, UnitBlocks]
    seed: int
    key: str
    # with record_trajectory: the hard mask of every validation, {"step", "forward_passes", "elapsed_s",
    # "val_loss", "masks"} (quality vs cost)
    trajectory: list[dict] = field(default_factory=list)


# --- identity of a search --------------------------------------------------------------------------------------
def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def nested_digest(obj) -> str:
    """Digest of a nested dict/list of tensors (e.g. init scores, compensation means)."""
    from pgprune.io import flatten_tensors

    if obj is None:
        return "none"
    flat = flatten_tensors(obj)
    return tensor_digest({k: flat[k] for k in sorted(flat)})


def model_digest(model, sample: int = 4096) -> str:
    """Identity of a model's weights: config, every tensor's name/shape/dtype and a strided sample of its values
    (reading every weight of a 70B model just to name a checkpoint would take minutes). A weight source that keeps
    the weights out of memory may provide ``model.pgprune_weights_digest``."""
    parts = [json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode()]
    extra = getattr(model, "pgprune_weights_digest", None)
    if extra:
        parts.append(str(extra).encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        parts.append(f"{name}{tuple(t.shape)}{t.dtype}{t.device.type}".encode())
        if t.device.type != "meta" and t.numel():
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            parts.append(tensor_digest([flat[::step][:sample]]).encode())
    return _sha(*parts)


def search_key(model, calib: torch.Tensor, init_scores: dict, compensation, sparsity: float, layout: str,
               device: str, refit: dict | None = None) -> str:
    """Everything a search's losses depend on besides its settings and seed (``refit``: the refit loss's
    :meth:`pgprune.core.refit.GramRefit.digest`)."""
    import transformers

    doc = {"model": model_digest(model), "dtype": str(next(model.parameters()).dtype), "device": str(device),
           "calib": tensor_digest([calib]), "init": nested_digest(init_scores), "comp": nested_digest(compensation),
           "sparsity": float(sparsity), "layout": layout, "torch": torch.__version__,
           "transformers": transformers.__version__}
    if refit is not None:
        doc["refit"] = refit
    return _sha(json.dumps(doc, sort_keys=True).encode())[:24]


# --- groups, budgets, initial probabilities -------------------------------------------------------------------
def _check_layout(layout: str, p: SearchParams) -> None:
    if layout not in LAYOUTS:
        raise PgpruneError(f"layout={layout!r} is not allowed; allowed: {', '.join(LAYOUTS)}")
    if layout == "uniform" and "layers" in p.granularity:
        raise PgpruneError("the uniform layout searches heads and channels; remove 'layers' from search.granularity "
                           "(whole layers are dropped by the heterogeneous layout or layer_drop)")


def build_search(masked: MaskedModel, init_scores: dict[str, torch.Tensor], p: SearchParams, sparsity: float, *,
                 layout: str = "heterogeneous", seed: int | None = None, key: str = ""
                 ) -> tuple[PolicyGradientSearch, dict[str, torch.Tensor], dict[str, UnitBlocks]]:
    """The search over ``p.granularity`` at ``sparsity``: groups with budgets, initial probabilities (from the
    metric ``init_scores``) and the unit blocks of heads and channels (channel blocks of ``channel_group``; with
    ``policy: widths`` both in the metric's rank order within each layer); ``seed`` defaults to the first of
    ``p.seeds``. ``init_allocation: slimgpt`` allocates ``init_scores`` globally: they are SlimGPT's masks as
    scores (:func:`pgprune.pruning.run.search_init` makes them; other scores give their metric's global cut)."""
    _check_layout(layout, p)
    lay = masked.layout
    alloc = "global" if p.init_allocation == "slimgpt" else p.init_allocation
    missing = [g for g in p.granularity if g not in init_scores]
    if missing:
        raise PgpruneError(f"search.init scorer provides {sorted(init_scores)}, not {missing}; pick a scorer that "
                           "scores every searched group (e.g. wanda_sp, magnitude, random)")
    # the uniform layout fixes every layer's width, so there the search decides which units (units policy)
    ordered = p.policy == "widths" and layout == "heterogeneous"
    # a group that is not searched keeps every unit: single-unit blocks, no ranking needed
    blocks = {"heads": UnitBlocks.build(lay, init_scores.get("heads"), 1, "heads",
                                        ranked=ordered and "heads" in p.granularity),
              "channels": UnitBlocks.build(lay, init_scores.get("channels"), p.channel_group, "channels",
                                           ranked=ordered) if "channels" in p.granularity
              else UnitBlocks.build(lay, None, 1, "channels")}
    counts = keep_counts(lay, sparsity, p.layer_sparsity, p.granularity, blocks)
    widths = uniform_widths(lay, sparsity, round_to=p.channel_group, min_heads=p.min_heads_per_layer) \
        if layout == "uniform" else None
    lrs = {"heads": p.lr_heads, "channels": p.lr_channels, "layers": p.lr_layers}
    groups, probs = {}, {}
    for g in p.granularity:
        gb = blocks.get(g)
        seg = gb.block_layer if gb is not None else segments(lay, g)
        score = gb.reduce(init_scores[g]) if gb is not None else init_scores[g].float().reshape(-1)
        minimum = p.min_heads_per_layer if g == "heads" else (1 if g == "channels" else 0)
        quota = None
        if widths is not None:
            quota = [widths[g] // gb.size] * lay.num_layers
        budget = float(sum(quota)) if quota is not None else float(counts[g])
        groups[g] = GroupSpec(size=seg.numel(), budget=budget, lr=lrs[g], segments=seg if g != "layers" else None,
                              segment_budgets=None if quota is None else tuple(float(q) for q in quota),
                              ordered=ordered and g != "layers")
        if p.init_map == "const" and g != "layers" and ordered:
            # widths policy: each layer's width starts uniform around the metric's (step 0 = the metric's mask)
            free = p.init_free_heads if g == "heads" else p.init_free_channels
            probs[g] = ramp_init(score, seg, k=None if quota else int(budget), quota=quota,
                                 allocation=alloc, minimum=minimum, free=free)
            continue
        if p.init_map == "const" and g != "layers":
            # exactly the metric baseline's mask (same allocation, same k): the search starts from it
            # (boundary units nearly undecided when search.init_free_<group> > 0)
            free = p.init_free_heads if g == "heads" else p.init_free_channels
            probs[g] = boundary_init(score, seg, k=None if quota else int(budget), quota=quota,
                                     allocation=alloc, minimum=minimum, const=p.init_const, free=free,
                                     margin=p.init_free_margin)
            probs[g] = probs[g].clamp(CLIP_EPS, 1.0 - CLIP_EPS)
            continue
        per_layer = seg if (g != "layers" and (alloc == "uniform" or quota is not None)) else None
        probs[g] = init_probs(score, budget / seg.numel(), method=p.init_map, segments=per_layer, const=p.init_const)
    seed = p.seeds[0] if seed is None else int(seed)
    return PolicyGradientSearch(groups, probs, p, seed=seed, key=key), probs, blocks


def hard_masks(layout, probs: dict[str, torch.Tensor], p: SearchParams, sparsity: float, *,
               layout_kind: str = "heterogeneous", blocks: dict[str, UnitBlocks] | None = None,
               validate: bool = True) -> Masks:
    """Exact top-k of the probabilities (pgprune.core.allocation.masks_from_scores, the rule every method uses):
    layers first, then KV groups and channel blocks among the kept layers (min KV groups per layer)."""
    masks = masks_from_scores(layout, probs, sparsity, allocation="global", granularity=tuple(probs),
                              layer_sparsity=p.layer_sparsity, min_heads_per_layer=p.min_heads_per_layer,
                              layout_kind=layout_kind, blocks=blocks)
    if validate:
        masks.validate(layout)
    return masks


def sample_masks(layout, flat: dict[str, torch.Tensor], blocks: dict[str, UnitBlocks] | None) -> Masks:
    """A sampled flat mask over blocks as model masks (units in the model's order)."""
    flat = {g: (blocks[g].expand(v) if blocks and g in blocks else v) for g, v in flat.items()}
    return Masks.from_flat(layout, flat)


# --- losses ---------------------------------------------------------------------------------------------------
def make_losses_fn(masked: MaskedModel, calib: torch.Tensor, batch_size: int, device: str = "cpu",
                   mode: str = "auto", blocks: dict[str, UnitBlocks] | None = None):
    """losses_fn(masks of the K samples, step): the masked model's LM loss of each sample on calibration batch
    ``step`` (cycled), all K on the same batch (so the batch's difficulty cancels in the leave-one-out baseline)."""
    n = calib.shape[0]
    if n < batch_size:
        raise PgpruneError(f"search.batch_size={batch_size} is larger than the {n} calibration blocks available "
                           "for the search; lower it or add calibration blocks")
    n_batches = n // batch_size
    layout = masked.layout

    def losses_fn(flat_masks: list[dict[str, torch.Tensor]], step: int) -> torch.Tensor:
        b = step % n_batches
        ids = calib[b * batch_size:(b + 1) * batch_size].to(device)
        return masked.sample_losses(ids, [sample_masks(layout, m, blocks) for m in flat_masks], mode=mode)

    return losses_fn


def make_validate_fn(masked: MaskedModel, val: torch.Tensor, p: SearchParams, sparsity: float, device: str,
                     layout_kind: str, blocks: dict[str, UnitBlocks]):
    """validate_fn(probs): token-mean LM loss of the probabilities' hard top-k mask on held-back calibration
    blocks, in one layer-major pass (a streamed model reads its weights once per validation)."""
    n_tokens = val.shape[0] * (val.shape[1] - 1)

    def validate_fn(probs: dict[str, torch.Tensor]) -> float:
        masks = hard_masks(masked.layout, probs, p, sparsity, layout_kind=layout_kind, blocks=blocks,
                           validate=False)
        return float(masked.block_nll(val, masks, batch_size=p.batch_size).sum() / n_tokens)

    return validate_fn


def check_val_blocks(n_calib: int, p: SearchParams) -> None:
    """The search trains on the calibration blocks less the last search.val_blocks (held back to validate): at
    least search.batch_size must remain. ConfigError naming both numbers otherwise."""
    v, b = int(p.val_blocks), int(p.batch_size)
    if v and v >= n_calib:
        raise ConfigError(f"search.val_blocks={v} is not less than the {n_calib} calibration blocks "
                          f"(data.calib_blocks / --calib-blocks): none would be left for the search; allowed: "
                          f"search.val_blocks <= {max(n_calib - b, 0)} (search.batch_size={b} must remain), 0 to "
                          "validate nothing, or more calibration blocks")
    if n_calib - v < b:
        raise ConfigError(f"search.val_blocks={v} of the {n_calib} calibration blocks (data.calib_blocks / "
                          f"--calib-blocks) leaves {n_calib - v}, fewer than search.batch_size={b}; allowed: at "
                          f"least {v + b} calibration blocks, or a smaller search.val_blocks / search.batch_size")


def run_pg_search(model, calib: torch.Tensor, init_scores: dict[str, torch.Tensor], p: SearchParams, *,
                  sparsity: float, layout: str = "heterogeneous", seed: int | None = None,
                  checkpoint_dir: str | Path | None = None, device: str = "cpu", progress: bool = True,
                  on_step=None, compensation: dict[str, list[torch.Tensor]] | None = None,
                  stop_after: int | None = None, record_trajectory: bool = False, refit=None) -> PGOutcome:
    """Search masks at ``sparsity`` in ``layout`` with ``seed`` (default: the first of ``p.seeds``).

    ``compensation`` (calibration means of o_proj/down_proj inputs, e.g. the flap scorer's "bias" entry) makes
    every evaluated mask mean-compensated, like the final sliced model; ``refit`` (a
    :class:`pgprune.core.refit.GramRefit`) evaluates every sampled and validated mask with its kept o_proj/down_proj
    weights refit instead (the search's refit loss). With ``checkpoint_dir`` the search checkpoints there every
    ``p.checkpoint_every`` steps and resumes a checkpoint of exactly this search. ``p.at_sparsity`` rules are
    resolved here (:meth:`pgprune.config.SearchParams.at`).

    The start (the init scores' hard mask, e.g. SlimGPT's masks with the MLP widths rounded to search.channel_group
    blocks: :func:`pgprune.pruning.run.search_init`) is validated before the first step, so with ``select: best``
    the search never returns a mask that validated worse than where it started, and its widths stay on the
    channel-block grid (what llama.cpp runs fastest: docs/serving.md)."""
    p = p.at(sparsity, layout)
    check_val_blocks(calib.shape[0], p)
    masked = MaskedModel(model)
    masked.set_compensation(compensation)
    masked.set_refit(refit)
    samples = masked
    if len(p.devices) > 1:  # data parallel over the K samples of a step: one replica per device, losses exchanged
        from pgprune.core.placement import ParallelSampleLosses

        if refit is not None:
            raise PgpruneError("the search's refit loss runs on one device; set search.devices: [] or "
                               "search.refit_loss: false")

        samples = ParallelSampleLosses.from_model(model, p.devices)
        samples.set_compensation(compensation)
    key = search_key(model, calib, init_scores, compensation, sparsity, layout, device,
                     refit.digest() if refit is not None else None)
    search, probs0, blocks = build_search(masked, init_scores, p, sparsity, layout=layout, seed=seed, key=key)
    validate_fn = None
    train = calib
    if p.val_blocks:
        train, val = calib[:-p.val_blocks], calib[-p.val_blocks:]
        validate_fn = make_validate_fn(masked, val, p, sparsity, device, layout, blocks)
    mode = "separate" if refit is not None else p.sample_mode  # the refit loss evaluates one mask per forward
    result = search.run(make_losses_fn(samples, train, p.batch_size, device, mode, blocks),
                        checkpoint_dir=checkpoint_dir, progress=progress, on_step=on_step,
                        validate_fn=validate_fn, validate_every=p.validate_every, stop_after=stop_after,
                        record_trajectory=record_trajectory)
    masks = hard_masks(masked.layout, result.selected_probs(p.select), p, sparsity, layout_kind=layout,
                       blocks=blocks)
    trajectory = [{k: v for k, v in t.items() if k != "probs"}
                  | {"masks": hard_masks(masked.layout, t["probs"], p, sparsity, layout_kind=layout, blocks=blocks)}
                  for t in result.trajectory]
    return PGOutcome(masks, result, probs0, blocks, search.seed, key, trajectory)
