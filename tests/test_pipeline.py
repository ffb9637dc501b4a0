"""dvc.yaml / params.yaml against the stage contract, DVC invalidation on a toy copy of the pipeline, and the
Prefect flows (order, runner, a real ephemeral run over the toy pipeline). No model needed."""
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
STAGES = DVC_YAML["stages"]

# the stage contract: cmd, required deps, params (whole sections or keys), outs
CONTRACT = {
    "model": ("python -m stages.model", ["stages/model.py", "pgprune/models.py"], ["model"], ["models/base"]),
    "data": ("python -m stages.data", ["stages/data.py", "pgprune/data", "models/base"], ["data", "model.source"],
             ["data/prepared"]),
    "init": ("python -m stages.init", ["stages/init.py", "pgprune/scorers", "models/base", "data/prepared"],
             ["init", "model"], ["artifacts/init"]),
    "search": ("python -m stages.search",
               ["stages/search.py", "pgprune/search", "pgprune/pg_prune.py", "pgprune/masked_forward.py",
                "models/base", "data/prepared", "artifacts/init"], ["search", "model"],
               ["artifacts/search", "artifacts/checkpoints/search.pt"]),
    "slice": ("python -m stages.slice", ["stages/slice.py", "pgprune/slicing.py", "models/base", "artifacts/search"],
              ["slice", "model"], ["models/pruned", "artifacts/slice/summary.json"]),
    "eval": ("python -m stages.eval", ["stages/eval.py", "pgprune/eval", "models/base", "models/pruned",
                                       "data/prepared"], ["eval", "model"], ["artifacts/eval/metrics.json"]),
    "compare": ("python -m stages.compare --sparsity ${item}",
                ["stages/compare.py", "models/base", "data/prepared", "artifacts/init"], ["eval", "model"],
                ["artifacts/compare/s${item}"]),
    "report": ("python -m stages.report", ["stages/report.py", "pgprune/report", "artifacts/eval/metrics.json",
                                           "artifacts/search", "artifacts/compare"], ["report", "compare.sparsities"],
               ["report/report.md", "report/plots/ppl_vs_sparsity.csv", "report/plots/search_loss.csv",
                "report/plots/kept_per_layer.csv"]),
}


def _paths(entries):
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _opts(entries):
    return {next(iter(e)): next(iter(e.values())) for e in entries or [] if isinstance(e, dict)}


# --- dvc.yaml and params.yaml -----------------------------------------------------------------------------------
def test_dvc_yaml_matches_the_stage_contract():
    assert list(STAGES) == list(CONTRACT)
    for name, (cmd, deps, params, outs) in CONTRACT.items():
        st = STAGES[name]
        if name == "compare":
            assert st["foreach"] == "${compare.sparsities}"
            st = st["do"]
        assert st["cmd"] == cmd, name
        assert set(deps) <= set(_paths(st["deps"])), (name, set(deps) - set(_paths(st["deps"])))
        assert set(params) <= set(st["params"]), name
        assert set(outs) <= set(_paths(st.get("outs")) + _paths(st.get("metrics"))), name
    search_outs = _opts(STAGES["search"]["outs"])
    assert search_outs["artifacts/checkpoints/search.pt"] == {"persist": True, "cache": False}
    assert _opts(STAGES["slice"]["metrics"])["artifacts/slice/summary.json"] == {"cache": False}
    assert _opts(STAGES["eval"]["metrics"])["artifacts/eval/metrics.json"] == {"cache": False}
    assert "artifacts/eval/metrics.json" in DVC_YAML["metrics"]


def test_compare_depends_on_the_whole_library_but_the_report():
    deps = set(_paths(STAGES["compare"]["do"]["deps"]))
    lib = {p.relative_to(ROOT).as_posix() for p in (ROOT / "pgprune").iterdir()
           if p.name not in ("__pycache__", "report", "assets") and (p.suffix == ".py" or p.is_dir())}
    assert lib <= deps, f"pgprune modules missing from compare's deps: {sorted(lib - deps)}"
    assert not {"pgprune", "pgprune/report", "pgprune/assets"} & deps


def test_compare_tracks_every_search_and_compare_setting_but_the_sparsities():
    from pgprune.config import CompareParams, SearchParams

    params = STAGES["compare"]["do"]["params"]
    tracked = {p.split(".", 1)[1] for p in params if p.startswith("search.")}
    assert tracked == set(SearchParams.model_fields) - {"sparsity", "checkpoint_every"}
    tracked = {p.split(".", 1)[1] for p in params if p.startswith("compare.")}
    assert tracked == set(CompareParams.model_fields) - {"sparsities"}


def test_plots_are_declared_for_the_report_files():
    plots = {}
    for entry in DVC_YAML["plots"]:
        (key, val), = entry.items() if isinstance(entry, dict) else [(entry, None)]
        plots[key] = val
    assert plots["ppl_vs_sparsity"]["x"] == "sparsity"
    assert set(plots["ppl_vs_sparsity"]["y"]["report/plots/ppl_vs_sparsity.csv"]) >= {"dense", "pg", "wanda_sp"}
    assert plots["search_loss"]["y"]["report/plots/search_loss.csv"] == ["loss_mean", "baseline"]
    assert plots["kept_per_layer"]["y"]["report/plots/kept_per_layer.csv"] == ["heads_kept", "channels_kept"]
    for png in ("report/ppl_vs_sparsity.png", "report/search_curve.png", "report/kept_per_layer.png"):
        assert png in plots and png in _paths(STAGES["report"]["outs"])


def test_params_yaml_validates():
    from pgprune.config import Params, load_params

    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert isinstance(p.search.sparsity, float)  # a scalar: `dvc exp run -S search.sparsity=0.4` works


def _schema_has(key: str) -> bool:
    from pydantic import BaseModel

    from pgprune.config import Params

    node = Params
    for part in key.split("."):
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            return False
        node = node.model_fields[part].annotation
    return True


def test_every_param_key_in_dvc_yaml_exists_in_the_schema():
    keys = []
    for st in STAGES.values():
        body = st.get("do", st)
        for p in body.get("params") or []:
            keys += [p] if isinstance(p, str) else [k for v in p.values() for k in v]
    keys.append(STAGES["compare"]["foreach"].strip("${}"))
    missing = [k for k in keys if not _schema_has(k)]
    assert not missing, f"dvc.yaml params not in pgprune/config.py: {missing}"
    assert not _schema_has("search.no_such_key")


def test_every_param_key_in_dvc_yaml_is_in_params_yaml():
    """DVC stops a stage whose tracked key is missing from params.yaml: regenerate params.yaml (defaults:
    pgprune.config.default_params_yaml()) when the schema gains a key that dvc.yaml tracks."""
    data = yaml.safe_load((ROOT / "params.yaml").read_text())

    def has(key):
        node = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    keys = [p for st in STAGES.values() for p in st.get("do", st).get("params") or [] if isinstance(p, str)]
    assert not [k for k in keys if not has(k)]


def test_dvc_parses_the_pipeline():
    out = dvc("stage", "list", cwd=ROOT).stdout
    names = [ln.split()[0] for ln in out.splitlines() if ln.strip()]
    from pgprune.config import load_params

    expected = [f"compare@{s}" for s in load_params(ROOT / "params.yaml").compare.sparsities]
    assert set(expected) <= set(names) and {"model", "search", "eval", "report"} <= set(names)
    dot = dvc("dag", "--dot", cwd=ROOT).stdout
    assert '"search" -> "slice"' in dot and '"slice" -> "eval"' in dot
    assert f'"{expected[0]}" -> "report"' in dot and '"eval" -> "report"' in dot


def test_metrics_files_are_not_git_ignored():
    for path in ("artifacts/eval/metrics.json", "artifacts/slice/summary.json", "report/report.md"):
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert r.returncode == 1, f"{path} is git-ignored"


# --- invalidation on a toy copy of the pipeline ------------------------------------------------------------------
def _status(path) -> set[str]:
    return set(json.loads(dvc("status", "--json", cwd=path).stdout or "{}"))


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    """Ephemeral Prefect (temporary local server), real dvc, the toy pipeline: the pipeline flow (every stage once,
    in DAG order), then the sweep flow with one value. One subprocess, so the temporary server starts once.
    Returns (toy repo, stdout, stdout + stderr); the repo is left at the sweep's experiment (search.sparsity 0.4)."""
    tmp = tmp_path_factory.mktemp("flows")
    path = make_toy_repo(tmp / "repo", commit=False)
    gi = path / ".gitignore"  # the ignore rules the project needs (see test_metrics_files_are_not_git_ignored)
    gi.write_text(gi.read_text().replace("/artifacts/\n", "/artifacts/checkpoints/\n"))
    sh(["git", "add", "-A"], path)
    sh(["git", "commit", "-q", "-m", "toy"], path)
    driver = (
        "import json, os, subprocess\n"
        "from pipeline.flows import pgprune_pipeline, sweep_sparsity\n"
        "order = pgprune_pipeline()\n"
        "print('ORDER', json.dumps(order))\n"
        "repo = os.environ['PGPRUNE_REPO_ROOT']\n"
        "subprocess.run(['git', 'add', '-A'], cwd=repo, check=True)\n"
        "subprocess.run(['git', 'commit', '-qm', 'run'], cwd=repo, check=True)\n"
        "print('SWEEP', json.dumps(sweep_sparsity([0.4])))\n"
    )
    env = dict(os.environ, PGPRUNE_REPO_ROOT=str(path), PREFECT_HOME=str(tmp / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DVC_NO_ANALYTICS="1", PYTHONPATH=str(ROOT),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com")
    for k in ("PREFECT_API_URL", "PGPRUNE_DVC"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", driver], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    return path, r.stdout, log


def test_flows_run_for_real_on_the_toy_pipeline(flow_run):
    _, stdout, log = flow_run
    order = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("ORDER "))[6:])
    assert order == ["model", "data", "init", "search", "slice", "eval", "compare", "report"]
    ran = ran_stages(log)
    first = ran[:ran.index("report") + 1]  # the pipeline flow; the sweep's experiment follows
    assert first == ["model", "data", "init", "search", "slice", "eval", "compare@0.2", "compare@0.3",
                     "compare@0.5", "report"]
    assert "Task run 'eval'" in log and "Running stage 'eval'" in log  # dvc output went into the task's log
    # the sweep: `dvc exp run -S search.sparsity=0.4` reran search and what follows, not compare@S
    assert ran[len(first):] == ["search", "slice", "eval", "report"]
    sweep = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("SWEEP "))[6:])
    exp = [s for s in sweep if s["baseline"] is not None]
    assert len(exp) == 1 and exp[0]["search.sparsity"] == 0.4
    assert next(s for s in sweep if s["baseline"] is None)["search.sparsity"] == 0.3
    assert set(exp[0]["params"]) >= {"search.sparsity", "eval.zero_shot_limit"}
    assert exp[0]["metrics"], "experiment metrics missing (git-ignored metrics files?)"


def test_changing_a_param_invalidates_only_its_stages(flow_run):
    toy = flow_run[0]  # reproduced by the flows (now at search.sparsity 0.4)
    assert _status(toy) == set()
    pyc = toy / "pgprune" / "search" / "__pycache__" / "policy.cpython-399.pyc"
    pyc.parent.mkdir()
    pyc.write_bytes(b"byte-code")  # written by imports; .dvcignore keeps it out of the code deps' hashes
    assert _status(toy) == set()
    compare = [f"compare@{s}" for s in yaml.safe_load((toy / "params.yaml").read_text())["compare"]["sparsities"]]
    set_param(toy, "eval.zero_shot_limit", 8)
    # eval, and the comparison, which evaluates its models with the same eval settings; nothing upstream
    assert _status(toy) == {"eval", *compare}
    assert ran_stages(dvc("repro", cwd=toy).stdout) == ["eval", *compare, "report"]  # report: its inputs changed

    set_param(toy, "search.sparsity", 0.5)
    assert _status(toy) == {"search"}
    assert ran_stages(dvc("repro", cwd=toy).stdout) == ["search", "slice", "eval", "report"]  # no compare@S

    set_param(toy, "compare.sparsities", [0.2, 0.3, 0.5, 0.6])
    assert _status(toy) == {"compare@0.6", "report"}
    assert ran_stages(dvc("repro", cwd=toy).stdout) == ["compare@0.6", "report"]
    assert (toy / "artifacts/compare/s0.6/out.txt").exists()
    assert _status(toy) == set()


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
                "data": {"rev": rev, "params": {"params.yaml": {"data": {"search": {"sparsity": sparsity}}}},
                         "metrics": {"artifacts/eval/metrics.json": {"data": {
                             "sparsity": sparsity, "pruned": {"ppl": {"local": ppl}, "params": {"per_layer": [1]}},
                             "note": "text"}}}}}

    show = [entry("workspace", None, 0.4, 30.0),
            entry("abc", "main", 0.3, 25.0, [{"revs": [entry("def", "exp-1", 0.4, 30.0)], "name": "exp-1"}])]
    rows = summarise_experiments(show)
    assert [(r["name"], r["baseline"], r["search.sparsity"]) for r in rows] == [("main", None, 0.3),
                                                                              ("exp-1", "main", 0.4)]
    assert rows[1]["metrics"] == {"artifacts/eval/metrics.json:sparsity": 0.4,
                                  "artifacts/eval/metrics.json:pruned.ppl.local": 30.0}


# --- Prefect flows -----------------------------------------------------------------------------------------------
def test_stage_order_follows_the_dag():
    from pipeline.flows import stage_graph, stage_order

    assert stage_order(DVC_YAML) == ["model", "data", "init", "search", "slice", "eval", "compare", "report"]
    assert stage_order(DVC_YAML, ["report", "init", "data"]) == ["data", "init", "report"]
    assert stage_order(DVC_YAML, ["report", "compare@0.3", "search"]) == ["search", "compare@0.3", "report"]
    g = stage_graph(DVC_YAML)
    assert g["compare"] == ["model", "data", "init"] and set(g["report"]) == {"search", "eval", "compare"}
    with pytest.raises(ValueError, match="unknown stage"):
        stage_order(DVC_YAML, ["nope"])
    # the order comes from the data flow, not from where a stage is written
    shuffled = {"stages": dict(reversed(list(STAGES.items())))}
    order = stage_order(shuffled)
    assert order.index("model") < order.index("data") < order.index("search") < order.index("eval") \
        < order.index("report")
    cyclic = {"stages": {"a": {"cmd": "x", "deps": ["b.txt"], "outs": ["a.txt"]},
                         "b": {"cmd": "y", "deps": ["a.txt"], "outs": ["b.txt"]}}}
    with pytest.raises(ValueError, match="cycle"):
        stage_order(cyclic)


def test_tasks_do_not_cache_and_retry_once():
    from prefect.cache_policies import NO_CACHE

    from pipeline.flows import pgprune_pipeline, run_stage, sweep_sparsity

    assert run_stage.cache_policy is NO_CACHE and run_stage.persist_result is False
    assert run_stage.retries == 1 and run_stage.retry_delay_seconds == 5 and run_stage.log_prints
    assert pgprune_pipeline.persist_result is False and sweep_sparsity.persist_result is False


def test_repro_command(monkeypatch):
    from pipeline.flows import exp_run_command, repro_command

    monkeypatch.setenv("PGPRUNE_DVC", "dvc-x")
    assert repro_command("eval") == ["dvc-x", "repro", "--single-item", "eval"]
    assert repro_command("compare", force=True) == ["dvc-x", "repro", "--single-item", "--force", "compare"]
    assert exp_run_command(0.4) == ["dvc-x", "exp", "run", "-S", "search.sparsity=0.4"]


def test_run_command_streams_lines_and_reports_failures(tmp_path):
    from pipeline.flows import StageFailed, run_command

    lines = []
    script = "import sys; print('one'); print('two', file=sys.stderr); print('three')"
    run_command([sys.executable, "-c", script], tmp_path, lines.append)
    assert lines == ["one", "two", "three"]
    with pytest.raises(StageFailed, match=r"status 3[\s\S]*boom"):
        run_command([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path, lambda _: None)


def test_use_params_validates_and_copies(tmp_path):
    from pgprune.errors import ConfigError
    from pipeline.flows import use_params

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    assert use_params("params.yaml", tmp_path) is False
    other = yaml.safe_load((ROOT / "params.yaml").read_text())
    other["search"]["sparsity"] = 0.5
    (tmp_path / "p2.yaml").write_text(yaml.safe_dump(other))
    assert use_params("p2.yaml", tmp_path) is True
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["search"]["sparsity"] == 0.5
    other["search"]["sparsity"] = 2
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(ConfigError, match="search.sparsity"):
        use_params("bad.yaml", tmp_path)


def test_deployment_builds_with_the_cron_schedule():
    from pipeline.deploy import build_deployments

    deps = build_deployments("nightly", "0 3 * * *", stages=["eval", "report"], with_sweep=True)
    assert [d.name for d in deps] == ["nightly", "nightly-sweep"]
    assert deps[0].schedules[0].schedule.cron == "0 3 * * *"
    assert deps[0].parameters == {"stages": ["eval", "report"], "params_file": "params.yaml", "force": False}
    with pytest.raises(ValueError):
        build_deployments("x", "0 3 * * *", stages=["nope"])


def test_flows_cli_dry_run():
    r = subprocess.run([sys.executable, "-m", "pipeline.flows", "--dry-run", "--stages", "report", "data"],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PGPRUNE_DVC="dvc"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["dvc repro --single-item data", "dvc repro --single-item report"]
