"""One option table (pgprune/options.py): every CLI flag of prune/eval/plan and every keyword of pgprune.prune() is in
it or named as setting no params key; every key it sets exists in the params schema; the API keyword and the CLI flag
of an option give the same overrides, and both front doors build their params from it."""
import argparse
import inspect

import pytest

import pgprune
from pgprune import cli
from pgprune.api import build_params
from pgprune.config import Params, _leaf_fields
from pgprune.options import COMMANDS, NOT_PARAMS, OPTIONS, api_options, options, overrides
from pgprune.recovery.settings import cli_flags

SCHEMA_KEYS = {k for k, _ in _leaf_fields(Params)}
# keywords of pgprune.prune() that set no params key
API_NOT_PARAMS = {"model", "tokenizer", "sparsity", "method", "layout", "config", "checkpoint_dir", "progress"}
# a value each option can take, as (CLI argument, API value)
SAMPLE = {"model": ("org/name", None), "calibration": ("c4", "c4"), "nsamples": ("16", 16),
          "calib_blocks": ("40", 40), "seq_len": ("32", 32), "steps": ("5", 5), "seed": ("7", 7),
          "round_to": ("16", 16), "compensation": ("bias", "bias"), "device": ("cpu", "cpu"), "dtype": ("float32", None),
          "threads": ("2", None), "offload": ("disk", None), "device_map": ("auto", None), "blocks": ("4", None),
          "batch_size": ("2", None), "limit": ("10", None), "batch": ("2", None), "samples": ("4", None),
          "sample_mode": ("batched", None)}


def _subparser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _flags(command: str) -> dict[str, argparse.Action]:
    """The parser's options of ``command`` by their long flag (a positional by its dest), help left out."""
    out = {}
    for act in _subparser(command)._actions:
        if isinstance(act, argparse._HelpAction):
            continue
        longs = [s for s in act.option_strings if s.startswith("--")]
        out[longs[0] if longs else act.dest] = act
    return out


def test_every_option_sets_existing_schema_keys():
    for o in OPTIONS:
        assert o.command in COMMANDS, o
        assert o.keys, f"{o.command} {o.cli_flag or o.name} maps to no params key"
        missing = [k for k in o.keys if k not in SCHEMA_KEYS]
        assert not missing, f"{o.command} {o.cli_flag or o.name} maps to {missing}, not keys of the params schema"
    for command in COMMANDS:
        names = [o.name for o in options(command)]
        assert len(names) == len(set(names)), f"{command}: an option is in the table twice"


@pytest.mark.parametrize("command", COMMANDS)
def test_every_cli_flag_is_in_the_table_or_sets_no_params_key(command):
    flags = _flags(command)
    table = {o.cli_flag: o for o in options(command) if o.cli_flag}
    generated = {f for f, _ in cli_flags()} if command == "recover" else set()  # RecoverSettings' own flags
    loose = sorted(set(flags) - set(table) - set(NOT_PARAMS[command]) - generated - {"--version"})
    assert not loose, f"`pgprune {command}` options neither in pgprune/options.py's table nor in NOT_PARAMS: {loose}"
    absent = sorted(set(table) - set(flags))
    assert not absent, f"the table lists `pgprune {command}` options the parser lacks: {absent}"
    stale = sorted(set(NOT_PARAMS[command]) - set(flags))
    assert not stale, f"NOT_PARAMS lists `pgprune {command}` options the parser lacks: {stale}"
    both = sorted(set(table) & set(NOT_PARAMS[command]))
    assert not both, both
    for flag, o in table.items():
        assert flags[flag].dest == o.dest, f"{flag}: argparse dest {flags[flag].dest!r}, table {o.dest!r}"


def test_every_prune_keyword_is_in_the_table_or_sets_no_params_key():
    kws = set(inspect.signature(pgprune.prune).parameters)
    api = {o.name for o in api_options()}
    assert not api - kws, f"table options prune() does not take: {sorted(api - kws)}"
    assert not kws - api - API_NOT_PARAMS, f"prune() keywords not in the table: {sorted(kws - api - API_NOT_PARAMS)}"
    assert not api & API_NOT_PARAMS


@pytest.mark.parametrize("o", api_options(), ids=lambda o: o.name)
def test_the_api_keyword_and_the_cli_flag_agree(o):
    """The same value through prune()'s keyword and `pgprune prune`'s flag gives the same params overrides."""
    cli_arg, api_value = SAMPLE[o.name]
    argv = ["prune", "--sparsity", "0.3", "--out", "x", o.cli_flag] + ([cli_arg] if cli_arg is not None else [])
    ns = vars(cli.build_parser().parse_args(argv))
    for search in (True, False):
        from_cli = overrides("prune", ns, search=search, cli=True)
        from_api = overrides("prune", {o.name: api_value}, search=search)
        assert from_cli == from_api, (o.name, search)
        if search or not o.search_only:
            assert set(from_cli) == set(o.keys) or o.name == "calibration"
    build_params(None, overrides("prune", {o.name: api_value}))  # the values are valid params


@pytest.mark.parametrize("command", COMMANDS)
def test_every_table_option_gives_valid_params(command):
    for o in options(command):
        arg = SAMPLE[o.name][0]
        required = {"eval": ["DIR"], "recover": ["DIR", "--out", "x"], "prune": ["--sparsity", "0.3", "--out", "x"]}
        argv = [command] + required.get(command, []) + [o.cli_flag]
        ns = vars(cli.build_parser().parse_args(argv + ([arg] if arg is not None else [])))
        got = overrides(command, ns, cli=True)
        if command == "eval":  # its --device and --dtype have parser defaults
            got = {k: v for k, v in got.items() if k in o.keys}
        assert set(got) == set(o.keys), (command, o.name, got)
        build_params(None, got)


class _Built(Exception):
    pass


def _capture(monkeypatch):
    def fake(config=None, overrides=None, source=None):
        raise _Built(overrides)

    monkeypatch.setattr("pgprune.api.build_params", fake)


def test_prune_and_the_cli_build_their_params_from_the_table(monkeypatch):
    _capture(monkeypatch)
    with pytest.raises(_Built) as api:
        pgprune.prune(None, steps=5, seed=7, round_to=16, compensation="none", calibration="c4", device="cpu",
                      nsamples=16, calib_blocks=40, seq_len=32)
    with pytest.raises(_Built) as line:
        cli.main(["prune", "--sparsity", "0.3", "--out", "x", "--steps", "5", "--seed", "7", "--round-to", "16",
                  "--compensation", "none", "--calibration", "c4", "--device", "cpu", "--nsamples", "16",
                  "--calib-blocks", "40", "--seq-len", "32", "-q"])
    assert api.value.args[0] == line.value.args[0]
    assert api.value.args[0]["search.seeds"] == [7] and api.value.args[0]["init.seed"] == 7


def test_cli_errors_name_the_option_of_their_command(capsys):
    assert cli.main(["eval", "DIR", "--ppl", "local", "--seq-len", "2"]) == 2
    assert "eval.ppl_seq_len (--seq-len)" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "x/y", "--batch", "0"]) == 2
    assert "search.batch_size (--batch)" in capsys.readouterr().err
