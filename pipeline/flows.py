"""Prefect flows over the DVC pipeline in this checkout: one Prefect task per dvc.yaml stage, each running
`dvc repro --single-item` on it, with the stage graph drawn in the Prefect UI.

DVC decides what is up to date and holds the only cache; Prefect adds orchestration, retries, logs and a UI.
No Prefect result caching or persistence is used (cache_policy=NO_CACHE, persist_result=False): a stage whose
inputs did not change is skipped by DVC ("Stage 'x' didn't change, skipping"), not by Prefect.

    python -m pipeline.flows                       # the whole pipeline (ephemeral Prefect, no server needed)
    python -m pipeline.flows --stages data init    # just these stages, in DAG order
    python -m pipeline.flows --stages search       # a matrix group: every search@<method>-<S> cell
    python -m pipeline.flows --force --stages evaluate_dense   # rerun even if up to date
    python -m pipeline.flows --sweep 0.2 0.4       # one `dvc exp run` per sparsity (all methods at S), here
    python -m pipeline.flows --sweep "search.steps=100" "search.steps=300"   # or per set of -S overrides
    python -m pipeline.flows --dry-run             # print the stage order and the commands, run nothing

Stages and their graph are DVC's own (``Repo(root).index``, pipeline/dvcgraph.py): ``foreach``/``matrix`` groups
are expanded with params.yaml, so the flow has one task per cell (``search@pg-0.3``), each waiting for the tasks of the stages whose outputs it
reads (``wait_for``): the Prefect UI draws dvc.yaml's DAG, and a failed stage leaves what depends on it NotReady
while independent stages still run. They run one at a time (a one-thread task runner, submitted in DAG order):
DVC holds a repository lock. Sweeps over many machines: pipeline/workpool.py.
Environment: PGPRUNE_DVC (the dvc executable), PGPRUNE_REPO_ROOT (the repository to run in; default: this checkout).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from pgprune.errors import PgpruneError  # noqa: E402
from pipeline.commands import StageFailed, capture_command, dvc_executable, run_command  # noqa: E402,F401
from pipeline.dvcgraph import load_params_yaml, plan, selected_upstream, stage_graph, stage_order  # noqa: E402,F401
from pipeline.experiments import experiment_names, normalise_unit, stages_in_output, summarise_experiments  # noqa: E402,F401

REPO_ROOT = Path(__file__).resolve().parent.parent
TASK_OPTIONS = dict(retries=1, retry_delay_seconds=5, log_prints=True, cache_policy=NO_CACHE, persist_result=False)


# --- where and what to run --------------------------------------------------------------------------------------
def repo_root() -> Path:
    return Path(os.environ.get("PGPRUNE_REPO_ROOT") or REPO_ROOT)


def repro_command(stage: str, force: bool = False) -> list[str]:
    """`dvc repro --single-item <stage>` (a group name makes DVC run every stage of the group)."""
    return [dvc_executable(), "repro", "--single-item", *(["--force"] if force else []), stage]


def exp_run_command(overrides: Sequence[str], queue: bool = False, name: str | None = None) -> list[str]:
    cmd = [dvc_executable(), "exp", "run", *(["--queue"] if queue else []), *(["-n", name] if name else [])]
    for o in overrides:
        cmd += ["-S", o]
    return cmd


def pipeline_plan(root: Path, stages: Sequence[str] | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """(stages to run in DAG order, {stage: the stages among them it waits for}), from DVC's index of root (its
    dvc.yaml with its params.yaml expanding foreach/matrix groups)."""
    return plan(root, stages)


def sparsity_unit(sparsity: float) -> list[str]:
    """pgprune's experiment "everything at sparsity S": every compare method at S and the export at S (no recovery
    cells: recover.sparsities=[], since the defaults' recover at sparsities that this experiment does not compute)."""
    s = float(sparsity)
    if not 0 < s < 1:
        raise ValueError(f"sparsity {sparsity} must be in (0, 1)")
    return [f"compare.sparsities=[{s:g}]", "recover.sparsities=[]", f"export.sparsity={s:g}"]


def sweep_units(specs: Sequence[Any]) -> list[list[str]]:
    """CLI --sweep values: a number is a sparsity (sparsity_unit), anything else a unit of key=value overrides."""
    units = []
    for spec in specs:
        try:
            units.append(sparsity_unit(float(spec)))
        except (TypeError, ValueError) as e:
            if isinstance(spec, (int, float)) or re.fullmatch(r"[-+.\d]+", str(spec)):
                raise ValueError(str(e)) from None
            units.append(normalise_unit(spec)["overrides"])
    return units


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


# --- Prefect tasks and flows ---------------------------------------------------------------------------------------
@task(name="dvc-repro", task_run_name="{stage}", **TASK_OPTIONS)
def run_stage(stage: str, force: bool = False) -> str:
    logger = get_run_logger()
    cmd = repro_command(stage, force)
    logger.info("$ dvc %s", " ".join(cmd[1:]))
    run_command(cmd, repo_root(), logger.info)
    return stage


@task(name="dvc-exp-run", task_run_name="{label}", **TASK_OPTIONS)
def run_experiment(overrides: list[str], label: str, queue: bool = False) -> str | None:
    logger = get_run_logger()
    cmd = exp_run_command(overrides, queue)
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


@flow(name="pgprune-pipeline", log_prints=True, persist_result=False,
      task_runner=ThreadPoolTaskRunner(max_workers=1))
def pgprune_pipeline(stages: list[str] | None = None, params_file: str = "params.yaml", force: bool = False
                     ) -> list[str]:
    """Run the dvc.yaml stages (all, or ``stages``: names, or group names for all their cells) in DAG order, one
    task each, every task waiting for the tasks of its upstream stages; returns the stages run."""
    logger = get_run_logger()
    root = repo_root()
    if use_params(params_file, root):
        logger.warning("copied %s to params.yaml (the file DVC tracks)", params_file)
    order, upstream = pipeline_plan(root, stages)
    logger.info("stages, in DAG order: %s", " → ".join(order))
    futures: dict[str, Any] = {}
    for stage in order:  # one worker thread, submitted in DAG order: upstream tasks always finish first
        futures[stage] = run_stage.with_options(name=f"dvc-repro-{stage}").submit(
            stage, force, wait_for=[futures[u] for u in upstream[stage]])
    bad = []
    for stage, fut in futures.items():
        fut.wait()
        if not fut.state.is_completed():
            bad.append(f"{stage} ({fut.state.name}: {(fut.state.message or '').splitlines()[0][:200]})")
    if bad:
        raise StageFailed(f"{len(bad)} of {len(order)} stages did not complete: " + "; ".join(bad))
    return order


@flow(name="pgprune-local-sweep", log_prints=True, persist_result=False)
def sweep_experiments(units: list[list[str]], queue: bool = False) -> list[dict]:
    """One DVC experiment per unit (a list of ``-S`` overrides) in this checkout, then the `dvc exp show` summary
    (baselines and the experiments run here).

    Sequential (default): each experiment runs in the workspace, which is left with the last one's params and
    outputs (DVC's behaviour; `dvc exp apply`/`git checkout params.yaml && dvc checkout` to go back).
    ``queue=True``: all are queued and run by `dvc exp run --run-all` in temporary copies (workspace untouched;
    needs the inputs committed to git or in DVC's cache). Many machines: pipeline/workpool.py.
    """
    if not units:
        raise ValueError("no units: give lists of key=value overrides (or sparsities on the CLI)")
    units = [normalise_unit(u)["overrides"] for u in units]
    names = [run_experiment(u, " ".join(u) or "(no overrides)", queue) for u in units]
    if queue:
        run_queue()
    summary = show_experiments()
    logger = get_run_logger()
    for r in summary:
        logger.info("%s (%s): %d metrics", r["name"], (r["rev"] or "")[:7], len(r["metrics"]))
    ran = set(filter(None, names))
    return [r for r in summary if not ran or r["name"] in ran or r["baseline"] is None]


# --- CLI ------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.flows", description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", metavar="STAGE", help="only these stages or groups (default: all)")
    ap.add_argument("--params", default="params.yaml", help="parameter file (copied to params.yaml if different)")
    ap.add_argument("--force", action="store_true", help="rerun stages even if DVC says they are up to date")
    ap.add_argument("--sweep", nargs="+", metavar="UNIT", help="run the local sweep flow instead: each value a "
                    "sparsity, or a quoted set of key=value overrides")
    ap.add_argument("--queue", action="store_true", help="with --sweep: queue the experiments, then run them all")
    ap.add_argument("--dry-run", action="store_true", help="print the stage order and commands, run nothing")
    args = ap.parse_args(argv)
    try:
        if args.sweep:
            units = sweep_units(args.sweep)
            if args.dry_run:
                for u in units:
                    print("dvc " + " ".join(exp_run_command(u, args.queue)[1:]))
                return 0
            print(json.dumps(sweep_experiments(units, queue=args.queue), indent=2))
            return 0
        if args.dry_run:
            order, upstream = pipeline_plan(repo_root(), args.stages)
            for stage in order:
                after = f"   # after {', '.join(upstream[stage])}" if upstream[stage] else ""
                print("dvc " + " ".join(repro_command(stage, args.force)[1:]) + after)
            return 0
        pgprune_pipeline(stages=args.stages, params_file=args.params, force=args.force)
    except (ValueError, PgpruneError) as e:  # bad stage names, units or params: the message alone
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
