"""Serve the pipeline as a scheduled Prefect deployment (long-running process; Ctrl-C stops it).

    prefect server start --host 127.0.0.1                                      # terminal 1 (UI: http://127.0.0.1:4200)
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m pipeline.deploy        # terminal 2: nightly at 03:00 UTC
    PREFECT_API_URL=http://127.0.0.1:4200/api python -m pipeline.deploy --cron "0 */6 * * *" --stages eval report

Runs of the deployment (scheduled, or started from the UI / `prefect deployment run
'pgprune-pipeline/pgprune-nightly'`) execute in this process, in this checkout. At most one run at a time
(DVC holds a repository lock). With --with-sweep, the local sweep flow is served too (no schedule; start it from
the UI with its `units` parameter: lists of key=value overrides). Sweeps over many machines: pipeline/workpool.py.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from pipeline.flows import pgprune_pipeline, pipeline_plan, repo_root, sparsity_unit, sweep_experiments  # noqa: E402


def build_deployments(name: str, cron: str, stages: list[str] | None = None, params_file: str = "params.yaml",
                      force: bool = False, timezone: str = "UTC", with_sweep: bool = False) -> list:
    """The RunnerDeployment objects that `serve` registers (built locally; nothing is contacted)."""
    from prefect.schedules import Cron

    if stages:
        pipeline_plan(repo_root(), stages)  # unknown stage names fail now, not at 3 a.m.
    deployments = [pgprune_pipeline.to_deployment(
        name=name, schedule=Cron(cron, timezone=timezone),
        parameters={"stages": stages, "params_file": params_file, "force": force},
        description="pgprune DVC pipeline (dvc repro per stage) on a schedule", tags=["pgprune", "dvc"])]
    if with_sweep:
        deployments.append(sweep_experiments.to_deployment(
            name=f"{name}-sweep", parameters={"units": [sparsity_unit(0.4)]},
            description="one dvc exp run -S ... per unit in this checkout, then dvc exp show",
            tags=["pgprune", "dvc"]))
    return deployments


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.deploy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="pgprune-nightly", help="deployment name (default: pgprune-nightly)")
    ap.add_argument("--cron", default="0 3 * * *", help='cron schedule (default: "0 3 * * *", daily 03:00)')
    ap.add_argument("--timezone", default="UTC", help="time zone of the cron schedule (default: UTC)")
    ap.add_argument("--stages", nargs="+", metavar="STAGE", help="only these stages (default: the whole pipeline)")
    ap.add_argument("--params", default="params.yaml", help="parameter file of the scheduled runs")
    ap.add_argument("--force", action="store_true", help="scheduled runs rerun stages even if up to date")
    ap.add_argument("--with-sweep", action="store_true", help="also serve the sparsity sweep flow (unscheduled)")
    ap.add_argument("--check", action="store_true", help="build the deployments and print them; do not serve")
    args = ap.parse_args(argv)
    try:
        deployments = build_deployments(args.name, args.cron, args.stages, args.params, args.force, args.timezone,
                                        args.with_sweep)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        for d in deployments:
            print(f"{d.flow_name}/{d.name}: schedules={[s.schedule.cron for s in d.schedules] or None} "
                  f"parameters={d.parameters}")
        return 0
    if not os.environ.get("PREFECT_API_URL"):
        print("note: PREFECT_API_URL is not set; Prefect runs a temporary server that lives as long as this "
              "process. For the UI and persistent history start `prefect server start --host 127.0.0.1` and set "
              "PREFECT_API_URL=http://127.0.0.1:4200/api.", file=sys.stderr)
    from prefect import serve

    serve(*deployments, limit=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
