"""Benchmark of the sweep work pool (pipeline/workpool.py): wall time of one sweep of the mini DVC project
(bench/workpool_demo.py) with 1, 2, ... local workers on one local Prefect server.

    python -m bench.workpool --units 3 --workers 1 2        # same as `python -m pipeline.workpool bench ...`
    python -m bench.workpool --smoke                        # one unit, one worker, one step (CI; ~1.5 min)
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from pipeline.workpool import POOL, ROOT, local_server, setup, start_worker, stop_group, wait_for_workers, worker_env


# --- benchmark ------------------------------------------------------------------------------------------------------
def bench(units: int, worker_counts: Sequence[int], steps: int, work: int, threads: int, keep: Path | None,
          step_seconds: float = 0.0, repeat: int = 1) -> dict:
    """Wall time of one sweep of ``units`` units of the mini DVC project (bench/workpool_demo.py) with each number of
    local workers, on one local server: rounds interleaved (1, 2, 1, 2, ... workers) ``repeat`` times, the median
    per worker count. Each round uses its own ``search.seed`` so no round reuses another's run cache; the clock runs
    from the sweep's start to its comparison table (submission, clones, pulls, runs, pushes, gathering). ``work``
    makes a unit CPU-bound (matrix products); ``step_seconds`` makes it wait (like a unit whose work runs on a
    GPU). Worker start-up is outside the clock (workers are started and online before)."""
    import statistics

    from bench.workpool_demo import make_demo_project
    from pipeline.sweep import sweep as sweep_flow

    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="pgprune-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        make_demo_project(tmp / "seed", tmp / "origin.git", tmp / "dvcstore",
                          params={"search": {"steps": steps, "work": work, "step_seconds": step_seconds}})
        times: dict[int, list[float]] = {n: [] for n in worker_counts}
        from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

        with local_server(tmp / "prefect") as api, \
                temporary_settings(updates={PREFECT_API_URL: api, PREFECT_HOME: str(tmp / "prefect")}):
            # the workers (subprocesses) read these; this process's prefect reads the temporary settings
            os.environ.update(PREFECT_API_URL=api, PREFECT_HOME=str(tmp / "prefect"),
                              PREFECT_WORKER_QUERY_SECONDS="1", PGPRUNE_WORK_DIR=str(tmp / "controller"))
            setup(POOL, str(ROOT), None, str(tmp / "origin.git"), str(tmp / "dvcstore"), heartbeat_window_s=180)
            for r, n in ((r, n) for r in range(repeat) for n in worker_counts):
                names = [f"bench-r{r}-w{n}-{i}" for i in range(n)]
                procs = [start_worker(nm, worker_env(tmp / "machine", threads=threads,
                                                     extra={"PREFECT_WORKER_QUERY_SECONDS": "1"}),
                                      tmp / "logs" / f"{nm}.log") for nm in names]
                try:
                    wait_for_workers(POOL, names)
                    seed = r * 1000 + n
                    grid = {"search.sparsity": [round(0.1 + 0.2 * i, 2) for i in range(units)],
                            "search.seed": [seed]}
                    t0 = time.perf_counter()
                    rows = sweep_flow(grid=grid, sweep_id=f"bench-r{r}-w{n}", poll_seconds=0.5)
                    times[n].append(time.perf_counter() - t0)
                    assert all(row["state"] == "completed" for row in rows), rows
                    print(f"round {r}: {n} worker(s): {times[n][-1]:.1f} s", flush=True)
                finally:
                    for p in procs:
                        stop_group(p)
            results = {f"sweep_wall_s_workers{n}": statistics.median(t) for n, t in times.items()}
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)  # this process's flow-run logs and events, before the server stops
            EventsWorker.drain_all(timeout=10)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return results


# --smoke: the real path (a local Prefect server, a worker, a sweep of the mini DVC project), at its smallest
SMOKE_ARGS = ["--units", "1", "--workers", "1", "--steps", "1"]
SMOKE = {"": ["sweep_wall_s_workers1"]}

if __name__ == "__main__":
    from pipeline.workpool import main

    argv = sys.argv[1:]
    if "--smoke" in argv:
        argv = [a for a in argv if a != "--smoke"] + SMOKE_ARGS
    sys.exit(main(["bench", *argv]))
