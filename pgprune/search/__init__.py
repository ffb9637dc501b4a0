"""Policy-gradient mask search over keep-probabilities (pure torch; knows nothing about models).

Names are imported on first use (PEP 562), so that ``pgprune.search.settings`` (the settings schema, no torch)
can be imported alone.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "BASELINES": "estimators", "ESTIMATORS": "estimators", "advance_baseline": "estimators",
    "check_estimator": "estimators", "estimate_gradient": "estimators", "penalty_gradient": "estimators",
    "sample_weights": "estimators", "score": "estimators",
    "INIT_METHODS": "init_map", "init_probs": "init_map",
    "GroupSpec": "policy", "PolicyGradientSearch": "policy", "SearchResult": "policy", "SearchSettings": "settings",
    "project_budget": "projection", "project_groups": "projection", "select_top_k": "projection",
    "LR_POLICIES": "schedules", "lr_factor": "schedules", "make_lr_schedule": "schedules",
    "penalty_weight": "schedules",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"pgprune.search.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'pgprune.search' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


__all__ = sorted(_LAZY)
