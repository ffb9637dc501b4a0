"""Importance scorers: ``compute_scores(name, model, calib_blocks, **opts)``.

Every scorer returns ``dict[str, Tensor]`` of float32 importances (higher = more important = keep), flat over
layers in layer-major order: "heads" (one per KV group, length sum(layout.kv_heads)), "channels" (one per MLP
channel, length sum(layout.intermediate)) and "layers" (length num_layers), for the groups in ``SCORER_GROUPS``.
``flap`` with ``bias_compensation=True`` also returns "bias" (per-layer mean inputs of o_proj/down_proj).

The names live in :mod:`pgprune.scorers.registry` (no torch); the names below are imported on first use, so that
``import pgprune.scorers.registry`` stays cheap.
"""
from __future__ import annotations

import importlib

# public name -> the module of this package that defines it (PEP 562 lazy attributes)
_LAZY = {
    "SCORER_NAMES": "registry", "SCORER_GROUPS": "registry", "NEEDS_CALIB": "registry", "canonical_name": "registry",
    "SCORERS": "compute", "compute_scores": "compute", "compute_all_scores": "compute",
    "ActivationStats": "activations", "RunningMoments": "activations", "collect_activation_stats": "activations",
    "as_extra_bias": "flap", "flap_compensation_biases": "flap", "flap_fluctuation": "flap", "flap_scores": "flap",
    "magnitude_scores": "magnitude", "random_scores": "random_scorer", "shortgpt_scores": "shortgpt",
    "taylor_scores": "taylor", "wanda_sp_columns": "wanda_sp", "wanda_sp_scores": "wanda_sp",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"pgprune.scorers.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pgprune.scorers' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
