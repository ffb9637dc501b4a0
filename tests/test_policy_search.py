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


def one_loss(w: torch.Tensor, noise: float = 0.1):
    """loss(m) = sum_i w_i (1 - m_i) + deterministic noise of (step, sample); minimised by the top-16 w."""
    def loss(mask, step, sample):
        return float((w * (1 - mask["u"].double())).sum()) + random.Random(step * 997 + sample).gauss(0, noise)
    return loss


def per_sample(loss):
    """losses_fn(masks of the K samples, step) from a one-sample loss(mask, step, sample)."""
    return lambda masks, step: [loss(m, step, j) for j, m in enumerate(masks)]


def make_loss(w: torch.Tensor, noise: float = 0.1):
    return per_sample(one_loss(w, noise))


def make_search(seg=None, lr=0.005, init=0.4, seed=42, **kw) -> PolicyGradientSearch:
    kw = {"steps": 400, "samples": 8, **kw}
    return PolicyGradientSearch({"u": GroupSpec(N, B, lr, seg)}, {"u": torch.full((N,), init)}, SearchSettings(**kw),
                                seed=seed)


@pytest.mark.parametrize("estimator", ["exact", "loo", "reference", "disarm"])
def test_finds_top_k_optimum(estimator):
    w = make_w(3)
    res = make_search(estimator=estimator, seed=3).run(make_loss(w), progress=False)
    assert res.completed and res.steps_done == 400 and len(res.history) == 400
    assert torch.equal(select_top_k(res.probs["u"], B), select_top_k(w, B))
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
    assert torch.equal(select_top_k(res.probs["u"], B), top)
    masks = select_top_k(res.probs["u"], B, segments=seg, min_per_segment=2)
    assert int(masks.sum()) == B
    assert all(int(masks[seg == s].sum()) >= 2 for s in range(4))
    assert bool(top[masks & (seg != 3)].all())  # the 14 other slots come from the optimum
    with pytest.raises(BudgetError, match="reserved"):
        select_top_k(res.probs["u"], 7, segments=seg, min_per_segment=2)


def test_segment_budgets_keep_every_segment_at_its_own_budget():
    """The uniform layout: each segment (layer) is projected onto its own budget, so every layer keeps 4."""
    w = make_w(6)
    seg = torch.arange(N) // 10
    spec = GroupSpec(N, B, 0.005, seg, segment_budgets=(4.0, 4.0, 4.0, 4.0))
    res = PolicyGradientSearch({"u": spec}, {"u": torch.full((N,), 0.4)}, SearchSettings(steps=300, samples=8),
                               seed=6).run(make_loss(w), progress=False)
    p = res.probs["u"]
    for j in range(4):
        assert float(p[seg == j].sum()) <= 4 + 1e-4
        top_j = select_top_k(w[seg == j], 4)
        assert torch.equal(select_top_k(p[seg == j], 4), top_j)
    with pytest.raises(BudgetError, match="segment budgets sum to 15"):
        GroupSpec(N, B, 0.1, seg, segment_budgets=(4.0, 4.0, 4.0, 3.0))


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
    part = make_search(**kw).run(make_loss(w), checkpoint_dir=tmp_path, progress=False, stop_after=17)
    ckpt = make_search(**kw).checkpoint_file(tmp_path)
    assert not part.completed and part.steps_done == 17 and ckpt.exists()
    steps_seen = []
    resumed = make_search(**kw).run(make_loss(w), checkpoint_dir=tmp_path, progress=False,
                                    on_step=lambda e: steps_seen.append(e["step"]))
    assert steps_seen == list(range(17, 40)) and resumed.resumed_from == 17
    assert resumed.completed and torch.equal(resumed.probs["u"], full.probs["u"])
    assert resumed.history == full.history
    assert resumed.forward_passes == full.forward_passes == 40 * 8
    # the search time is summed over the interrupted and the resumed run, not restarted by a resume
    assert resumed.elapsed_s >= part.elapsed_s > 0
    assert not ckpt.exists()  # a completed search removes its checkpoint


def test_checkpoints_are_keyed_by_every_setting_seed_and_caller_key(tmp_path):
    w = make_w(2)
    kw = dict(steps=20, checkpoint_every=5)
    base = make_search(**kw)
    names = {base.checkpoint_file(tmp_path).name,
             make_search(**kw, seed=12).checkpoint_file(tmp_path).name,
             make_search(**{**kw, "samples": 4}).checkpoint_file(tmp_path).name,
             make_search(init=0.3, **kw).checkpoint_file(tmp_path).name,
             PolicyGradientSearch({"u": GroupSpec(N, B, 0.005)}, {"u": torch.full((N,), 0.4)},
                                  SearchSettings(steps=20, samples=8, checkpoint_every=5), seed=42,
                                  key="other model").checkpoint_file(tmp_path).name}
    assert len(names) == 5
    # operational settings (checkpoint_every) do not change the key: resuming with another interval is allowed
    assert make_search(steps=20, checkpoint_every=3).checkpoint_file(tmp_path) == base.checkpoint_file(tmp_path)
    make_search(**kw).run(make_loss(w), checkpoint_dir=tmp_path, progress=False, stop_after=10)
    other = make_search(**{**kw, "samples": 4}).run(make_loss(w), checkpoint_dir=tmp_path, progress=False)
    assert other.resumed_from == 0  # another search never picks up this checkpoint
    assert base.checkpoint_file(tmp_path).exists()


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage", "flip", "foreign"])
def test_damaged_checkpoint_is_moved_aside_and_the_search_restarts(tmp_path, damage):
    w = make_w(2)
    kw = dict(steps=20, seed=3, checkpoint_every=5)
    full = make_search(**kw).run(make_loss(w), progress=False)
    make_search(**kw).run(make_loss(w), checkpoint_dir=tmp_path, progress=False, stop_after=10)
    ckpt = make_search(**kw).checkpoint_file(tmp_path)
    raw = ckpt.read_bytes()
    if damage == "truncate":
        ckpt.write_bytes(raw[: len(raw) // 2])
    elif damage == "empty":
        ckpt.write_bytes(b"")
    elif damage == "garbage":
        ckpt.write_bytes(b"\x00\x01 not a checkpoint at all" * 50)
    elif damage == "flip":  # one flipped byte deep in the payload: the state would silently differ
        b = bytearray(raw)
        b[-200] ^= 0xFF
        ckpt.write_bytes(bytes(b))
    else:  # a checkpoint of another search copied under this name
        make_search(**{**kw, "seed": 4}).run(make_loss(w), checkpoint_dir=tmp_path / "o", progress=False,
                                             stop_after=10)
        ckpt.write_bytes(make_search(**{**kw, "seed": 4}).checkpoint_file(tmp_path / "o").read_bytes())
    with pytest.warns(RuntimeWarning, match=r"starting the search over") as rec:
        res = make_search(**kw).run(make_loss(w), checkpoint_dir=tmp_path, progress=False)
    assert str(ckpt) in str(rec[0].message)
    assert res.resumed_from == 0 and torch.equal(res.probs["u"], full.probs["u"])
    assert len(list(tmp_path.glob(ckpt.name + ".damaged-*"))) == 1  # kept for inspection, not deleted


def test_keyboard_interrupt_saves_and_resumes(tmp_path):
    w = make_w(4)
    full = make_search(steps=25, seed=1).run(make_loss(w), progress=False)
    base = make_loss(w)

    def flaky(masks, step):
        if step == 9:
            raise KeyboardInterrupt
        return base(masks, step)

    with pytest.raises(KeyboardInterrupt):
        make_search(steps=25, seed=1).run(flaky, checkpoint_dir=tmp_path, progress=False)
    assert make_search(steps=25, seed=1)._load(make_search(steps=25, seed=1).checkpoint_file(tmp_path))["step"] == 9
    resumed = make_search(steps=25, seed=1).run(base, checkpoint_dir=tmp_path, progress=False)
    assert resumed.resumed_from == 9 and torch.equal(resumed.probs["u"], full.probs["u"])


def test_nan_samples_are_dropped_with_warning():
    w = make_w(0)
    base = one_loss(w)

    @per_sample
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

    def always_nan(masks, step):
        calls.append(step)
        return [float("nan")] * len(masks)

    with pytest.warns(RuntimeWarning), pytest.raises(NaNLossError, match="4 consecutive steps"):
        search.run(always_nan, progress=False)
    assert max(calls) == 3


@pytest.mark.parametrize("bad, field", [
    ({"samples": 0}, "samples"), ({"steps": 0}, "steps"), ({"estimator": "vanilla"}, "estimator"),
    ({"estimator": "loo", "samples": 1}, "samples"), ({"lr_schedule": "cosinus"}, "lr_schedule"),
    ({"ema_window": 0.5}, "ema_window"), ({"eps": 0.7}, "eps"), ({"stepz": 3}, "stepz"),
    ({"lr_schedule": "step"}, "lr_milestones"), ({"lr_milestones": [3]}, "lr_milestones"),
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


def test_step_schedule_uses_its_milestones():
    w = make_w(1)
    res = make_search(steps=12, lr_schedule="step", lr_milestones=[4, 8]).run(make_loss(w), progress=False)
    assert [round(h["lr"], 6) for h in res.history] == [1.0] * 4 + [0.1] * 4 + [0.01] * 4


def test_patience_stops_at_the_stale_validation_and_keeps_the_unstopped_best(tmp_path):
    """search.patience: the search ends at the validation that makes ``patience`` in a row without a new best; its
    steps up to there and its best probabilities are those of the search run to the end (which a later validation
    does not beat here)."""
    w = make_w(7)
    script = [1.0, 0.9, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8, 1.9]  # best at the 2nd validation (step 10)

    def scripted():
        calls = iter(script)
        return lambda probs: next(calls)

    full = make_search(steps=100, patience=0).run(make_loss(w), progress=False, validate_fn=scripted(),
                                                  validate_every=10)
    early = make_search(steps=100, patience=3).run(make_loss(w), progress=False, validate_fn=scripted(),
                                                   validate_every=10, checkpoint_dir=tmp_path)
    assert full.steps_done == 100 and not full.stopped_early and full.best_step == 10
    assert early.completed and early.stopped_early and early.steps_done == 40 and early.best_step == 10
    assert [v["step"] for v in early.validation] == [0, 10, 20, 30, 40]
    assert torch.equal(early.best_probs["u"], full.best_probs["u"])
    assert early.history == full.history[:40]
    assert not list(tmp_path.iterdir())  # completed: no checkpoint left
    # a new best resets the count: 1.0, 0.9, 1.1, 0.8 (step 30), then three worse -> stop at step 60
    script[:] = [1.0, 0.9, 1.1, 0.8, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]
    again = make_search(steps=100, patience=3).run(make_loss(w), progress=False, validate_fn=scripted(),
                                                   validate_every=10)
    assert again.steps_done == 60 and again.best_step == 30
    # patience is part of the fingerprint (it changes what a search returns)
    assert make_search(patience=3).fingerprint != make_search(patience=4).fingerprint


def test_patience_counts_periodic_validations_only():
    """Without periodic validation (validate_every 0: the start and the end only) patience never stops a search."""
    w = make_w(7)
    calls = iter([1.0, 2.0])
    res = make_search(steps=30, patience=1).run(make_loss(w), progress=False, validate_fn=lambda probs: next(calls),
                                                validate_every=0)
    assert res.steps_done == 30 and not res.stopped_early and res.best_step == 0
    assert [v["step"] for v in res.validation] == [0, 30]
