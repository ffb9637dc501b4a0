"""The policy-gradient search on a (tiny) model: exact budgets, layer granularity, validation and selection."""
from functools import partial

import pytest
import torch
from conftest import make_tiny_model

from pgprune.config import SearchParams as _SearchParams
from pgprune.core.adapters import get_adapter

# the paper's units policy on single channels (the tiny models' MLPs are 48 wide), started from the metric's mask
# (init_allocation uniform; SlimGPT's start: tests/test_slimgpt.py); tests override what they study
SearchParams = partial(_SearchParams, init_allocation="uniform", policy="units", channel_group=1,
                       init_free_channels=0.0, lr_channels=0.02)
from pgprune.core.allocation import masks_from_scores
from pgprune.core.masked_forward import MaskedModel
from pgprune.core.masks import sparsity_report
from pgprune.errors import PgpruneError
from pgprune.pruning.pg import build_search, hard_masks, run_pg_search
from pgprune.scorers import compute_scores


@pytest.fixture(scope="module")
def setup():
    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=4, hidden=32, ffn=48)
    calib = torch.randint(0, 300, (24, 16), generator=torch.Generator().manual_seed(0))
    return model, calib, compute_scores("magnitude", model, calib)


def test_heads_and_channels_exact_budget_and_best_selection(setup):
    model, calib, scores = setup
    p = SearchParams(steps=8, batch_size=4, val_blocks=8, validate_every=4, init="magnitude",
                     compensation="none", lr_heads=0.3, lr_channels=0.3)
    out = run_pg_search(model, calib, scores, p, sparsity=0.5, progress=False)
    rep = sparsity_report(get_adapter(model).layout(), out.masks)
    assert rep["kv_groups_kept"] == 4 and rep["channels_kept"] == 96
    assert rep["prunable_sparsity"] == pytest.approx(0.5)
    assert [v["step"] for v in out.result.validation] == [0, 4, 8]
    best = min(out.result.validation, key=lambda v: v["val_loss"])
    assert out.result.best_step == best["step"]
    assert len(out.result.history) == 8 and all(h["n_valid"] == 2 for h in out.result.history)


def test_the_start_is_validated_and_returned_when_no_step_beats_it(setup):
    """The start (the init scores' hard mask) is validated before the first step: a search that cannot improve on
    it (learning rates ~0: the hard masks never move) returns exactly the start, as step 0."""
    model, calib, scores = setup
    p = SearchParams(steps=8, batch_size=4, val_blocks=8, validate_every=4, init="magnitude",
                     compensation="none", lr_heads=1e-12, lr_channels=1e-12)
    out = run_pg_search(model, calib, scores, p, sparsity=0.5, progress=False)
    assert out.result.validation[0]["step"] == 0 and out.result.best_step == 0
    search, _, bl = build_search(MaskedModel(model), scores, p, 0.5)
    start = hard_masks(get_adapter(model).layout(), search.init_probs, p, 0.5, blocks=bl)
    assert out.masks.to_json() == start.to_json()


def test_layer_granularity_drops_layers_and_keeps_total_budget(setup):
    model, calib, scores = setup
    p = SearchParams(steps=4, batch_size=4, val_blocks=8, init="magnitude", compensation="none",
                     granularity=["heads", "channels", "layers"], layer_sparsity=0.25)
    out = run_pg_search(model, calib, scores, p, sparsity=0.5, progress=False)
    assert int(out.masks.layers.sum()) == 3
    kept = out.masks.kept_layer_indices()
    assert sum(int(out.masks.heads[i].sum()) for i in kept) == 4
    assert sum(int(out.masks.channels[i].sum()) for i in kept) == 96
    only = SearchParams(steps=4, batch_size=4, val_blocks=8, init="magnitude", compensation="none",
                        granularity=["layers"], init_map="sigmap")
    out2 = run_pg_search(model, calib, scores, only, sparsity=0.5, progress=False)
    assert int(out2.masks.layers.sum()) == 2 and all(int(h.sum()) == 2 for h in out2.masks.heads)


def test_too_few_calibration_blocks_is_named(setup):
    model, calib, scores = setup
    p = SearchParams(steps=2, val_blocks=64, init="magnitude", compensation="none")
    with pytest.raises(PgpruneError, match="search.val_blocks=64"):
        run_pg_search(model, calib, scores, p, sparsity=0.3, progress=False)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_const_init_starts_exactly_at_the_metric_baseline_mask(setup, allocation):
    """init_map: const puts init_const on exactly the baseline's units (same allocation, exact budget), so the
    search's step-0 hard mask is the metric baseline itself, even where round(r * n) per layer would undershoot."""
    model, calib, scores = setup
    p = SearchParams(init="magnitude", init_map="const", init_allocation=allocation, init_const=0.9,
                     init_free_heads=0.0, compensation="none")
    layout = get_adapter(model).layout()
    search, probs, _ = build_search(MaskedModel(model), scores, p, 0.3)
    baseline = masks_from_scores(layout, scores, 0.3, allocation=allocation)
    for g in ("heads", "channels"):
        assert probs[g].unique().tolist() == pytest.approx([0.1, 0.9])
    start = hard_masks(layout, search.init_probs, p, 0.3)
    for a, b in zip(start.heads + start.channels, baseline.heads + baseline.channels):
        assert torch.equal(a, b)


@pytest.mark.parametrize("allocation", ["uniform", "global"])
def test_free_boundary_init_starts_at_the_baseline_with_undecided_units_at_the_cut(setup, allocation):
    """init_free_<group>: the metric's surest units at init_const, about free*k units on each side of the cut at
    0.55 (kept) / 0.45 (pruned), the rest at 1 - init_const; the step-0 hard mask is still the baseline's."""
    model, calib, scores = setup
    p = SearchParams(init="magnitude", init_map="const", init_allocation=allocation, init_const=0.95,
                     init_free_channels=0.25, init_free_heads=0.5, init_free_margin=0.05, compensation="none")
    layout = get_adapter(model).layout()
    search, probs, _ = build_search(MaskedModel(model), scores, p, 0.5)
    baseline = masks_from_scores(layout, scores, 0.5, allocation=allocation)
    keep = torch.cat(baseline.channels)
    ch = probs["channels"]
    k = int(keep.sum())  # 96 of 192
    assert sorted(set(ch[keep].tolist())) == pytest.approx([0.55, 0.95])
    assert sorted(set(ch[~keep].tolist())) == pytest.approx([0.05, 0.45])
    assert int((ch == 0.55).sum()) == round(0.25 * k) == int((ch == 0.45).sum())
    # the undecided kept channels are the baseline's lowest-scored ones (within a layer for uniform allocation)
    score = scores["channels"].float()
    for i, c in enumerate(baseline.channels):
        layer = slice(i * 48, (i + 1) * 48)
        s_l, p_l = score[layer], ch[layer]
        if allocation == "uniform" and (p_l == 0.55).any() and (p_l == 0.95).any():
            assert s_l[p_l == 0.55].max() <= s_l[p_l == 0.95].min()
    start = hard_masks(layout, search.init_probs, p, 0.5)
    for a, b in zip(start.heads + start.channels, baseline.heads + baseline.channels):
        assert torch.equal(a, b)
    assert int((probs["heads"] > 0.5).sum()) == 4  # heads: 4 of 8 kept, still at least one per layer
    with pytest.raises(PgpruneError, match="free=1.5"):
        from pgprune.core.allocation import boundary_init
        boundary_init(scores["heads"], torch.arange(4).repeat_interleave(2), k=4, free=1.5)


def test_a_changed_setting_never_returns_a_stale_result(setup, tmp_path):
    """The bug of issue 9: a checkpoint of batch_size 4 was returned for batch_size 16. Now the checkpoint is keyed
    by every setting: the second search is a fresh one and equals a search without any checkpoint."""
    model, calib, scores = setup
    kw = dict(steps=6, val_blocks=4, init="magnitude", compensation="none", lr_heads=0.3, lr_channels=0.3,
              init_free_heads=0.5, init_free_channels=0.5, checkpoint_every=2)
    a = run_pg_search(model, calib, scores, SearchParams(batch_size=4, **kw), sparsity=0.5, progress=False,
                      checkpoint_dir=tmp_path, stop_after=4)
    assert not a.result.completed and list(tmp_path.glob("search-*.ckpt"))
    b = run_pg_search(model, calib, scores, SearchParams(batch_size=16, **kw), sparsity=0.5, progress=False,
                      checkpoint_dir=tmp_path)
    fresh = run_pg_search(model, calib, scores, SearchParams(batch_size=16, **kw), sparsity=0.5, progress=False)
    assert b.result.resumed_from == 0 and b.result.history == fresh.result.history
    assert b.masks.to_json() == fresh.masks.to_json()
    # the model's weights, its dtype and the calibration data are part of the key as well
    other = make_tiny_model("llama", seed=1, n_heads=4, n_kv=2, layers=4, hidden=32, ffn=48)
    c = run_pg_search(other, calib, scores, SearchParams(batch_size=4, **kw), sparsity=0.5, progress=False,
                      checkpoint_dir=tmp_path)
    assert c.result.resumed_from == 0
    d = run_pg_search(model, calib.flip(0), scores, SearchParams(batch_size=4, **kw), sparsity=0.5, progress=False,
                      checkpoint_dir=tmp_path)
    assert d.result.resumed_from == 0
    e = run_pg_search(model, calib, scores, SearchParams(batch_size=4, **kw), sparsity=0.5, progress=False,
                      checkpoint_dir=tmp_path)
    assert e.result.resumed_from == 4  # the very same search resumes


def test_uniform_layout_search_keeps_equal_widths(setup):
    model, calib, scores = setup
    p = SearchParams(steps=6, batch_size=4, val_blocks=4, init="magnitude", compensation="none",
                     init_free_heads=0.5, init_free_channels=0.5, lr_heads=0.3, lr_channels=0.3, channel_group=4)
    out = run_pg_search(model, calib, scores, p, sparsity=0.5, layout="uniform", progress=False)
    counts = out.masks.kept_counts()
    assert out.masks.is_uniform() and counts["heads"] == [1] * 4 and counts["channels"] == [24] * 4
    groups = out.result.groups
    assert groups["channels"].segment_budgets == (6.0,) * 4 and groups["heads"].segment_budgets == (1.0,) * 4
    with pytest.raises(PgpruneError, match="uniform layout searches heads and channels"):
        run_pg_search(model, calib, scores, SearchParams(granularity=["heads", "layers"], layer_sparsity=0.25,
                                                         init="magnitude", compensation="none",
                                                         batch_size=4, val_blocks=4),
                      sparsity=0.5, layout="uniform", progress=False)


def test_channel_groups_keep_whole_blocks(setup):
    model, calib, scores = setup
    p = SearchParams(steps=6, batch_size=4, val_blocks=4, init="magnitude", compensation="none",
                     init_free_channels=0.5, lr_channels=0.3, channel_group=8)
    out = run_pg_search(model, calib, scores, p, sparsity=0.5, progress=False)
    assert out.blocks["channels"].n_blocks == 24 and out.result.groups["channels"].size == 24
    kept = out.masks.kept_counts()["channels"]
    assert all(k % 8 == 0 for k in kept) and sum(kept) == 96
    for i, c in enumerate(out.masks.channels):  # every block is kept or removed whole
        ids = out.blocks["channels"].unit_block[i * 48:(i + 1) * 48]
        for b in ids.unique():
            assert c[ids == b].all() or not c[ids == b].any()


def test_samples_split_over_devices_give_the_same_search(setup):
    """search.devices: the K samples of every step run on replicas (here two CPU 'devices'), only losses come
    back; the search is identical to the single-device one."""
    model, calib, scores = setup
    kw = dict(steps=4, samples=4, batch_size=4, val_blocks=4, init="magnitude", compensation="none",
              init_free_heads=0.5, lr_heads=0.3, sample_mode="separate")
    one = run_pg_search(model, calib, scores, SearchParams(**kw), sparsity=0.5, progress=False)
    two = run_pg_search(model, calib, scores, SearchParams(devices=["cpu", "cpu"], **kw), sparsity=0.5,
                        progress=False)
    assert [h["loss_mean"] for h in one.result.history] == [h["loss_mean"] for h in two.result.history]
    assert one.masks.to_json() == two.masks.to_json()


def test_widths_policy_keeps_prefixes_of_the_metric_order(setup):
    """policy: widths: every sampled mask and the result keep, in every layer, the metric's best units (a prefix
    of its rank order); only how many each layer keeps is searched. Step 0 is still the metric's mask."""
    model, calib, scores = setup
    p = SearchParams(steps=6, batch_size=4, val_blocks=4, init="magnitude", compensation="none",
                     policy="widths", channel_group=8, init_free_heads=0.5, init_free_channels=0.5,
                     init_free_margin=0.25, lr_heads=0.3, lr_channels=0.3)
    layout = get_adapter(model).layout()
    layout_kind = "heterogeneous"
    seen = []
    masked = MaskedModel(model)
    uniform, _, _ = build_search(masked, scores, p, 0.5, layout="uniform")
    assert not uniform.groups["channels"].ordered  # fixed widths: the uniform layout searches which units
    search, probs, blocks = build_search(masked, scores, p, 0.5, layout=layout_kind)
    assert search.groups["heads"].ordered and search.groups["channels"].ordered
    start = hard_masks(layout, search.init_probs, p, 0.5, layout_kind=layout_kind, blocks=blocks)
    base = masks_from_scores(layout, scores, 0.5, allocation="uniform", layout_kind=layout_kind,
                             blocks={"channels": blocks["channels"]})
    assert start.to_json() == base.to_json()
    from pgprune.pruning.pg import make_losses_fn

    losses = make_losses_fn(masked, calib, 4, blocks=blocks)

    def spy(masks, step):
        seen.extend(masks)
        return losses(masks, step)

    result = search.run(spy, progress=False)
    ranks = {g: blocks[g].unit_block for g in ("heads", "channels")}
    for flat in seen:
        for g in ("heads", "channels"):
            kept = flat[g]  # over blocks, in rank order within each layer
            for j in range(layout.num_layers):
                part = kept[blocks[g].block_layer == j].tolist()
                assert part == sorted(part, reverse=True), (g, j, part)
    out = hard_masks(layout, result.probs, p, 0.5, layout_kind=layout_kind, blocks=blocks)
    order = scores["channels"].float()
    for i, c in enumerate(out.channels):  # the kept channels of a layer are its best-ranked blocks
        sl = slice(i * 48, (i + 1) * 48)
        if c.any() and (~c).any():
            assert order[sl][c].min() >= order[sl][~c].max() - 1e-6
    assert int(sum(h.sum() for h in out.heads)) == 4
    assert ranks["heads"].numel() == 8
    with pytest.raises(Exception, match="policy 'widths'"):
        SearchParams(policy="widths", estimator="disarm")
