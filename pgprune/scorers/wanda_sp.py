"""Wanda-sp (FLAP's ``prune_wanda_sp``; the reference init, GQA-aware).

Per weight of o_proj / down_proj (shape [out, in]): metric = |W_rc| * sqrt(mean_tokens x_c^2), x the module input.
* channels: mean over output rows of down_proj's metric (one value per intermediate channel);
* heads: mean over output rows of o_proj's metric gives one value per o_proj input column; sum over the head_dim
  columns of each query head, then mean over the G query heads of the KV group (head_dim from the model, not 128);
* layers: mean of the layer's head and channel scores (concatenated).

Since sqrt(mean x_c^2) is constant per column, mean_r |W_rc| * sqrt(.) = (mean_r |W_rc|) * sqrt(.) exactly; the
full metric matrix is never built. The reference normalises Σ x^2 by the number of sequences instead of tokens: a
constant factor, no change in ranking.

Difference from the reference: the reference processes layers sequentially and feeds each layer the output of the
*init-masked* previous layers; here all statistics come from one dense pass (the scores are not tied to an init
rate).
"""
from __future__ import annotations

import torch

from pgprune.core.weights import layer_parts
from pgprune.scorers.activations import ActivationStats, collect_activation_stats, head_columns_to_groups


@torch.no_grad()
def wanda_sp_columns(model, stats: ActivationStats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer mean-over-rows metric of every o_proj and down_proj input column (float64)."""
    o_cols, d_cols = [], []
    for i in range(stats.layout.num_layers):
        p = layer_parts(model, i)
        o_cols.append(p.o_proj.weight.detach().abs().double().mean(0).cpu() * stats.o_proj[i].sqmean.sqrt())
        d_cols.append(p.down_proj.weight.detach().abs().double().mean(0).cpu() * stats.down_proj[i].sqmean.sqrt())
    return o_cols, d_cols


def wanda_sp_scores(model, calib, *, batch_size: int = 8, stats: ActivationStats | None = None,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """``stats``: reuse statistics from :func:`collect_activation_stats` (calib is then unused)."""
    if stats is None:
        stats = collect_activation_stats(model, calib, batch_size=batch_size, progress=progress, desc="wanda-sp")
    layout = stats.layout
    o_cols, d_cols = wanda_sp_columns(model, stats)
    heads = [head_columns_to_groups(o, layout, i, query_reduce="mean", dim_reduce="sum")
             for i, o in enumerate(o_cols)]
    layers = torch.stack([torch.cat([h, c]).mean() for h, c in zip(heads, d_cols)])
    return {"heads": torch.cat(heads).float(), "channels": torch.cat(d_cols).float(), "layers": layers.float()}
