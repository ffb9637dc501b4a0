"""Prefect work pool for sweeps: set-up, local workers, submitting a sweep, and a benchmark. See pipeline/README.md.

    prefect server start --host 0.0.0.0                     # once, on the machine every worker can reach
    export PREFECT_API_URL=http://<server>:4200/api
    python -m pipeline.workpool setup --repo-url <shared git remote> [--dvc-remote <url>]
    python -m pipeline.workpool worker --gpus 0 1 2 3      # on each GPU box: one worker per GPU
    python -m pipeline.workpool worker --queue sweeps -n 1 # somewhere: runs sweeps submitted from the UI
    python -m pipeline.workpool sweep --grid 'search.sparsity=[0.2, 0.4]' --grid 'search.method=[pg, flap]'
    python -m pipeline.workpool bench --units 3 --workers 1 2   # the mini DVC project, 1 vs 2 local workers (bench/)

``setup`` creates the process work pool (queues ``units`` and ``sweeps``), registers the deployments
``pgprune-unit/unit`` and ``pgprune-sweep/sweep`` from this checkout (or ``--source <git url>``: each flow run then
clones the code) with the shared remotes as default parameters, and an automation that marks a flow run of these
deployments Crashed when its heartbeats stop (a lost worker); the sweep reschedules crashed units.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Sequence

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from pgprune.errors import PgpruneError  # noqa: E402  (no torch: the exceptions alone)

ROOT = Path(__file__).resolve().parent.parent
POOL = "pgprune"
UNITS_QUEUE, SWEEPS_QUEUE = "units", "sweeps"
UNIT_ENTRY, SWEEP_ENTRY = "pipeline/unit.py:unit", "pipeline/sweep.py:sweep"
UNIT_DEPLOYMENT, SWEEP_DEPLOYMENT = "pgprune-unit/unit", "pgprune-sweep/sweep"


def prefect_executable() -> str:
    here = Path(sys.executable).with_name("prefect")
    return str(here) if here.exists() else (shutil.which("prefect") or "prefect")


# --- server (for tests, the benchmark and trying things on one machine) ------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(home: Path) -> dict[str, str]:
    """A self-contained Prefect server: its own PREFECT_HOME and sqlite database, no analytics, no UI build."""
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
               PREFECT_SERVER_UI_ENABLED="false")
    env.pop("PREFECT_API_URL", None)
    return env


@contextlib.contextmanager
def local_server(home: Path, port: int | None = None, timeout_s: float = 90) -> Iterator[str]:
    """``prefect server start`` on a free loopback port (in its own process group, stopped on exit); yields the
    API URL once /api/health answers."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/api"
    with open(home / "server.log", "ab") as log:
        proc = subprocess.Popen([prefect_executable(), "server", "start", "--host", "127.0.0.1", "--port",
                                 str(port)], env=server_env(home), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_default_signals)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prefect server did not start; see {home / 'server.log'}")
            time.sleep(0.3)
        yield url
    finally:
        stop_group(proc)


def _default_signals() -> None:
    """In the child before exec: default SIGINT (a parent started in the background has it ignored, and prefect's
    CLI turns SIGTERM into SIGINT to stop cleanly)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM the process group ``proc`` leads (started with start_new_session), SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- pool, deployments, automation --------------------------------------------------------------------------------
def ensure_pool(pool: str = POOL) -> None:
    """The process work pool ``pool`` with the queues ``units`` and ``sweeps`` (created if missing)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            wp = client.read_work_pool(pool)
            if wp.type != "process":
                raise ValueError(f"work pool {pool!r} exists with type {wp.type!r}; this needs a 'process' pool")
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                   description="pgprune: one DVC experiment per flow run"))
        for queue in (UNITS_QUEUE, SWEEPS_QUEUE):
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_work_queue(name=queue, work_pool_name=pool)


def _source(source: str, branch: str | None):
    """A local folder as is; a git URL as a GitRepository (each flow run clones it)."""
    if "://" in source or source.startswith("git@") or source.endswith(".git"):
        from prefect.runner.storage import GitRepository

        return GitRepository(url=source, branch=branch)
    return str(Path(source).resolve())


def register_deployments(pool: str = POOL, source: str = str(ROOT), branch: str | None = None,
                         repo_url: str | None = None, dvc_remote: str | None = None) -> dict[str, str]:
    """``pgprune-unit/unit`` (queue units) and ``pgprune-sweep/sweep`` (queue sweeps) from ``source``; the shared
    remotes become the deployments' default parameters. Returns {deployment name: id}."""
    from prefect import flow

    defaults = {k: v for k, v in (("repo_url", repo_url), ("dvc_remote", dvc_remote)) if v}
    ids = {}
    for entry, name, queue, desc in (
            (UNIT_ENTRY, UNIT_DEPLOYMENT, UNITS_QUEUE, "one DVC experiment (dvc exp run -S ...) in a worker's clone; "
                                                       "pushed to the shared git and DVC remotes"),
            (SWEEP_ENTRY, SWEEP_DEPLOYMENT, SWEEPS_QUEUE, "fans units out to the pool, then one comparison table "
                                                          "and plot")):
        fl = flow.from_source(source=_source(source, branch), entrypoint=entry)
        dep = fl.to_deployment(name=name.split("/")[1], work_pool_name=pool, work_queue_name=queue,
                               parameters=dict(defaults), description=desc, tags=["pgprune"])
        # RunnerDeployment.apply, not flow.deploy: deploy() asks the server for online workers with a request
        # that prefect 3.8 + fastapi 0.154 reject (422 on offset/limit None)
        ids[name] = str(dep.apply(work_pool_name=pool))
    return ids


def ensure_zombie_automation(pool: str, deployment_ids: Sequence[str], window_s: float) -> str:
    """Prefect's documented zombie detection, limited to these deployments: after a flow run's heartbeat, if no
    event of that run follows within ``window_s``, mark it Crashed. Replaces an earlier one of the same name."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    name = f"{pool}: crash flow runs whose heartbeats stopped"
    with contextlib.suppress(ValueError):
        Automation.read(name=name).delete()
    auto = Automation(
        name=name, description="a lost worker's unit becomes Crashed; the sweep then reschedules it",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"}, expect={"prefect.flow-run.*"},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.id": [f"prefect.deployment.{d}"
                                                                          for d in deployment_ids]}),
            for_each={"prefect.resource.id"}, posture=Posture.Proactive, threshold=1,
            within=timedelta(seconds=window_s)),
        actions=[ChangeFlowRunState(state=StateType.CRASHED,
                                    message=f"no heartbeat for {window_s:g} s: the worker was lost")])
    return str(auto.create().id)


def _absolute(location: str | None) -> str | None:
    """A local path made absolute (workers clone from other folders); URLs (scheme://, user@host:) as given."""
    if not location or "://" in location or re.match(r"^[\w.-]+@[\w.-]+:", location):
        return location
    return str(Path(location).expanduser().resolve())


def setup(pool: str = POOL, source: str = str(ROOT), branch: str | None = None, repo_url: str | None = None,
          dvc_remote: str | None = None, heartbeat_window_s: float = 180) -> dict[str, str]:
    repo_url, dvc_remote = _absolute(repo_url), _absolute(dvc_remote)
    ensure_pool(pool)
    ids = register_deployments(pool, source, branch, repo_url, dvc_remote)
    ids["automation"] = ensure_zombie_automation(pool, [ids[UNIT_DEPLOYMENT], ids[SWEEP_DEPLOYMENT]],
                                                 heartbeat_window_s)
    return ids


# --- workers ---------------------------------------------------------------------------------------------------------
def worker_env(work_dir: Path, gpu: str | None = None, threads: int | None = None, heartbeat_s: int = 60,
               extra: dict[str, str] | None = None) -> dict[str, str]:
    """A worker's environment (its flow runs inherit it): its GPU, CPU threads, the machine's work folder
    (clones, shared DVC cache, search checkpoints) and the heartbeat the zombie automation watches."""
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1",
               PGPRUNE_WORK_DIR=str(work_dir), PGPRUNE_CHECKPOINT_DIR=str(Path(work_dir) / "checkpoints"),
               PREFECT_FLOWS_HEARTBEAT_FREQUENCY=str(max(30, int(heartbeat_s))))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    if threads:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
            env[k] = str(threads)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def start_worker(name: str, env: dict[str, str], log_path: Path, pool: str = POOL,
                 queue: str = UNITS_QUEUE, limit: int = 1) -> subprocess.Popen:
    """``prefect worker start`` (process type, at most ``limit`` flow runs at a time) in its own process group."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen([prefect_executable(), "worker", "start", "--pool", pool, "--work-queue", queue,
                                 "--name", name, "--type", "process", "--limit", str(limit),
                                 "--install-policy", "never"],
                                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=_default_signals)


def wait_for_workers(pool: str, names: Sequence[str], timeout_s: float = 180) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            online = {w.name for w in client.read_workers_for_work_pool(
                pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])), offset=0, limit=200)}
            if set(names) <= online:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(set(names) - online)} did not come online in {timeout_s:g} s")
            time.sleep(0.5)


def worker_specs(n: int | None, gpus: Sequence[str] | None, prefix: str) -> list[tuple[str, str | None]]:
    """(worker name, CUDA_VISIBLE_DEVICES) for ``--gpus 0 1`` (one worker per GPU) or ``-n N`` (no GPU pinning)."""
    if gpus:
        return [(f"{prefix}-gpu{g}", str(g)) for g in gpus]
    return [(f"{prefix}-{i}", None) for i in range(n or 1)]


# --- sweep submission ------------------------------------------------------------------------------------------------
def parse_grid(items: Sequence[str] | None) -> dict[str, list]:
    """``key=[v1, v2]`` (YAML flow list) → {key: [v1, v2]}; a scalar value is a one-element list."""
    from pipeline.experiments import check_override, parse_value

    grid: dict[str, list] = {}
    for item in items or []:
        key, value = check_override(item)
        v = parse_value(value)
        grid[key] = v if isinstance(v, list) else [v]
    return grid


def sweep_parameters(args: argparse.Namespace) -> dict:
    if args.methods or args.sparsities:  # validated here, in this checkout, before anything is submitted
        from pipeline.experiments import pgprune_units

        pgprune_units(args.methods or [], args.sparsities or [], not args.full, root=ROOT)
    p = {"units": [u for u in (args.unit or [])] or None, "grid": parse_grid(args.grid) or None,
         "methods": args.methods, "sparsities": args.sparsities, "evaluate_only": False if args.full else None,
         "targets": args.targets or None, "sweep_id": args.sweep_id, "rev": args.rev, "repo_url": args.repo_url,
         "dvc_remote": args.dvc_remote, "metric": args.metric, "x": args.x,
         "fail_on_unit_failure": not args.no_fail}
    return {k: v for k, v in p.items() if v is not None}


def _interrupt(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt


# --- CLI ------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.workpool", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("setup", help="create the work pool, register the deployments and the zombie automation")
    s.add_argument("--pool", default=POOL)
    s.add_argument("--repo-url", help="the shared git remote the workers clone and push experiments to")
    s.add_argument("--dvc-remote", help="the shared DVC remote URL (default: the repository's default remote)")
    s.add_argument("--source", default=str(ROOT), help="where workers get the flow code: this checkout (default; "
                   "the same path must exist on every worker machine) or a git URL (cloned per flow run)")
    s.add_argument("--branch", help="with a git --source: its branch")
    s.add_argument("--heartbeat-window", type=float, default=180, help="seconds without a heartbeat after which "
                   "a flow run is marked Crashed (>= 3 x the workers' --heartbeat; default 180)")

    w = sub.add_parser("worker", help="start process workers on this machine (foreground; Ctrl-C stops them)")
    w.add_argument("--pool", default=POOL)
    w.add_argument("--queue", default=UNITS_QUEUE, help="units (default) or sweeps")
    w.add_argument("-n", type=int, help="number of workers (without --gpus)")
    w.add_argument("--gpus", nargs="+", help="one worker per GPU index (CUDA_VISIBLE_DEVICES)")
    w.add_argument("--threads", type=int, help="CPU threads per worker (OMP/MKL/OpenBLAS; torch follows OMP)")
    w.add_argument("--work-dir", default=os.environ.get("PGPRUNE_WORK_DIR") or
                   str(Path.home() / ".cache" / "pgprune-work"),
                   help="this machine's folder: clones, the shared DVC cache, search checkpoints")
    w.add_argument("--heartbeat", type=int, default=60, help="flow-run heartbeat seconds (>= 30; default 60)")
    w.add_argument("--name", default=socket.gethostname(), help="worker name prefix (default: the host name)")

    sw = sub.add_parser("sweep", help="run a sweep (in this process, or --submit it to the sweeps queue)")
    sw.add_argument("--unit", action="append", help='one unit: "key=value key=value" (repeatable)')
    sw.add_argument("--grid", action="append", help="key=[v1, v2] (repeatable; the product of all is swept)")
    sw.add_argument("--methods", nargs="+", help="pgprune: one unit per method x --sparsities cell")
    sw.add_argument("--sparsities", nargs="+", type=float, help="pgprune: the sparsities of --methods")
    sw.add_argument("--full", action="store_true", help="with --methods: the whole pipeline per unit (export and "
                    "report too), not only the cell's evaluation")
    sw.add_argument("--targets", nargs="+", help="stages to run in every --grid/--unit unit (default: all)")
    sw.add_argument("--sweep-id", help="names the experiments; rerunning an id skips units already pushed")
    sw.add_argument("--rev", help="baseline branch/tag/commit of the shared git remote (default HEAD)")
    sw.add_argument("--repo-url")
    sw.add_argument("--dvc-remote")
    sw.add_argument("--metric", help="the plot's y: a metrics key (file:key) or its suffix")
    sw.add_argument("--x", help="the plot's x: an override key")
    sw.add_argument("--no-fail", action="store_true", help="end Completed even if units failed")
    sw.add_argument("--submit", action="store_true", help="run it as a flow run of pgprune-sweep/sweep (a worker "
                    "of the sweeps queue executes it); print its id and return")

    b = sub.add_parser("bench", help="wall time of a sweep of the mini DVC project with 1, 2, ... local workers")
    b.add_argument("--units", type=int, default=3)
    b.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    b.add_argument("--steps", type=int, default=8, help="search steps per unit")
    b.add_argument("--work", type=int, default=2000, help="256x256 matmuls per search step (CPU work; about 0.65 ms "
                   "each on one core here, so 8 steps x 2000 is about 10 s of search per unit)")
    b.add_argument("--step-seconds", type=float, default=0.0, help="seconds each search step waits (a GPU-bound "
                   "unit: the CPU is free meanwhile)")
    b.add_argument("--threads", type=int, default=1, help="CPU threads per worker")
    b.add_argument("--repeat", type=int, default=1, help="rounds per worker count (interleaved; medians)")
    b.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temporary one)")
    args = ap.parse_args(argv)

    if args.cmd in ("setup", "worker", "sweep"):
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            print("error: PREFECT_API_URL is not set: start a server (prefect server start --host 0.0.0.0) and "
                  "export PREFECT_API_URL=http://<server>:4200/api (workers and sweeps need a real server)",
                  file=sys.stderr)
            return 2
    try:
        if args.cmd == "setup":
            ids = setup(args.pool, args.source, args.branch, args.repo_url, args.dvc_remote, args.heartbeat_window)
            print(json.dumps(ids, indent=2))
        elif args.cmd == "worker":
            specs = worker_specs(args.n, args.gpus, args.name)
            logs = Path(args.work_dir) / "logs"
            procs = [start_worker(nm, worker_env(Path(args.work_dir), gpu, args.threads, args.heartbeat),
                                  logs / f"{nm}.log", args.pool, args.queue) for nm, gpu in specs]
            signal.signal(signal.SIGTERM, _interrupt)
            signal.signal(signal.SIGINT, _interrupt)
            print(f"started {len(procs)} worker(s) on {args.pool}/{args.queue}: "
                  + ", ".join(f"{nm} ({f'CUDA_VISIBLE_DEVICES={gpu}' if gpu is not None else 'no GPU pinning'}, "
                              f"log {logs / (nm + '.log')})" for nm, gpu in specs))
            try:
                while all(p.poll() is None for p in procs):
                    time.sleep(1)
                print("a worker exited; stopping the others", file=sys.stderr)
                return 1
            except KeyboardInterrupt:
                return 0
            finally:
                for p in procs:
                    stop_group(p)
        elif args.cmd == "sweep":
            params = sweep_parameters(args)
            if args.submit:
                from prefect.deployments import run_deployment

                fr = run_deployment(SWEEP_DEPLOYMENT, parameters=params, timeout=0)
                print(f"submitted sweep flow run {fr.name} ({fr.id})")
                return 0
            from pipeline.sweep import UnitsFailed, markdown_table
            from pipeline.sweep import sweep as sweep_flow

            try:
                rows = sweep_flow(**params)
            except UnitsFailed as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            print(markdown_table(rows))
        elif args.cmd == "bench":
            from bench.workpool import bench  # test/benchmark code lives in bench/

            res = bench(args.units, args.workers, args.steps, args.work, args.threads, args.keep, args.step_seconds,
                        args.repeat)
            for k, v in res.items():
                print(f"RESULT {k}={v:.1f}")
            if len(args.workers) > 1:
                a, z = args.workers[0], args.workers[-1]
                print(f"RESULT speedup_workers{z}_vs_{a}="
                      f"{res[f'sweep_wall_s_workers{a}'] / res[f'sweep_wall_s_workers{z}']:.2f}")
    except (ValueError, PgpruneError) as e:  # bad units, names, params: the message alone
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
