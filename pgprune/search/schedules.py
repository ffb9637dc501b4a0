"""Learning-rate and penalty schedules (the value used at step t is the one before any scheduler step)."""
from __future__ import annotations

import math
from typing import Callable, Sequence

from pgprune.errors import ConfigError

LR_POLICIES = ("cosine", "const", "linear", "poly", "exp", "step")


def lr_factor(policy: str, step: int, total_steps: int, *, power: float = 0.9, gamma: float = 0.995,
              milestones: Sequence[int] = (), step_gamma: float = 0.1) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``.

    cosine: (1 + cos(pi t/T))/2; const: 1; linear: 1 - t/T; poly: (1 - t/T)^power; exp: gamma^t;
    step: step_gamma^(number of milestones <= t).
    """
    if policy not in LR_POLICIES:
        raise ConfigError(f"unknown lr schedule '{policy}'; allowed: {', '.join(LR_POLICIES)}.")
    if total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total_steps}.")
    frac = min(max(step / total_steps, 0.0), 1.0)
    if policy == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * frac))
    if policy == "const":
        return 1.0
    if policy == "linear":
        return 1.0 - frac
    if policy == "poly":
        return (1.0 - frac) ** power
    if policy == "exp":
        return gamma ** step
    return step_gamma ** sum(1 for m in milestones if step >= m)


def make_lr_schedule(policy: str, base_lr: float, total_steps: int, **kw) -> Callable[[int], float]:
    """Return lr(t) = base_lr * lr_factor(policy, t, total_steps, **kw); validates the policy name now."""
    lr_factor(policy, 0, total_steps, **kw)
    return lambda t: base_lr * lr_factor(policy, t, total_steps, **kw)


def penalty_weight(step: int, total_steps: int, init: float, final: float) -> float:
    """Entropy-penalty weight: linear from ``init`` to ``final`` over the run; 0 (off) when ``init`` < 0."""
    if init < 0:
        return 0.0
    return init + (final - init) * step / max(total_steps, 1)
