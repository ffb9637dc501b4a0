"""dvc.yaml / params.yaml against the stage contract, and DVC's invalidation and run cache on a toy copy of the
pipeline (dummy stages, real dvc). No model needed; tests/test_pipeline_real.py runs the real stages."""
from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from toy_dvc import DVC, ROOT, dvc, make_toy_repo, ran_stages, set_param

pytestmark = pytest.mark.skipif(not Path(DVC).exists(), reason="dvc is not installed next to this Python")

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]
PATHS = DVC_YAML["vars"][0]["paths"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())


def _paths(entries):
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _opts(entries):
    return {next(iter(e)): next(iter(e.values())) for e in entries or [] if isinstance(e, dict)}


# --- dvc.yaml and params.yaml -----------------------------------------------------------------------------------
def test_stage_layout():
    assert list(STAGES) == ["model", "data", "init", "search", "baseline", "evaluate_dense", "evaluate_search",
                            "evaluate_baseline", "teacher", "recover", "evaluate_recovered", "export", "report"]
    assert STAGES["search"]["matrix"] == {"method": "${compare.searches}", "sparsity": "${compare.sparsities}"}
    assert STAGES["baseline"]["matrix"] == {"method": "${compare.baselines}", "sparsity": "${compare.sparsities}"}
    assert STAGES["evaluate_search"]["matrix"] == STAGES["search"]["matrix"]
    assert STAGES["evaluate_baseline"]["matrix"] == STAGES["baseline"]["matrix"]
    for name, st in STAGES.items():
        assert st["cmd"].startswith(f"python -m stages.{name.split('_')[0]}"), name
        assert f"stages/{name.split('_')[0]}.py" in _paths(st["deps"]) or name == "model", name
    # masks are the hand-off: searches and baselines write them, evaluations and the export read them
    cell = "${paths.masks}/${item.method}/s${item.sparsity}"
    assert _paths(STAGES["search"]["outs"]) == [cell] == _paths(STAGES["baseline"]["outs"])
    assert cell in _paths(STAGES["evaluate_search"]["deps"]) and cell in _paths(STAGES["evaluate_baseline"]["deps"])
    assert "${paths.masks}/${export.method}/s${export.sparsity}" in _paths(STAGES["export"]["deps"])
    # recovery: a cell's masks in, a model folder out, evaluated by evaluate_recovered
    assert STAGES["recover"]["matrix"] == {"method": "${recover.methods}", "sparsity": "${recover.sparsities}"}
    assert STAGES["evaluate_recovered"]["matrix"] == STAGES["recover"]["matrix"]
    folder = "${paths.recovered}/${item.method}/s${item.sparsity}"
    assert cell in _paths(STAGES["recover"]["deps"]) and _paths(STAGES["recover"]["outs"]) == [folder]
    assert folder in _paths(STAGES["evaluate_recovered"]["deps"]) and "--pruned " + folder in \
        STAGES["evaluate_recovered"]["cmd"]


def test_no_stage_imports_another_and_stages_are_thin():
    for f in sorted((ROOT / "stages").glob("*.py")):
        tree = ast.parse(f.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
                   {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        others = {m for m in imported if m.startswith("stages.") and m != "stages._common"}
        assert not others, f"{f.name} imports {others}"
        assert len(f.read_text().splitlines()) < 110, f"{f.name} is not thin"


def test_artifact_paths_are_declared_once():
    """Every artifact path in a stage goes through `vars: paths` (no literal artifacts/, models/, data/ paths)."""
    text = (ROOT / "dvc.yaml").read_text()
    body = text.split("\nstages:", 1)[1].split("\nplots:", 1)[0]
    for root in ("artifacts/", "models/", "data/prepared"):
        lines = [ln for ln in body.splitlines() if root in ln and not ln.strip().startswith("#")]
        assert not lines, f"literal {root} paths in stages: {lines}"
    assert set(PATHS) >= {"base", "data", "scores", "masks", "eval", "timing", "pruned", "report"}


def test_run_cache_is_never_switched_off():
    """No persisted output (DVC never run-caches a stage with one); checkpoints are not outputs at all."""
    for name, st in STAGES.items():
        for group in ("outs", "metrics"):
            for path, opts in _opts(st.get(group)).items():
                assert not (opts or {}).get("persist"), (name, path)
        assert "checkpoint" not in json.dumps(st.get("outs")), name
    assert "/artifacts/checkpoints/" in (ROOT / ".gitignore").read_text()


def test_params_lists_are_exact_keys():
    """Sections or exact keys; which keys a stage really reads is checked by running it
    (tests/test_stages_e2e.py::test_all_stages), this pins the layout."""
    p = {name: st.get("params") for name, st in STAGES.items()}
    placement = ["model.dtype", "model.device", "model.offload", "model.device_map", "model.max_memory"]
    assert p["search"] == ["search", "refit", *placement]
    assert p["baseline"] == ["search.min_heads_per_layer", "init.flap_bias_compensation", "refit", "model.dtype",
                             "model.offload"]
    assert p["evaluate_search"] == p["evaluate_baseline"] == p["evaluate_dense"] == ["eval", "data.evaluation",
                                                                                     *placement]
    assert p["export"] == ["export", "model.dtype", "model.source", "data.calibration", "data.calib_blocks",
                           "data.seq_len"]
    assert p["model"] == ["model.source", "model.dtype"] and p["data"] == ["data"]
    assert p["init"] == ["init", *placement]
    assert p["report"] == ["report", "compare", "export", "search.init", "search.seeds", "recover"]
    assert p["evaluate_recovered"] == p["evaluate_dense"]
    assert p["recover"] == ["recover", "refit", "eval.curve_blocks", "eval.ppl_batch_size", "eval.ppl_seq_len",
                            "eval.ppl_blocks", "data.evaluation", "data.calibration", "data.calib_blocks",
                            "data.seq_len", "model.source", *placement]
    assert not any("model.threads" in (v or []) or "model" in (v or []) for v in p.values())  # operational only


def test_plots_columns_are_the_method_registry():
    from pgprune.methods import METHODS

    plots = {}
    for entry in DVC_YAML["plots"]:
        (key, val), = entry.items() if isinstance(entry, dict) else [(entry, None)]
        plots[key] = val
    assert plots["ppl_vs_sparsity"]["y"]["report/plots/ppl_vs_sparsity.csv"] == ["dense", *METHODS]
    assert plots["search_loss"]["y"]["report/plots/search_loss.csv"] == ["loss_mean", "baseline", "val_loss"]
    for png in ("report/ppl_vs_sparsity.png", "report/search_curve.png", "report/kept_per_layer.png",
                "report/recovery_curve.png"):
        assert png in plots and png.replace("report/", "${paths.report}/") in _paths(STAGES["report"]["outs"])


def test_params_yaml_validates_and_compares_what_the_report_needs():
    """The default cells (docs/defaults.md says which were dropped for time): the default PG search, FLAP with its
    bias-only compensation and the same FLAP masks refit (what the mask brings vs what the refit brings)."""
    from pgprune.config import Params, load_params
    from pgprune.methods import METRIC_METHODS, SEARCH_METHODS

    p = load_params(ROOT / "params.yaml")
    assert isinstance(p, Params)
    assert "pg" in p.compare.searches and set(p.compare.searches) <= set(SEARCH_METHODS)
    assert {"flap", "flap_refit"} <= set(p.compare.baselines) <= set(METRIC_METHODS)
    assert p.search.compensation == "refit" and p.export.method == "pg"


def _schema_has(key: str) -> bool:
    from pydantic import BaseModel

    from pgprune.config import Params

    node = Params
    for part in key.split("."):
        if not (isinstance(node, type) and issubclass(node, BaseModel)) or part not in node.model_fields:
            return False
        node = node.model_fields[part].annotation
    return True


def _template_keys() -> list[str]:
    text = (ROOT / "dvc.yaml").read_text()
    return [k for k in re.findall(r"\$\{([^}]+)\}", text) if not k.startswith(("item", "paths."))]


def test_every_param_key_in_dvc_yaml_exists_in_the_schema_and_params_yaml():
    keys = [p for st in STAGES.values() for p in st.get("params") or []] + _template_keys()
    missing = [k for k in keys if not _schema_has(k)]
    assert not missing, f"dvc.yaml params not in pgprune/config.py: {missing}"
    assert not _schema_has("search.no_such_key")

    def has(key):
        node = PARAMS
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    assert not [k for k in keys if not has(k)]


def test_dvc_parses_the_pipeline():
    out = dvc("stage", "list", cwd=ROOT).stdout
    names = [ln.split()[0] for ln in out.splitlines() if ln.strip()]
    c = PARAMS["compare"]
    expected = [f"search@{m}-{s}" for m in c["searches"] for s in c["sparsities"]]
    expected += [f"baseline@{m}-{s}" for m in c["baselines"] for s in c["sparsities"]]
    expected += [f"evaluate_search@{m}-{s}" for m in c["searches"] for s in c["sparsities"]]
    assert set(expected) <= set(names) and {"model", "export", "report", "evaluate_dense"} <= set(names)
    dot = dvc("dag", "--dot", cwd=ROOT).stdout
    e = PARAMS["export"]
    cell = f"{e['method']}-{e['sparsity']}"
    assert f'"search@{cell}" -> "evaluate_search@{cell}"' in dot
    assert f'"search@{cell}" -> "export"' in dot and '"export"' in dot
    assert f'"evaluate_search@{cell}" -> "report"' in dot and '"evaluate_dense" -> "report"' in dot
    assert '"init" -> "baseline@flap-0.2"' in dot


def test_metrics_files_are_not_git_ignored():
    for path in ("artifacts/eval/pg-s0.3.json", "artifacts/timing/init.json", "report/report.md"):
        r = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT)
        assert r.returncode == 1, f"{path} is git-ignored"


# --- invalidation and run cache on a toy copy of the pipeline ------------------------------------------------------
def _status(path) -> set[str]:
    return set(json.loads(dvc("status", "--json", cwd=path).stdout or "{}"))


# a smaller grid than params.yaml's (DVC needs about a second per stage), with one baseline held back to be added
TOY = {"sparsities": [0.2, 0.3], "searches": PARAMS["compare"]["searches"], "baselines": ["flap", "layer_drop"]}
NEW = "random"
TOY_RECOVER = {"methods": ["pg", "flap"], "sparsities": [0.3]}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    path = make_toy_repo(tmp_path_factory.mktemp("toy") / "repo")
    for k, v in TOY.items():
        set_param(path, f"compare.{k}", v)
    set_param(path, "export.sparsity", 0.3)
    for k, v in TOY_RECOVER.items():
        set_param(path, f"recover.{k}", v)
    first = ran_stages(dvc("repro", cwd=path).stdout)
    return path, first


def _cells(prefix: str, methods, sparsities) -> list[str]:
    return [f"{prefix}@{m}-{s}" for m in methods for s in sparsities]


def test_the_whole_pipeline_runs_once_in_dag_order(toy):
    path, first = toy
    c = TOY
    assert first[:3] == ["model", "data", "init"] and first[-2:] == ["export", "report"]
    assert sorted(first) == sorted(["model", "data", "init", "evaluate_dense", "teacher", "export", "report",
                                    *_cells("search", c["searches"], c["sparsities"]),
                                    *_cells("baseline", c["baselines"], c["sparsities"]),
                                    *_cells("evaluate_search", c["searches"], c["sparsities"]),
                                    *_cells("evaluate_baseline", c["baselines"], c["sparsities"]),
                                    *_cells("recover", TOY_RECOVER["methods"], TOY_RECOVER["sparsities"]),
                                    *_cells("evaluate_recovered", TOY_RECOVER["methods"], TOY_RECOVER["sparsities"])])
    assert first.index("recover@pg-0.3") > first.index("search@pg-0.3")
    assert first.index("evaluate_recovered@flap-0.3") > first.index("recover@flap-0.3")
    assert first.index("recover@pg-0.3") > first.index("teacher")
    assert _status(path) == set()


def test_each_parameter_reruns_exactly_the_stages_it_affects(toy):
    path, _ = toy
    c = TOY
    export_cell = f"search@{PARAMS['export']['method']}-0.3"

    # an evaluation setting: every evaluation, nothing searched (dvc status lists the stages it hits directly;
    # repro also reruns what depends on their outputs: export's model card holds the metrics, and the report)
    set_param(path, "eval.zero_shot_limit", 8)
    r = TOY_RECOVER
    recovered = _cells("evaluate_recovered", r["methods"], r["sparsities"])
    evals = ["evaluate_dense", *_cells("evaluate_search", c["searches"], c["sparsities"]),
             *_cells("evaluate_baseline", c["baselines"], c["sparsities"]), *recovered]
    assert _status(path) == set(evals)
    assert sorted(ran_stages(dvc("repro", cwd=path).stdout)) == sorted([*evals, "export", "report"])

    # a search setting: only the search cells (and what reads their masks), no baseline
    set_param(path, "search.lr_heads", 0.05)
    searches = _cells("search", c["searches"], c["sparsities"])
    assert _status(path) == set(searches)
    ran = ran_stages(dvc("repro", cwd=path).stdout)
    assert sorted(ran) == sorted([*searches, *_cells("evaluate_search", c["searches"], c["sparsities"]),
                                  "recover@pg-0.3", "evaluate_recovered@pg-0.3", "export", "report"])
    assert export_cell in ran

    # a recovery setting: only the recovery cells and their evaluations
    set_param(path, "recover.steps", 3)
    rec = _cells("recover", r["methods"], r["sparsities"])
    assert _status(path) == {*rec, "report"}  # the report states the settings
    assert sorted(ran_stages(dvc("repro", cwd=path).stdout)) == sorted([*rec, *recovered, "report"])
    # the teacher's top-k: the teacher stage, then the recovery cells that read it
    set_param(path, "recover.teacher_topk", 4)
    assert _status(path) == {"teacher", *rec, "report"}
    assert sorted(ran_stages(dvc("repro", cwd=path).stdout)) == sorted(["teacher", *rec, *recovered, "report"])

    # adding a baseline and a sparsity runs only the new cells (and the report, which lists them)
    set_param(path, "compare.baselines", [*c["baselines"], NEW])
    new = [*_cells("baseline", [NEW], c["sparsities"]), *_cells("evaluate_baseline", [NEW], c["sparsities"])]
    assert _status(path) == {*new, "report"}  # the new cells, and the report whose list changed
    assert sorted(ran_stages(dvc("repro", cwd=path).stdout)) == sorted([*new, "report"])
    # removing it and adding it back recomputes nothing: its cells come back from DVC's run cache
    set_param(path, "compare.baselines", c["baselines"])
    assert ran_stages(dvc("repro", cwd=path).stdout) == ["report"]
    set_param(path, "compare.baselines", [*c["baselines"], NEW])
    assert ran_stages(dvc("repro", cwd=path).stdout) == ["report"]
    c = dict(c, baselines=[*c["baselines"], NEW])
    set_param(path, "compare.sparsities", [*c["sparsities"], 0.4])
    ran = ran_stages(dvc("repro", cwd=path).stdout)
    assert sorted(ran) == sorted([*_cells("search", c["searches"], [0.4]), *_cells("baseline", c["baselines"], [0.4]),
                                  *_cells("evaluate_search", c["searches"], [0.4]),
                                  *_cells("evaluate_baseline", c["baselines"], [0.4]), "report"])

    # the exported cell: only the export (and the report that names it)
    set_param(path, "export.sparsity", 0.4)
    assert _status(path) == {"export", "report"}
    assert sorted(ran_stages(dvc("repro", cwd=path).stdout)) == ["export", "report"]
    assert _status(path) == set()


def test_returning_to_earlier_params_restores_from_the_run_cache(toy):
    path, _ = toy
    before = (path / "dvc.lock").read_text()
    set_param(path, "search.steps", 7)
    ran = ran_stages(dvc("repro", cwd=path).stdout)
    assert any(r.startswith("search@") for r in ran)
    set_param(path, "search.steps", PARAMS["search"]["steps"])
    out = dvc("repro", cwd=path).stdout
    # nothing searched or evaluated again: the search, evaluation and export cells come back from the run cache;
    # only the report is rebuilt (its git-tracked outputs are not cached, so DVC never run-caches it; seconds)
    assert ran_stages(out) == ["report"], out
    for cell in [c for c in ran if c != "report"]:
        assert f"Stage '{cell}' is cached - skipping run, checking out outputs" in out
    assert (path / "dvc.lock").read_text() == before


def test_every_parameter_is_documented_with_what_it_invalidates():
    """docs/parameters.md's table is pgprune.config.params_reference() for this dvc.yaml (one declaration each)."""
    from pgprune.config import params_reference

    table = params_reference(DVC_YAML)
    assert "| `search.lr_heads` |" in table and "`search`" in table.split("| `search.lr_heads` |")[1].split("\n")[0]
    rows = [ln for ln in table.splitlines()[2:]]
    assert all(ln.split("|")[3].strip() for ln in rows), "a key without a description"
    assert "| `eval.zero_shot_limit` |" in table and \
        "`evaluate_search`" in table.split("| `eval.zero_shot_limit` |")[1].split("\n")[0]
    assert table in (ROOT / "docs" / "parameters.md").read_text(), \
        "docs/parameters.md is stale: python docs/make_parameters.py"
