"""A self-contained mini DVC project for the work-pool test and benchmark (the real pipeline needs the real model).

Three cheap stages, each printing ``DEMO-RAN <stage>``:

* ``prepare`` → ``data/prepared.json``: ``prepare.size`` pseudo-random numbers (seed ``prepare.seed``);
* ``search`` → ``out/result.json``: ``search.steps`` steps of a toy "search" (``search.work`` rounds of a
  256×256 matrix product per step, single-threaded numpy, then ``search.step_seconds`` of sleep, so it can be
  killed mid-run). After every step it writes a checkpoint ``$PGPRUNE_CHECKPOINT_DIR/search-<sha256 of every
  input>.json`` (atomically: temporary file + rename) and removes it when done; on start it resumes from a
  checkpoint with the same key and prints ``DEMO-RESUMED search from step <k>``, like the library's searches;
* ``evaluate`` → ``metrics/eval.json`` (a metrics file kept in git: ``cache: false``).

The result is a closed form of the params (expected_metrics), so a resumed search can be checked exactly.
``search.method`` must be one of METHODS (a unit with another value fails, for the failure path).
"""
from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import yaml

METHODS = ("pg", "flap", "magnitude")

PARAMS = {"prepare": {"size": 64, "seed": 0},
          "search": {"method": "pg", "sparsity": 0.3, "steps": 6, "step_seconds": 0.2, "work": 0, "seed": 0}}

DVC_YAML = {"stages": {
    "prepare": {"cmd": "python prepare.py", "deps": ["prepare.py"], "params": ["prepare"],
                "outs": ["data/prepared.json"]},
    "search": {"cmd": "python search.py", "deps": ["search.py", "data/prepared.json"], "params": ["search"],
               "outs": ["out/result.json"]},
    "evaluate": {"cmd": "python evaluate.py", "deps": ["evaluate.py", "out/result.json"],
                 "params": ["search.method", "search.sparsity"],
                 "metrics": [{"metrics/eval.json": {"cache": False}}]},
}}

PREPARE = '''
import json, random
from pathlib import Path
import yaml
p = yaml.safe_load(open("params.yaml"))["prepare"]
rng = random.Random(p["seed"])
Path("data").mkdir(exist_ok=True)
Path("data/prepared.json").write_text(json.dumps([round(rng.random(), 6) for _ in range(p["size"])]))
print("DEMO-RAN prepare", flush=True)
'''

SEARCH = '''
import hashlib, json, os, sys, time
from pathlib import Path
import yaml
p = yaml.safe_load(open("params.yaml"))["search"]
if p["method"] not in {methods!r}:
    sys.exit(f"search.method={{p['method']!r}} is unknown; allowed: {methods!r}")
data = Path("data/prepared.json").read_bytes()
key = hashlib.sha256(json.dumps(p, sort_keys=True).encode() + data + Path("search.py").read_bytes()).hexdigest()
ckdir = Path(os.environ.get("PGPRUNE_CHECKPOINT_DIR") or "checkpoints")
ckdir.mkdir(parents=True, exist_ok=True)
ck = ckdir / f"search-{{key[:16]}}.json"
state = {{"step": 0, "total": 0.0}}
if ck.exists():
    state = json.loads(ck.read_text())
    print(f"DEMO-RESUMED search from step {{state['step']}}", flush=True)
values = json.loads(data)
if p["work"]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import numpy as np
    m = np.random.default_rng(0).standard_normal((256, 256)) / 16
for step in range(state["step"], p["steps"]):
    for _ in range(p["work"]):
        m = np.tanh(m @ m)
    state = {{"step": step + 1, "total": state["total"] + values[step % len(values)] * (step + 1) * p["sparsity"]}}
    tmp = ck.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(ck)
    print(f"DEMO-STEP search {{step + 1}}/{{p['steps']}}", flush=True)
    time.sleep(p["step_seconds"])
Path("out").mkdir(exist_ok=True)
Path("out/result.json").write_text(json.dumps({{"method": p["method"], "total": round(state["total"], 9)}}))
ck.unlink(missing_ok=True)
print("DEMO-RAN search", flush=True)
'''.format(methods=METHODS)

EVALUATE = '''
import json
from pathlib import Path
r = json.loads(Path("out/result.json").read_text())
Path("metrics").mkdir(exist_ok=True)
Path("metrics/eval.json").write_text(json.dumps({"score": r["total"], "method": r["method"]}))
print("DEMO-RAN evaluate", flush=True)
'''


def expected_metrics(params: dict) -> dict:
    """The ``metrics/eval.json`` numbers the pipeline must produce for ``params`` (whatever was resumed)."""
    import json
    import random

    rng = random.Random(params["prepare"]["seed"])
    values = json.loads(json.dumps([round(rng.random(), 6) for _ in range(params["prepare"]["size"])]))
    s = params["search"]
    total = 0.0
    for step in range(s["steps"]):
        total = total + values[step % len(values)] * (step + 1) * s["sparsity"]
    return {"score": round(total, 9)}


def _run(args: list[str], cwd: Path, env: dict | None = None) -> str:
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r.stdout


def make_demo_project(path: Path, git_remote: Path, dvc_remote: Path, *, params: dict | None = None,
                      dvc: str | None = None, compute: tuple[str, ...] = ("prepare",), env: dict | None = None) -> str:
    """Create the project at ``path`` (git + DVC), run ``compute`` stages, push their outputs to the local DVC
    remote ``dvc_remote`` and the commit to a new bare git repository ``git_remote`` (branch main).
    Returns the commit SHA. ``env`` (added to os.environ) must give git an identity if the machine has none."""
    from pipeline.commands import command_env, dvc_executable

    dvc = dvc or dvc_executable()
    env = command_env(env)
    path, git_remote, dvc_remote = Path(path), Path(git_remote), Path(dvc_remote)
    path.mkdir(parents=True, exist_ok=True)
    full = yaml.safe_load(yaml.safe_dump(PARAMS))
    for section, values in (params or {}).items():
        full.setdefault(section, {}).update(values)
    (path / "params.yaml").write_text(yaml.safe_dump(full, sort_keys=False))
    (path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    for name, text in (("prepare.py", PREPARE), ("search.py", SEARCH), ("evaluate.py", EVALUATE)):
        (path / name).write_text(textwrap.dedent(text).lstrip())
    (path / ".gitignore").write_text("/checkpoints/\n__pycache__/\n")
    _run(["git", "init", "-q", "-b", "main"], path, env)
    _run([dvc, "init", "-q"], path, env)
    _run([dvc, "config", "core.analytics", "false"], path, env)
    _run([dvc, "remote", "add", "-d", "shared", str(dvc_remote)], path, env)
    for stage in compute:
        _run([dvc, "repro", "--single-item", stage], path, env)
    _run(["git", "add", "-A"], path, env)
    _run(["git", "commit", "-q", "-m", "demo project"], path, env)
    if compute:
        _run([dvc, "push", "--run-cache"], path, env)
    _run(["git", "init", "-q", "--bare", "-b", "main", str(git_remote)], path, env)
    _run(["git", "remote", "add", "origin", str(git_remote)], path, env)
    _run(["git", "push", "-q", "origin", "main"], path, env)
    return _run(["git", "rev-parse", "HEAD"], path, env).strip()
