"""search.at_sparsity: settings by sparsity and layout, resolved where a search meets its sparsity."""
import pytest
import torch
from conftest import make_tiny_model

from pgprune.api import build_params
from pgprune.config import SearchParams
from pgprune.errors import ConfigError
from pgprune.pruning.pg import run_pg_search
from pgprune.scorers import compute_scores

UNITS = {"policy": "units", "channel_group": 1, "init_free_channels": 0.0, "lr_channels": 0.02}


def test_rules_apply_up_to_their_sparsity_and_in_their_layouts_later_rules_win():
    p = SearchParams(channel_group=16, at_sparsity=[{"up_to": 0.3, "set": UNITS},
                                                    {"up_to": 0.2, "layouts": ["uniform"], "set": {"lr_heads": 0.5}}])
    low = p.at(0.3)
    assert (low.policy, low.channel_group, low.lr_channels, low.lr_heads) == ("units", 1, 0.02, 0.4)
    assert low.at_sparsity == [] and low.at(0.3) == low  # resolved once and for all
    assert p.at(0.2, "uniform").lr_heads == 0.5 and p.at(0.2, "heterogeneous").lr_heads == 0.4
    high = p.at(0.5)
    assert (high.policy, high.channel_group) == ("widths", 16) and high.at_sparsity == []
    assert SearchParams().at(0.2) == SearchParams()


@pytest.mark.parametrize("rule, message", [
    ({"up_to": 0.3, "set": {"polcy": "units"}}, r"at_sparsity\[0\]\.set has \['polcy'\]; allowed: .*policy"),
    ({"up_to": 0.3, "set": {"seeds": [1]}}, r"has \['seeds'\]"),
    ({"up_to": 0.3, "set": {"policy": "rows"}}, r"at_sparsity\[0\] \(up_to 0.3\) gives invalid search settings: "
                                                r"policy"),
    ({"up_to": 1.5, "set": {"policy": "units"}}, r"up_to"),
    ({"up_to": 0.3, "set": {}}, r"set"),
])
def test_bad_rules_are_named(rule, message):
    with pytest.raises(ConfigError, match=message):
        build_params({"search": {"at_sparsity": [rule]}})


def test_explicit_search_values_win_over_rules():
    cfg = {"search": {"at_sparsity": [{"up_to": 0.3, "set": UNITS}, {"up_to": 0.5, "set": {"channel_group": 8}}]}}
    p = build_params(cfg, {"search.channel_group": 16}).search
    assert [r.set for r in p.at_sparsity] == [{k: v for k, v in UNITS.items() if k != "channel_group"}]
    assert p.at(0.2).channel_group == 16 and p.at(0.2).policy == "units"
    assert build_params(cfg).search.at(0.2).channel_group == 8  # without it: the rules, the later one wins


def test_search_runs_with_the_settings_of_its_sparsity():
    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=3, hidden=32, ffn=48)
    calib = torch.randint(0, 300, (16, 16), generator=torch.Generator().manual_seed(0))
    scores = compute_scores("magnitude", model, calib)
    p = SearchParams(steps=2, batch_size=4, val_blocks=4, init="magnitude", compensation="none",
                     channel_group=16, at_sparsity=[{"up_to": 0.3, "set": UNITS}])
    low = run_pg_search(model, calib, scores, p, sparsity=0.25, progress=False)
    high = run_pg_search(model, calib, scores, p, sparsity=0.5, progress=False)
    assert low.blocks["channels"].size == 1 and high.blocks["channels"].size == 16
    assert low.key != high.key


def test_rules_valid_alone_but_not_together_are_named_at_their_sparsity():
    p = SearchParams(at_sparsity=[{"up_to": 0.5, "set": {"estimator": "disarm", "policy": "units"}},
                                  {"up_to": 0.3, "set": {"policy": "widths"}}])
    assert p.at(0.4).estimator == "disarm"
    with pytest.raises(ConfigError, match=r"at sparsity 0.2 \(heterogeneous\) combines .*policy 'widths'"):
        p.at(0.2)
