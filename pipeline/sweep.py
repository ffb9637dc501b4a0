"""A sweep: units (DVC experiments) fanned out to the work pool, then one comparison table and plot.

The flow ``pgprune-sweep`` (deployment ``pgprune-sweep/sweep``, or run in-process by
``python -m pipeline.workpool sweep``):

1. pins the baseline: ``rev`` (default the shared git remote's HEAD) is resolved to a commit once, so every unit
   runs on the same code and params;
2. names every unit (pipeline/experiments.py: ``<sweep id>-<overrides>-<hash>``); a unit whose experiment is
   already in the shared git remote (an earlier run of the same sweep id) is not submitted again;
3. submits the others with ``run_deployment(<unit deployment>, timeout=0)``: each becomes a flow run of the unit
   deployment, a child of this run (linked in the UI), picked up by whichever worker of the pool is free;
4. waits for all of them. A unit run that ends ``Crashed`` (its worker died: the heartbeat automation created by
   ``pipeline.workpool setup`` marks it so) is rescheduled (``AwaitingRetry``, the state the UI's *Retry* sets) as
   long as its run count is within the unit flow's retries; a worker picks it up again and its search resumes from
   the checkpoint if that worker's machine has it. Exceptions inside a unit are retried by Prefect in place.
5. gathers the results from the shared git remote (``dvc exp pull --no-cache`` + ``dvc exp show --json`` in a
   clone on the machine running the sweep: the metrics are git-tracked, no model is downloaded), and publishes a
   table artifact ``sweep-<id>`` (one row per unit: experiment, state, overrides, metrics, error, link to the
   unit's flow run) and a markdown artifact ``sweep-<id>-report`` (the same with links, and the plot embedded as a
   PNG data URI; the PNG, CSV and markdown are also written to ``$PGPRUNE_WORK_DIR/sweeps/<id>/``).

A unit that failed permanently is a row with ``state: failed`` (or ``crashed``) and its error; the sweep then
ends Failed after publishing (``fail_on_unit_failure``), with the table as its artifacts.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from prefect import flow, get_run_logger  # noqa: E402

from pipeline.commands import capture_command, dvc_executable  # noqa: E402
from pipeline.dvcgraph import load_params_yaml, stage_outs  # noqa: E402
from pipeline.experiments import (  # noqa: E402
    apply_overrides,
    check_override,
    check_sweep_id,
    experiment_name,
    grid_units,
    normalise_unit,
    parse_value,
    pgprune_units,
    summarise_experiments,
)
from pipeline.unit import (  # noqa: E402
    GIT_REMOTE,
    UNIT_RETRIES,
    artifact_key,
    prepare_clone,
    remote_experiments,
    resolve_baseline,
    resolve_repo_url,
    work_dir,
)

UNIT_DEPLOYMENT = "pgprune-unit/unit"


class UnitsFailed(RuntimeError):
    """Some units of a sweep failed permanently (the table and plot were published)."""


def build_units(units: list[Any] | None, grid: dict[str, list] | None, targets: list[str] | None,
                methods: list[str] | None = None, sparsities: list[float] | None = None,
                evaluate_only: bool = True) -> list[dict]:
    """pgprune's ``methods`` x ``sparsities`` cells (pipeline.experiments.pgprune_units), the ``grid`` product, then
    ``units`` (each: a list of key=value, a string, or {overrides, targets}); ``targets`` apply to grid units and
    units that name none (``{key}`` placeholders are filled for grid units)."""
    out = pgprune_units(methods, sparsities or [], evaluate_only) if methods or sparsities else []
    out += grid_units(grid, targets or []) if grid else []
    for u in (normalise_unit(u) for u in units or []):
        u["targets"] = u["targets"] or list(targets or [])
        out.append(u)
    if not out:
        raise ValueError("the sweep has no units: give units (lists of key=value overrides) or a grid")
    return out


# --- waiting, with crashed runs rescheduled -----------------------------------------------------------------------
def wait_for_units(flow_run_ids: dict[str, Any], poll_seconds: float, timeout_s: float, log) -> dict[str, Any]:
    """Poll the unit flow runs until every one is final; reschedule a Crashed one (AwaitingRetry) while its run
    count is within its retries. Returns ``{name: FlowRun}`` (runs still not final at the timeout included)."""
    from prefect.client.orchestration import get_client
    from prefect.states import AwaitingRetry

    pending = dict(flow_run_ids)
    done: dict[str, Any] = {}
    rescheduled = {name: 0 for name in pending}  # also bounds runs that crash before they start (run count 0)
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while pending:
            for name, fid in list(pending.items()):
                fr = client.read_flow_run(fid)
                if not fr.state or not fr.state.is_final():
                    continue
                if fr.state.is_crashed():
                    retries = fr.empirical_policy.retries
                    retries = UNIT_RETRIES if retries is None else retries
                    if fr.run_count <= retries and rescheduled[name] <= retries:
                        rescheduled[name] += 1
                        log(f"unit {name} crashed ({fr.state.message}); rescheduling it (run {fr.run_count} of "
                            f"at most {retries + 1})")
                        client.set_flow_run_state(fid, AwaitingRetry(
                            message=f"rescheduled by the sweep after a crash: {fr.state.message}"))
                        continue
                done[name] = fr
                del pending[name]
                log(f"unit {name}: {fr.state.name}")
            if pending and time.monotonic() > deadline:
                log(f"timed out waiting for {sorted(pending)}")
                for name, fid in pending.items():
                    done[name] = client.read_flow_run(fid)
                break
            if pending:
                time.sleep(poll_seconds)
    return done


# --- gathering ----------------------------------------------------------------------------------------------------
def gather(repo_url: str, baseline: str, units: dict[str, dict], sweep_id: str, dvc_remote: str | None
           ) -> dict[str, dict]:
    """``{name: record}`` (params, metrics) of the experiments in the shared git remote, via a clone on this
    machine: ``dvc exp pull --no-cache`` then ``dvc exp show --json``. A unit with stage targets also gets
    ``target_metrics``: the metrics of the files its targets write (found from the baseline's dvc.yaml with the
    unit's params), keyed without the file name, so that units whose cells write different files share columns."""
    present = {n for (b, n) in remote_experiments(repo_url) if b == baseline} & set(units)
    if not present:
        return {}
    clone = work_dir() / "sweeps" / sweep_id / "repo"
    prepare_clone(clone, repo_url, baseline, dvc_remote, lambda _m: None)
    capture_command([dvc_executable(), "exp", "pull", "--no-cache", GIT_REMOTE, *sorted(present)], clone)
    show = json.loads(capture_command([dvc_executable(), "exp", "show", "--json", "--no-pager"], clone) or "[]")
    records = {r["name"]: r for r in summarise_experiments(show) if r["name"] in present}
    base = load_params_yaml(clone)
    for name, rec in records.items():
        targets = units[name]["targets"]
        if not targets:
            continue
        outs = stage_outs(clone, apply_overrides(base, units[name]["overrides"]))
        files = {p for st, paths in outs.items() for t in targets if st == t or st.split("@")[0] == t
                 for p in paths}
        rec["target_metrics"] = {k.split(":", 1)[1]: v for k, v in rec["metrics"].items()
                                 if k.split(":", 1)[0] in files}
    return records


def _error_text(message: str | None, limit: int = 600) -> str:
    """A failed run's state message on one line: its first line and its last 6 (the end of the dvc output)."""
    lines = [ln.strip() for ln in (message or "").splitlines() if ln.strip()]
    text = " | ".join(lines[:1] + ["..."] + lines[-6:]) if len(lines) > 7 else " | ".join(lines)
    return text[:limit]


def comparison_rows(units: list[dict], names: list[str], runs: dict[str, Any], records: dict[str, dict],
                    reused: set[str], ui_url: str | None, metrics: list[str] | None = None) -> list[dict]:
    """One row per unit: experiment, state, each override key, the metrics (``file:key``; ``targets:key`` for the
    files a unit's targets write, see gather; ``metrics``: keys or key suffixes to keep, default all numeric ones),
    the error of a failed unit, and the link to its flow run."""
    rows = []
    for u, name in zip(units, names):
        fr = runs.get(name)
        rec = records.get(name)
        if rec is not None:
            state = "reused" if name in reused else "completed"
        elif fr is not None and fr.state is not None:
            state = fr.state.type.value.lower()
            state = "failed" if state == "completed" else state  # completed but nothing in the remote
        else:
            state = "missing"
        row: dict[str, Any] = {"experiment": name, "state": state}
        for o in u["overrides"]:
            k, v = check_override(o)
            row[k] = parse_value(v)
        found = (rec or {}).get("metrics", {})
        if (rec or {}).get("target_metrics"):  # the target stages' metrics, one column per key for every unit
            found = {f"targets:{k}": v for k, v in rec["target_metrics"].items()}
        for k, v in sorted(found.items()):
            if not metrics or any(k == m or k.endswith(m) for m in metrics):
                row[k] = v
        row["error"] = "" if rec is not None else _error_text(fr.state.message if fr and fr.state else
                                                                   "no flow run and no experiment")
        row["flow_run"] = f"{ui_url}/runs/flow-run/{fr.id}" if (ui_url and fr is not None) else ""
        rows.append(row)
    return rows


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [c for c in r if c not in cols]
    return cols


def markdown_table(rows: list[dict]) -> str:
    cols = [c for c in _columns(rows) if c != "flow_run"]
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    body = ""
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            v = f"{v:.6g}" if isinstance(v, float) else str(v)
            if c == "experiment" and r.get("flow_run"):
                v = f"[{v}]({r['flow_run']})"
            cells.append(v.replace("|", "\\|").replace("\n", " "))
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def _determined(rows: list[dict], col: str, by: list[str]) -> bool:
    """Whether ``col``'s value is a function of the ``by`` columns' values over ``rows``."""
    seen: dict[str, str] = {}
    for r in rows:
        key = json.dumps([r.get(b) for b in by], sort_keys=True, default=str)
        val = json.dumps(r.get(col), sort_keys=True, default=str)
        if seen.setdefault(key, val) != val:
            return False
    return True


def pick_axes(rows: list[dict], metric: str | None, x: str | None) -> tuple[str | None, str | None, list[str]]:
    """(metric column, x column, series columns) for the plot.

    metric: the one given (a column or a column's suffix), else the first perplexity column (``...ppl...``, not
    per seed), else the first numeric metric. x: the one given, else the first varying override whose values are
    numbers. series: the other varying overrides, scalars first, leaving out those that follow from x and the
    series already kept (``compare.sparsities=[0.4]`` follows from ``export.sparsity=0.4``)."""
    ok = [r for r in rows if r["state"] in ("completed", "reused")]
    cols = _columns(rows)
    metric_cols = [c for c in cols if ":" in c and ok and all(isinstance(r.get(c), (int, float)) for r in ok)]
    if metric:
        metric = next((c for c in metric_cols if c == metric or c.endswith(metric)), None)
    else:
        ppl = [c for c in metric_cols if "ppl" in c.split(":", 1)[1] and "seed" not in c]
        metric = (ppl or metric_cols or [None])[0]
    fixed = {"experiment", "state", "error", "flow_run"}
    varying = [c for c in cols if c not in fixed and ":" not in c
               and len({json.dumps(r.get(c), sort_keys=True, default=str) for r in rows}) > 1]
    if x is None:
        x = next((c for c in varying if all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
                                            for r in rows)), None)
    series: list[str] = []
    for c in sorted((c for c in varying if c != x), key=lambda c: any(isinstance(r.get(c), (list, dict))
                                                                     for r in rows)):
        if not _determined(rows, c, ([x] if x else []) + series):
            series.append(c)
    return metric, x, series


def plot_png(rows: list[dict], metric: str | None, x: str | None, series: list[str], title: str) -> bytes | None:
    """The comparison plot: ``metric`` against ``x``, one line per combination of ``series`` values (bars per
    experiment when there is no numeric x). None without matplotlib or a metric."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in rows if r["state"] in ("completed", "reused") and isinstance(r.get(metric), (int, float))]
    if not metric or not ok:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if x:
        groups: dict[str, list[dict]] = {}
        for r in ok:
            groups.setdefault(", ".join(f"{s}={r.get(s)}" for s in series) or metric, []).append(r)
        for label, rs in groups.items():
            rs = sorted(rs, key=lambda r: r[x])
            ax.plot([r[x] for r in rs], [r[metric] for r in rs], marker="o", label=label)
        ax.set_xlabel(x)
        if len(groups) > 1 or series:
            ax.legend(fontsize=8)
    else:
        ax.bar(range(len(ok)), [r[metric] for r in ok])
        ax.set_xticks(range(len(ok)), [r["experiment"] for r in ok], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _write(out_dir: Path, rows: list[dict], md: str, png: bytes | None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(rows))
    w.writeheader()
    w.writerows(rows)
    for name, data in (("comparison.csv", buf.getvalue().encode()), ("comparison.md", md.encode()),
                       ("comparison.png", png)):
        if data is None:
            continue
        tmp = out_dir / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(out_dir / name)


# --- the flow ------------------------------------------------------------------------------------------------------
@flow(name="pgprune-sweep", persist_result=False, log_prints=True)
def sweep(units: list[Any] | None = None, grid: dict[str, list] | None = None, targets: list[str] | None = None,
          methods: list[str] | None = None, sparsities: list[float] | None = None, evaluate_only: bool = True,
          sweep_id: str | None = None, rev: str | None = None, repo_url: str | None = None,
          dvc_remote: str | None = None, deployment: str = UNIT_DEPLOYMENT, metric: str | None = None,
          x: str | None = None, metrics: list[str] | None = None, poll_seconds: float = 5.0,
          timeout_hours: float = 72.0, fail_on_unit_failure: bool = True) -> list[dict]:
    """Run ``units`` (and/or the ``grid`` product) as DVC experiments on the work pool, then compare them.

    units: e.g. ``[["search.steps=100"], ["search.steps=300", "search.seeds=[1]"]]``; grid: e.g.
    ``{"search.lr_heads": [0.05, 0.1], "search.samples": [2, 4]}``; targets: stages to run (default all).
    methods x sparsities: pgprune's comparison cells, one unit each (its evaluation stage; ``evaluate_only=False``:
    the whole pipeline per unit, exported model included).
    sweep_id: names the experiments (default: from this flow run's id); rerunning a sweep id skips what is done.
    rev: baseline branch/tag/commit on the shared git remote (default HEAD). repo_url / dvc_remote: default the
    unit deployment's parameters, else the workers' PGPRUNE_GIT_REMOTE / PGPRUNE_DVC_REMOTE.
    metric / x: the plot's y (a metrics key or its suffix) and x (an override key); metrics: columns to keep.
    """
    from prefect.deployments import run_deployment
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_UI_URL

    logger = get_run_logger()
    all_units = build_units(units, grid, targets, methods, sparsities, evaluate_only)
    sweep_id = check_sweep_id(sweep_id or f"sw-{str(flow_run.id or 'local')[:8]}")
    names = [experiment_name(sweep_id, u) for u in all_units]
    if len(set(names)) != len(names):
        raise ValueError(f"the sweep repeats a unit: {[n for n in names if names.count(n) > 1]}")
    repo = resolve_repo_url(repo_url or _deployment_default(deployment, "repo_url"))
    baseline = resolve_baseline(repo, rev)
    logger.info("sweep %s: %d units on baseline %s of %s", sweep_id, len(all_units), baseline[:12], repo)
    existing = {n for (b, n) in remote_experiments(repo) if b == baseline}
    reused = {n for n in names if n in existing}
    if reused:
        logger.info("already in the shared git remote (not run again): %s", ", ".join(sorted(reused)))
    submitted: dict[str, Any] = {}
    for u, name in zip(all_units, names):
        if name in reused:
            continue
        params = {"overrides": u["overrides"], "targets": u["targets"], "name": name, "sweep_id": sweep_id,
                  "rev": baseline}
        if repo_url:
            params["repo_url"] = repo_url
        if dvc_remote:
            params["dvc_remote"] = dvc_remote
        fr = run_deployment(deployment, parameters=params, timeout=0, flow_run_name=name,
                            tags=["pgprune", f"sweep-{sweep_id}"])
        submitted[name] = fr.id
        logger.info("submitted %s: %s", name, " ".join(u["overrides"]) or "(no overrides)")
    runs = wait_for_units(submitted, poll_seconds, timeout_hours * 3600, logger.info)
    records = gather(repo, baseline, dict(zip(names, all_units)), sweep_id,
                     dvc_remote or _deployment_default(deployment, "dvc_remote"))
    ui = PREFECT_UI_URL.value()
    rows = comparison_rows(all_units, names, runs, records, reused, ui, metrics)
    m, xcol, series = pick_axes(rows, metric, x)
    png = plot_png(rows, m, xcol, series, f"sweep {sweep_id}: {m or 'no metric'}")
    md = (f"# Sweep {sweep_id}\n\nBaseline commit `{baseline[:12]}` of `{repo}`; {len(rows)} units: "
          + ", ".join(f"{sum(r['state'] == s for r in rows)} {s}" for s in sorted({r['state'] for r in rows}))
          + ".\n\n" + markdown_table(rows))
    out_dir = work_dir() / "sweeps" / sweep_id
    _write(out_dir, rows, md, png)
    if png:
        md += f"\n![{m} vs {xcol}](data:image/png;base64,{base64.b64encode(png).decode()})\n"
    md += f"\nFiles: `{out_dir}` (comparison.csv, comparison.md, comparison.png).\n"
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(key=artifact_key(f"sweep-{sweep_id}"), table=rows,
                          description=f"sweep {sweep_id}: one row per DVC experiment")
    create_markdown_artifact(key=artifact_key(f"sweep-{sweep_id}-report"), markdown=md,
                             description=f"sweep {sweep_id}: comparison table and plot")
    logger.info("comparison:\n%s", markdown_table(rows))
    failed = [r for r in rows if r["state"] not in ("completed", "reused")]
    if failed and fail_on_unit_failure:
        raise UnitsFailed(f"{len(failed)} of {len(rows)} units failed: "
                          + "; ".join(f"{r['experiment']} ({r['state']}): {r['error']}" for r in failed))
    return rows


def _deployment_default(deployment: str, key: str) -> str | None:
    """A parameter default stored in the unit deployment (set by `pipeline.workpool setup`)."""
    from prefect.client.orchestration import get_client

    try:
        with get_client(sync_client=True) as client:
            return (client.read_deployment_by_name(deployment).parameters or {}).get(key)
    except Exception:  # noqa: BLE001 - no deployment: the caller's value or the env var decides
        return None
