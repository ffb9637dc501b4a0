"""Running dvc and git from the flows: which executable, streamed output into a log, errors with the last lines.

Nothing here imports torch or pgprune's library: the flows only shell out to dvc and git.
Environment: PGPRUNE_DVC (the dvc executable; default: the one next to this Python, else PATH).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


class StageFailed(RuntimeError):
    """A dvc/git command exited with a non-zero status; the message holds the command and its last output lines."""


def dvc_executable() -> str:
    """PGPRUNE_DVC, else the dvc installed next to this interpreter (the project's venv), else dvc on PATH."""
    if os.environ.get("PGPRUNE_DVC"):
        return os.environ["PGPRUNE_DVC"]
    here = Path(sys.executable).with_name("dvc")
    if here.exists():
        return str(here)
    found = shutil.which("dvc")
    if not found:
        raise FileNotFoundError("dvc not found: install the project (pip install -e .) or set PGPRUNE_DVC")
    return found


def command_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """os.environ + no analytics + unbuffered Python, with this interpreter's folder first on PATH (dvc.yaml's
    `python -m stages.x` must be this environment's Python even when the venv is not activated)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def _show(cmd: Sequence[str]) -> str:
    return " ".join(str(c) for c in cmd)


def run_command(cmd: Sequence[str], cwd: Path, log: Callable[[str], Any], tail: int = 30,
                env: Mapping[str, str] | None = None) -> list[str]:
    """Run ``cmd`` in ``cwd``, passing each output line (stdout and stderr, as they come) to ``log``;
    raise StageFailed with the last ``tail`` lines if it exits non-zero. Returns every output line."""
    lines: list[str] = []
    last: deque[str] = deque(maxlen=tail)
    with subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1, env=command_env(env), errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\r\n")
            lines.append(line)
            last.append(line)
            log(line)
        rc = proc.wait()
    if rc:
        raise StageFailed(f"`{_show(cmd)}` exited with status {rc}; last output:\n" + "\n".join(last))
    return lines


def capture_command(cmd: Sequence[str], cwd: Path, env: Mapping[str, str] | None = None) -> str:
    """Run ``cmd`` and return its stdout; StageFailed with the end of stderr if it fails."""
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=command_env(env))
    if r.returncode:
        raise StageFailed(f"`{_show(cmd)}` exited with status {r.returncode}:\n{(r.stderr or r.stdout)[-4000:]}")
    return r.stdout
