"""Policy-gradient mask search over keep-probabilities (pure torch; knows nothing about models)."""
from pgprune.search.estimators import (BASELINES, ESTIMATORS, advance_baseline, check_estimator, estimate_gradient,
                                       penalty_gradient, sample_weights, score)
from pgprune.search.init_map import INIT_METHODS, init_probs
from pgprune.search.policy import GroupSpec, PolicyGradientSearch, SearchResult, SearchSettings
from pgprune.search.projection import project_budget, project_groups, select_top_k
from pgprune.search.schedules import LR_POLICIES, lr_factor, make_lr_schedule, penalty_weight

__all__ = [
    "BASELINES", "ESTIMATORS", "INIT_METHODS", "LR_POLICIES",
    "GroupSpec", "PolicyGradientSearch", "SearchResult", "SearchSettings",
    "advance_baseline", "check_estimator", "estimate_gradient", "init_probs", "lr_factor", "make_lr_schedule",
    "penalty_gradient", "penalty_weight", "project_budget", "project_groups", "sample_weights", "score",
    "select_top_k",
]
