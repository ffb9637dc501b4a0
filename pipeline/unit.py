"""One unit of a sweep = one DVC experiment, run by a Prefect worker in its own clone of the shared git remote.

The flow ``pgprune-unit`` (deployment ``pgprune-unit/unit``, see pipeline/workpool.py) does, as tasks:

1. **clone**: a fresh clone of the shared git repository (``repo_url``) at the sweep's baseline commit in
   ``$PGPRUNE_WORK_DIR/clones/<experiment>`` (a leftover of an earlier, killed attempt is removed first); the
   clone uses the machine's shared DVC cache ``$PGPRUNE_WORK_DIR/dvc-cache`` (objects any worker of this machine
   already has are not downloaded again) and, if ``dvc_remote`` is given, that URL as its default DVC remote
   (``.dvc/config.local``). If the shared git remote already holds this experiment (an earlier attempt pushed it),
   nothing is run: the unit reports the stored result (``status: reused``).
2. **pull**: ``dvc pull --allow-missing --run-cache``: restores the baseline's outputs that are in the DVC remote
   and the run cache (every stage anyone pushed). Objects missing from the remote are not an error: those stages
   are recomputed. A failing pull (remote unreachable) is logged as a warning and the unit goes on; whatever could
   not be restored is recomputed.
3. **exp-run**: ``dvc exp run --pull -n <experiment> -S k=v ... [targets]``. ``--pull`` fetches, per stage, the
   outputs of a run-cache hit, so a stage computed anywhere with the same inputs is restored, not rerun.
   ``PGPRUNE_CHECKPOINT_DIR`` (default ``$PGPRUNE_WORK_DIR/checkpoints``, shared by the workers of a machine)
   keeps the search checkpoints, keyed by a hash of every input: a retried unit resumes a killed search.
4. **push**: ``dvc exp push --run-cache origin <experiment>``: the experiment's git ref to the shared git remote,
   its cached outputs and the run cache to the DVC remote. Never ``--force``: if the ref appeared on the remote
   meanwhile (another attempt of the same unit won the race), the stored one is kept and reported.
5. **record**: the experiment's params and metrics from ``dvc exp show --json``, published as a table artifact
   ``unit-<experiment>``; the clone is removed (kept with PGPRUNE_KEEP_CLONES=1).

Experiment names are deterministic (pipeline/experiments.py): the sweep passes them; a unit started alone derives
its name from ``sweep_id`` and its overrides. Failures: an exception fails the flow run, and Prefect retries it in
the same process (``PGPRUNE_UNIT_RETRIES``, default 2, read when this module is imported); a lost worker is
detected by the heartbeat automation (pipeline/workpool.py) and the sweep reschedules the crashed run, within the
same retry budget.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from pipeline.commands import StageFailed, capture_command, dvc_executable, run_command  # noqa: E402
from pipeline.experiments import (  # noqa: E402
    experiment_name,
    normalise_unit,
    parse_exp_refs,
    stages_in_output,
    summarise_experiments,
)

UNIT_RETRIES = int(os.environ.get("PGPRUNE_UNIT_RETRIES", "2"))
TASK = dict(cache_policy=NO_CACHE, persist_result=False, log_prints=True)
GIT_REMOTE = "origin"


# --- the worker machine's folders --------------------------------------------------------------------------------
def work_dir() -> Path:
    """PGPRUNE_WORK_DIR: this machine's folder for clones, the shared DVC cache and search checkpoints."""
    return Path(os.environ.get("PGPRUNE_WORK_DIR") or Path.home() / ".cache" / "pgprune-work").expanduser()


def checkpoint_dir() -> Path:
    return Path(os.environ.get("PGPRUNE_CHECKPOINT_DIR") or work_dir() / "checkpoints").expanduser()


def artifact_key(text: str) -> str:
    """Prefect artifact keys: lowercase letters, digits and dashes."""
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")[:100]


def git(*args: str, cwd: Path) -> str:
    return capture_command(["git", *args], cwd).strip()


def resolve_repo_url(repo_url: str | None) -> str:
    url = repo_url or os.environ.get("PGPRUNE_GIT_REMOTE")
    if not url:
        raise ValueError("no shared git remote: pass repo_url or set PGPRUNE_GIT_REMOTE on the workers")
    return url


def resolve_baseline(repo_url: str, rev: str | None, cwd: Path | None = None) -> str:
    """The commit ``rev`` names on the shared git remote (a full SHA is taken as is; default: its HEAD)."""
    rev = rev or "HEAD"
    if re.fullmatch(r"[0-9a-f]{40}", rev):
        return rev
    out = capture_command(["git", "ls-remote", repo_url, rev, f"refs/heads/{rev}", f"refs/tags/{rev}"],
                          cwd or Path.cwd())
    for line in out.splitlines():
        sha, _ref = line.split()
        return sha
    raise ValueError(f"revision {rev!r} not found on {repo_url} (a branch, tag, HEAD or a full commit SHA)")


def remote_experiments(repo_url: str, cwd: Path | None = None) -> dict[tuple[str, str], str]:
    """``{(baseline, name): commit}`` of every experiment in the shared git remote."""
    return parse_exp_refs(capture_command(["git", "ls-remote", repo_url, "refs/exps/*"], cwd or Path.cwd()))


def prepare_clone(dest: Path, repo_url: str, baseline: str, dvc_remote: str | None, log) -> Path:
    """A clean clone of ``repo_url`` at ``baseline`` in ``dest`` using the machine's shared DVC cache."""
    if dest.exists():
        log(f"removing the leftover clone of an earlier attempt: {dest}")
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    capture_command(["git", "clone", "--quiet", repo_url, str(dest)], dest.parent)
    try:
        git("checkout", "--quiet", "--detach", baseline, cwd=dest)
    except StageFailed:  # not on a branch the clone fetched: fetch the commit itself
        git("fetch", "--quiet", GIT_REMOTE, baseline, cwd=dest)
        git("checkout", "--quiet", "--detach", baseline, cwd=dest)
    if not _has(dest, "user.email"):  # DVC commits the experiment: give this clone an identity if git has none
        git("config", "user.name", f"pgprune worker {socket.gethostname()}", cwd=dest)
        git("config", "user.email", "pgprune-worker@localhost", cwd=dest)
    dvc = dvc_executable()
    cache = work_dir() / "dvc-cache"
    cache.mkdir(parents=True, exist_ok=True)
    capture_command([dvc, "cache", "dir", "--local", str(cache)], dest)
    if dvc_remote:
        capture_command([dvc, "remote", "add", "--local", "--force", "--default", "workpool", dvc_remote], dest)
    return dest


def _has(cwd: Path, key: str) -> bool:
    """Whether git config (any level) sets ``key``."""
    return subprocess.run(["git", "config", "--get", key], cwd=cwd, capture_output=True).returncode == 0


# --- tasks ------------------------------------------------------------------------------------------------------------
@task(name="clone", **TASK)
def clone_task(repo_url: str, baseline: str, name: str, dvc_remote: str | None) -> str:
    logger = get_run_logger()
    dest = prepare_clone(work_dir() / "clones" / name, repo_url, baseline, dvc_remote, logger.info)
    logger.info("clone of %s at %s in %s", repo_url, baseline[:12], dest)
    return str(dest)


@task(name="dvc-pull", **TASK)
def pull_task(clone: str) -> bool:
    """Restore what the DVC remote has; a failure is a warning (what is missing gets recomputed)."""
    logger = get_run_logger()
    cmd = [dvc_executable(), "pull", "--allow-missing", "--run-cache"]
    logger.info("$ dvc %s", " ".join(cmd[1:]))
    try:
        run_command(cmd, Path(clone), logger.info)
        return True
    except StageFailed as e:
        logger.warning("dvc pull failed; the stages whose outputs are missing will be recomputed:\n%s", e)
        return False


@task(name="dvc-exp-run", **TASK)
def exp_run_task(clone: str, name: str, overrides: list[str], targets: list[str]) -> dict:
    logger = get_run_logger()
    ckpt = checkpoint_dir()
    ckpt.mkdir(parents=True, exist_ok=True)
    cmd = [dvc_executable(), "exp", "run", "--pull", "-n", name]
    for o in overrides:
        cmd += ["-S", o]
    cmd += list(targets)
    logger.info("$ dvc %s   (PGPRUNE_CHECKPOINT_DIR=%s)", " ".join(cmd[1:]), ckpt)
    lines = run_command(cmd, Path(clone), logger.info, env={"PGPRUNE_CHECKPOINT_DIR": str(ckpt)})
    return stages_in_output(lines)


@task(name="dvc-exp-push", retries=2, retry_delay_seconds=10, **TASK)
def push_task(clone: str, repo_url: str, baseline: str, name: str) -> str:
    """Push the experiment (git ref, outputs, run cache). Never --force: an existing ref is kept."""
    logger = get_run_logger()
    cmd = [dvc_executable(), "exp", "push", "--run-cache", GIT_REMOTE, name]
    logger.info("$ dvc %s", " ".join(cmd[1:]))
    try:
        run_command(cmd, Path(clone), logger.info)
        return "pushed"
    except StageFailed:
        if (baseline, name) in remote_experiments(repo_url, Path(clone)):
            logger.warning("experiment %s was pushed meanwhile by another attempt; that result is kept, this "
                           "one is discarded (nothing is overwritten)", name)
            return "kept-existing"
        raise


@task(name="dvc-exp-show", **TASK)
def record_task(clone: str, name: str, fetch: bool = False) -> dict:
    """The experiment's params and metrics (``dvc exp show --json`` in the clone; ``fetch``: pull its ref
    from the shared remote first, without its cached outputs)."""
    if fetch:
        capture_command([dvc_executable(), "exp", "pull", "--no-cache", GIT_REMOTE, name], Path(clone))
    show = json.loads(capture_command([dvc_executable(), "exp", "show", "--json", "--no-pager"], Path(clone))
                      or "[]")
    for rec in summarise_experiments(show):
        if rec["name"] == name:
            return rec
    raise StageFailed(f"experiment {name} is not in `dvc exp show` of {clone}")


def publish_unit(record: dict, overrides: list[str], status: str, stages: dict | None) -> None:
    from prefect.artifacts import create_table_artifact

    rows = [{"field": "experiment", "value": record.get("name")}, {"field": "status", "value": status},
            {"field": "commit", "value": (record.get("rev") or "")[:12]},
            {"field": "overrides", "value": " ".join(overrides)}]
    if stages:
        rows += [{"field": "stages run", "value": ", ".join(stages.get("ran") or []) or "(none)"},
                 {"field": "stages restored/unchanged", "value": ", ".join(stages.get("reused") or []) or "(none)"}]
    rows += [{"field": k, "value": v} for k, v in sorted(record.get("metrics", {}).items())]
    create_table_artifact(key=artifact_key(f"unit-{record.get('name')}"), table=rows,
                          description=f"DVC experiment {record.get('name')}: {status}")


# --- the flow ---------------------------------------------------------------------------------------------------------
@flow(name="pgprune-unit", retries=UNIT_RETRIES, retry_delay_seconds=10, persist_result=False, log_prints=True)
def unit(overrides: list[str], targets: list[str] | None = None, name: str | None = None, sweep_id: str = "adhoc",
         rev: str | None = None, repo_url: str | None = None, dvc_remote: str | None = None) -> dict[str, Any]:
    """One DVC experiment (``-S`` ``overrides``, optional stage ``targets``) in a worker-local clone of
    ``repo_url`` at ``rev``, pushed to the shared git and DVC remotes. Returns its record (name, baseline,
    status, stages run/reused, metrics)."""
    logger = get_run_logger()
    u = normalise_unit({"overrides": overrides, "targets": targets or []})
    name = name or experiment_name(sweep_id, u)
    repo_url = resolve_repo_url(repo_url)
    dvc_remote = dvc_remote or os.environ.get("PGPRUNE_DVC_REMOTE") or None
    baseline = resolve_baseline(repo_url, rev)
    logger.info("unit %s on %s: overrides %s, targets %s, baseline %s", name, socket.gethostname(),
                u["overrides"], u["targets"] or "(all)", baseline[:12])
    clone_f = clone_task.submit(repo_url, baseline, name, dvc_remote)
    clone = clone_f.result()
    if (baseline, name) in remote_experiments(repo_url):
        logger.info("experiment %s is already in the shared git remote: reporting it, running nothing", name)
        record = record_task.submit(clone_f, name, fetch=True).result()
        status, stages = "reused", None
    else:
        pull_f = pull_task.submit(clone_f)
        run_f = exp_run_task.submit(clone_f, name, u["overrides"], u["targets"], wait_for=[pull_f])
        push_f = push_task.submit(clone_f, repo_url, baseline, name, wait_for=[run_f])
        stages, pushed = run_f.result(), push_f.result()
        record = record_task.submit(clone_f, name, fetch=pushed == "kept-existing", wait_for=[push_f]).result()
        status = "completed" if pushed == "pushed" else "reused"
    publish_unit(record, u["overrides"], status, stages)
    if not os.environ.get("PGPRUNE_KEEP_CLONES"):
        shutil.rmtree(clone, ignore_errors=True)
    return {"name": name, "baseline": baseline, "status": status, "host": socket.gethostname(),
            "ran": (stages or {}).get("ran", []), "reused": (stages or {}).get("reused", []),
            "metrics": record.get("metrics", {})}
