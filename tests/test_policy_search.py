"""PolicyGradientSearch on synthetic problems: optimum found, determinism, resume, NaN handling, settings."""
from __future__ import annotations

import random
import warnings

import pytest
import torch
from pydantic import ValidationError

from pgprune.errors import BudgetError, ConfigError, NaNLossError
from pgprune.search import GroupSpec, PolicyGradientSearch, SearchSettings, select_top_k

N, B = 40, 16


def make_w(seed: int = 0, top_among: int = N) -> torch.Tensor:
    """Unit importances: 16 units (among the first ``top_among``) in [0.7, 1.2], the others in [0, 0.3]."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(top_among, generator=g).tolist()
    perm = torch.tensor(perm[:B] + perm[B:] + list(range(top_among, N)))
    w = torch.empty(N, dtype=torch.float64)
    w[perm[:B]] = 0.7 + 0.5 * torch.rand(B, generator=g, dtype=torch.float64)
    w[perm[B:]] = 0.3 * torch.rand(N - B, generator=g, dtype=torch.float64)
    return w


def make_loss(w: torch.Tensor, noise: float = 0.1):
    """loss(m) = sum_i w_i (1 - m_i) + deterministic noise of (step, sample); minimised by the top-16 w."""
    def loss_fn(masks, step, sample):
        return float((w * (1 - masks["u"].double())).sum()) + random.Random(step * 997 + sample).gauss(0, noise)
    return loss_fn


def make_search(seg=None, lr=0.005, init=0.4, **kw) -> PolicyGradientSearch:
    kw = {"steps": 400, "samples": 8, **kw}
    return PolicyGradientSearch({"u": GroupSpec(N, B, lr, seg)}, {"u": torch.full((N,), init)}, SearchSettings(**kw))


@pytest.mark.parametrize("estimator", ["exact", "loo", "reference"])
def test_finds_top_k_optimum(estimator):
    w = make_w(3)
    res = make_search(estimator=estimator, seed=3).run(make_loss(w), progress=False)
    assert res.completed and res.steps_done == 400 and len(res.history) == 400
    assert torch.equal(res.final_masks({"u": B})["u"], select_top_k(w, B))
    assert torch.equal(res.final_masks()["u"], select_top_k(w, B))  # default k = floor(budget)
    p = res.probs["u"]
    assert float(p.sum()) <= B + 1e-4 and float(p.min()) >= 0 and float(p.max()) <= 1
    assert float(p[select_top_k(w, B)].min()) > 0.5 > float(p[~select_top_k(w, B)].max())
    h = res.history[-1]
    assert {"step", "loss_mean", "loss_min", "baseline", "lr", "n_valid", "u/prob_sum", "u/prob_mean",
            "u/entropy", "u/lr"} <= set(h)
    assert h["n_valid"] == 8 and h["loss_min"] <= h["loss_mean"] and h["u/prob_sum"] <= B + 1e-4
    assert res.history[0]["lr"] == 1.0 and h["lr"] < 1e-3  # cosine
    assert res.history[-1]["loss_mean"] < res.history[0]["loss_mean"]


def test_min_per_segment_in_final_masks():
    w = make_w(5, top_among=30)
    seg = torch.arange(N) // 10  # segment 3 (units 30..39) holds no unit of the unconstrained optimum
    top = select_top_k(w, B)
    assert int(top[seg == 3].sum()) == 0
    res = make_search(seg, seed=5).run(make_loss(w), progress=False)
    assert torch.equal(res.final_masks()["u"], top)
    masks = res.final_masks({"u": B}, {"u": 2})["u"]
    assert int(masks.sum()) == B
    assert all(int(masks[seg == s].sum()) >= 2 for s in range(4))
    assert bool(top[masks & (seg != 3)].all())  # the 14 other slots come from the optimum
    with pytest.raises(BudgetError, match="reserved"):
        res.final_masks({"u": 7}, {"u": 2})
    with pytest.raises(ConfigError, match="unknown group"):
        res.final_masks({"v": 3})


def test_determinism_and_seed():
    w = make_w(1)
    a = make_search(steps=30, seed=7).run(make_loss(w), progress=False)
    b = make_search(steps=30, seed=7).run(make_loss(w), progress=False)
    c = make_search(steps=30, seed=8).run(make_loss(w), progress=False)
    assert torch.equal(a.probs["u"], b.probs["u"]) and a.history == b.history
    assert not torch.equal(a.probs["u"], c.probs["u"])


def test_checkpoint_resume_bit_identical(tmp_path):
    w = make_w(2)
    kw = dict(steps=40, seed=11, checkpoint_every=5, estimator="reference", penalty_init=0.01, penalty_final=0.1)
    full = make_search(**kw).run(make_loss(w), progress=False)
    ckpt = tmp_path / "search.pt"
    part = make_search(**kw).run(make_loss(w), checkpoint_path=ckpt, progress=False, stop_after=17)
    assert not part.completed and part.steps_done == 17 and ckpt.exists()
    steps_seen = []
    resumed = make_search(**kw).run(make_loss(w), checkpoint_path=ckpt, progress=False,
                                    on_step=lambda e: steps_seen.append(e["step"]))
    assert steps_seen == list(range(17, 40))
    assert resumed.completed and torch.equal(resumed.probs["u"], full.probs["u"])
    assert resumed.history == full.history
    # a finished checkpoint just returns the result; operational settings do not change the fingerprint
    again = make_search(**{**kw, "checkpoint_every": 0}).run(make_loss(w), checkpoint_path=ckpt, progress=False,
                                                             on_step=lambda e: pytest.fail("no step expected"))
    assert torch.equal(again.probs["u"], full.probs["u"])
    # the search time is summed over the interrupted and the resumed run, not restarted by a resume
    assert again.elapsed_s >= resumed.elapsed_s >= part.elapsed_s > 0
    assert torch.load(ckpt, weights_only=True)["elapsed_s"] == pytest.approx(resumed.elapsed_s, rel=0.5, abs=0.05)
    with pytest.raises(ConfigError, match="delete the checkpoint.*restore the settings"):
        make_search(**{**kw, "seed": 12}).run(make_loss(w), checkpoint_path=ckpt, progress=False)
    with pytest.raises(ConfigError, match="different search settings"):
        make_search(init=0.3, **kw).run(make_loss(w), checkpoint_path=ckpt, progress=False)


def test_keyboard_interrupt_saves_and_resumes(tmp_path):
    w = make_w(4)
    full = make_search(steps=25, seed=1).run(make_loss(w), progress=False)
    base = make_loss(w)

    def flaky(masks, step, sample):
        if step == 9 and sample == 3:
            raise KeyboardInterrupt
        return base(masks, step, sample)

    ckpt = tmp_path / "search.pt"
    with pytest.raises(KeyboardInterrupt):
        make_search(steps=25, seed=1).run(flaky, checkpoint_path=ckpt, progress=False)
    assert torch.load(ckpt, weights_only=True)["step"] == 9
    resumed = make_search(steps=25, seed=1).run(base, checkpoint_path=ckpt, progress=False)
    assert torch.equal(resumed.probs["u"], full.probs["u"])


def test_nan_samples_are_dropped_with_warning():
    w = make_w(0)
    base = make_loss(w)

    def some_nan(masks, step, sample):
        if step == 3 and sample < 2 or step == 5:
            return float("nan") if sample % 2 else float("inf")
        return base(masks, step, sample)

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        res = make_search(steps=8).run(some_nan, progress=False)
    msgs = [str(r.message) for r in rec if issubclass(r.category, RuntimeWarning)]
    assert len(msgs) == 2 and "search step 3: 2/8" in msgs[0] and "dropped" in msgs[0]
    assert "search step 5: 8/8" in msgs[1] and "skipped" in msgs[1]
    assert res.history[3]["n_valid"] == 6 and res.history[5]["n_valid"] == 0
    assert res.history[5]["loss_mean"] is None and res.history[5]["u/prob_sum"] == res.history[4]["u/prob_sum"]
    assert res.completed and bool(torch.isfinite(res.probs["u"]).all())


def test_all_nan_forever_raises():
    search = make_search(steps=100, max_consecutive_nan_steps=4)
    calls = []

    def always_nan(masks, step, sample):
        calls.append(step)
        return float("nan")

    with pytest.warns(RuntimeWarning), pytest.raises(NaNLossError, match="4 consecutive steps"):
        search.run(always_nan, progress=False)
    assert max(calls) == 3


@pytest.mark.parametrize("bad, field", [
    ({"samples": 0}, "samples"), ({"steps": 0}, "steps"), ({"estimator": "vanilla"}, "estimator"),
    ({"estimator": "loo", "samples": 1}, "samples"), ({"lr_schedule": "cosinus"}, "lr_schedule"),
    ({"ema_window": 0.5}, "ema_window"), ({"eps": 0.7}, "eps"), ({"stepz": 3}, "stepz"),
])
def test_bad_settings_name_the_field(bad, field):
    with pytest.raises(ValidationError, match=field):
        SearchSettings(**{"steps": 10, **bad})
    with pytest.raises(ConfigError, match=field):
        SearchSettings.parse({"steps": 10, **bad})


def test_bad_groups():
    with pytest.raises(BudgetError, match=r"budget 50 .*\[0, 40\]"):
        GroupSpec(N, 50, 0.01)
    with pytest.raises(ConfigError, match="lr"):
        GroupSpec(N, 10, -1.0)
    with pytest.raises(ConfigError, match="segments"):
        GroupSpec(N, 10, 0.1, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ConfigError, match="differ"):
        PolicyGradientSearch({"u": GroupSpec(N, B, 0.1)}, {"v": torch.rand(N)}, {"steps": 3})
    with pytest.raises(ConfigError, match="39 entries"):
        PolicyGradientSearch({"u": GroupSpec(N, B, 0.1)}, {"u": torch.rand(N - 1)}, {"steps": 3})
    # infeasible initial probabilities are projected onto the budget
    s = PolicyGradientSearch({"u": GroupSpec(N, B, 0.1)}, {"u": torch.full((N,), 0.9)}, {"steps": 3})
    assert float(s.init_probs["u"].sum()) == pytest.approx(B, abs=1e-4)
