"""Budgets are exact; global vs uniform allocation; minimum heads per layer; layer dropping."""
import pytest
import torch
from conftest import make_tiny_model

from pgprune.core.adapters import get_adapter
from pgprune.core.allocation import (
    UnitBlocks,
    boundary_init,
    keep_count,
    keep_counts,
    masks_from_scores,
    ramp_init,
    select_units,
    uniform_quota,
    uniform_sparsity,
    uniform_widths,
)
from pgprune.errors import BudgetError, PgpruneError


@pytest.fixture
def layout():
    return get_adapter(make_tiny_model("llama", n_heads=8, n_kv=4, layers=4, ffn=40)).layout()


def test_keep_counts(layout):
    assert keep_counts(layout, 0.5) == {"heads": 8, "channels": 80, "layers": 4}
    with pytest.raises(BudgetError, match="sparsity=1.2"):
        keep_counts(layout, 1.2)


def test_uniform_quota_is_exact_and_proportional():
    assert uniform_quota([3] * 30, 45) == [2] * 15 + [1] * 15
    assert sum(uniform_quota([5, 7, 11], 9)) == 9
    with pytest.raises(BudgetError):
        uniform_quota([3, 3], 1, minimum=1)


@pytest.mark.parametrize("allocation", ["global", "uniform"])
def test_exact_budget_even_with_ties(layout, allocation):
    scores = {"heads": torch.ones(16), "channels": torch.ones(160)}
    m = masks_from_scores(layout, scores, 0.5, allocation=allocation)
    assert sum(int(h.sum()) for h in m.heads) == 8
    assert sum(int(c.sum()) for c in m.channels) == 80


def test_global_allocation_is_heterogeneous_but_keeps_a_head_per_layer(layout):
    heads = torch.zeros(16)
    heads[:4] = 10.0  # layer 0's groups are by far the best
    chans = torch.arange(160, dtype=torch.float)
    m = masks_from_scores(layout, {"heads": heads, "channels": chans}, 0.5, allocation="global")
    counts = m.kept_counts()
    assert counts["heads"][0] == 4 and min(counts["heads"]) >= 1 and sum(counts["heads"]) == 8
    assert counts["channels"] == [1, 1, 38, 40]  # one reserved per layer, the rest go to the top scores
    u = masks_from_scores(layout, {"heads": heads, "channels": chans}, 0.5, allocation="uniform")
    assert u.kept_counts()["heads"] == [2, 2, 2, 2] and u.kept_counts()["channels"] == [20, 20, 20, 20]


def test_layer_drop_only(layout):
    m = masks_from_scores(layout, {"layers": torch.tensor([4.0, 1.0, 3.0, 2.0])}, 0.5, granularity=("layers",))
    assert m.layers.tolist() == [True, False, True, False]


def test_layers_plus_heads_fill_budget_from_kept_layers(layout):
    scores = {"layers": torch.tensor([4.0, 1.0, 3.0, 2.0]), "heads": torch.rand(16), "channels": torch.rand(160)}
    m = masks_from_scores(layout, scores, 0.5, granularity=("layers", "heads", "channels"), layer_sparsity=0.25)
    assert m.layers.tolist() == [True, False, True, True]
    assert sum(int(m.heads[i].sum()) for i in m.kept_layer_indices()) == 8
    with pytest.raises(BudgetError, match="does not fit"):
        masks_from_scores(layout, scores, 0.1, granularity=("layers", "heads", "channels"), layer_sparsity=0.75)


def test_bad_inputs(layout):
    with pytest.raises(PgpruneError, match="allocation='local'"):
        masks_from_scores(layout, {"heads": torch.ones(16), "channels": torch.ones(160)}, 0.5, allocation="local")
    with pytest.raises(PgpruneError, match="no scores for"):
        masks_from_scores(layout, {"heads": torch.ones(16)}, 0.5)
    with pytest.raises(PgpruneError, match="entries"):
        masks_from_scores(layout, {"heads": torch.ones(3), "channels": torch.ones(160)}, 0.5)


def test_one_rounding_rule_for_every_method():
    """Layers only, 25% of 30 layers: 22.5 rounds to 23 kept for layer_drop and for a layer search alike (the PG
    search used to keep 22 by Python's round-half-even)."""
    lay = get_adapter(make_tiny_model("llama", n_heads=2, n_kv=1, layers=30, hidden=16, ffn=8)).layout()
    assert keep_count(30, 0.75) == 23 and keep_counts(lay, 0.25, granularity=("layers",))["layers"] == 23
    m = masks_from_scores(lay, {"layers": torch.arange(30.0)}, 0.25, granularity=("layers",))
    assert int(m.layers.sum()) == 23
    from pgprune.config import SearchParams
    from pgprune.core.masked_forward import MaskedModel
    from pgprune.pruning.pg import build_search

    mm = MaskedModel(make_tiny_model("llama", n_heads=2, n_kv=1, layers=30, hidden=16, ffn=8))
    search, _, _ = build_search(mm, {"layers": torch.arange(30.0)}, SearchParams(granularity=["layers"],
                                init_map="sigmap"), 0.25)
    assert search.groups["layers"].budget == 23


def test_uniform_layout_widths_are_equal_and_rounded(layout):
    w = uniform_widths(layout, 0.5, round_to=4)
    assert w == {"heads": 2, "channels": 20}
    # heads round to 3 of 4 KV groups (75% kept); the channels take the remainder so the layer keeps ~70%:
    # 24 of 40 channels (3 blocks of 8) is the nearest whole block
    assert uniform_widths(layout, 0.3, round_to=8) == {"heads": 3, "channels": 24}
    w3 = uniform_widths(layout, 0.3, round_to=8)
    assert abs(uniform_sparsity(layout, w3) - 0.3) <= 0.5 * 8 * layout.channel_unit_params() / layout.layer_params(4, 40)
    scores = {"heads": torch.rand(16), "channels": torch.rand(160)}
    m = masks_from_scores(layout, scores, 0.3, layout_kind="uniform", round_to=8)
    assert m.is_uniform() and m.kept_counts()["heads"] == [3] * 4 and m.kept_counts()["channels"] == [24] * 4
    with pytest.raises(BudgetError, match="channel_group=3 does not divide the MLP widths"):
        uniform_widths(layout, 0.3, round_to=3)
    with pytest.raises(BudgetError, match="cannot also drop layers"):
        masks_from_scores(layout, {**scores, "layers": torch.rand(4)}, 0.3, layout_kind="uniform",
                          granularity=("layers", "heads", "channels"), layer_sparsity=0.25)


def test_channel_blocks_group_channels_by_rank(layout):
    ranking = torch.arange(160, dtype=torch.float).flip(0)  # within each layer: lower index = higher score
    b = UnitBlocks.build(layout, ranking, 8)
    assert b.n_blocks == 20 and b.block_layer.tolist() == [i for i in range(4) for _ in range(5)]
    assert b.unit_block[:8].tolist() == [0] * 8 and b.unit_block[40:48].tolist() == [5] * 8
    block_scores = torch.zeros(20)
    block_scores[[0, 6, 12, 18]] = 1.0
    m = masks_from_scores(layout, {"heads": torch.rand(16), "channels": block_scores}, 0.5, blocks={"channels": b},
                          allocation="uniform")
    kept = m.kept_counts()["channels"]
    assert all(k % 8 == 0 for k in kept) and sum(kept) == keep_counts(layout, 0.5, blocks={"channels": b})["channels"] * 8
    assert bool(m.channels[0][:8].all())  # block 0 = layer 0's top-ranked 8 channels
    assert torch.equal(b.expand(b.reduce(torch.arange(160.0))), b.expand(b.reduce(torch.arange(160.0))))
    assert UnitBlocks.build(layout, None, 1).n_blocks == 160
    with pytest.raises(BudgetError, match="channel_group=7"):
        UnitBlocks.build(layout, ranking, 7)


def test_boundary_init_per_layer_quota():
    seg = torch.arange(4).repeat_interleave(10)
    score = torch.rand(40)
    p = boundary_init(score, seg, quota=[4] * 4, const=0.95, free=0.5)
    for j in range(4):
        layer = p[seg == j]
        assert int((layer > 0.5).sum()) == 4  # the top-4 of every layer sit above 0.5
        assert int((layer == 0.55).sum()) == 2 and int((layer == 0.45).sum()) == 2


def test_ramp_init_spreads_each_layer_width_around_the_metric_cut():
    seg = torch.arange(3).repeat_interleave(8)
    score = torch.arange(24, 0, -1).float()  # already in rank order within each layer
    p = ramp_init(score, seg, quota=[4, 4, 4], free=0.5)
    layer = p[:8].tolist()
    assert layer == pytest.approx([1.0, 1.0, 0.875, 0.625, 0.375, 0.125, 0.0, 0.0])
    assert float(p.sum()) == pytest.approx(12.0)  # expected widths = the metric's
    assert select_units(p, seg, k=12).tolist() == select_units(score, seg, quota=[4, 4, 4]).tolist()
    assert ramp_init(score, seg, quota=[4, 4, 4], free=0.0)[:8].tolist() == [1.0] * 4 + [0.0] * 4
