"""The commands printed in README.md and docs/*.md run as printed in a fresh clone (from the repository root).

Convention: every fenced shell block (```bash, ```sh, ```shell or ```console) is extracted. A block preceded by
the line ``<!-- runnable -->`` (blank lines allowed in between) is *runnable*: it is executed with ``bash -e`` in
a subprocess from the repository root, so keep such blocks cheap (``--help``, ``--version``, ``pgprune plan``,
``docs/make_parameters.py --check``). The subprocess gets ``PGPRUNE_CACHE`` pointing at a temporary cache that holds
only the embedded model's ``config.json`` (``pgprune plan`` reads nothing else), and runs offline.

Every shell block, runnable or not, must

* parse (``bash -n``);
* use ``pgprune <subcommand> ...`` with arguments the real parser accepts (``pgprune.cli.build_parser()``, read at
  test time: the options change while the docs do not);
* name importable modules in ``python -m X`` and keys of the params schema in ``dvc exp run -S key=value``;
* mention only repository paths that exist (git-tracked files and folders; DVC outputs and ``.venv`` excepted);
* activate the virtual environment (``. .venv/bin/activate`` or ``source ...``) before using the project's tools
  (``pgprune``, ``python``, ``dvc``, ``prefect``, ``pip``, ``lm_eval``), or call them as ``.venv/bin/<tool>``;
  what runs the pipeline's stages (``dvc``, ``pgprune run``, ``python -m pipeline...``) needs the activated venv
  (or ``PATH=.venv/bin:$PATH``) even as ``.venv/bin/<tool>``: the stages run ``python`` from PATH, so
  ``.venv/bin/dvc exp run`` alone fails in a fresh clone with "No module named 'torch'".

Inline code spans that start with ``pgprune `` or ``python -m `` are checked for real subcommands, options and
modules (not for required arguments). docs/parameters.md equals ``docs/make_parameters.py``'s text
(``pgprune.config.params_reference`` for this dvc.yaml).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELLS = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
RUNNABLE = "<!-- runnable -->"
TOOLS = {"pgprune", "python", "dvc", "prefect", "pip", "lm_eval"}
ACTIVATE = re.compile(r"^\s*(?:\.|source)\s+\.venv/bin/activate\b")
OPERATORS = {"&&", "||", ";", "|", "&", "(", ")"}
# the DVC outputs (absent in a fresh clone) and what the set-up creates
GENERATED_ROOTS = {".venv", "models", "artifacts", "dvc_plots"}
# the embedded model's config.json: enough for `pgprune plan --model embedded:smollm2-135m`
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.02,
    "intermediate_size": 1536, "max_position_embeddings": 8192, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3, "pad_token_id": 2,
    "rms_norm_eps": 1e-05, "rope_theta": 100000.0, "tie_word_embeddings": True, "vocab_size": 49152,
}


# --- extraction ---------------------------------------------------------------------------------------------------
def shell_blocks() -> list[tuple[str, int, str, bool]]:
    """(file, line, code, runnable) of every fenced shell block."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            if m.group(1).lower() not in SHELLS:
                continue
            before = text[:m.start()].rstrip("\n").splitlines()
            runnable = bool(before) and before[-1].strip() == RUNNABLE
            line = text.count("\n", 0, m.start()) + 1
            out.append((path.relative_to(ROOT).as_posix(), line, m.group(2), runnable))
    return out


BLOCKS = shell_blocks()
IDS = [f"{f}:{ln}" for f, ln, _, _ in BLOCKS]


def commands(code: str) -> list[list[str]]:
    """The simple commands of a block: continuation lines joined, comments dropped, split at && || ; | & ( )."""
    joined = re.sub(r"\\\n", " ", code)
    cmds = []
    for line in joined.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|()")
        lex.whitespace_split = True
        lex.commenters = "#"
        cur: list[str] = []
        for tok in lex:
            if tok in OPERATORS:
                if cur:
                    cmds.append(cur)
                cur = []
            else:
                cur.append(tok)
        if cur:
            cmds.append(cur)
    return cmds


def strip_env(cmd: list[str]) -> list[str]:
    """The command without leading VAR=value assignments (and `export`, `exec`)."""
    i = 0
    while i < len(cmd) and (re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", cmd[i]) or cmd[i] in {"exec", "time"}):
        i += 1
    return cmd[i:]


def tool_of(word: str) -> str:
    return word.rsplit("/", 1)[-1] if word.startswith(".venv/bin/") else word


# --- the parser, read at test time ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def subparsers() -> dict:
    from pgprune.cli import build_parser

    parser = build_parser()
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert actions, "pgprune.cli.build_parser() has no subcommands"
    return parser, actions[0].choices


def check_pgprune_full(args: list[str]) -> str | None:
    """None when the real parser accepts `pgprune <args>`, else the reason."""
    from pgprune.cli import UsageError

    parser, _ = subparsers()
    if not args:
        return "a bare `pgprune`"
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args(args)
    except SystemExit as e:  # --help, --version
        return None if e.code in (0, None) else f"exit {e.code}"
    except UsageError as e:
        return str(e)
    return None


def check_pgprune_options(args: list[str]) -> str | None:
    """Only the subcommand and the option names (inline mentions leave out required arguments)."""
    parser, subs = subparsers()
    if not args or args[0] in {"--help", "-h", "--version"}:
        return None
    if args[0] not in subs:
        return f"no subcommand {args[0]!r} (have {', '.join(subs)})"
    known = set(subs[args[0]]._option_string_actions)
    for a in args[1:]:
        if a.startswith("-") and not re.match(r"^-\d", a) and a.split("=", 1)[0] not in known:
            return f"`pgprune {args[0]}` has no option {a!r}"
    return None


def module_exists(name: str) -> bool:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=None)
def param_keys() -> set[str]:
    from pgprune.config import params_reference

    return set(re.findall(r"^\| `([a-z_.]+)` \|", params_reference(), re.M))


@functools.lru_cache(maxsize=None)
def tracked() -> set[str]:
    """Git-tracked files and their folders (as in a fresh clone), plus the working tree's new files."""
    try:
        files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        files = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if ".git" not in p.parts]
    paths = set(files)
    for f in files:
        parts = f.split("/")
        paths.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return paths


@functools.lru_cache(maxsize=None)
def dvc_outputs() -> list[str]:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    text = json.dumps(spec)
    return sorted(set(re.findall(r"\b(?:data|models|artifacts|report)/[\w./-]+", text)))


def path_problems(cmds: list[list[str]], have: set[str], outs: list[str]) -> list[str]:
    roots = {p.split("/")[0] for p in have}
    bad = []
    for cmd in cmds:
        for tok in cmd:
            if "://" in tok or tok.startswith("-") or "=" in tok or "$" in tok or "*" in tok:
                continue
            p = tok.rstrip("/").removeprefix("./")
            first = p.split("/")[0]
            if "/" not in p and not re.search(r"\.(py|sh|ya?ml|toml|txt|md|json|lock)$", p):
                continue
            if first in GENERATED_ROOTS or first not in roots or p in have:
                continue
            if any(p == o or p.startswith(o.rstrip("/") + "/") or o.startswith(p + "/") for o in outs):
                continue
            bad.append(p)
    return bad


# --- tests --------------------------------------------------------------------------------------------------------
def test_blocks_found():
    files = {f for f, _, _, _ in BLOCKS}
    assert "README.md" in files and any(f.startswith("docs/") for f in files)
    assert any(r for *_, r in BLOCKS), f"no block is marked {RUNNABLE}"
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200, "README.md is the front page: at most 200 lines"
    for cmd in ("bash scripts/pipeline.sh", "bash scripts/test.sh"):
        assert cmd in readme.split("\n## ", 2)[1], f"README's first section shows `{cmd}`"


def test_links_resolve():
    """Relative links of README.md and docs/*.md point at files that exist."""
    bad = []
    for path in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (path.parent / target).exists():
                bad.append(f"{path.relative_to(ROOT)}: {target}")
    assert not bad, bad


@pytest.mark.parametrize("block", BLOCKS, ids=IDS)
def test_shell_block(block):
    fname, line, code, _ = block
    where = f"{fname}:{line}"
    r = subprocess.run(["bash", "-n"], input=code, capture_output=True, text=True)
    assert r.returncode == 0, f"{where}: bash -n: {r.stderr}"
    cmds = commands(code)
    activated = False
    have, outs, keys = tracked(), dvc_outputs(), None
    for raw in cmds:
        if raw and raw[0] in {".", "source"} and raw[1:2] == [".venv/bin/activate"]:
            activated = True
            continue
        cmd = strip_env(raw[1:] if raw and raw[0] == "export" else raw)
        if not cmd:
            continue
        exe = cmd[0]
        tool = tool_of(exe)
        uses_path_venv = any(re.match(r"^PATH=[^ ]*\.venv/bin", t) for t in raw)
        if tool in TOOLS and exe == tool:
            assert activated or uses_path_venv, \
                f"{where}: `{' '.join(cmd)}` needs the venv: put `. .venv/bin/activate` before it (fresh clone)"
        # what runs the pipeline's stages, which call `python` from PATH: `.venv/bin/dvc ...` alone is not enough
        runs_stages = tool == "dvc" or (tool == "pgprune" and cmd[1:2] == ["run"]) or \
            (tool in {"python", "python3"} and "-m" in cmd and cmd[cmd.index("-m") + 1].startswith("pipeline."))
        if runs_stages:
            assert activated or uses_path_venv, \
                f"{where}: `{' '.join(cmd)}` runs the stages, which call `python` from PATH: put " \
                "`. .venv/bin/activate` before it (a bare .venv/bin/... fails with No module named 'torch')"
        if tool == "pgprune":
            err = check_pgprune_full(cmd[1:])
            assert err is None, f"{where}: `{shlex.join(cmd)}`: {err}"
        if tool in {"python", "python3"} and "-m" in cmd:
            mod = cmd[cmd.index("-m") + 1]
            assert module_exists(mod), f"{where}: `python -m {mod}`: no such module"
        if tool == "dvc" and cmd[1:3] == ["exp", "run"]:
            keys = keys or param_keys()
            for i, t in enumerate(cmd):
                if t in {"-S", "--set-param"}:
                    key = cmd[i + 1].split("=", 1)[0]
                    assert key in keys, f"{where}: `-S {cmd[i + 1]}`: no params key {key!r}"
    bad = path_problems(cmds, have, outs)
    assert not bad, f"{where}: no such path in the repository: {bad}"


def test_inline_commands():
    """`pgprune ...` and `python -m ...` in inline code name real subcommands, options and modules."""
    bad = []
    for path in DOCS:
        text = FENCE.sub("", path.read_text())
        for span in re.findall(r"`([^`\n]+)`", text):
            if "<" in span:  # a placeholder such as <stage>
                continue
            try:
                words = shlex.split(span)
            except ValueError:
                continue
            if words[:1] == ["pgprune"] and len(words) > 1:
                err = check_pgprune_options(words[1:])
                if err:
                    bad.append(f"{path.name}: `{span}`: {err}")
            elif words[:2] == ["python", "-m"] and len(words) > 2 and not module_exists(words[2]):
                bad.append(f"{path.name}: `{span}`: no module {words[2]!r}")
    assert not bad, bad


@pytest.fixture(scope="module")
def run_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("pgprune-cache")
    model = cache / "models" / "smollm2-135m"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(SMOLLM2_CONFIG))
    env = dict(os.environ, PGPRUNE_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    venv = os.environ.get("PGPRUNE_VENV", ".venv")
    if not (ROOT / venv / "bin" / "activate").exists():
        pytest.skip(f"no virtual environment at {venv} (bash scripts/setup.sh)")
    return env


@pytest.mark.parametrize("block", [b for b in BLOCKS if b[3]], ids=[i for i, b in zip(IDS, BLOCKS) if b[3]])
def test_runnable_block(block, run_env):
    fname, line, code, _ = block
    r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=ROOT, env=run_env, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, f"{fname}:{line} failed ({r.returncode}):\n{code}\n--- stdout\n{r.stdout[-2000:]}" \
                              f"\n--- stderr\n{r.stderr[-3000:]}"


def test_parameters_page_is_generated():
    spec = importlib.util.spec_from_file_location("make_parameters", ROOT / "docs" / "make_parameters.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "docs" / "parameters.md").read_text() == mod.text(), \
        "docs/parameters.md is stale: run .venv/bin/python docs/make_parameters.py"
