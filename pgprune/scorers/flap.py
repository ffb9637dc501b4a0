"""FLAP (An et al., AAAI 2024): fluctuation-based importance with optional bias compensation.

Fluctuation of input column c of o_proj / down_proj ("WIFV"):
    F_c = Var_tokens(x_c) * ||W_{:,c}||^2
(population variance over all calibration tokens, exact float64 Welford/Chan merge; FLAP's own running
update is an approximation of the same quantity).

Standardisation (``standardize``), so that one global threshold can rank units of all layers and both modules
(FLAP's "AL-AM" structure):
* ``"layer"`` (default; what FLAP's released ``prune_flap`` does): for attention the column metric is squared
  (``metrics[...] ** 2`` in FLAP), every layer's o_proj columns are z-scored over that layer's columns, and a
  KV group's score is the mean of its G*head_dim standardised columns; the MLP channels are z-scored over each
  layer's channels. (FLAP's ``standarlization`` takes mean/std along axis=1 of the stacked [layers, columns]
  matrix, i.e. per layer and module.)
* ``"module"``: raw unit scores (heads: sum over the head_dim columns of each query head, summed over the G
  query heads; channels: F_c) z-scored over all layers of that module type together;
* ``"none"``: the raw unit scores of ``"module"`` without standardisation.

Bias compensation: removing units whose input has mean mu loses, in expectation, W_{:,removed} @ mu_removed from
the module output; FLAP adds that vector to the module's bias. ``bias_compensation=True`` adds the per-layer mean
input vectors under key ``"bias"``; :func:`flap_compensation_biases` turns them and a mask into the bias vectors.
"""
from __future__ import annotations

import torch

from pgprune.core.adapters import get_adapter
from pgprune.core.masks import Masks
from pgprune.core.weights import layer_parts
from pgprune.errors import PgpruneError
from pgprune.scorers.activations import ActivationStats, collect_activation_stats, head_columns_to_groups

STANDARDIZE = ("layer", "module", "none")


@torch.no_grad()
def flap_fluctuation(model, stats: ActivationStats) -> dict:
    """Unstandardised FLAP metrics.

    Returns {"o_proj": [per-layer float64 Tensor[n_kv*G*hd]], "down_proj": [per-layer Tensor[inter]],
    "heads": flat raw head scores (sum over the group's columns), "channels": flat raw channel scores}.
    """
    layout = stats.layout
    o_cols, d_cols = [], []
    for i in range(layout.num_layers):
        p = layer_parts(model, i)
        wo = p.o_proj.weight.detach().double()
        wd = p.down_proj.weight.detach().double()
        o_cols.append(stats.o_proj[i].var * (wo * wo).sum(0).cpu())
        d_cols.append(stats.down_proj[i].var * (wd * wd).sum(0).cpu())
    heads = torch.cat([head_columns_to_groups(o, layout, i, query_reduce="sum", dim_reduce="sum")
                       for i, o in enumerate(o_cols)])
    return {"o_proj": o_cols, "down_proj": d_cols, "heads": heads, "channels": torch.cat(d_cols)}


def _zscore(x: torch.Tensor) -> torch.Tensor:
    if x.numel() < 2:
        return torch.zeros_like(x)
    return (x - x.mean()) / (x.std() + 1e-12)


def flap_scores(model, calib, *, batch_size: int = 8, standardize: str = "layer", bias_compensation: bool = False,
                stats: ActivationStats | None = None, progress: bool = True) -> dict:
    """FLAP scores; ``stats`` reuses statistics from :func:`collect_activation_stats` (calib is then unused)."""
    if standardize not in STANDARDIZE:
        raise PgpruneError(f"standardize={standardize!r} is not allowed; allowed: {STANDARDIZE}")
    if stats is None:
        stats = collect_activation_stats(model, calib, batch_size=batch_size, progress=progress, desc="flap")
    layout = stats.layout
    fl = flap_fluctuation(model, stats)
    if standardize == "layer":
        heads = torch.cat([head_columns_to_groups(_zscore(o * o), layout, i, query_reduce="mean", dim_reduce="mean")
                           for i, o in enumerate(fl["o_proj"])])
        chans = torch.cat([_zscore(d) for d in fl["down_proj"]])
    elif standardize == "module":
        heads, chans = _zscore(fl["heads"]), _zscore(fl["channels"])
    else:
        heads, chans = fl["heads"], fl["channels"]
    out = {"heads": heads.float(), "channels": chans.float()}
    if bias_compensation:
        out["bias"] = {"o_proj": [m.mean.float() for m in stats.o_proj],
                       "down_proj": [m.mean.float() for m in stats.down_proj]}
    return out


def _mean_inputs(stats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    if isinstance(stats, ActivationStats):
        return [m.mean for m in stats.o_proj], [m.mean for m in stats.down_proj]
    if isinstance(stats, dict) and "bias" in stats:
        stats = stats["bias"]
    if isinstance(stats, dict) and "o_proj" in stats and "down_proj" in stats:
        return list(stats["o_proj"]), list(stats["down_proj"])
    raise PgpruneError("stats must be an ActivationStats, flap_scores(..., bias_compensation=True)'s result, or its "
                       "'bias' entry {'o_proj': [...], 'down_proj': [...]}")


@torch.no_grad()
def flap_compensation_biases(model, masks: Masks, stats) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, 'o_proj'|'down_proj'): float32 Tensor[hidden]} = W[:, removed] @ mean_input[removed], per kept layer.

    Add the vector to that module's output bias (dense layer index; dropped layers get no entry). Layers with nothing
    removed get zero vectors. See :func:`as_extra_bias` for the format ``slicing.slice_model`` takes.
    """
    adapter = get_adapter(model)
    layout = adapter.layout()
    masks.validate(layout)
    o_mean, d_mean = _mean_inputs(stats)
    if len(o_mean) != layout.num_layers or len(d_mean) != layout.num_layers:
        raise PgpruneError(f"statistics cover {len(o_mean)} layers, the model has {layout.num_layers}")
    g, hd = layout.group_size, layout.head_dim
    out = {}
    for i in masks.kept_layer_indices():
        p = layer_parts(model, i)
        removed_q = (~masks.heads[i].bool()).repeat_interleave(g * hd)
        removed_c = ~masks.channels[i].bool()
        for name, lin, mu, removed in (("o_proj", p.o_proj, o_mean[i], removed_q),
                                       ("down_proj", p.down_proj, d_mean[i], removed_c)):
            if mu.numel() != lin.in_features:
                raise PgpruneError(f"layer {i} {name}: mean input has {mu.numel()} entries, the module has "
                                   f"{lin.in_features} inputs")
            w = lin.weight.detach().double().cpu()
            mu = mu.double().cpu() * removed.double()
            out[(i, name)] = (w @ mu).float()
    return out


def as_extra_bias(biases: dict[tuple[int, str], torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """Convert {(layer, name): bias} to {layer: {name: bias}} (``slicing.slice_model(extra_bias=...)``)."""
    nested: dict[int, dict[str, torch.Tensor]] = {}
    for (i, name), b in biases.items():
        nested.setdefault(i, {})[name] = b
    return nested
