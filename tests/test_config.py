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
        parse_params({"search": {"sparsity": 1.5, "estimator": "foo"}, "bogus": 1})
    msg = str(e.value)
    assert "search.sparsity" in msg and "1.5" in msg
    assert "search.estimator" in msg and "'exact', 'loo' or 'reference'" in msg
    assert "bogus" in msg


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="search.init"):
        parse_params({"init": {"scorers": ["magnitude"]}, "search": {"init": "wanda_sp"}})
    with pytest.raises(ConfigError, match="device"):
        parse_params({"model": {"device": "tpu"}})
    with pytest.raises(ConfigError, match="sparsities"):
        parse_params({"compare": {"sparsities": [0.0]}})


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
    assert yaml.safe_load((root / "params.yaml").read_text())["search"]["sparsity"] > 0
