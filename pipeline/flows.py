"""Prefect flows over the DVC pipeline: one Prefect task per dvc.yaml stage, each running `dvc repro` on it.

DVC decides what is up to date and holds the only cache; Prefect adds orchestration, retries, logs and a UI.
No Prefect result caching or persistence is used (cache_policy=NO_CACHE, persist_result=False): a stage whose
inputs did not change is skipped by DVC ("Stage 'x' didn't change, skipping"), not by Prefect.

    python -m pipeline.flows                       # the whole pipeline (ephemeral Prefect, no server needed)
    python -m pipeline.flows --stages data init    # just these stages (dvc repro --single-item), in DAG order
    python -m pipeline.flows --force --stages eval # rerun even if up to date
    python -m pipeline.flows --sweep 0.2 0.4 0.6   # one `dvc exp run -S search.sparsity=S` per value
    python -m pipeline.flows --dry-run             # print the stage order and the commands, run nothing

The stages run one after another: DVC holds a repository lock, so concurrent `dvc repro` calls would fail.
Environment: PGPRUNE_DVC (the dvc executable; default: the one next to this Python, else PATH),
PGPRUNE_REPO_ROOT (the repository to run in; default: this checkout).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from pgprune.errors import PgpruneError  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
TASK_OPTIONS = dict(retries=1, retry_delay_seconds=5, log_prints=True, cache_policy=NO_CACHE, persist_result=False)


class StageFailed(RuntimeError):
    """A dvc command exited with a non-zero status; the message holds the command and its last output lines."""


# --- where and what to run --------------------------------------------------------------------------------------
def repo_root() -> Path:
    return Path(os.environ.get("PGPRUNE_REPO_ROOT") or REPO_ROOT)


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


def repro_command(stage: str, force: bool = False) -> list[str]:
    """`dvc repro --single-item <stage>`; for a foreach group (compare) DVC expands it to compare@S for every S."""
    return [dvc_executable(), "repro", "--single-item", *(["--force"] if force else []), stage]


def exp_run_command(sparsity: float, queue: bool = False) -> list[str]:
    return [dvc_executable(), "exp", "run", *(["--queue"] if queue else []), "-S", f"search.sparsity={sparsity:g}"]


# --- the DAG of dvc.yaml (pure functions) ------------------------------------------------------------------------
def load_dvc_yaml(root: Path | None = None) -> dict:
    return yaml.safe_load(((root or repo_root()) / "dvc.yaml").read_text(encoding="utf-8"))


def _paths(entries: Iterable[Any] | None) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]


def _parts(path: str) -> list[str]:
    return [p for p in path.strip().strip("/").split("/") if p not in ("", ".")]


def _overlaps(a: str, b: str) -> bool:
    """Whether two dvc.yaml paths are the same or one contains the other (a component with ${...} matches any)."""
    pa, pb = _parts(a), _parts(b)
    n = min(len(pa), len(pb))
    return all(x == y or "${" in x or "${" in y for x, y in zip(pa[:n], pb[:n]))


def stage_graph(dvc_yaml: dict) -> dict[str, list[str]]:
    """stage (foreach groups by their group name) → the stages whose outputs it depends on, in dvc.yaml order."""
    stages = dvc_yaml.get("stages") or {}
    outs = {}
    for name, st in stages.items():
        body = st.get("do", st)
        outs[name] = _paths(body.get("outs")) + _paths(body.get("metrics")) + _paths(body.get("plots"))
    graph = {}
    for name, st in stages.items():
        deps = _paths(st.get("do", st).get("deps"))
        graph[name] = [o for o in stages if o != name and any(_overlaps(d, p) for d in deps for p in outs[o])]
    return graph


def stage_order(dvc_yaml: dict, selected: Iterable[str] | None = None) -> list[str]:
    """Stages in dependency order (ties: the order of dvc.yaml), optionally only ``selected`` ones.

    ``selected`` may name foreach groups (``compare``) or single items (``compare@0.3``); unknown names raise
    ValueError listing the valid ones.
    """
    graph = stage_graph(dvc_yaml)
    position = {n: i for i, n in enumerate(graph)}
    indegree = {n: len(d) for n, d in graph.items()}
    users = {n: [m for m in graph if n in graph[m]] for n in graph}
    ready = sorted((n for n, k in indegree.items() if k == 0), key=position.get)
    order: list[str] = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for m in users[n]:
            indegree[m] -= 1
            if indegree[m] == 0:
                ready.append(m)
        ready.sort(key=position.get)
    if len(order) != len(graph):
        raise ValueError(f"dvc.yaml has a dependency cycle among {sorted(set(graph) - set(order))}")
    if selected is None:
        return order
    selected = list(dict.fromkeys(selected))
    unknown = [s for s in selected if s.split("@", 1)[0] not in graph]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has: {', '.join(order)} "
                         "(a foreach item is written group@value, e.g. compare@0.3)")
    rank = {n: i for i, n in enumerate(order)}
    return sorted(selected, key=lambda s: (rank[s.split("@", 1)[0]], selected.index(s)))


# --- running commands ---------------------------------------------------------------------------------------------
def run_command(cmd: Sequence[str], cwd: Path, log: Callable[[str], Any], tail: int = 30) -> None:
    """Run ``cmd`` in ``cwd``, passing each output line (stdout and stderr, as they come) to ``log``;
    raise StageFailed with the last ``tail`` lines if it exits non-zero."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", DVC_NO_ANALYTICS="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    # dvc.yaml's `python -m stages.x` must be this environment's Python, even when the venv is not activated
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    last: deque[str] = deque(maxlen=tail)
    with subprocess.Popen(list(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          bufsize=1, env=env, errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\r\n")
            last.append(line)
            log(line)
        rc = proc.wait()
    if rc:
        raise StageFailed(f"`{' '.join(cmd)}` exited with status {rc}; last output:\n" + "\n".join(last))


def capture_command(cmd: Sequence[str], cwd: Path) -> str:
    r = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True,
                       env=dict(os.environ, DVC_NO_ANALYTICS="1"))
    if r.returncode:
        raise StageFailed(f"`{' '.join(cmd)}` exited with status {r.returncode}:\n{r.stderr[-4000:]}")
    return r.stdout


def use_params(params_file: str | os.PathLike, root: Path) -> bool:
    """Validate ``params_file`` (pgprune.config); if it is not the repository's params.yaml, copy it there
    (DVC tracks params.yaml), so the run uses it. Returns whether params.yaml was overwritten."""
    from pgprune.config import load_params
    from pgprune.io import write_text

    src = Path(params_file)
    src = src if src.is_absolute() else root / src
    load_params(src)  # raises ConfigError naming the bad key before anything runs
    dst = root / "params.yaml"
    if src.resolve() != dst.resolve():
        text = src.read_text(encoding="utf-8")
        if not dst.exists() or dst.read_text(encoding="utf-8") != text:
            write_text(dst, text)
            return True
    return False


# --- experiment summary (pure) -------------------------------------------------------------------------------------
def experiment_names(line: str) -> list[str]:
    """Experiment names in a line of `dvc exp run` output ("Ran experiment(s): a, b", "Queued experiment 'a' ...")."""
    m = re.search(r"Queued experiment '([^']+)'", line)
    if m:
        return [m.group(1)]
    m = re.search(r"Ran experiment\(s\):(.*)", line)
    return [n.strip() for n in m.group(1).split(",") if n.strip()] if m else []


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        out[prefix] = obj
    return out  # lists (per-layer counts, ...) are left out


def summarise_experiments(exp_show: list[dict]) -> list[dict]:
    """`dvc exp show --json` → one record per committed baseline and experiment:
    ``{"name", "rev", "baseline", "search.sparsity", "params": {...}, "metrics": {"file:key": value}}``."""
    records = []

    def record(entry: dict, baseline: str | None) -> None:
        data = entry.get("data") or {}
        params = {}
        for _file, p in (data.get("params") or {}).items():
            params.update(_flatten((p or {}).get("data") or {}))
        metrics = {}
        for file, m in (data.get("metrics") or {}).items():
            for k, v in _flatten((m or {}).get("data") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    metrics[f"{file}:{k}"] = v
        records.append({"name": entry.get("name"), "rev": entry.get("rev"), "baseline": baseline,
                        "search.sparsity": params.get("search.sparsity"), "params": params, "metrics": metrics,
                        "error": entry.get("error")})

    for top in exp_show or []:
        if top.get("rev") == "workspace":
            continue
        record(top, None)
        for group in top.get("experiments") or []:
            for rev in group.get("revs") or []:
                record(rev, top.get("name") or top.get("rev"))
    return records


# --- Prefect tasks and flows ---------------------------------------------------------------------------------------
@task(name="dvc-repro", task_run_name="{stage}", **TASK_OPTIONS)
def run_stage(stage: str, force: bool = False) -> str:
    logger = get_run_logger()
    cmd = repro_command(stage, force)
    logger.info("$ dvc %s", " ".join(cmd[1:]))
    run_command(cmd, repo_root(), logger.info)
    return stage


@task(name="dvc-exp-run", task_run_name="search.sparsity={sparsity}", **TASK_OPTIONS)
def run_experiment(sparsity: float, queue: bool = False) -> str | None:
    logger = get_run_logger()
    cmd = exp_run_command(sparsity, queue)
    logger.info("$ dvc %s", " ".join(cmd[1:]))
    names: list[str] = []

    def log(line: str) -> None:
        logger.info(line)
        names.extend(experiment_names(line))

    run_command(cmd, repo_root(), log)
    return names[-1] if names else None


@task(name="dvc-exp-run-queue", **TASK_OPTIONS)
def run_queue() -> None:
    logger = get_run_logger()
    cmd = [dvc_executable(), "exp", "run", "--run-all"]
    logger.info("$ dvc %s", " ".join(cmd[1:]))
    run_command(cmd, repo_root(), logger.info)


@task(name="dvc-exp-show", **TASK_OPTIONS)
def show_experiments() -> list[dict]:
    out = capture_command([dvc_executable(), "exp", "show", "--json", "--no-pager"], repo_root())
    return summarise_experiments(json.loads(out or "[]"))


@flow(name="pgprune-pipeline", log_prints=True, persist_result=False)
def pgprune_pipeline(stages: list[str] | None = None, params_file: str = "params.yaml", force: bool = False
                     ) -> list[str]:
    """Run the dvc.yaml stages (all, or ``stages``) in DAG order, one task each; returns the stages run."""
    logger = get_run_logger()
    root = repo_root()
    if use_params(params_file, root):
        logger.warning("copied %s to params.yaml (the file DVC tracks)", params_file)
    order = stage_order(load_dvc_yaml(root), stages)
    logger.info("stages, in DAG order: %s", " → ".join(order))
    for stage in order:
        run_stage.with_options(name=f"dvc-repro-{stage}")(stage, force)
    return order


@flow(name="pgprune-sparsity-sweep", log_prints=True, persist_result=False)
def sweep_sparsity(sparsities: list[float], queue: bool = False) -> list[dict]:
    """One DVC experiment per sparsity (`dvc exp run -S search.sparsity=S`), then the `dvc exp show` summary.

    Sequential (default): each experiment runs in the workspace, which is left with the last one's params and
    outputs (DVC's behaviour; `dvc exp apply`/`git checkout params.yaml && dvc checkout` to go back).
    ``queue=True``: all are queued and run by `dvc exp run --run-all` in temporary copies (workspace untouched;
    needs the inputs committed to git or in DVC's cache).
    """
    if not sparsities:
        raise ValueError("sparsities is empty")
    bad = [s for s in sparsities if not 0 < float(s) < 1]
    if bad:
        raise ValueError(f"sparsities {bad} must each be in (0, 1)")
    names = [run_experiment(float(s), queue) for s in sparsities]
    if queue:
        run_queue()
    summary = show_experiments()
    logger = get_run_logger()
    for r in summary:
        ppl = {k.split(":", 1)[1]: v for k, v in r["metrics"].items() if ".ppl." in k and "pruned" in k}
        logger.info("%s (%s): search.sparsity=%s pruned ppl=%s", r["name"], (r["rev"] or "")[:7],
                    r["search.sparsity"], ppl)
    ran = set(filter(None, names))
    return [r for r in summary if not ran or r["name"] in ran or r["baseline"] is None]


# --- CLI ------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.flows", description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", metavar="STAGE", help="only these stages (default: all, in DAG order)")
    ap.add_argument("--params", default="params.yaml", help="parameter file (copied to params.yaml if different)")
    ap.add_argument("--force", action="store_true", help="rerun stages even if DVC says they are up to date")
    ap.add_argument("--sweep", nargs="+", type=float, metavar="S", help="run the sparsity sweep flow instead")
    ap.add_argument("--queue", action="store_true", help="with --sweep: queue the experiments, then run them all")
    ap.add_argument("--dry-run", action="store_true", help="print the stage order and commands, run nothing")
    args = ap.parse_args(argv)
    try:
        if args.dry_run:
            if args.sweep:
                for s in args.sweep:
                    print("dvc " + " ".join(exp_run_command(s, args.queue)[1:]))
                return 0
            for stage in stage_order(load_dvc_yaml(), args.stages):
                print("dvc " + " ".join(repro_command(stage, args.force)[1:]))
            return 0
        if args.sweep:
            print(json.dumps(sweep_sparsity(args.sweep, queue=args.queue), indent=2))
        else:
            pgprune_pipeline(stages=args.stages, params_file=args.params, force=args.force)
    except (ValueError, PgpruneError) as e:  # bad stage names, sparsities or params: the message alone
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
