"""Budget projection and exact top-k selection."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pgprune.errors import BudgetError
from pgprune.search import project_budget, project_groups, select_top_k

FAST = settings(max_examples=150, deadline=None)


def waterfill(s: list[float], budget: float) -> list[float]:
    """Independent exact solver: f(v) = sum clamp(s - v, 0, 1) is piecewise linear with kinks at s_i and s_i - 1;
    find the interval where it crosses the budget and interpolate linearly."""
    clamp = lambda v: [min(max(x - v, 0.0), 1.0) for x in s]  # noqa: E731
    if sum(clamp(0.0)) <= budget:
        return clamp(0.0)
    f = lambda v: sum(clamp(v)) - budget  # noqa: E731
    kinks = sorted({0.0, *[x for x in s if x > 0], *[x - 1 for x in s if x - 1 > 0]})
    for a, b in zip(kinks, kinks[1:]):
        fa, fb = f(a), f(b)
        if fa >= 0 >= fb:
            v = a if fa == fb else a + (b - a) * fa / (fa - fb)
            return clamp(v)
    raise AssertionError("no crossing found")


@st.composite
def problems(draw):
    n = draw(st.integers(1, 40))
    s = draw(st.lists(st.floats(-0.5, 1.5, allow_nan=False, width=64), min_size=n, max_size=n))
    budget = draw(st.floats(0.0, 1.0)) * n
    return torch.tensor(s, dtype=torch.float64), budget


@FAST
@given(problems())
def test_feasible_and_optimal(prob):
    s, budget = prob
    x = project_budget(s, budget)
    assert x.dtype == s.dtype and x.shape == s.shape
    assert bool((x >= 0).all()) and bool((x <= 1).all())
    assert float(x.sum()) <= budget + 1e-7
    ref = torch.tensor(waterfill(s.tolist(), budget), dtype=torch.float64)
    assert torch.allclose(x, ref, atol=1e-6), (x, ref)
    # KKT: x = clamp(s - v) with v >= 0 and complementary slackness v * (sum x - budget) = 0
    free = (x > 1e-9) & (x < 1 - 1e-9)
    v = float((s - x)[free].mean()) if bool(free.any()) else 0.0
    if bool(free.any()):
        assert torch.allclose(s[free] - x[free], torch.full_like(x[free], v), atol=1e-9)
        assert v >= -1e-9
        assert abs(v * (float(x.sum()) - budget)) < 1e-6


@FAST
@given(problems())
def test_idempotent_and_monotone(prob):
    s, budget = prob
    x = project_budget(s, budget)
    assert torch.equal(project_budget(x, budget), x)
    order = torch.argsort(s)
    assert bool((x[order].diff() >= -1e-12).all())


@FAST
@given(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=30), st.floats(0.0, 1.0))
def test_identity_when_feasible(vals, extra):
    s = torch.tensor(vals, dtype=torch.float64)
    budget = min(float(s.sum()) + extra, s.numel())
    assert torch.equal(project_budget(s, budget), s)  # never pushed up to fill the budget


def test_float32_and_shape_kept():
    s = torch.rand(4, 25, generator=torch.Generator().manual_seed(0))
    x = project_budget(s, 30.0)
    assert x.dtype == torch.float32 and x.shape == (4, 25)
    assert float(x.sum()) == pytest.approx(30.0, abs=1e-4)


def test_budget_validation_and_groups():
    s = torch.rand(10)
    with pytest.raises(BudgetError, match=r"budget 11.0 .*\[0, 10\]"):
        project_budget(s, 11)
    with pytest.raises(BudgetError, match="-1"):
        project_budget(s, -1)
    out = project_groups({"a": s, "b": torch.ones(4)}, {"a": 2.0, "b": 1.0})
    assert float(out["a"].sum()) <= 2.0 + 1e-6 and float(out["b"].sum()) == pytest.approx(1.0)
    with pytest.raises(BudgetError, match="'b'"):
        project_groups({"a": s, "b": s}, {"a": 2.0})


# ---- select_top_k ---------------------------------------------------------------------------------

def test_top_k_ties_exact_count_and_order():
    keep = select_top_k(torch.full((10,), 0.5), 3)
    assert keep.tolist() == [True] * 3 + [False] * 7
    zeros = torch.tensor([0.0] * 8 + [0.3, 0.2])  # reference degeneracy: threshold 0 would keep everything
    keep = select_top_k(zeros, 4)
    assert int(keep.sum()) == 4 and keep[8] and keep[9] and keep[0] and keep[1]
    assert select_top_k(torch.tensor([0.1, 0.9, 0.5]), 2).tolist() == [False, True, True]


def test_top_k_min_per_segment():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1, 0.05, 0.2, 0.01])
    seg = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert select_top_k(scores, 4, segments=seg).tolist() == [True] * 4 + [False] * 4
    keep = select_top_k(scores, 4, segments=seg, min_per_segment=1)
    assert keep.tolist() == [True, True, True, False, False, False, True, False]
    # a segment with no allowed units is exempt; disallowed units are never kept
    allowed = torch.tensor([True] * 4 + [False] * 4)
    keep = select_top_k(scores, 3, segments=seg, min_per_segment=1, allowed=allowed)
    assert keep.tolist() == [True, True, True] + [False] * 5


def test_top_k_errors():
    seg = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(BudgetError, match="k=2 .*reserved"):
        select_top_k(torch.rand(6), 2, segments=seg, min_per_segment=1)
    with pytest.raises(BudgetError, match=r"k=7 .*\[0, 6\]"):
        select_top_k(torch.rand(6), 7)
    with pytest.raises(BudgetError, match="k=-1"):
        select_top_k(torch.rand(6), -1)
    with pytest.raises(BudgetError, match=r"k=5 .*\[0, 4\]"):
        select_top_k(torch.rand(6), 5, allowed=torch.tensor([True] * 4 + [False] * 2))


@FAST
@given(st.lists(st.sampled_from([0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=30), st.data())
def test_top_k_properties(vals, data):
    scores = torch.tensor(vals)
    n = len(vals)
    seg = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    m = data.draw(st.integers(0, 3))
    required = sum(min(m, int((seg == s).sum())) for s in seg.unique())
    k = data.draw(st.integers(required, n))
    keep = select_top_k(scores, k, segments=seg, min_per_segment=m)
    assert int(keep.sum()) == k
    for s in seg.unique():
        assert int(keep[seg == s].sum()) >= min(m, int((seg == s).sum()))
    if m == 0 and 0 < k < n:  # plain top-k: every kept score >= every dropped score
        assert float(scores[keep].min()) >= float(scores[~keep].max())
