"""params.yaml schema: defaults validate; errors name the key, the value and what is allowed."""
import pytest
import yaml

from pgprune.config import Params, default_params_yaml, load_params, parse_params
from pgprune.errors import ConfigError


def test_defaults_round_trip(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(default_params_yaml())
    assert load_params(p) == Params()


def test_errors_name_key_value_and_allowed():
    with pytest.raises(ConfigError) as e:
        parse_params({"export": {"sparsity": 1.5}, "search": {"estimator": "foo"}, "bogus": 1})
    msg = str(e.value)
    assert "export.sparsity" in msg and "1.5" in msg
    assert "search.estimator" in msg and "'exact', 'loo', 'reference' or 'disarm'" in msg
    assert "bogus" in msg


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="search.init"):
        parse_params({"init": {"scorers": ["magnitude"]}, "search": {"init": "wanda_sp"}})
    with pytest.raises(ConfigError, match="device"):
        parse_params({"model": {"device": "tpu"}})
    with pytest.raises(ConfigError, match="sparsities"):
        parse_params({"compare": {"sparsities": [0.0]}})
    with pytest.raises(ConfigError, match=r"export.sparsity=0.4 must be one of compare.sparsities"):
        parse_params({"export": {"sparsity": 0.4}})
    with pytest.raises(ConfigError, match="needs the scorer 'taylor'"):
        parse_params({"init": {"scorers": ["flap", "shortgpt", "wanda_sp", "magnitude", "random"]},
                      "compare": {"baselines": ["flap", "taylor"]}})
    with pytest.raises(ConfigError, match="export.method='taylor' must be one of"):
        parse_params({"compare": {"baselines": ["flap"]}, "export": {"method": "taylor"}})


def test_search_settings_are_checked_where_they_are_declared():
    """The pipeline's search section is the search's own settings class: one declaration, one validation."""
    from pgprune.config import SearchParams
    from pgprune.search import SearchSettings

    assert issubclass(SearchParams, SearchSettings)
    with pytest.raises(ConfigError, match=r"samples=1: estimator 'loo' needs samples >= 2"):
        parse_params({"search": {"samples": 1}})
    assert parse_params({"search": {"samples": 1, "estimator": "exact"}}).search.samples == 1
    with pytest.raises(ConfigError, match="lr_schedule 'step' needs lr_milestones"):
        parse_params({"search": {"lr_schedule": "step"}})
    with pytest.raises(ConfigError, match=r"lr_milestones: a non-empty list of steps in \(0, steps=100\); got \[300\]"):
        parse_params({"search": {"lr_schedule": "step", "lr_milestones": [300]}})
    with pytest.raises(ConfigError, match="only used by lr_schedule 'step'"):
        parse_params({"search": {"lr_milestones": [50]}})
    assert parse_params({"search": {"lr_schedule": "step", "lr_milestones": [25, 75]}}).search.lr_milestones == [25, 75]
    with pytest.raises(ConfigError, match="seeds repeat"):
        parse_params({"search": {"seeds": [1, 1]}})
    with pytest.raises(ConfigError, match="compare.searches"):
        parse_params({"compare": {"searches": ["flap"]}})

def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("search: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_repository_params_yaml_is_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert isinstance(load_params(root / "params.yaml"), Params)
    data = yaml.safe_load((root / "params.yaml").read_text())
    assert data["export"]["sparsity"] in data["compare"]["sparsities"]
    # every key of the schema is written out (DVC tracks keys, and a missing one stops a stage)
    assert set(data) == set(Params.model_fields)
    for section, model in Params.model_fields.items():
        assert set(data[section]) == set(model.annotation.model_fields), section
