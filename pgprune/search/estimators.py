"""Score-function (REINFORCE) gradient estimates of E[L(m)], m ~ Bernoulli(s), for one probability vector.

The estimate for a group is g = sum_j w_j * score(m_j, s) (+ an optional entropy-penalty gradient), where the
per-sample weights w_j depend only on the losses and the baseline, so they are shared by every group:

* ``exact`` (default): w_j = (L_j - b)/K_valid, score = (m - s)/(s(1-s)), s clamped to [eps, 1-eps] in the
  denominator only; b is the moving-average baseline of PREVIOUS steps (mean of the current losses at step 0).
* ``loo``: w_j = (L_j - mean of the other losses)/K_valid with the exact score (unbiased, needs K >= 2).
* ``reference``: the reference code: b is the EMA updated with the current mean first, w_j = (L_j - b)/(K-1)
  with K the number of samples drawn (also when some were dropped), score = (m - s)/sqrt((s+1e-7)(1-s+1e-7)).
* ``disarm`` (not in the paper): antithetic pairs, b = 1[u < s] and b' = 1[1 - u < s] with the same uniform u, and
  DisARM (Dong, Mnih & Tucker, NeurIPS 2020) per pair: with logits a = logit(s),
  dE/da_i = 1/2 (L(b) - L(b')) (-1)^{b'_i} 1[b_i != b'_i] sigmoid(|a_i|), i.e. in s (da/ds = 1/(s(1-s))):
  g_i = 1/2 (L(b) - L(b')) (-1)^{b'_i} 1[b_i != b'_i] / min(s_i, 1 - s_i), averaged over the K/2 pairs. Unbiased;
  a unit contributes only where the pair disagrees on it, so the surest units (s near 0 or 1) are rarely moved by
  noise while undecided units (s near 1/2, where b' is nearly the complement of b) get a paired comparison.
"""
from __future__ import annotations

import torch

from pgprune.errors import ConfigError

ESTIMATORS = ("exact", "loo", "reference", "disarm")
PAIRED = ("disarm",)  # estimators that sample antithetic pairs
BASELINES = ("ema", "none")
_REF_EPS = 1e-7


def check_estimator(estimator: str, baseline: str = "ema", n_samples: int | None = None) -> None:
    """Raise ConfigError for an unknown estimator/baseline name or too few samples."""
    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown estimator '{estimator}'; allowed: {', '.join(ESTIMATORS)}.")
    if baseline not in BASELINES:
        raise ConfigError(f"unknown baseline '{baseline}'; allowed: {', '.join(BASELINES)}.")
    if n_samples is not None and estimator in ("loo", "reference") and n_samples < 2:
        raise ConfigError(f"estimator '{estimator}' needs samples K >= 2, got K={n_samples}.")
    if n_samples is not None and estimator in PAIRED and (n_samples < 2 or n_samples % 2):
        raise ConfigError(f"estimator '{estimator}' samples antithetic pairs: K must be even and >= 2, got "
                          f"K={n_samples}.")


def advance_baseline(estimator: str, baseline: str, ema_window: float, state: float | None,
                     loss_mean: float) -> tuple[float, float | None]:
    """Return (baseline value used this step, new EMA state) given the previous state and the current mean loss.

    The EMA is b_t = (1 - 1/W) b_{t-1} + (1/W) mean(L_t), started at the first mean. ``exact`` uses the previous
    value (the current mean at the first step); ``reference`` the value after this step's update; ``loo`` does
    not use it (the value reported is the current mean). With baseline "none" the value is 0 (loo: the mean).
    """
    check_estimator(estimator, baseline)
    if baseline == "none":
        return (loss_mean if estimator == "loo" else 0.0), None
    lam = 1.0 / ema_window
    new = loss_mean if state is None else (1.0 - lam) * state + lam * loss_mean
    if estimator == "exact":
        return (loss_mean if state is None else state), new
    if estimator == "reference":
        return new, new
    return loss_mean, new


def sample_weights(losses: torch.Tensor, baseline: float, *, estimator: str = "exact",
                   n_samples: int | None = None) -> torch.Tensor:
    """Per-sample weights w_j (float64) for the valid losses of one step.

    ``n_samples`` is the number of samples drawn (K); only ``reference`` uses it, for its 1/(K-1) factor.
    ``loo`` with a single valid loss returns a zero weight (no leave-one-out baseline exists).
    """
    check_estimator(estimator)
    losses = losses.detach().to(torch.float64).reshape(-1)
    k = losses.numel()
    if k == 0:
        return losses
    if estimator == "exact":
        return (losses - baseline) / k
    if estimator in PAIRED:  # pairs are weighted inside disarm_gradient
        return torch.zeros_like(losses)
    if estimator == "loo":
        if k < 2:
            return torch.zeros_like(losses)
        loo_mean = (losses.sum() - losses) / (k - 1)
        return (losses - loo_mean) / k
    k_drawn = k if n_samples is None else n_samples
    if k_drawn < 2:
        raise ConfigError(f"estimator 'reference' needs samples K >= 2, got K={k_drawn}.")
    return (losses - baseline) / (k_drawn - 1)


def score(s: torch.Tensor, masks: torch.Tensor, *, estimator: str = "exact", eps: float = 1e-4) -> torch.Tensor:
    """Per-sample score terms (K x N, float64): (m - s)/(s(1-s)) or, for ``reference``, (m - s)/sqrt(s(1-s))."""
    check_estimator(estimator)
    s64 = s.detach().to(torch.float64).reshape(1, -1)
    diff = masks.reshape(masks.shape[0], -1).to(torch.float64) - s64
    if estimator == "reference":
        return diff / torch.sqrt((s64 + _REF_EPS) * (1.0 - s64 + _REF_EPS))
    sc = s64.clamp(eps, 1.0 - eps)
    return diff / (sc * (1.0 - sc))


def penalty_gradient(s: torch.Tensor, weight: float, *, estimator: str = "exact", eps: float = 1e-4) -> torch.Tensor:
    """Gradient of weight * H(s) (binary entropy): weight * log((1-s)/s), float64; zeros when weight == 0."""
    s64 = s.detach().to(torch.float64).reshape(-1)
    if weight == 0:
        return torch.zeros_like(s64)
    if estimator == "reference":
        return weight * (torch.log(1.0 - s64 + _REF_EPS) - torch.log(s64 + _REF_EPS))
    sc = s64.clamp(eps, 1.0 - eps)
    return weight * (torch.log1p(-sc) - torch.log(sc))


def estimate_gradient(s: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor, baseline: float = 0.0, *,
                      estimator: str = "exact", eps: float = 1e-4, n_samples: int | None = None,
                      penalty: float = 0.0) -> torch.Tensor:
    """Gradient estimate for one group (float64, shape of ``s``) from K masks (K x N bool) and K finite losses.

    ``baseline`` is the value to subtract (see :func:`advance_baseline`); ``loo`` ignores it.
    """
    w = sample_weights(losses, baseline, estimator=estimator, n_samples=n_samples)
    if masks.shape[0] != w.numel():
        raise ConfigError(f"got {masks.shape[0]} masks but {w.numel()} losses.")
    g = w @ score(s, masks, estimator=estimator, eps=eps) if w.numel() else torch.zeros(s.numel(), dtype=torch.float64)
    g = g + penalty_gradient(s, penalty, estimator=estimator, eps=eps)
    return g.reshape(s.shape)


def antithetic_masks(s: torch.Tensor, n_pairs: int, generator: torch.Generator) -> list[torch.Tensor]:
    """2 * n_pairs masks in pair order: u < s and then (1 - u) < s for each uniform draw u."""
    out = []
    for _ in range(n_pairs):
        u = torch.rand(s.numel(), generator=generator, dtype=s.dtype)
        out += [u < s, (1.0 - u) < s]
    return out


def disarm_gradient(s: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor, *, eps: float = 1e-4,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """DisARM estimate (float64, shape of ``s``) from masks [2P, N] in pair order and their losses [2P];
    pairs with a non-finite loss (or ``valid`` False) are left out."""
    s64 = s.detach().to(torch.float64).reshape(-1)
    m = masks.reshape(masks.shape[0], -1)
    if m.shape[0] % 2:
        raise ConfigError(f"disarm needs masks in antithetic pairs; got {m.shape[0]} masks")
    losses = losses.detach().to(torch.float64).reshape(-1)
    ok = torch.isfinite(losses) if valid is None else valid.reshape(-1).bool() & torch.isfinite(losses)
    pair_ok = ok[0::2] & ok[1::2]
    if not bool(pair_ok.any()):
        return torch.zeros_like(s64).reshape(s.shape)
    a, b = m[0::2][pair_ok].to(torch.float64), m[1::2][pair_ok].to(torch.float64)  # [P, N]
    diff = (losses[0::2] - losses[1::2])[pair_ok]  # [P]
    sign = 1.0 - 2.0 * b  # (-1)^{b'}
    disagree = (a != b).to(torch.float64)
    inv = 1.0 / torch.minimum(s64, 1.0 - s64).clamp_min(eps)
    g = 0.5 * (diff[:, None] * sign * disagree).mean(dim=0) * inv
    return g.reshape(s.shape)


def prefix_score(s: torch.Tensor, masks: torch.Tensor, segments: torch.Tensor, *, eps: float = 1e-4) -> torch.Tensor:
    """Score terms d log p(m)/ds (K x N, float64) of prefix masks of ordered segments (pgprune.search.GroupSpec
    ``ordered``): in a segment with non-increasing s_1 >= ... >= s_n a mask keeping its first w units has
    p(w) = s_w - s_{w+1} (s_0 = 1, s_{n+1} = 0), so the score is +1/p(w) at unit w and -1/p(w) at unit w + 1
    (p clamped to >= eps). Used with the same per-sample weights as the Bernoulli score (loo, exact)."""
    s64 = s.detach().to(torch.float64).reshape(-1)
    m = masks.reshape(masks.shape[0], -1).to(torch.bool)
    seg = segments.reshape(-1).to(torch.long)
    k, n = m.shape
    n_seg = int(seg.max()) + 1
    sizes = torch.bincount(seg, minlength=n_seg)
    starts = torch.cumsum(sizes, 0) - sizes  # first unit of every segment
    width = torch.zeros(k, n_seg, dtype=torch.long).index_add_(1, seg, m.to(torch.long))  # kept units per segment
    out = torch.zeros(k, n, dtype=torch.float64)
    for r in range(k):
        for seg_id in range(n_seg):
            w = int(width[r, seg_id])
            hi = 1.0 if w == 0 else float(s64[starts[seg_id] + w - 1])
            lo = 0.0 if w >= int(sizes[seg_id]) else float(s64[starts[seg_id] + w])
            p = max(hi - lo, eps)
            if w > 0:
                out[r, starts[seg_id] + w - 1] = 1.0 / p
            if w < int(sizes[seg_id]):
                out[r, starts[seg_id] + w] = -1.0 / p
    return out
