"""Gradient estimators, baselines, penalty, schedules and the metric -> probability initialisation."""
from __future__ import annotations

import math

import pytest
import torch

from pgprune.errors import ConfigError
from pgprune.search import (
    advance_baseline,
    estimate_gradient,
    init_probs,
    lr_factor,
    make_lr_schedule,
    penalty_gradient,
    penalty_weight,
    sample_weights,
)

S = torch.tensor([0.3, 0.6, 0.8, 0.15], dtype=torch.float64)
C = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
D, E0 = 1.5, 2.0


def toy_loss(m: torch.Tensor, d: float = D) -> torch.Tensor:
    """L(m) = c.m + d m0 m1 + e0 for a batch of masks (rows); E[L] = c.s + d s0 s1 + e0."""
    m = m.to(torch.float64)
    return m @ C + d * m[:, 0] * m[:, 1] + E0


def true_grad(d: float = D) -> torch.Tensor:
    g = C.clone()
    g[0] += d * S[1]
    g[1] += d * S[0]
    return g


def replicate(estimator: str, k: int, reps: int, baseline: float, d: float = D, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    masks = torch.rand(reps, k, S.numel(), generator=gen, dtype=torch.float64) < S
    out = torch.empty(reps, S.numel(), dtype=torch.float64)
    for r in range(reps):
        out[r] = estimate_gradient(S, masks[r], toy_loss(masks[r], d), baseline, estimator=estimator, n_samples=k)
    return out


def assert_mean_close(est: torch.Tensor, target: torch.Tensor, z: float = 5.0) -> None:
    se = est.std(dim=0) / math.sqrt(est.shape[0])
    err = (est.mean(dim=0) - target).abs()
    assert bool((err <= z * se + 1e-3).all()), f"mean {est.mean(0)} vs {target} (se {se})"


@pytest.mark.parametrize("baseline", [0.0, 3.0])
def test_exact_is_unbiased(baseline):
    est = replicate("exact", k=2, reps=20000, baseline=baseline)
    assert_mean_close(est, true_grad())


def test_loo_is_unbiased():
    est = replicate("loo", k=4, reps=8000, baseline=123.0)  # loo ignores the given baseline
    assert_mean_close(est, true_grad())


def test_reference_is_preconditioned_and_biased():
    """Linear loss, fixed baseline: E[g_ref] = K/(K-1) * sqrt(s(1-s)) * grad, not grad."""
    k = 4
    b = float(S @ C + E0)  # E[L]: a constant baseline, lowers the variance
    est = replicate("reference", k=k, reps=20000, baseline=b, d=0.0)
    factor = k / (k - 1) * torch.sqrt(S * (1 - S))
    assert_mean_close(est, factor * C)
    se = est.std(dim=0) / math.sqrt(est.shape[0])
    assert bool(((est.mean(0) - C).abs() > 10 * se).all())  # clearly not the true gradient


def test_formulas_match_spec():
    s = torch.tensor([0.0, 0.5, 1.0, 0.2])
    m = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    L = torch.tensor([2.0, 1.0])
    mf, s64, L64 = m.double(), s.double(), L.double()
    sc = s64.clamp(1e-4, 1 - 1e-4)
    exact = ((L64 - 1.2)[:, None] * (mf - s64) / (sc * (1 - sc))).mean(0)
    assert torch.allclose(estimate_gradient(s, m, L, 1.2), exact)
    # reference at step 0 (b = mean) is (L1-L2)/2 (m1-m2)/sqrt(s(1-s)) for K=2
    ref = (L64[0] - L64[1]) / 2 * (mf[0] - mf[1]) / torch.sqrt((s64 + 1e-7) * (1 - s64 + 1e-7))
    assert torch.allclose(estimate_gradient(s, m, L, 1.5, estimator="reference"), ref)
    # loo with K=2 equals (1/(K-1)) sum (L_j - mean)(score_j)
    loo = ((L64 - 1.5)[:, None] * (mf - s64) / (sc * (1 - sc))).sum(0)
    assert torch.allclose(estimate_gradient(s, m, L, 0.0, estimator="loo"), loo)
    # frozen units (s exactly 0 or 1, masks deterministic) get zero gradient
    assert float(estimate_gradient(s, m[:1], L[:1], 0.5)[2]) == 0.0
    # reference keeps the 1/(K-1) factor of the K samples drawn when one was dropped
    assert sample_weights(torch.tensor([3.0]), 1.0, estimator="reference", n_samples=2).item() == pytest.approx(2.0)
    assert sample_weights(torch.tensor([3.0]), 1.0, estimator="exact").item() == pytest.approx(2.0)
    assert sample_weights(torch.tensor([3.0]), 1.0, estimator="loo").item() == 0.0


def test_baseline_timing():
    # exact: previous EMA (current mean at the first step); reference: EMA after including the current mean
    assert advance_baseline("exact", "ema", 5, None, 2.0) == (2.0, 2.0)
    used, new = advance_baseline("exact", "ema", 5, 2.0, 7.0)
    assert used == 2.0 and new == pytest.approx(0.8 * 2.0 + 0.2 * 7.0)
    used, new = advance_baseline("reference", "ema", 5, 2.0, 7.0)
    assert used == new == pytest.approx(3.0)
    assert advance_baseline("reference", "none", 5, 2.0, 7.0) == (0.0, None)
    assert advance_baseline("loo", "ema", 5, 2.0, 7.0)[0] == 7.0


def test_estimator_errors():
    s, m, L = torch.full((3,), 0.5), torch.ones(1, 3, dtype=torch.bool), torch.ones(1)
    with pytest.raises(ConfigError, match="'nope'.*exact, loo, reference"):
        estimate_gradient(s, m, L, estimator="nope")
    with pytest.raises(ConfigError, match="K >= 2"):
        estimate_gradient(s, m, L, estimator="reference")
    with pytest.raises(ConfigError, match="baseline 'mean'"):
        advance_baseline("exact", "mean", 5, None, 1.0)
    with pytest.raises(ConfigError, match="2 masks but 1 losses"):
        estimate_gradient(s, torch.ones(2, 3, dtype=torch.bool), L)


def test_penalty():
    s = torch.tensor([0.2, 0.5, 0.7, 0.0])
    g = penalty_gradient(s, 0.1)
    assert torch.allclose(g[:3], 0.1 * torch.log((1 - s[:3].double()) / s[:3].double()))
    assert g[1] == 0 and g[0] > 0 and g[2] < 0 and math.isfinite(float(g[3]))  # descent pushes towards 0/1
    assert bool((penalty_gradient(s, 0.0) == 0).all())
    assert penalty_weight(5, 10, -1.0, 0.5) == 0.0
    assert penalty_weight(5, 10, 0.1, 0.3) == pytest.approx(0.2)
    m, L = torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1)
    assert torch.allclose(estimate_gradient(s, m, L, 0.0, penalty=0.1), g)  # zero advantage: only the penalty


def test_lr_schedules():
    T = 100
    assert lr_factor("cosine", 0, T) == 1.0 and lr_factor("cosine", 50, T) == pytest.approx(0.5)
    assert lr_factor("cosine", 100, T) == pytest.approx(0.0)
    assert lr_factor("const", 77, T) == 1.0
    assert lr_factor("linear", 25, T) == pytest.approx(0.75)
    assert lr_factor("poly", 50, T) == pytest.approx(0.5 ** 0.9)
    assert lr_factor("exp", 10, T) == pytest.approx(0.995 ** 10)
    assert [lr_factor("step", t, T, milestones=[10, 20]) for t in (9, 10, 25)] == pytest.approx([1, 0.1, 0.01])
    assert make_lr_schedule("cosine", 2e-3, T)(50) == pytest.approx(1e-3)
    with pytest.raises(ConfigError, match="'cosinus'.*cosine, const, linear, poly, exp, step"):
        make_lr_schedule("cosinus", 1e-3, T)


def test_init_map():
    gen = torch.Generator().manual_seed(0)
    metric = torch.randn(3 * 50, generator=gen).exp()
    seg = torch.arange(3).repeat_interleave(50)
    for method in ("sigmap", "norm", "uniform"):
        p = init_probs(metric, 0.7, method=method, segments=seg)
        assert p.dtype == torch.float32 and float(p.min()) >= 0.01 - 1e-6 and float(p.max()) <= 0.99 + 1e-6
        for i in range(3):
            ps, ms = p[seg == i], metric[seg == i]
            assert float(ps.mean()) == pytest.approx(0.7, abs=0.03)
            assert bool((ps[ms.argsort()].diff() >= 0).all())  # monotone in the metric
    p = init_probs(metric, 0.6, method="const", const=1.0, clip_eps=0.0)
    assert set(p.unique().tolist()) == {0.0, 1.0} and int(p.sum()) == 90  # reference: frozen at exactly 0/1
    q = init_probs(metric, 0.6, method="const", const=1.0)
    assert float(q.min()) == pytest.approx(0.01) and float(q.max()) == pytest.approx(0.99)
    assert torch.equal(q > 0.5, metric >= metric.sort().values[60])
    with pytest.raises(ConfigError, match="'wanda'.*sigmap"):
        init_probs(metric, 0.7, method="wanda")
    with pytest.raises(ConfigError, match="keep_ratio"):
        init_probs(metric, 1.5)


def test_disarm_is_unbiased_and_uses_antithetic_pairs():
    from pgprune.search.estimators import antithetic_masks, disarm_gradient

    gen = torch.Generator().manual_seed(0)
    reps, pairs = 20000, 1
    est = torch.empty(reps, S.numel(), dtype=torch.float64)
    for r in range(reps):
        m = torch.stack(antithetic_masks(S, pairs, gen))
        est[r] = disarm_gradient(S, m, toy_loss(m))
    assert_mean_close(est, true_grad())
    # the pair's second mask is the antithetic of the first: at s = 1/2 it is exactly the complement
    half = torch.full((50,), 0.5, dtype=torch.float64)
    a, b = antithetic_masks(half, 1, torch.Generator().manual_seed(1))
    assert torch.equal(a, ~b)
    # a pair with a non-finite loss is left out; odd counts are refused
    m = torch.stack(antithetic_masks(S, 2, gen))
    only_second = disarm_gradient(S, m[2:], toy_loss(m[2:]))
    losses = toy_loss(m)
    losses[1] = float("nan")
    assert torch.equal(disarm_gradient(S, m, losses), only_second)
    with pytest.raises(ConfigError, match="pairs"):
        disarm_gradient(S, m[:3], toy_loss(m[:3]))


def test_disarm_needs_an_even_number_of_samples():
    from pgprune.search import SearchSettings

    with pytest.raises(Exception, match="even number of samples"):
        SearchSettings(estimator="disarm", samples=3)
    assert SearchSettings(estimator="disarm", samples=4).samples == 4


def test_prefix_score_is_unbiased_for_width_policies():
    """Ordered (widths) groups: one uniform per segment keeps a prefix; the score of the width distribution gives
    an unbiased gradient of E[L] w.r.t. the (non-increasing) keep-probabilities."""
    from pgprune.search import GroupSpec
    from pgprune.search.estimators import prefix_score

    seg = torch.tensor([0, 0, 0, 1, 1])
    s = torch.tensor([0.9, 0.6, 0.2, 0.7, 0.3], dtype=torch.float64)
    c = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    spec = GroupSpec(5, float(s.sum()), 0.1, seg, ordered=True)
    gen = torch.Generator().manual_seed(0)
    reps, k = 30000, 4
    est = torch.empty(reps, 5, dtype=torch.float64)
    for r in range(reps):
        m = torch.stack([spec.sample(s, gen) for _ in range(k)])
        losses = m.to(torch.float64) @ c  # linear loss: E[L] = c . s, gradient c
        w = sample_weights(losses, 0.0, estimator="loo")
        est[r] = w @ prefix_score(s, m, seg)
    assert_mean_close(est, c)
    m = torch.stack([spec.sample(s, gen) for _ in range(200)])
    for row in m:  # every sample keeps a prefix of each segment
        for j in range(2):
            part = row[seg == j].tolist()
            assert part == sorted(part, reverse=True)


def test_ordered_projection_is_non_increasing_and_on_budget():
    from pgprune.search import GroupSpec
    from pgprune.search.projection import isotonic_nonincreasing

    seg = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    x = torch.tensor([0.2, 0.9, 0.5, 0.6, 1.4, -0.3, 0.8], dtype=torch.float64)
    iso = isotonic_nonincreasing(x, seg)
    assert iso.tolist() == pytest.approx([0.55, 0.55, 0.55, 0.55, 1.4, 0.25, 0.25])
    p = GroupSpec(7, 3.0, 0.1, seg, ordered=True).project(x)
    assert float(p.sum()) == pytest.approx(3.0, abs=1e-6) and float(p.min()) >= 0 and float(p.max()) <= 1
    for j in range(2):
        part = p[seg == j].tolist()
        assert part == sorted(part, reverse=True)
