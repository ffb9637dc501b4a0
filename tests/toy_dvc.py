"""A cheap copy of the real pipeline for DVC tests: the repository's dvc.yaml and params.yaml, with every stage's
cmd replaced by a dummy script that writes the stage's declared outputs (their content depends on the stage's
tracked params and inputs, so a change propagates downstream as with the real stages). Code dependencies are
placeholders. Templates (`vars`, `${item.*}` of foreach/matrix stages, `${params}`) are resolved by the dummy
itself from the same dvc.yaml/params.yaml, the way DVC resolves them."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DVC = str(Path(sys.executable).with_name("dvc"))

FAKE_STAGE = r'''
"""Dummy stage: writes the outputs dvc.yaml declares for it; content = stage + item + its params + its inputs."""
import hashlib, json, re, sys
from pathlib import Path
import yaml

FILE_SUFFIXES = {".json", ".csv", ".md", ".png", ".pt", ".txt", ".py", ".safetensors"}
stage = sys.argv[1]
item = dict(a.split("=", 1) for a in sys.argv[2:])  # key=value of the matrix/foreach item
spec = yaml.safe_load(Path("dvc.yaml").read_text())
body = spec["stages"][stage]
params = yaml.safe_load(Path("params.yaml").read_text())
ctx = {}
for v in spec.get("vars") or []:
    ctx.update(v)
ctx.update(params)

def get(key):
    if key == "item":
        return item["item"]
    if key.startswith("item."):
        return item[key[5:]]
    v = ctx
    for k in key.split("."):
        v = v[k]
    return v

def render(s):
    return re.sub(r"\$\{([^}]+)\}", lambda m: str(get(m.group(1).strip())), str(s))

def paths(entries):
    return [render(next(iter(e)) if isinstance(e, dict) else e) for e in entries or []]

tracked = {k: get(k) for k in (body.get("params") or [])}
h = hashlib.sha256(json.dumps([stage, item, tracked], sort_keys=True).encode())
for dep in paths(body.get("deps")):  # inputs' content too: a changed input changes the outputs
    p = Path(dep)
    for f in sorted([p] if p.is_file() else (x for x in p.rglob("*") if x.is_file())):
        h.update(str(f).encode() + f.read_bytes())
tag = h.hexdigest()[:12]
for path in paths(body.get("outs")) + paths(body.get("metrics")) + paths(body.get("plots")):
    path = Path(path)
    if path.suffix in FILE_SUFFIXES:  # a file (s0.3 is a folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"stage": stage, "tag": tag, "value": int(tag[:6], 16) / 1e6}) if path.suffix == ".json" else f"{stage} {tag}\n"
        path.write_text(text)
    else:  # a folder, with the files other stages depend on inside it
        path.mkdir(parents=True, exist_ok=True)
        (path / "out.txt").write_text(f"{stage} {tag}\n")
        for other in spec["stages"].values():
            for dep in other.get("deps") or []:
                if "${item" in str(dep):
                    continue
                dep = Path(render(dep))
                if path in dep.parents:
                    dep.parent.mkdir(parents=True, exist_ok=True)
                    dep.write_text(f"{stage} {tag} {dep.name}\n")
name = stage + ("@" + "-".join(item.values()) if item else "")
print(f"FAKE-RAN {name}", flush=True)
'''


def _templated_paths(spec: dict):
    """Output paths of every stage, with vars resolved and the item part cut off (prefixes)."""
    ctx = {}
    for v in spec.get("vars") or []:
        ctx.update(v)

    def render(s: str) -> str:
        def sub(m):
            key = m.group(1).strip()
            node = ctx
            for k in key.split("."):
                if not isinstance(node, dict) or k not in node:
                    return m.group(0)
                node = node[k]
            return str(node)
        return re.sub(r"\$\{([^}]+)\}", sub, s)

    out = set()
    for st in spec["stages"].values():
        for group in ("outs", "metrics", "plots"):
            for e in st.get(group) or []:
                out.add(render(next(iter(e)) if isinstance(e, dict) else e).split("${")[0].rstrip("/-"))
    return out, render


def env() -> dict:
    e = dict(os.environ, DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
             GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
             GIT_COMMITTER_EMAIL="t@example.com")
    e.pop("PGPRUNE_REPO_ROOT", None)
    e["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")])  # `python` = this venv's
    return e


def sh(args, cwd, check=True, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, env={**env(), **(env_extra or {})}, capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def dvc(*args, cwd, check=True, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return sh([DVC, *args], cwd, check, env_extra)


def make_toy_repo(path: Path, *, commit: bool = True) -> Path:
    """git + dvc repo at ``path`` mirroring dvc.yaml's structure with dummy commands; not reproduced yet. Its
    params.yaml is the repository's with recover.sparsities empty (no recovery cells)."""
    path.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    produced, render = _templated_paths(spec)
    for name, st in spec["stages"].items():
        if "matrix" in st:
            st["cmd"] = f"python fake_stage.py {name} " + " ".join(f"{k}=${{item.{k}}}" for k in st["matrix"])
        elif "foreach" in st:
            st["cmd"] = f"python fake_stage.py {name} item=${{item}}"
        else:
            st["cmd"] = f"python fake_stage.py {name}"
    for name, st in spec["stages"].items():
        for d in st.get("deps") or []:
            d = render(d)
            if "${" in d or any(d == p or d.startswith(p + "/") or p.startswith(d + "/") for p in produced):
                continue  # produced by a stage
            p = path / d
            if Path(d).suffix in (".py", ".json", ".csv", ".md", ".png", ".pt", ".txt", ".safetensors"):
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(f"# placeholder for {d}\n")
            else:
                p.mkdir(parents=True, exist_ok=True)
                (p / "__init__.py").write_text(f"# placeholder for {d}\n")
    (path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_param(path, "recover.sparsities", [])  # no recovery cells: tests narrow compare.* freely (test_pipeline adds some)
    (path / "fake_stage.py").write_text(FAKE_STAGE)
    if (ROOT / ".gitignore").exists():  # the project's ignore rules (they decide what experiments commit)
        (path / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    sh(["git", "init", "-q"], path)
    dvc("init", "-q", cwd=path)
    if (ROOT / ".dvcignore").exists():  # the project's (byte-code is ignored)
        (path / ".dvcignore").write_text((ROOT / ".dvcignore").read_text())
    dvc("config", "core.analytics", "false", cwd=path)
    if commit:
        sh(["git", "add", "-A"], path)
        sh(["git", "commit", "-q", "-m", "toy"], path)
    return path


def ran_stages(output: str) -> list[str]:
    """Stage names a dvc repro / exp run output says it ran (from the dummy's FAKE-RAN lines)."""
    return [ln.split("FAKE-RAN ", 1)[1].strip() for ln in output.splitlines() if "FAKE-RAN " in ln]


def set_param(path: Path, key: str, value) -> None:
    p = yaml.safe_load((path / "params.yaml").read_text())
    d = p
    *head, last = key.split(".")
    for k in head:
        d = d[k]
    d[last] = value
    (path / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
