"""One set of defaults: the params schema's defaults are params.yaml's values, key by key (search.at_sparsity's rules
included), so `pgprune prune`, pgprune.prune() and build_params() (which start from the schema) run what the
pipeline runs."""
from pathlib import Path

import yaml

from pgprune.api import build_params
from pgprune.config import DEFAULT_SEARCH_RULES, Params, SearchParams, load_params, parse_params

PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"


def _leaves(d, prefix=""):
    """{dotted key: value} of a nested mapping; lists (at_sparsity's rules too) are compared whole."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_schema_defaults_are_params_yaml_key_by_key():
    raw = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))
    yaml_keys = _leaves(raw)
    schema_keys = _leaves(Params().model_dump(mode="json"))
    assert sorted(set(yaml_keys) - set(schema_keys)) == [], "params.yaml keys the schema has no default for"
    assert sorted(set(schema_keys) - set(yaml_keys)) == [], "schema keys params.yaml leaves out"
    differ = {k: (schema_keys[k], yaml_keys[k]) for k in yaml_keys if schema_keys[k] != yaml_keys[k]}
    assert differ == {}, f"schema default vs params.yaml: {differ}"
    assert Params() == load_params(PARAMS_YAML)


def test_the_api_and_cli_defaults_resolve_like_the_pipeline():
    pipeline, api = load_params(PARAMS_YAML), build_params()
    for s in (0.2, 0.3, 0.5):
        for layout in ("heterogeneous", "uniform"):
            assert api.search.at(s, layout) == pipeline.search.at(s, layout), (s, layout)
    assert api.search.at(0.3).policy == "widths" == api.search.at(0.5).policy  # no default rules since 2026-12-05


def test_left_out_rules_are_the_default_ones():
    """A search section that gives other keys still takes the default rules (like any key left out: none today); a
    given list is used as it is; a search.* override drops only that key from the rules."""
    rules = [r.model_dump() for r in parse_params({"search": {"steps": 3}}).search.at_sparsity]
    assert rules == list(DEFAULT_SEARCH_RULES) == []
    given = {"search": {"at_sparsity": [{"up_to": 0.3, "set": {"policy": "units", "channel_group": 1}}]}}
    assert parse_params(given).search.at(0.3).policy == "units"
    assert parse_params(given).search.at(0.5).policy == "widths"
    over = build_params(given, {"search.channel_group": 16}).search.at(0.3)
    assert (over.policy, over.channel_group) == ("units", 16)
    assert SearchParams().at_sparsity == []  # a search's settings built alone carry no rules


def test_params_reference_shows_the_defaults():
    from pgprune.config import params_reference

    table = params_reference()
    assert "| `search.seeds` | `[42, 43, 44]` |" in table
    assert "| `search.at_sparsity` | `[]` |" in table
