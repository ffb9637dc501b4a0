"""The `pgprune` command end to end on a tiny random Llama saved with a tokenizer (offline): prune -> folder ->
reload -> generate; the uniform layout loads without remote code and equals the masked forward; a killed prune
resumes to the same masks; eval, plan, run; bad input exits 2 with one line."""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_TEXT, cli_fails, make_tiny_config, make_tiny_model

from pgprune import __version__, cli

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).parent / "pgprune"  # the console script of this environment
MODULE = [sys.executable, "-m", "pgprune.cli"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
# small calibration and search: seconds on 2 CPU cores
SMALL = {"data": {"seq_len": 16, "calib_blocks": 24, "seed": 0}, "init": {"nsamples": 8, "batch_size": 4},
         "search": {"steps": 6, "batch_size": 4, "val_blocks": 4, "validate_every": 3, "channel_group": 8},
         "eval": {"ppl_seq_len": 16, "ppl_blocks": 4}}


def script() -> list[str]:
    if not SCRIPT.exists():
        pytest.skip(f"no console script at {SCRIPT} (pip install -e . installs it)")
    return [str(SCRIPT)]


def run(prefix: list[str], *args, cwd, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def summary_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_tokenizer):
    """A folder with base/ (tiny Llama, float32, tokenizer), calib.txt and small.yaml."""
    d = tmp_path_factory.mktemp("cli")
    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=3, hidden=32, ffn=48)
    model.save_pretrained(d / "base")
    tiny_tokenizer.save_pretrained(d / "base")
    (d / "calib.txt").write_text(TINY_TEXT * 3, encoding="utf-8")
    (d / "small.yaml").write_text(yaml.safe_dump(SMALL), encoding="utf-8")
    return d


def prune_args(work: Path, out: str, *extra) -> list[str]:
    return ["prune", "--model", work / "base", "--sparsity", "0.3", "--out", work / out, "--calibration",
            work / "calib.txt", "--dtype", "float32", "--config", work / "small.yaml", *extra]


@pytest.fixture(scope="module")
def pg_run(work):
    """`pgprune prune` (console script) with the PG search, heterogeneous layout."""
    args = prune_args(work, "pg", "--steps", 4, "--json")
    proc = run(script(), *args, cwd=work)
    return args, summary_of(proc), proc


def test_prune_pg_folder_reloads_generates_and_documents_the_command(work, pg_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pgprune.core.masks import Masks

    args, s, proc = pg_run
    out = work / "pg"
    assert s["method"] == "pg" and s["layout"] == "heterogeneous" and s["trust_remote_code"] is True
    assert s["compensated"] is True and s["resumed_from_step"] == 0
    dl, tot = s["params"]["decoder_linear"], s["params"]["total"]
    assert dl["after"] < dl["before"] and abs(dl["sparsity"] - 0.3) < 0.05 and tot["after"] < tot["before"]
    assert "24 blocks of 16 tokens" in s["calibration"]
    assert not (work / "pg.checkpoints").exists(), "a completed search leaves no checkpoint folder"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "masks.json",
            "modeling_pgprune.py"} <= names
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    assert sum(p.numel() for p in model.parameters()) == s["saved_params"] < s["params"]["model_before"]
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape == (1, ids.shape[1] + 5)
    card = (out / "README.md").read_text()
    assert "pgprune " + shlex.join(map(str, args)) in card  # the exact command
    assert "trust_remote_code=True" in card
    masks = Masks.load(out / "masks.json")
    assert sum(masks.kept_counts()["heads"]) < 6


def test_eval_folder_on_a_text_file_matches_the_library(work, pg_run, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pgprune.data import tokenize_blocks
    from pgprune.eval import perplexity

    out = work / "pg"
    text_file = work / "held.txt"
    text_file.write_text(TINY_TEXT[::-1] * 2, encoding="utf-8")
    proc = run(MODULE, "eval", out, "--ppl", text_file, "--seq-len", 16, "--blocks", 5, "--json", cwd=work)
    res = summary_of(proc)
    assert res["trust_remote_code"] is True and res["architecture"] == "PgpruneLlamaForCausalLM"
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    blocks = tokenize_blocks(text_file.read_text(), tok, 16, max_blocks=5)
    assert res["ppl"]["held.txt"] == pytest.approx(perplexity(model, blocks)["ppl"], rel=1e-5)
    assert cli.main(["eval", str(out), "--ppl", str(text_file), "--seq-len", "16", "--blocks", "5"]) == 0
    table = capsys.readouterr().out
    assert "| perplexity (held.txt, 5 blocks of 16 tokens)" in table and f"{res['ppl']['held.txt']:.4f}" in table


def test_eval_zero_shot_tasks_by_name(work, pg_run, capsys):
    pytest.importorskip("lm_eval")
    import random

    from pgprune.eval import write_local_tasks

    rng, words = random.Random(0), sorted(set(TINY_TEXT.replace(".", "").replace(",", "").split()))
    paras = [" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(8, 16))).capitalize() + "."
                      for _ in range(5)) for _ in range(12)]
    names = write_local_tasks({"tiny": "\n\n".join(paras)}, work / "tasks", n_items=8, seed=0)
    argv = ["eval", work / "pg", "--tasks", ",".join(names), "--include", work / "tasks", "--limit", 6, "--json"]
    assert cli.main([str(a) for a in argv]) == 0
    z = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["zero_shot"]
    assert set(z["tasks"]) == set(names) and z["metric"] == "acc"
    assert all(0 <= v <= 1 for v in z["tasks"].values())
    assert z["average"] == pytest.approx(sum(z["tasks"].values()) / len(names))


def _masked_logits(work: Path, masks_file: Path, ids: torch.Tensor, compensated: bool) -> torch.Tensor:
    """The base model's masked forward under a saved masks.json, mean-compensated with the calibration means the
    command computed (same params, same calibration text, same library calls)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pgprune.api import build_params, calibration_from
    from pgprune.core.adapters import get_adapter
    from pgprune.core.masked_forward import MaskedModel
    from pgprune.core.masks import Masks
    from pgprune.scorers import compute_all_scores

    base = AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32).eval()
    mm = MaskedModel(base)
    if compensated:
        tok = AutoTokenizer.from_pretrained(work / "base")
        params = build_params(work / "small.yaml")
        calib, _ = calibration_from(str(work / "calib.txt"), tok, params)
        scores, _ = compute_all_scores(params.init, base, calib, scorers=["flap"])
        mm.set_compensation(scores["flap"]["bias"])
    return mm.logits(ids, Masks.load(masks_file, get_adapter(base).layout()))


def test_prune_uniform_layout_is_stock_and_equals_the_masked_forward(work):
    from transformers import AutoModelForCausalLM

    s = summary_of(run(MODULE, *prune_args(work, "uni", "--layout", "uniform", "--steps", 4, "--compensation", "bias",
                                           "--json"), cwd=work))
    out = work / "uni"
    assert s["method"] == "pg_uniform" and s["layout"] == "uniform" and s["architecture"] == "LlamaForCausalLM"
    assert not (out / "modeling_pgprune.py").exists()
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(input_ids=ids).logits
        expected = _masked_logits(work, out / "masks.json", ids, compensated=True)
    assert (got - expected).abs().max().item() < 1e-4


def test_prune_metric_baseline_round_to_gives_the_stock_class(work):
    from transformers import AutoModelForCausalLM

    s = summary_of(run(script(), *prune_args(work, "wanda", "--method", "wanda_sp", "--round-to", 8, "--json"),
                       cwd=work))
    assert s["method"] == "wanda_sp" and s["layout"] == "uniform" and s["compensated"] is False
    assert s["checkpoint_dir"] is None and not (work / "wanda.checkpoints").exists()
    out = work / "wanda"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["intermediate_size"] % 8 == 0
    assert cfg["intermediate_size"] < 48
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = model(input_ids=ids).logits - _masked_logits(work, out / "masks.json", ids, compensated=False)
    assert diff.abs().max().item() < 1e-4
    assert "--method wanda_sp --round-to 8" in (out / "README.md").read_text()


def test_killed_prune_resumes_to_the_masks_of_an_uninterrupted_run(work):
    cfg = work / "resume.yaml"
    cfg.write_text(yaml.safe_dump({**SMALL, "search": {**SMALL["search"], "steps": 24, "checkpoint_every": 1}}))
    args = ["prune", "--model", work / "base", "--sparsity", "0.3", "--out", work / "res", "--calibration",
            work / "calib.txt", "--dtype", "float32", "--config", cfg, "--seed", 7]
    ckpt = work / "res.checkpoints"
    proc = subprocess.Popen([*MODULE, *map(str, args)], cwd=work, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(ckpt.glob("*.ckpt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the search ended before a checkpoint was seen: " + proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "lets the same command resume" in err and len(list(ckpt.glob("*.ckpt"))) == 1
    assert not (work / "res").exists()

    again = run(MODULE, *args, cwd=work)
    assert again.returncode == 0, again.stderr[-3000:]
    line = next(x for x in again.stdout.splitlines() if x.strip().startswith("search"))
    assert "resumed from step" in line and "resumed from step 0" not in line, again.stdout
    assert not ckpt.exists(), "the completed search removes its checkpoint"

    ref_args = [*args[:6], work / "ref", *args[7:], "--checkpoint-dir", work / "ref-ckpt"]
    ref = run(MODULE, *ref_args, cwd=work)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "ran from step 0" in ref.stdout
    assert (work / "res" / "masks.json").read_text() == (work / "ref" / "masks.json").read_text()
    assert (work / "res" / "model.safetensors").read_bytes() == (work / "ref" / "model.safetensors").read_bytes()


# --- bad input: exit 2, one line, no traceback ---------------------------------------------------------------
_fails = cli_fails


def test_bad_inputs_exit_2_with_one_line(work, tmp_path, capsys):
    base = ["prune", "--model", work / "base", "--out", tmp_path / "o", "--calibration", work / "calib.txt"]
    _fails(capsys, [*base, "--sparsity", "1.5"], "sparsity=1.5", "0 < sparsity < 1")
    _fails(capsys, [*base, "--sparsity", "0.3", "--method", "obs"], "unknown method 'obs'", "wanda_sp", "layer_drop")
    _fails(capsys, [*base, "--sparsity", "0.3", "--layout", "square"], "'square'", "heterogeneous", "uniform")
    _fails(capsys, [*base, "--sparsity", "0.3", "--steps", "0"], "search.steps (--steps)", "got 0")
    _fails(capsys, [*base, "--sparsity", "0.3", "--round-to", "5"], "--round-to 5", "48")
    _fails(capsys, [*base, "--sparsity", "0.3", "--calibration", "wikitext3"], "'wikitext3'", "wikitext2, c4, ptb")
    _fails(capsys, [*base, "--sparsity", "0.3", "--calibration", tmp_path / "none.txt"], "none.txt", "not found")
    _fails(capsys, ["prune", "--model", tmp_path / "nothere", "--sparsity", "0.3", "--out", tmp_path / "o"],
           "nothere", "no such folder")
    _fails(capsys, ["prune", "--model", work / "base", "--sparsity", "0.3", "--out", work], "refusing to replace")
    _fails(capsys, ["prune", "--sparsity", "0.3"], "--out")
    gpt2 = tmp_path / "gpt2"
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(gpt2)
    _fails(capsys, ["prune", "--model", gpt2, "--sparsity", "0.3", "--out", tmp_path / "o"], "model_type='gpt2'",
           "llama")
    _fails(capsys, ["eval", tmp_path / "nothere", "--ppl", "local"], "nothere", "not found")
    _fails(capsys, ["eval", work / "base"], "nothing to evaluate")
    _fails(capsys, ["eval", work / "base", "--ppl", "wikitext3"], "'wikitext3'", "licenses")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.checkpoints").exists()
    # the installed command reports the same way
    proc = run(script(), *base, "--sparsity", "2", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "pgprune: error: sparsity=2.0 is not allowed; allowed: 0 < sparsity < 1 (the fraction of decoder-layer "
        "linear parameters removed)")


def test_version_and_run_help():
    for prefix in (script(), MODULE):
        proc = run(prefix, "--version", cwd=ROOT)
        assert proc.returncode == 0 and proc.stdout.strip() == f"pgprune {__version__}"
    proc = run(script(), "run", "--help", cwd=ROOT)
    assert proc.returncode == 0 and "dvc repro" in proc.stdout and "--force" in proc.stdout


def test_run_finds_the_checkout_and_dvc(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, cwd=None, env=None: calls.append((cmd, cwd, env)) or 0)
    monkeypatch.chdir(tmp_path)
    _fails(capsys, ["run"], "not in a pgprune checkout")
    monkeypatch.chdir(ROOT / "stages")  # a folder inside the checkout
    monkeypatch.setattr(cli, "dvc_command", lambda: None)
    _fails(capsys, ["run"], "dvc is not installed", "pgprune[pipeline]")
    monkeypatch.setattr(cli, "dvc_command", lambda: ["dvc"])
    assert cli.main(["run", "export", "report", "--force"]) == 0
    (cmd, cwd, env), = calls
    assert (cmd, cwd) == (["dvc", "repro", "--force", "export", "report"], ROOT)
    # the stages' `python` is this interpreter's even when its venv is not activated
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_plan_wraps_the_memory_plan(tmp_path, capsys):
    from pgprune.hf.memory import plan

    cfg = make_tiny_config("llama", layers=4, hidden=64, ffn=128, vocab=200)
    cfg.save_pretrained(tmp_path / "cfg")  # config.json only: no weights are needed
    argv = ["plan", "--model", tmp_path / "cfg", "--dtype", "float32", "--batch", "2", "--seq-len", "16",
            "--samples", "3", "--device", "cpu", "--devices", "2", "--gpu-memory", "1MiB"]
    assert cli.main([str(a) for a in argv + ["--json"]]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    want = plan(tmp_path / "cfg", "float32", batch=2, seq_len=16, samples=3, device="cpu", gpus=2,
                gpu_memory="1MiB")
    assert got["weights"] == want["weights"] and got["activations"] == want["activations"]
    assert got["rows"] == json.loads(json.dumps(want["rows"])) and got["layers"] == 4
    assert cli.main([str(a) for a in argv + ["--offload", "disk"]]) == 0
    text = capsys.readouterr().out
    assert "| offload disk (selected) |" in text and "device_map auto (2 GPUs)" in text


# --- one house: friction of eval / plan / prune -------------------------------------------------------------------
class _Called(Exception):
    pass


def test_eval_resolves_the_embedded_model_like_prune(tmp_path, monkeypatch, capsys):
    """`pgprune eval embedded:smollm2-135m` evaluates the converted folder `prune --model embedded:...` uses; not
    prepared and not convertible, the message says how to get it."""
    monkeypatch.setenv("PGPRUNE_CACHE", str(tmp_path / "cache"))
    folder = cli.embedded_cache("embedded:smollm2-135m")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert cli.model_folder("embedded:smollm2-135m") == str(folder)

    def fake_load(path, dtype, device):
        raise _Called(path)

    monkeypatch.setattr(cli, "load_for_eval", fake_load)
    with pytest.raises(_Called) as called:
        cli.main(["eval", "embedded:smollm2-135m", "--ppl", "local", "-q"])
    assert called.value.args[0] == str(folder)

    (folder / "config.json").unlink()
    from pgprune.hf import loading

    monkeypatch.setitem(loading.EMBEDDED, "embedded:smollm2-135m", ("no_such_package_pgprune", "x.gguf"))
    err = _fails(capsys, ["eval", "embedded:smollm2-135m", "--ppl", "local"], "embedded:smollm2-135m is not prepared",
                 "pip install")
    assert "model folder" not in err


@pytest.mark.parametrize("cuda, want", [(False, "cpu"), (True, "cuda")])
def test_plan_defaults_to_cpu_without_cuda(tmp_path, monkeypatch, cuda, want):
    from pgprune.hf import memory

    make_tiny_config("llama", layers=2, hidden=64, ffn=128, vocab=200).save_pretrained(tmp_path / "cfg")
    monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)

    def fake_plan(src, dtype, **kw):
        raise _Called(kw["device"])

    monkeypatch.setattr(memory, "plan", fake_plan)
    with pytest.raises(_Called) as called:
        cli.main(["plan", "--model", str(tmp_path / "cfg")])
    assert called.value.args[0] == want


def test_interrupted_prune_says_so_once(work, monkeypatch, capsys):
    def interrupted(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr("pgprune.api.run_prune", interrupted)
    assert cli.main([str(a) for a in prune_args(work, "stopped", "-q")]) == 130
    err = capsys.readouterr().err
    assert err.count("pgprune: interrupted") == 1 and "lets the same command resume" in err, err
    assert not (work / "stopped.checkpoints").exists()  # nothing to resume: the empty folder is removed


def test_a_search_says_its_seed_and_a_resume_at_the_start(work, pg_run, tmp_path, caplog):
    from pgprune.api import _announce_search, build_params

    _, summary, _ = pg_run
    assert summary["search_seed"] == 42 and summary["seeds_not_run"] == [43, 44]  # the first of search.seeds only
    (tmp_path / "search-0123456789abcdef0123.ckpt").write_bytes(b"x")
    with caplog.at_level("INFO", logger="pgprune"):
        assert _announce_search("pg", build_params(), tmp_path) == 42
        assert _announce_search("flap", build_params(), tmp_path) is None
    text = caplog.text
    assert "the first of search.seeds [42, 43, 44]" in text and "resuming" in text and str(tmp_path) in text


def test_every_option_has_help():
    """Every option of every subcommand (help and version aside) says what it does in --help."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        for act in p._actions:
            if act.__class__.__name__ in ("_HelpAction", "_VersionAction"):
                continue
            assert (act.help or "").strip(), f"pgprune {name} {'/'.join(act.option_strings) or act.dest} has no help"
