"""The real stages under real DVC, on a tiny local model (issue 9's guarantees, end to end):

* a changed search setting reruns the search and gives the fresh result, even with a checkpoint of the old
  settings lying around (the stale-mask bug);
* returning to earlier params restores the search from DVC's run cache instead of searching;
* an evaluation setting re-evaluates without searching;
* a killed search resumes from its checkpoint bit-identically;
* two runs from scratch (separate clones, no shared cache) give identical dvc.lock hashes for data, init, masks.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_model
from toy_dvc import DVC, ROOT, dvc, set_param, sh

pytestmark = [pytest.mark.skipif(not Path(DVC).exists(), reason="dvc is not installed next to this Python"),
              pytest.mark.skipif(not Path("/usr/share/games/fortunes").is_dir() or shutil.which("bible") is None,
                                 reason="Debian corpus packages not installed (scripts/setup.sh installs them)")]

CELL = "search@pg-0.5"


def tiny_params(model_dir: Path) -> dict:
    return {
        "model": {"source": str(model_dir), "dtype": "float32", "device": "cpu", "threads": 1},
        "data": {"local_sources": ["fortunes"], "evaluation": ["local"], "seq_len": 32, "calib_blocks": 24,
                 "zero_shot_items": 8},
        "init": {"nsamples": 8, "batch_size": 4, "scorers": ["flap", "wanda_sp"]},
        "search": {"seeds": [42], "steps": 8, "samples": 2, "batch_size": 4, "checkpoint_every": 2, "val_blocks": 4, "channel_group": 8,
                   "validate_every": 4, "lr_heads": 0.2, "lr_channels": 0.2, "init_free_channels": 0.3,
                   # every step: the kill tests lengthen the search to 200-300 steps and kill it mid-way, which the
                   # early stop (3 stale validations: step 12) would race (8 steps never stop early either way)
                   "patience": 0},
        "eval": {"ppl_seq_len": 32, "ppl_blocks": 8, "zero_shot": False, "speed": {"enabled": False}},
        "compare": {"sparsities": [0.5], "searches": ["pg"], "baselines": ["flap"]},
        "export": {"method": "pg", "sparsity": 0.5, "save_dtype": "float32"},
        "recover": {"methods": ["flap"], "sparsities": [0.5], "steps": 2, "batch_size": 2, "seq_len": 16,
                    "curve_every": 1},
    }


def copy_project(dst: Path) -> None:
    dst.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for d in ("pgprune", "stages"):
        shutil.copytree(ROOT / d, dst / d, ignore=ignore)
    for f in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / f, dst / f)


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_tokenizer):
    tmp = tmp_path_factory.mktemp("real")
    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=3, hidden=32, ffn=48, vocab=len(tiny_tokenizer))
    model.save_pretrained(tmp / "tiny")
    tiny_tokenizer.save_pretrained(tmp / "tiny")
    repo = tmp / "repo"
    copy_project(repo)
    from pgprune.config import parse_params

    full = parse_params(tiny_params(tmp / "tiny")).model_dump(mode="json")  # DVC needs every tracked key
    (repo / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    sh(["git", "init", "-q"], repo)
    dvc("init", "-q", cwd=repo)
    dvc("config", "core.analytics", "false", cwd=repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "tiny pgprune project"], repo)
    env = {"PGPRUNE_CHECKPOINT_DIR": str(tmp / "ckpt"), "PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1"}
    out = dvc("repro", cwd=repo, env_extra=env).stdout
    assert "Running stage 'report'" in out
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "first run"], repo)
    return tmp, repo, env


def _repro(repo, env, *targets) -> str:
    return dvc("repro", *targets, cwd=repo, env_extra=env).stdout


def _ran(out: str) -> list[str]:
    return [ln.split("'")[1] for ln in out.splitlines() if ln.startswith("Running stage '")]


def _search_cmd(repo: Path, out: str, timing: str) -> list[str]:
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    paths = spec["vars"][0]["paths"]
    return [sys.executable, "-m", "stages.search", "--method", "pg", "--sparsity", "0.5", "--model", paths["base"],
            "--data", paths["data"], "--scores", paths["scores"], "--out", out, "--timing", timing]


def _kill_midway(cmd, repo, env, ckpt_dir: Path) -> None:
    """Start the search, SIGKILL it once a checkpoint exists (no chance to clean up or save)."""
    proc = subprocess.Popen(cmd, cwd=repo, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.time()
    while not list(ckpt_dir.glob("search-*.ckpt")):
        assert proc.poll() is None, "the search ended before writing a checkpoint"
        assert time.time() - t0 < 120
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_pipeline_is_reproduced_and_clean(project):
    _, repo, env = project
    assert json.loads(dvc("status", "--json", cwd=repo).stdout or "{}") == {}
    assert (repo / "artifacts/masks/pg/s0.5/masks.json").exists() and (repo / "models/pruned/README.md").exists()


def test_changed_search_key_gives_the_fresh_result_and_going_back_uses_the_run_cache(project):
    tmp, repo, env = project
    masks = repo / "artifacts/masks/pg/s0.5/masks.json"
    first = masks.read_text()
    # a half-done search with batch 4 leaves its checkpoint behind ...
    set_param(repo, "search.steps", 200)
    set_param(repo, "search.checkpoint_every", 1)
    _kill_midway(_search_cmd(repo, "scratch/out", "scratch/t.json"), repo, env, tmp / "ckpt")
    # ... then only the batch size changes: DVC reruns the search, and the result is the fresh one (the old
    # checkpoint, whose other settings are all the same, is never picked up)
    set_param(repo, "search.batch_size", 8)
    out = _repro(repo, env)
    assert CELL in _ran(out) and "baseline@flap-0.5" not in _ran(out)
    fresh_env = dict(env, PGPRUNE_CHECKPOINT_DIR=str(tmp / "ckpt-fresh"))
    sh(_search_cmd(repo, "scratch/fresh", "scratch/t2.json"), repo, env_extra=fresh_env)
    assert masks.read_text() == (repo / "scratch/fresh/masks.json").read_text()
    assert (repo / "artifacts/masks/pg/s0.5/history.csv").read_text() == \
        (repo / "scratch/fresh/history.csv").read_text()
    # back to the first run's settings: restored from DVC's run cache, not searched again
    set_param(repo, "search.batch_size", 4)
    set_param(repo, "search.steps", 8)
    set_param(repo, "search.checkpoint_every", 2)
    out = _repro(repo, env)
    assert f"Stage '{CELL}' is cached - skipping run, checking out outputs" in out
    assert not [s for s in _ran(out) if s.startswith(("search@", "evaluate", "baseline@"))], _ran(out)
    assert masks.read_text() == first


def test_an_eval_setting_reevaluates_without_searching(project):
    _, repo, env = project
    set_param(repo, "eval.ppl_batch_size", 4)
    ran = _ran(_repro(repo, env))
    assert sorted(ran) == sorted(["evaluate_dense", "evaluate_search@pg-0.5", "evaluate_baseline@flap-0.5",
                                  "recover@flap-0.5", "evaluate_recovered@flap-0.5", "export", "report"])
    set_param(repo, "eval.ppl_batch_size", 8)
    _repro(repo, env)


def test_a_killed_search_resumes_bit_identically(project):
    tmp, repo, env = project
    set_param(repo, "search.steps", 300)
    set_param(repo, "search.checkpoint_every", 5)
    try:
        ckpt = tmp / "ckpt-kill"
        kill_env = dict(env, PGPRUNE_CHECKPOINT_DIR=str(ckpt))
        cmd = _search_cmd(repo, "scratch/killed", "scratch/k.json")
        _kill_midway(cmd, repo, kill_env, ckpt)
        sh(cmd, repo, env_extra=kill_env)
        timing = json.loads((repo / "scratch/k.json").read_text())
        assert next(iter(timing["seeds"].values()))["resumed_from_step"] > 0  # it did resume
        assert not list(ckpt.glob("search-*.ckpt"))  # and removed its checkpoint when done
        sh(_search_cmd(repo, "scratch/whole", "scratch/w.json"), repo,
           env_extra=dict(env, PGPRUNE_CHECKPOINT_DIR=str(tmp / "ckpt-whole")))
        for f in ("masks.json", "history.csv", "compensation.safetensors", "summary.json"):
            assert (repo / "scratch/killed" / f).read_bytes() == (repo / "scratch/whole" / f).read_bytes(), f
    finally:
        set_param(repo, "search.steps", 8)
        set_param(repo, "search.checkpoint_every", 2)


def test_two_runs_from_scratch_give_identical_lock_hashes(project):
    tmp, repo, env = project
    clone = tmp / "clone"
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp)
    (clone / "dvc.lock").unlink()  # from scratch: no lock, no cache, no outputs
    targets = ["model", "data", "init", CELL, "baseline@flap-0.5"]
    _repro(clone, dict(env, PGPRUNE_CHECKPOINT_DIR=str(tmp / "ckpt-clone"), PYTHONPATH=str(clone)), *targets)

    def outs(lock):  # every output but the timings (seconds are measurements: metrics kept in git, not cached)
        return {(s, o["path"]): o["md5"] for s in targets for o in lock[s]["outs"]
                if not o["path"].startswith("artifacts/timing/")}

    first = outs(yaml.safe_load(sh(["git", "show", "HEAD:dvc.lock"], repo).stdout)["stages"])
    assert outs(yaml.safe_load((clone / "dvc.lock").read_text())["stages"]) == first
    assert {p for _, p in first} >= {"data/prepared", "artifacts/init/scores.safetensors", "artifacts/masks/pg/s0.5",
                                     "artifacts/masks/flap/s0.5", "models/base", "models/tokenizer"}
