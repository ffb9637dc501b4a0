"""Sweeps fanned out to a Prefect work pool, shared through a bare git repository and a local DVC remote.

The end-to-end fixture builds, in a temporary folder: the mini DVC project of bench/workpool_demo.py (three cheap stages,
its ``search`` checkpointing every step into PGPRUNE_CHECKPOINT_DIR; the real pgprune pipeline needs the real model,
so it is not used here) pushed to a bare git repository and a local DVC remote; a Prefect server (`prefect server
start` on a free loopback port, sqlite in the temporary folder); ``python -m pipeline.workpool setup``; two process
workers (one CPU thread each, 30 s heartbeats, the zombie automation at 50 s). It then runs a sweep of three good
units and one failing unit, SIGKILLs the worker running a search mid-run (with everything it started), and lets the
sweep finish. The tests check what landed in the remotes, a third clone, the retry/resume, and the artifacts.
Around 2-3 minutes on 2 cores, most of it the heartbeat timeout after the kill.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DVC = Path(sys.executable).with_name("dvc")
PREFECT = Path(sys.executable).with_name("prefect")
psutil = pytest.importorskip("psutil")

needs_tools = pytest.mark.skipif(not (DVC.exists() and PREFECT.exists() and shutil.which("git")),
                                 reason="needs dvc and prefect next to this Python, and git")

SWEEP_ID = "t1"
GRID = {"search.sparsity": [0.2, 0.4, 0.6]}
BAD_UNIT = "search.method=bogus"
TARGETS = ["evaluate"]  # every unit runs `evaluate` and what it needs; the table shows its metrics as targets:*
DEMO_SEARCH = {"steps": 12, "step_seconds": 0.4}


def _env(**extra) -> dict:
    env = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1", PYTHONPATH=str(ROOT),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    for k in ("PGPRUNE_REPO_ROOT", "PGPRUNE_DVC", "PGPRUNE_WORK_DIR", "PGPRUNE_CHECKPOINT_DIR"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run(args, cwd, env, check=True, timeout=120) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{args} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL the process groups of ``pid`` and of everything it started (a lost machine)."""
    procs = [psutil.Process(pid)]
    procs += procs[0].children(recursive=True)
    groups = set()
    for p in procs:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    for g in groups:
        try:
            os.killpg(g, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(groups)


def _running_search(units: set[str], min_age_s: float) -> tuple[int, str] | None:
    """(pid, unit) of a demo search.py of one of ``units`` (its clone folder is named by the experiment) that has
    run for ``min_age_s`` (enough steps to have checkpointed a few times)."""
    for p in psutil.process_iter(["cmdline", "create_time"]):
        cmd = p.info["cmdline"] or []
        if len(cmd) >= 2 and cmd[-1] == "search.py" and time.time() - p.info["create_time"] >= min_age_s:
            try:
                unit = Path(p.cwd()).name
            except psutil.Error:
                continue
            if unit in units:
                return p.pid, unit
    return None


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    from bench.workpool_demo import make_demo_project
    from pipeline.workpool import local_server, start_worker, stop_group, worker_env

    tmp = tmp_path_factory.mktemp("workpool")
    baseline = make_demo_project(tmp / "seed", tmp / "origin.git", tmp / "dvcstore",
                                 params={"search": DEMO_SEARCH}, env=_env())
    workers: dict[str, subprocess.Popen] = {}
    with local_server(tmp / "prefect") as api:
        env = _env(PREFECT_API_URL=api, PREFECT_HOME=tmp / "prefect", PREFECT_WORKER_QUERY_SECONDS=1,
                   PGPRUNE_UNIT_RETRIES=1)
        try:
            _run([sys.executable, "-m", "pipeline.workpool", "setup", "--repo-url", tmp / "origin.git",
                  "--dvc-remote", tmp / "dvcstore", "--heartbeat-window", 50], ROOT, env)
            # one after the other: two workers registering at once with the SQLite-backed test server can be
            # answered "retry later" and back off for over a minute on a loaded machine
            for i, name in enumerate(("w0", "w1")):
                workers[name] = start_worker(name, worker_env(tmp / "machine", threads=1, heartbeat_s=30,
                                                              extra=env), tmp / "logs" / f"{name}.log")
                _run([sys.executable, "-c", "from pipeline.workpool import wait_for_workers; "
                      f"wait_for_workers('pgprune', {['w0', 'w1'][:i + 1]!r}, timeout_s=240)"], ROOT, env,
                     timeout=300)
            t0 = time.monotonic()
            sweep_log = tmp / "sweep.log"
            with open(sweep_log, "w") as out:
                sweep = subprocess.Popen(
                    [sys.executable, "-m", "pipeline.workpool", "sweep", "--grid",
                     f"search.sparsity={json.dumps(GRID['search.sparsity'])}", "--unit", BAD_UNIT,
                     "--targets", *TARGETS, "--sweep-id", SWEEP_ID, "--no-fail"],
                    cwd=ROOT, env={**env, "PGPRUNE_WORK_DIR": str(tmp / "controller")}, stdout=out,
                    stderr=subprocess.STDOUT)
            # a lost machine: once a search has run 5 of its 12 steps (0.4 s each), SIGKILL its worker and all it
            # started (the flow run, dvc, the stage)
            good = set(_names()[0])
            killed = None
            while killed is None and time.monotonic() - t0 < 150 and sweep.poll() is None:
                found = _running_search(good, min_age_s=2.0)
                if found:
                    pid, unit = found
                    ancestors = {a.pid for a in psutil.Process(pid).parents()}
                    victim = next((n for n, w in workers.items() if w.pid in ancestors), None)
                    if victim:
                        _kill_tree(workers[victim].pid)
                        killed = {"worker": victim, "unit": unit, "after_s": time.monotonic() - t0}
                time.sleep(0.1)
            assert killed, f"no search to kill; sweep log:\n{sweep_log.read_text()[-3000:]}"
            sweep.wait(timeout=240)
            wall = time.monotonic() - t0
            yield {"tmp": tmp, "api": api, "env": env, "baseline": baseline, "killed": killed,
                   "sweep_rc": sweep.returncode, "sweep_log": sweep_log.read_text(), "wall_s": wall,
                   "worker_logs": "\n".join(p.read_text(errors="replace") for p in (tmp / "logs").glob("*.log"))}
        finally:
            for w in workers.values():
                stop_group(w, grace_s=5)


def _units():
    from pipeline.experiments import grid_units, normalise_unit

    return grid_units(GRID, TARGETS), normalise_unit({"overrides": BAD_UNIT, "targets": TARGETS})


def _names():
    from pipeline.experiments import experiment_name

    good, bad = _units()
    return [experiment_name(SWEEP_ID, u) for u in good], experiment_name(SWEEP_ID, bad)


def _expected_score(sparsity: float) -> float:
    from bench.workpool_demo import PARAMS, expected_metrics

    params = yaml.safe_load(yaml.safe_dump(PARAMS))
    params["search"].update(DEMO_SEARCH, sparsity=sparsity)
    return expected_metrics(params)["score"]


def _api(pool, code: str) -> str:
    """Run ``code`` against the test's server in a subprocess (prefect reads its settings at import). Filters,
    limit, offset and sort are always given: prefect 3.8's client sends null for those left out, which the server
    rejects (422) with the fastapi 0.154 installed here."""
    return _run([sys.executable, "-c", code], ROOT, pool["env"]).stdout


# --- end to end ---------------------------------------------------------------------------------------------------
@needs_tools
def test_sweep_pushes_every_experiment_and_its_outputs_to_the_shared_remotes(pool):
    tmp = pool["tmp"]
    assert pool["sweep_rc"] == 0, pool["sweep_log"][-3000:]
    good, bad = _names()
    refs = _run(["git", "ls-remote", tmp / "origin.git", "refs/exps/*"], tmp, pool["env"]).stdout.split("\n")
    pushed = {ln.split("/")[-1]: ln.split()[0] for ln in refs if ln.strip()}
    assert set(pushed) == set(good)  # the failed unit pushed nothing
    b = pool["baseline"]
    assert all(ln.split()[1].startswith(f"refs/exps/{b[:2]}/{b[2:]}/") for ln in refs if ln.strip())
    for name, sha in pushed.items():  # every output the experiment's dvc.lock names is in the DVC remote
        lock = yaml.safe_load(_run(["git", "show", f"{sha}:dvc.lock"], tmp / "origin.git", pool["env"]).stdout)
        outs = [o for st in lock["stages"].values() for o in st.get("outs", [])]
        cached = [o for o in outs if o["path"] != "metrics/eval.json"]  # the metrics file is in git (cache: false)
        assert {o["path"] for o in cached} == {"data/prepared.json", "out/result.json"}, name
        for o in cached:
            assert (tmp / "dvcstore" / "files" / "md5" / o["md5"][:2] / o["md5"][2:]).exists(), (name, o)
    assert any((tmp / "dvcstore" / "runs").rglob("*"))  # the run cache went to the remote too
    print(f"three-unit sweep (+1 failing unit, one worker killed) with two workers: {pool['wall_s']:.0f} s")


@needs_tools
def test_a_third_clone_sees_every_result_without_recomputing(pool):
    tmp, env = pool["tmp"], pool["env"]
    good, _ = _names()
    third = tmp / "third"
    _run(["git", "clone", "-q", tmp / "origin.git", third], tmp, env)
    _run([DVC, "exp", "pull", "origin", *good], third, env)
    from pipeline.experiments import summarise_experiments

    show = summarise_experiments(json.loads(_run([DVC, "exp", "show", "--json", "--no-pager"], third, env).stdout))
    scores = {r["name"]: r["metrics"]["metrics/eval.json:score"] for r in show if r["name"] in good}
    assert set(scores) == set(good)
    for name, s in zip(good, GRID["search.sparsity"]):
        assert scores[name] == pytest.approx(_expected_score(s), abs=1e-9), name
    for name in good:  # each experiment's outputs come from the DVC remote: nothing to reproduce
        _run([DVC, "exp", "apply", name], third, env)
        _run([DVC, "pull"], third, env)
        assert json.loads(_run([DVC, "status", "--json"], third, env).stdout or "{}") == {}, name
    repro = _run([DVC, "repro"], third, env)
    assert "DEMO-RAN" not in repro.stdout + repro.stderr


@needs_tools
def test_a_killed_worker_s_unit_is_retried_and_resumes_its_search(pool):
    killed = pool["killed"]
    good, _ = _names()
    assert killed["unit"] in good
    assert re.search(rf"unit {re.escape(killed['unit'])} crashed .*rescheduling", pool["sweep_log"])
    resumed = [int(k) for k in re.findall(r"DEMO-RESUMED search from step (\d+)", pool["worker_logs"])]
    assert resumed and max(resumed) >= 3  # the retry started from the killed run's checkpoint
    run = json.loads(_api(pool, (
        "import json\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName\n"
        "from prefect.client.schemas.sorting import FlowRunSort\n"
        "with get_client(sync_client=True) as c:\n"
        f"    frs = c.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=['{killed['unit']}'])),"
        " limit=10, offset=0, sort=FlowRunSort.START_TIME_DESC)\n"
        "print(json.dumps([{'runs': f.run_count, 'state': f.state.type.value} for f in frs]))\n")))
    assert run == [{"runs": 2, "state": "COMPLETED"}]  # one flow run, run twice (Prefect's retry of it)
    s = GRID["search.sparsity"][good.index(killed["unit"])]
    scores = {r["experiment"]: r.get("targets:score") for r in _sweep_rows(pool)}
    assert scores[killed["unit"]] == pytest.approx(_expected_score(s), abs=1e-9)  # resumed == uninterrupted


def _sweep_rows(pool) -> list[dict]:
    rows = (pool["tmp"] / "controller" / "sweeps" / SWEEP_ID / "comparison.csv").read_text().splitlines()
    import csv

    out = []
    for r in csv.DictReader(rows):
        out.append({k: (float(v) if re.fullmatch(r"-?[\d.]+(e-?\d+)?", v or "") else v) for k, v in r.items()})
    return out


@needs_tools
def test_units_restore_computed_inputs_and_only_run_their_own_stages(pool):
    logs = pool["worker_logs"]
    assert "DEMO-RAN search" in logs and "DEMO-RAN evaluate" in logs
    assert "DEMO-RAN prepare" not in logs  # computed once in the seed clone, pulled from the DVC remote by all


@needs_tools
def test_the_sweep_publishes_a_table_with_the_failed_unit_and_a_plot(pool):
    good, bad = _names()
    import httpx  # the REST API directly: prefect 3.8's read_artifacts sends nulls the server rejects (see _api)

    r = httpx.post(f"{pool['api']}/artifacts/filter", timeout=30,
                   json={"artifacts": {"key": {"any_": [f"sweep-{SWEEP_ID}", f"sweep-{SWEEP_ID}-report"]}},
                         "limit": 10, "offset": 0, "sort": "CREATED_DESC"})
    r.raise_for_status()
    artifacts = {a["key"]: a for a in r.json()}
    table = artifacts[f"sweep-{SWEEP_ID}"]
    assert table["type"] == "table"
    rows = json.loads(table["data"]) if isinstance(table["data"], str) else table["data"]
    by_name = {r["experiment"]: r for r in rows}
    assert set(by_name) == set(good) | {bad}
    for name, s in zip(good, GRID["search.sparsity"]):
        r = by_name[name]
        assert r["state"] == "completed" and r["search.sparsity"] == s and not r["error"]
        assert r["targets:score"] == pytest.approx(_expected_score(s), abs=1e-9)  # evaluate's metrics file
        assert re.fullmatch(rf"{re.escape(pool['api'][:-4])}/runs/flow-run/[0-9a-f-]{{36}}", r["flow_run"])
    assert by_name[bad]["state"] == "failed"
    assert "search.method='bogus' is unknown" in by_name[bad]["error"]
    report = artifacts[f"sweep-{SWEEP_ID}-report"]
    assert report["type"] == "markdown" and "data:image/png;base64," in report["data"]
    assert f"[{good[0]}](" in report["data"]  # the table links each unit's flow run
    png = pool["tmp"] / "controller" / "sweeps" / SWEEP_ID / "comparison.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_tools
def test_rerunning_a_sweep_id_reuses_what_is_pushed(pool):
    """Same sweep id and units: nothing is submitted, the results come from the shared remote."""
    r = _run([sys.executable, "-m", "pipeline.workpool", "sweep", "--grid",
              f"search.sparsity={json.dumps(GRID['search.sparsity'])}", "--targets", *TARGETS, "--sweep-id", SWEEP_ID],
             ROOT, {**pool["env"], "PGPRUNE_WORK_DIR": str(pool["tmp"] / "controller2")}, timeout=180)
    assert "submitted" not in r.stdout + r.stderr
    good, _ = _names()
    for name in good:
        assert re.search(rf"\| {re.escape(name)} \| reused \|", r.stdout), r.stdout[-2000:]


# --- pure parts -------------------------------------------------------------------------------------------------------
def test_experiment_names_are_deterministic_distinct_and_valid_git_refs(tmp_path):
    from pipeline.experiments import experiment_name

    a = experiment_name("s1", ["search.sparsity=0.4", "search.method=flap"])
    assert a == experiment_name("s1", {"overrides": ["search.method=flap", "search.sparsity=0.4"]})  # order-free
    assert a.startswith("s1-") and len(a) <= 80
    others = {experiment_name("s2", ["search.sparsity=0.4", "search.method=flap"]),
              experiment_name("s1", ["search.sparsity=0.41", "search.method=flap"]),
              experiment_name("s1", {"overrides": ["search.sparsity=0.4", "search.method=flap"], "targets": ["x"]}),
              experiment_name("s1", ["compare.sparsities=[0.2, 0.4]", "compare.baselines=[]"]),
              experiment_name("s1", ["note=a b/c..d:e~f^g?h*i[j\\k"])}
    assert a not in others and len(others) == 5
    for name in others | {a}:
        assert re.fullmatch(r"[A-Za-z0-9._-]+", name) and ".." not in name
        ok = subprocess.run(["git", "check-ref-format", f"refs/exps/ab/cd/{name}"], capture_output=True)
        assert ok.returncode == 0, name


def test_units_are_validated():
    from pipeline.experiments import check_sweep_id, grid_units, normalise_unit

    assert normalise_unit("a.b=1 'c=[1, 2]'") == {"overrides": ["a.b=1", "c=[1, 2]"], "targets": []}
    assert normalise_unit({"overrides": "x=1", "targets": "s1 s2"}) == {"overrides": ["x=1"], "targets": ["s1", "s2"]}
    for bad, msg in (("novalue", "key=value"), ("1a=2", "not a params key"), (["a=1", "a=2"], "more than once"),
                     ({"overrides": [], "nope": 1}, "unknown field"), (3, "must be a list")):
        with pytest.raises(ValueError, match=msg):
            normalise_unit(bad)
    with pytest.raises(ValueError, match="sweep id"):
        check_sweep_id("a/b")
    units = grid_units({"m.method": ["pg", "flap"], "m.s": [0.2, [0.3, 0.5]]}, targets=["eval@{m.method}-{m.s}"])
    assert [u["overrides"] for u in units] == [["m.method=pg", "m.s=0.2"], ["m.method=pg", "m.s=[0.3, 0.5]"],
                                               ["m.method=flap", "m.s=0.2"], ["m.method=flap", "m.s=[0.3, 0.5]"]]
    assert units[0]["targets"] == ["eval@pg-0.2"]
    with pytest.raises(ValueError, match="non-empty list"):
        grid_units({"a": []})


def test_exp_refs_are_parsed():
    from pipeline.experiments import parse_exp_refs

    base = "a4800d5503da34968d8094fa272a24e77c12fc30"
    out = f"1111111111111111111111111111111111111111\trefs/exps/{base[:2]}/{base[2:]}/s1-x-1de1c97a\n" \
          f"{base}\trefs/heads/main\n"
    assert parse_exp_refs(out) == {(base, "s1-x-1de1c97a"): "1" * 40}


def test_comparison_rows_axes_and_plot():
    from types import SimpleNamespace

    from pipeline.sweep import comparison_rows, markdown_table, pick_axes, plot_png

    units = [{"overrides": [f"s.x={x}", f"s.m={m}", f"s.l=[{x}]"], "targets": []} for m in ("a", "b")
             for x in (0.2, 0.4)]
    names = [f"e{i}" for i in range(4)]
    # units with targets: their target files' metrics as targets:<key>; e1 has none (whole pipeline): file:key
    records = {n: {"metrics": {f"m{i}.json:score": float(i), "t.json:time": 1.0},
                   "target_metrics": {"score": float(i), "time": 1.0}} for i, n in enumerate(names[:3])}
    records["e1"] = {"metrics": {"m1.json:score": 1.0}}
    failed = SimpleNamespace(id="f-1", state=SimpleNamespace(
        type=SimpleNamespace(value="FAILED"), message="Flow run encountered an exception: StageFailed: `dvc exp run` "
        "exited with status 1; last output:\n" + "\n".join(f"line {i}" for i in range(10)) + "\nERROR: boom"))
    rows = comparison_rows(units, names, {"e3": failed}, records, {"e0"}, "http://ui", metrics=["score"])
    assert [r["state"] for r in rows] == ["reused", "completed", "completed", "failed"]
    assert rows[0] == {"experiment": "e0", "state": "reused", "s.x": 0.2, "s.m": "a", "s.l": [0.2],
                       "targets:score": 0.0, "error": "", "flow_run": ""}
    assert rows[1]["m1.json:score"] == 1.0 and "targets:score" not in rows[1]
    assert rows[3]["flow_run"] == "http://ui/runs/flow-run/f-1" and rows[3]["error"].endswith("ERROR: boom")
    assert "StageFailed" in rows[3]["error"] and "line 2" not in rows[3]["error"]  # first line + the end
    md = markdown_table(rows)
    assert "| [e3](http://ui/runs/flow-run/f-1) | failed |" in md
    ok = [rows[0], rows[2], rows[3]]
    # s.l follows from s.x: not a series of its own
    assert pick_axes(ok, None, None) == ("targets:score", "s.x", ["s.m"])
    assert pick_axes(ok, "score", "s.m") == ("targets:score", "s.m", ["s.x"])
    pytest.importorskip("matplotlib")
    assert plot_png(ok, "targets:score", "s.x", ["s.m"], "t")[:4] == b"\x89PNG"
    assert plot_png(ok, None, "s.x", [], "t") is None


def test_worker_environment_and_specs(tmp_path):
    from pipeline.workpool import parse_grid, worker_env, worker_specs

    env = worker_env(tmp_path, gpu="3", threads=2, heartbeat_s=10)
    assert env["CUDA_VISIBLE_DEVICES"] == "3" and env["OMP_NUM_THREADS"] == "2" and env["MKL_NUM_THREADS"] == "2"
    assert env["PGPRUNE_WORK_DIR"] == str(tmp_path)
    assert env["PGPRUNE_CHECKPOINT_DIR"] == str(tmp_path / "checkpoints")  # shared by the machine's workers
    assert env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"  # Prefect's minimum
    assert worker_specs(None, ["0", "1"], "box") == [("box-gpu0", "0"), ("box-gpu1", "1")]
    assert worker_specs(2, None, "box") == [("box-0", None), ("box-1", None)]
    assert parse_grid(["a.b=[0.2, 0.4]", "c=pg", "d=[[1], [2]]"]) == {"a.b": [0.2, 0.4], "c": ["pg"],
                                                                       "d": [[1], [2]]}


def test_pipeline_imports_no_torch():
    code = ("import sys; import pipeline.flows, pipeline.unit, pipeline.sweep, pipeline.workpool, "
            "pipeline.deploy; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=_env())
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr


def test_pgprune_units_narrow_the_comparison_to_one_cell():
    """methods x sparsities on this checkout: each unit's params validate, its target is a stage dvc.yaml generates
    for them, and the stages it would run are that cell's (not the other methods' or sparsities')."""
    from pipeline.dvcgraph import load_params_yaml, stage_graph
    from pipeline.experiments import apply_overrides, pgprune_units

    units = pgprune_units(["pg", "flap"], [0.25], root=ROOT)  # validated against pgprune/config.py and dvc.yaml
    assert [u["targets"] for u in units] == [["evaluate_search@pg-0.25"], ["evaluate_baseline@flap-0.25"]]
    base = load_params_yaml(ROOT)
    for u in units:
        graph = stage_graph(ROOT, apply_overrides(base, u["overrides"]))
        cells = [s for s in graph if "@" in s]
        assert all(s.endswith("-0.25") for s in cells) and len(cells) == 2  # its masks stage + its evaluation
    assert pgprune_units(["pg"], [0.3], evaluate_only=False)[0]["targets"] == []
    with pytest.raises(ValueError, match="unknown"):
        pgprune_units(["pg", "nope"], [0.3])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        pgprune_units(["pg"], [1.0])
