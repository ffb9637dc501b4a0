"""Importance scorers: ``compute_scores(name, model, calib_blocks, **opts)``.

Every scorer returns ``dict[str, Tensor]`` of float32 importances (higher = more important = keep), flat over
layers in layer-major order: "heads" (one per KV group, length sum(layout.kv_heads)), "channels" (one per MLP
channel, length sum(layout.intermediate)) and "layers" (length num_layers), for the groups in ``SCORER_GROUPS``.
``flap`` with ``bias_compensation=True`` also returns "bias" (per-layer mean inputs of o_proj/down_proj).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from pgprune.errors import PgpruneError
from pgprune.scorers.activations import ActivationStats, RunningMoments, collect_activation_stats
from pgprune.scorers.flap import as_extra_bias, flap_compensation_biases, flap_fluctuation, flap_scores
from pgprune.scorers.magnitude import magnitude_scores
from pgprune.scorers.random_scorer import random_scores
from pgprune.scorers.shortgpt import shortgpt_scores
from pgprune.scorers.taylor import taylor_scores
from pgprune.scorers.wanda_sp import wanda_sp_columns, wanda_sp_scores

SCORERS: dict[str, Callable[..., dict]] = {
    "magnitude": magnitude_scores,
    "wanda_sp": wanda_sp_scores,
    "flap": flap_scores,
    "taylor": taylor_scores,
    "shortgpt": shortgpt_scores,
    "random": random_scores,
}

SCORER_GROUPS: dict[str, tuple[str, ...]] = {
    "magnitude": ("heads", "channels", "layers"),
    "wanda_sp": ("heads", "channels", "layers"),
    "flap": ("heads", "channels"),
    "taylor": ("heads", "channels", "layers"),
    "shortgpt": ("layers",),
    "random": ("heads", "channels", "layers"),
}

NEEDS_CALIB = {"wanda_sp", "flap", "taylor", "shortgpt"}


def canonical_name(name: str) -> str:
    """'wanda-sp' / 'Wanda_SP' -> 'wanda_sp'; unknown names raise PgpruneError listing the allowed ones."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in SCORERS:
        raise PgpruneError(f"unknown scorer {name!r}; allowed: {sorted(SCORERS)}")
    return key


def compute_scores(name: str, model, calib_blocks: torch.Tensor | None = None, **opts) -> dict:
    key = canonical_name(name)
    fn = SCORERS[key]
    allowed = [p for p, v in inspect.signature(fn).parameters.items() if v.kind == inspect.Parameter.KEYWORD_ONLY]
    bad = sorted(set(opts) - set(allowed))
    if bad:
        raise PgpruneError(f"scorer {key!r} does not take option(s) {bad}; allowed: {allowed}")
    if key in NEEDS_CALIB and calib_blocks is None and opts.get("stats") is None:
        raise PgpruneError(f"scorer {key!r} needs calibration blocks (LongTensor [n_blocks, seq_len])")
    return fn(model, calib_blocks, **opts)


__all__ = ["SCORERS", "SCORER_GROUPS", "compute_scores", "canonical_name", "ActivationStats", "RunningMoments",
           "collect_activation_stats", "magnitude_scores", "wanda_sp_scores", "wanda_sp_columns", "flap_scores",
           "flap_fluctuation", "flap_compensation_biases", "as_extra_bias", "taylor_scores", "shortgpt_scores",
           "random_scores"]
