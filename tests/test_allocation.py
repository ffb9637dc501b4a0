"""Budgets are exact; global vs uniform allocation; minimum heads per layer; layer dropping."""
import pytest
import torch

from conftest import make_tiny_model
from pgprune.adapters import get_adapter
from pgprune.allocation import keep_counts, masks_from_scores, uniform_quota
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
