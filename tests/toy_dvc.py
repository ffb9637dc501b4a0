"""A cheap copy of the real pipeline for DVC tests: the repository's dvc.yaml and params.yaml, with every stage's
cmd replaced by a dummy script that writes the stage's declared outputs (their content depends on the stage's
tracked params, so a change propagates downstream as with the real stages). Code dependencies are placeholders."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DVC = str(Path(sys.executable).with_name("dvc"))

FAKE_STAGE = r'''
"""Dummy stage: writes the outputs dvc.yaml declares for it; content = stage + the values of its params."""
import hashlib, json, sys
from pathlib import Path
import yaml

FILE_SUFFIXES = {".json", ".csv", ".md", ".png", ".pt", ".txt", ".py"}
stage, item = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
spec = yaml.safe_load(Path("dvc.yaml").read_text())["stages"][stage]
spec = spec.get("do", spec)
params = yaml.safe_load(Path("params.yaml").read_text())

def get(key):
    v = params
    for k in key.split("."):
        v = v[k]
    return v

tracked = {k: get(k) for k in (spec.get("params") or [])}
h = hashlib.sha256(json.dumps([stage, item, tracked], sort_keys=True).encode())
for dep in spec.get("deps") or []:  # inputs' content too: a changed input changes the outputs
    p = Path(dep)
    for f in sorted([p] if p.is_file() else (x for x in p.rglob("*") if x.is_file())):
        h.update(str(f).encode() + f.read_bytes())
tag = h.hexdigest()[:12]
for group in ("outs", "metrics", "plots"):
    for entry in spec.get(group) or []:
        path = next(iter(entry)) if isinstance(entry, dict) else entry
        path = Path(path.replace("${item}", str(item)))
        if path.suffix in FILE_SUFFIXES:  # a file (s0.3 is a folder)
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"stage": stage, "tag": tag, "value": int(tag[:6], 16) / 1e6}) if path.suffix == ".json" else f"{stage} {tag}\n"
            path.write_text(text)
        else:  # a folder
            path.mkdir(parents=True, exist_ok=True)
            (path / "out.txt").write_text(f"{stage} {tag}\n")
print(f"FAKE-RAN {stage}{'@' + item if item else ''}", flush=True)
'''


def env() -> dict:
    e = dict(os.environ, DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false",
             GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
             GIT_COMMITTER_EMAIL="t@example.com")
    e.pop("PGPRUNE_REPO_ROOT", None)
    e["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), e.get("PATH", "")])  # `python` = this venv's
    return e


def sh(args, cwd, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run(args, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and r.returncode:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


def dvc(*args, cwd, check=True) -> subprocess.CompletedProcess:
    return sh([DVC, *args], cwd, check)


def make_toy_repo(path: Path, *, commit: bool = True) -> Path:
    """git + dvc repo at ``path`` mirroring dvc.yaml's structure with dummy commands; not reproduced yet."""
    path.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    produced = set()
    for name, st in spec["stages"].items():
        body = st.get("do", st)
        for group in ("outs", "metrics", "plots"):
            for e in body.get(group) or []:
                produced.add((next(iter(e)) if isinstance(e, dict) else e).split("${")[0].rstrip("/"))
        body["cmd"] = f"python fake_stage.py {name}" + (" ${item}" if "foreach" in st else "")
    for name, st in spec["stages"].items():
        for d in st.get("do", st).get("deps") or []:
            if any(d == p or d.startswith(p + "/") or p.startswith(d + "/") for p in produced):
                continue  # produced by a stage
            p = path / d
            if Path(d).suffix in (".py", ".json", ".csv", ".md", ".png", ".pt", ".txt"):
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text(f"# placeholder for {d}\n")
            else:
                p.mkdir(parents=True, exist_ok=True)
                (p / "__init__.py").write_text(f"# placeholder for {d}\n")
    (path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
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
