"""Prefect flows over the DVC pipeline: the stage graph (DVC's own, with experiment params too), a real
ephemeral run over a toy copy of the pipeline (tasks wired like dvc.yaml's DAG), the local sweep, the runner, the
deployment, the CLI. No model needed. Expected stages and edges come from dvc.yaml via DVC, not from lists here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from toy_dvc import DVC, ROOT, dvc, make_toy_repo, ran_stages, set_param, sh

pytestmark = pytest.mark.skipif(not Path(DVC).exists(), reason="dvc is not installed next to this Python")

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
# a smaller grid for the toy run: a few cells of every matrix, export's cell included
TOY_GRID = {"compare.sparsities": sorted({PARAMS["export"]["sparsity"], 0.3}),
            "compare.searches": [PARAMS["export"]["method"]],
            "compare.baselines": PARAMS["compare"]["baselines"][:1]}


def dvc_graph(repo: Path) -> dict[str, set[str]]:
    """DVC's own stage graph of ``repo``: {stage address: the stages it depends on}."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        graph = {s.name: set() for s in r.index.stages}
        for a, b in r.index.graph.edges():
            graph[a.name].add(b.name)
    return graph


def is_topological(order: list[str], graph: dict[str, set[str]]) -> bool:
    pos = {s: i for i, s in enumerate(order)}
    return all(pos[u] < pos[s] for s in order for u in graph[s] if u in pos)


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """Ephemeral Prefect (temporary local server), real dvc, the toy pipeline on TOY_GRID: the pipeline flow (every
    stage once, in DAG order), then the local sweep flow with one unit. One subprocess, so the temporary server
    starts once. Returns (toy repo, stdout, stdout + stderr)."""
    tmp = tmp_path_factory.mktemp("flows")
    path = make_toy_repo(tmp / "repo", commit=False)
    for key, value in TOY_GRID.items():
        set_param(path, key, value)
    sh(["git", "add", "-A"], path)
    sh(["git", "commit", "-q", "-m", "toy"], path)
    driver = (
        "import json, os, subprocess\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId\n"
        "from prefect.client.schemas.sorting import TaskRunSort\n"
        "from pipeline.flows import pgprune_pipeline, sweep_experiments\n"
        "state = pgprune_pipeline(return_state=True)\n"
        "print('ORDER', json.dumps(state.result()))\n"
        "with get_client(sync_client=True) as c:\n"
        "    trs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(\n"
        "        any_=[state.state_details.flow_run_id])), limit=200, offset=0,\n"
        "        sort=TaskRunSort.EXPECTED_START_TIME_ASC)  # explicit: prefect 3.8 + fastapi 0.154 reject nulls\n"
        "    names = {str(t.id): t.name for t in trs}\n"
        "    edges = {t.name: sorted(names[str(i.id)] for i in t.task_inputs.get('wait_for', [])) for t in trs}\n"
        "print('EDGES', json.dumps(edges))\n"
        "from dvc.repo import Repo\n"
        "with Repo(os.environ['PGPRUNE_REPO_ROOT']) as r:  # DVC's own graph, before the sweep changes params\n"
        "    g = {s.name: [] for s in r.index.stages}\n"
        "    for a, b in r.index.graph.edges():\n"
        "        g[a.name].append(b.name)\n"
        "print('DVCGRAPH', json.dumps(g))\n"
        "repo = os.environ['PGPRUNE_REPO_ROOT']\n"
        "subprocess.run(['git', 'add', '-A'], cwd=repo, check=True)\n"
        "subprocess.run(['git', 'commit', '-qm', 'run'], cwd=repo, check=True)\n"
        "print('SWEEP', json.dumps(sweep_experiments([['compare.sparsities=[0.4]', 'export.sparsity=0.4']])))\n"
    )
    env = dict(os.environ, PGPRUNE_REPO_ROOT=str(path), PREFECT_HOME=str(tmp / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1", PYTHONPATH=str(ROOT),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com")
    for k in ("PREFECT_API_URL", "PGPRUNE_DVC"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    return path, r.stdout, log


def _line(stdout: str, tag: str):
    return json.loads(next(ln for ln in stdout.splitlines() if ln.startswith(tag + " "))[len(tag) + 1:])


def test_pipeline_flow_runs_every_stage_in_dag_order_with_the_dag_as_task_graph(flow_run):
    path, stdout, log = flow_run
    graph = {s: set(u) for s, u in _line(stdout, "DVCGRAPH").items()}
    order = _line(stdout, "ORDER")
    assert sorted(order) == sorted(graph)  # one task per stage DVC knows, matrix cells included
    assert any("@" in s for s in order)
    assert is_topological(order, graph)
    ran = ran_stages(log)
    assert ran[:len(order)] == order  # the dummy stages ran in the flow's order, each once
    # the Prefect task graph (wait_for, what the UI draws) is DVC's stage graph
    edges = _line(stdout, "EDGES")
    assert {s: set(e) for s, e in edges.items()} == graph
    assert "Task run 'evaluate_dense'" in log and "Running stage 'evaluate_dense'" in log  # dvc output in the log


def test_local_sweep_runs_only_the_new_cells(flow_run):
    path, stdout, log = flow_run
    order = _line(stdout, "ORDER")
    ran = ran_stages(log)[len(order):]  # the sweep's experiment
    new_cells = {s for s in dvc_graph(path) if s.endswith("-0.4")}  # after the sweep, the repo is at the experiment
    assert new_cells and new_cells <= set(ran)
    assert not {"model", "data", "init", "evaluate_dense"} & set(ran)  # unchanged inputs are not recomputed
    assert set(ran) - new_cells == {"export", "report"}
    sweep = _line(stdout, "SWEEP")
    exp = [s for s in sweep if s["baseline"] is not None]
    assert len(exp) == 1 and exp[0]["params"]["export.sparsity"] == 0.4
    assert next(s for s in sweep if s["baseline"] is None)["params"]["export.sparsity"] == PARAMS["export"]["sparsity"]
    assert exp[0]["metrics"], "experiment metrics missing (git-ignored metrics files?)"


# --- the stage graph -------------------------------------------------------------------------------------------
def test_stage_graph_of_the_real_dvc_yaml_is_dvcs():
    from pipeline.flows import pipeline_plan

    graph = dvc_graph(ROOT)
    order, upstream = pipeline_plan(ROOT)
    assert sorted(order) == sorted(graph) and is_topological(order, graph)
    assert {s: set(u) for s, u in upstream.items()} == graph


def test_overridden_params_give_the_stages_dvc_lists_for_them(tmp_path):
    """With params other than params.yaml (an experiment's overrides), the stages and edges are the ones DVC lists
    for a checkout whose params.yaml holds them (foreach and matrix groups, ${key}/${item.x} in paths)."""
    from pipeline.dvcgraph import stage_graph, stage_outs

    spec = {"vars": [{"root": "out"}], "stages": {
        "a": {"foreach": "${xs}", "do": {"cmd": "echo ${item}", "outs": ["${root}/a-${item}"]}},
        "b": {"foreach": {"left": 1, "right": 2}, "do": {"cmd": "echo ${key} ${item}", "outs": ["out/b-${key}"]}},
        "d": {"matrix": {"m": ["p", "q"], "s": "${xs}", "f": [True, False]},
              "cmd": "echo ${item.m} ${item.s}", "deps": ["out/a-${item.s}"],
              "outs": ["out/d-${item.m}-${item.s}-${item.f}"]},
        "e": {"cmd": "echo e", "deps": ["out"], "outs": ["e.txt"]}}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"xs": [0.5]}))
    params = {"xs": [0.5, 2]}
    graph = stage_graph(tmp_path, params)
    assert (tmp_path / "params.yaml").read_text() == yaml.safe_dump({"xs": [0.5]})  # the checkout is untouched
    assert stage_outs(tmp_path, params)["a@2"] == ["out/a-2"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    sh(["git", "init", "-q"], tmp_path)
    dvc("init", "-q", cwd=tmp_path)
    assert list(graph) == dvc("stage", "list", "--name-only", cwd=tmp_path).stdout.split()
    assert {s: set(u) for s, u in graph.items()} == dvc_graph(tmp_path)


def test_stage_order_selection_and_errors(tmp_path):
    from pipeline.dvcgraph import stage_graph, stage_order

    params = {**PARAMS, "compare": {**PARAMS["compare"], **{k.split(".")[1]: v for k, v in TOY_GRID.items()}}}
    order = stage_order(ROOT, params=params)
    assert stage_order(ROOT, ["report", "init", "data"], params) == ["data", "init", "report"]
    cells = [s for s in order if s.startswith("search@")]
    assert cells and stage_order(ROOT, ["search"], params) == cells  # a group name means all its cells
    one = cells[-1]
    assert stage_order(ROOT, ["report", one, "model"], params) == ["model", one, "report"]
    with pytest.raises(ValueError, match="unknown stage"):
        stage_order(ROOT, ["nope"], params)
    with pytest.raises(ValueError, match="unknown stage"):
        stage_order(ROOT, ["search@nope-0.9"], params)
    # the order comes from the data flow, not from where a stage is written
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({**DVC_YAML, "stages": dict(reversed(list(
        DVC_YAML["stages"].items())))}, sort_keys=False))
    reordered = stage_order(tmp_path, params=params)
    assert sorted(reordered) == sorted(order) and reordered != order
    assert is_topological(reordered, {s: set(u) for s, u in stage_graph(ROOT, params).items()})
    cyclic = tmp_path / "cyclic"
    cyclic.mkdir()
    (cyclic / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "a": {"cmd": "x", "deps": ["b.txt"], "outs": ["a.txt"]}, "b": {"cmd": "y", "deps": ["a.txt"], "outs": ["b.txt"]}}}))
    with pytest.raises(ValueError, match="cycle"):
        stage_order(cyclic)


def test_selected_upstream_skips_unselected_stages():
    from pipeline.dvcgraph import selected_upstream

    graph = {"a": [], "b": ["a"], "c": ["b"], "d": ["a", "c"]}
    assert selected_upstream(graph, ["a", "c", "d"]) == {"a": [], "c": ["a"], "d": ["a", "c"]}
    assert selected_upstream(graph, ["d"]) == {"d": []}


# --- runner, experiments ----------------------------------------------------------------------------------------
def test_experiment_names():
    from pipeline.flows import experiment_names

    assert experiment_names("Ran experiment(s): leary-yoni") == ["leary-yoni"]
    assert experiment_names("Ran experiment(s): a, b") == ["a", "b"]
    assert experiment_names("Ran experiment(s): ") == []
    assert experiment_names("Queued experiment 'pally-alto' for future execution.") == ["pally-alto"]
    assert experiment_names("Running stage 'search':") == []


def test_summarise_experiments():
    from pipeline.flows import summarise_experiments

    def entry(rev, name, sparsity, ppl, experiments=None):
        return {"rev": rev, "name": name, "error": None, "experiments": experiments,
                "data": {"rev": rev, "params": {"params.yaml": {"data": {"export": {"sparsity": sparsity}}}},
                         "metrics": {"artifacts/eval/pg-s0.3.json": {"data": {
                             "sparsity": sparsity, "pruned": {"ppl": {"local": ppl}, "params": {"per_layer": [1]}},
                             "note": "text"}}}}}

    show = [entry("workspace", None, 0.4, 30.0),
            entry("abc", "main", 0.3, 25.0, [{"revs": [entry("def", "exp-1", 0.4, 30.0)], "name": "exp-1"}])]
    rows = summarise_experiments(show)
    assert [(r["name"], r["baseline"], r["params"]["export.sparsity"]) for r in rows] == [("main", None, 0.3),
                                                                                        ("exp-1", "main", 0.4)]
    assert rows[1]["metrics"] == {"artifacts/eval/pg-s0.3.json:sparsity": 0.4,
                                  "artifacts/eval/pg-s0.3.json:pruned.ppl.local": 30.0}


def test_stages_in_output():
    from pipeline.flows import stages_in_output

    out = ["Stage 'model' didn't change, skipping", "Stage 'search@pg-0.3' is cached - skipping run, checking out "
           "outputs", "Running stage 'evaluate_search@pg-0.3':", "> python -m stages.evaluate"]
    assert stages_in_output(out) == {"ran": ["evaluate_search@pg-0.3"], "reused": ["model", "search@pg-0.3"]}


def test_tasks_do_not_cache_and_retry_once():
    from prefect.cache_policies import NO_CACHE

    from pipeline.flows import pgprune_pipeline, run_stage, sweep_experiments

    assert run_stage.cache_policy is NO_CACHE and run_stage.persist_result is False
    assert run_stage.retries == 1 and run_stage.retry_delay_seconds == 5 and run_stage.log_prints
    assert pgprune_pipeline.persist_result is False and sweep_experiments.persist_result is False


def test_commands(monkeypatch):
    from pipeline.flows import exp_run_command, repro_command, sweep_units

    monkeypatch.setenv("PGPRUNE_DVC", "dvc-x")
    assert repro_command("evaluate_dense") == ["dvc-x", "repro", "--single-item", "evaluate_dense"]
    assert repro_command("search", force=True) == ["dvc-x", "repro", "--single-item", "--force", "search"]
    assert exp_run_command(["a.b=1", "c=[1, 2]"]) == ["dvc-x", "exp", "run", "-S", "a.b=1", "-S", "c=[1, 2]"]
    assert sweep_units(["0.4", "search.steps=5 search.seed=1"]) == [
        ["compare.sparsities=[0.4]", "recover.sparsities=[]", "export.sparsity=0.4"], ["search.steps=5", "search.seed=1"]]
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        sweep_units(["1.5"])
    with pytest.raises(ValueError, match="key=value"):
        sweep_units(["nonsense"])


def test_run_command_streams_lines_and_reports_failures(tmp_path):
    from pipeline.flows import StageFailed, run_command

    lines = []
    script = "import sys; print('one'); print('two', file=sys.stderr); print('three')"
    assert run_command([sys.executable, "-c", script], tmp_path, lines.append) == ["one", "two", "three"]
    assert lines == ["one", "two", "three"]
    with pytest.raises(StageFailed, match=r"status 3[\s\S]*boom"):
        run_command([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path, lambda _: None)


def test_use_params_validates_and_copies(tmp_path):
    from pgprune.errors import ConfigError
    from pipeline.flows import use_params

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    assert use_params("params.yaml", tmp_path) is False
    other = yaml.safe_load((ROOT / "params.yaml").read_text())
    other["search"]["steps"] = 7
    (tmp_path / "p2.yaml").write_text(yaml.safe_dump(other))
    assert use_params("p2.yaml", tmp_path) is True
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["search"]["steps"] == 7
    other["export"]["sparsity"] = 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ConfigError, match="export.sparsity"):
        use_params("bad.yaml", tmp_path)


def test_deployment_builds_with_the_cron_schedule():
    from pipeline.deploy import build_deployments

    deps = build_deployments("nightly", "0 3 * * *", stages=["evaluate_dense", "report"], with_sweep=True)
    assert [d.name for d in deps] == ["nightly", "nightly-sweep"]
    assert deps[0].schedules[0].schedule.cron == "0 3 * * *"
    assert deps[0].parameters == {"stages": ["evaluate_dense", "report"], "params_file": "params.yaml",
                                  "force": False}
    with pytest.raises(ValueError):
        build_deployments("x", "0 3 * * *", stages=["nope"])


def test_flows_cli_dry_run():
    env = dict(os.environ, PGPRUNE_DVC="dvc")
    env.pop("PGPRUNE_REPO_ROOT", None)
    r = subprocess.run([sys.executable, "-m", "pipeline.flows", "--dry-run", "--stages", "report", "data"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["dvc repro --single-item data", "dvc repro --single-item report   # after data"]
    r = subprocess.run([sys.executable, "-m", "pipeline.flows", "--dry-run", "--sweep", "0.4", "search.steps=5"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["dvc exp run -S compare.sparsities=[0.4] -S recover.sparsities=[] -S "
                                     "export.sparsity=0.4",
                                     "dvc exp run -S search.steps=5"]
    r = subprocess.run([sys.executable, "-m", "pipeline.flows", "--dry-run", "--stages", "nope"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "unknown stage" in r.stderr
