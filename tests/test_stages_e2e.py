"""End to end: every stage of dvc.yaml run for real, in a temporary folder, on a tiny local model and the
Debian corpus (a few steps / blocks). Checks the artifacts each stage promises, and bad input handling."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_tiny_model

pytestmark = pytest.mark.skipif(not Path("/usr/share/games/fortunes").is_dir() or shutil.which("bible") is None,
                                reason="Debian corpus packages not installed (scripts/setup.sh installs them)")


def tiny_params(model_dir: Path) -> dict:
    return {
        "model": {"source": str(model_dir), "dtype": "float32", "device": "cpu"},
        "data": {"local_sources": ["fortunes", "jargon"], "seq_len": 32, "calib_blocks": 16, "eval_blocks": 8,
                 "zero_shot_items": 8},
        "init": {"nsamples": 8, "batch_size": 4},
        "search": {"sparsity": 0.5, "steps": 6, "samples": 2, "batch_size": 4, "checkpoint_every": 2, "val_blocks": 4,
                   "validate_every": 3,
                   "lr_heads": 0.2, "lr_channels": 0.2},
        "eval": {"ppl_seq_len": 32, "zero_shot_limit": 8, "speed": {"prompt_len": 4, "new_tokens": 4, "repeats": 1}},
        "compare": {"sparsities": [0.5], "methods": ["pg", "wanda_sp", "flap", "magnitude", "taylor", "random",
                                                     "layer_drop"]},
    }


@pytest.fixture
def workdir(tmp_path, tiny_tokenizer, monkeypatch):
    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=4, hidden=32, ffn=48, vocab=len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(tmp_path / "tiny")))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_all_stages(workdir):
    from stages import compare, data, eval as eval_stage, init, model, search, slice as slice_stage

    model.main([])
    assert json.loads(Path("models/base/pgprune_source.json").read_text())["source"].endswith("tiny")
    data.main([])
    assert torch.load("data/prepared/calib.pt").shape == (16, 32)
    assert (Path("data/prepared/tasks") / "manifest.json").exists()
    init.main([])
    scores = torch.load("artifacts/init/scores.pt")
    assert {"wanda_sp", "flap", "magnitude", "taylor", "shortgpt", "random"} <= set(scores)
    search.main([])
    summary = json.loads(Path("artifacts/search/summary.json").read_text())
    assert summary["steps"] == 6 and abs(summary["params"]["prunable_sparsity"] - 0.5) < 0.05
    assert Path("artifacts/checkpoints/search.pt").exists()
    hist = Path("artifacts/search/history.csv").read_text().splitlines()
    assert hist[0].startswith("step,") and len(hist) == 7
    slice_stage.main([])
    assert (Path("models/pruned") / "model.safetensors").exists()
    eval_stage.main([])
    metrics = json.loads(Path("artifacts/eval/metrics.json").read_text())
    assert metrics["pruned"]["ppl"]["local"] > 1 and metrics["dense"]["ppl"]["local"] > 1
    assert 0 <= metrics["pruned"]["zero_shot"]["average"] <= 1
    compare.main(["--sparsity", "0.5"])
    res = json.loads(Path("artifacts/compare/s0.5/results.json").read_text())
    assert set(res["methods"]) == {"pg", "wanda_sp", "flap", "magnitude", "taylor", "random", "layer_drop"}
    for name, r in res["methods"].items():
        assert r["ppl"]["local"] > 1, name
        assert abs(r["params"]["prunable_sparsity"] - 0.5) < 0.1, name
    # the search resumes from its checkpoint: a rerun with the same settings gives the same masks
    before = Path("artifacts/search/masks.json").read_text()
    search.main([])
    assert Path("artifacts/search/masks.json").read_text() == before


def test_stage_reports_bad_params_without_traceback(workdir, capsys):
    from stages import _common, search

    p = yaml.safe_load(Path("params.yaml").read_text())
    p["search"]["estimator"] = "magic"
    Path("params.yaml").write_text(yaml.safe_dump(p))
    with pytest.raises(SystemExit) as e:
        _common.run(lambda: search.main([]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "search.estimator" in err and "'exact', 'loo' or 'reference'" in err


def test_stage_reports_missing_inputs(workdir, capsys):
    from stages import _common, slice as slice_stage, model

    model.main([])
    with pytest.raises(SystemExit):
        _common.run(lambda: slice_stage.main([]))
    assert "search masks not found" in capsys.readouterr().err
