"""End to end: every stage of dvc.yaml, with the command line dvc.yaml gives it, run in-process in a temporary folder
on a tiny local model and the Debian corpus (a few steps / blocks). Checks the artifacts each stage promises, the
masks hand-off, byte-reproducible outputs and bad input handling."""
import hashlib
import importlib
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not Path("/usr/share/games/fortunes").is_dir() or shutil.which("bible") is None,
                                reason="Debian corpus packages not installed (scripts/setup.sh installs them)")


def tiny_params(model_dir: Path) -> dict:
    return {
        "model": {"source": str(model_dir), "dtype": "float32", "device": "cpu"},
        "data": {"local_sources": ["fortunes", "jargon"], "seq_len": 32, "calib_blocks": 24, "zero_shot_items": 8},
        "init": {"nsamples": 8, "batch_size": 4,
                 "scorers": ["magnitude", "wanda_sp", "flap", "taylor", "shortgpt", "random"]},
        "refit": {"blocks": 8, "batch_size": 4},
        "search": {"steps": 6, "samples": 2, "batch_size": 4, "checkpoint_every": 2, "val_blocks": 4, "channel_group": 8,
                   "validate_every": 3, "lr_heads": 0.2, "lr_channels": 0.2, "seeds": [42, 7],
                   "at_sparsity": [{"up_to": 0.5, "layouts": ["uniform"], "set": {"lr_heads": 0.05}}]},
        "eval": {"ppl_seq_len": 32, "ppl_blocks": 8, "zero_shot_limit": 8,
                 "speed": {"prompt_len": 4, "new_tokens": 4, "repeats": 1}},
        "compare": {"sparsities": [0.5], "searches": ["pg", "pg_uniform"],
                    "baselines": ["wanda_sp", "flap", "flap_refit", "slimgpt", "magnitude", "taylor", "random",
                                  "layer_drop"]},
        "export": {"method": "pg", "sparsity": 0.5, "save_dtype": "float32"},
        "recover": {"steps": 3, "batch_size": 2, "seq_len": 16, "checkpoint_every": 0, "curve_every": 2,
                    "teacher_topk": 8, "methods": ["pg", "flap"], "sparsities": [0.5]},
    }


def stage_names(params: dict) -> list[str]:
    """The dvc.yaml stage (group) of each of stage_commands' entries."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    ctx = {k: v for d in spec["vars"] for k, v in d.items()} | params
    out = []
    for name, st in spec["stages"].items():
        n = 1
        for ref in (st.get("matrix") or {}).values():
            node = ctx
            for k in ref.strip("${}").split("."):
                node = node[k]
            n *= len(node)
        out += [name] * n
    return out


def stage_commands(params: dict) -> list[tuple[str, list[str]]]:
    """(stage name, argv) of every stage cell in dvc.yaml's order, templates resolved like DVC does."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    ctx = {k: v for d in spec["vars"] for k, v in d.items()} | params

    def get(key, item):
        if key.startswith("item."):
            return item[key[5:]]
        node = ctx
        for k in key.split("."):
            node = node[k]
        return node

    out = []
    for name, st in spec["stages"].items():
        items = [{}]
        if "matrix" in st:
            items = [{}]
            for key, ref in st["matrix"].items():
                values = get(ref.strip("${}"), {})
                items = [dict(i, **{key: v}) for i in items for v in values]
        for item in items:
            cmd = re.sub(r"\$\{([^}]+)\}", lambda m: str(get(m.group(1).strip(), item)), " ".join(st["cmd"].split()))
            argv = shlex.split(cmd)
            assert argv[:2] == ["python", "-m"], cmd
            out.append((argv[2], argv[3:]))
    return out


def run_stage(module: str, argv: list[str]) -> None:
    importlib.import_module(module).main(argv)


# params that cannot change a stage's outputs, so no stage declares them (torch's thread count)
OPERATIONAL_PARAMS = {"model.threads"}


class ParamsRecorder:
    """Stands for a Params (or one of its sections) and records every key read through it: a leaf value as
    ``section.key``, a method or a dump of a section as the whole section (the stage depends on all of it)."""

    def __init__(self, obj, path: str, log: set):
        object.__setattr__(self, "_obj", obj)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_log", log)

    def __getattr__(self, name):
        from pydantic import BaseModel

        value = getattr(self._obj, name)
        key = f"{self._path}.{name}" if self._path else name
        if isinstance(value, BaseModel):
            return ParamsRecorder(value, key, self._log)
        self._log.add((self._path or "*") if callable(value) or name.startswith("model_") else key)
        return value

    def __setattr__(self, name, value):
        raise AttributeError(f"a stage sets params.{self._path}.{name}")


def declared_params(stage: str) -> list[str]:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage].get("params") or []


def undeclared(read: set, declared: list[str]) -> list[str]:
    """Keys read that no declared key covers (a declared section covers its keys; a declared key its sub-keys)."""
    return sorted(k for k in read - OPERATIONAL_PARAMS
                  if not any(k == d or k.startswith(d + ".") for d in declared))


def run_stage_recording(monkeypatch, module: str, argv: list[str]) -> set:
    """Run a stage with its params behind a ParamsRecorder; returns the keys it read."""
    from stages import _common

    log: set = set()
    real = _common.load_params
    monkeypatch.setattr(_common, "load_params", lambda path: ParamsRecorder(real(path), "", log))
    try:
        run_stage(module, argv)
    finally:
        monkeypatch.setattr(_common, "load_params", real)
    return log


@pytest.fixture
def workdir(tmp_path, tiny_tokenizer, monkeypatch):
    model = make_tiny_model("llama", n_heads=4, n_kv=2, layers=4, hidden=32, ffn=48, vocab=len(tiny_tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    params = tiny_params(tmp_path / "tiny")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PGPRUNE_CHECKPOINT_DIR", str(tmp_path / "ckpt"))
    return tmp_path, params


def _digest(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + f.read_bytes())
    return h.hexdigest()


def test_all_stages(workdir, monkeypatch):
    """Every stage, in dvc.yaml's order; each reads only the params its dvc.yaml entry declares (else a change of an
    undeclared key would leave its DVC cache stale)."""
    tmp, params = workdir
    cmds = stage_commands(params)
    names = [m for m, _ in cmds]
    assert names[:3] == ["stages.model", "stages.data", "stages.init"] and names[-2:] == ["stages.export",
                                                                                          "stages.report"]
    bad = {}
    for (module, argv), stage in zip(cmds, stage_names(params)):
        extra = undeclared(run_stage_recording(monkeypatch, module, argv), declared_params(stage))
        if extra:
            bad.setdefault(stage, set()).update(extra)
    assert not bad, f"stages read params their dvc.yaml `params` do not declare: {bad}"
    assert json.loads(Path("models/base/pgprune_source.json").read_text())["source"].endswith("tiny")
    assert (Path("models/tokenizer") / "tokenizer.json").exists()
    assert (Path("data/prepared") / "calib.safetensors").exists() and (Path("data/prepared/tasks") /
                                                                       "manifest.json").exists()
    assert {p.name for p in Path("data/prepared/eval").iterdir()} == {"local.txt", "licenses.txt"}
    # the masks hand-off of every cell, and the evaluations
    for m in params["compare"]["searches"] + params["compare"]["baselines"]:
        cell = Path("artifacts/masks") / m / "s0.5"
        summary = json.loads((cell / "summary.json").read_text())
        assert (cell / "masks.json").exists() and summary["method"] == m
        assert abs(summary["params"]["prunable_sparsity"] - 0.5) < 0.1, m
        r = json.loads(Path(f"artifacts/eval/{m}-s0.5.json").read_text())
        assert r["ppl"]["local"] > 1 and r["ppl"]["licenses"] > 1 and 0 <= r["zero_shot"]["average"] <= 1, m
    pg = Path("artifacts/masks/pg/s0.5")
    assert (pg / "compensation.safetensors").exists() and (pg / "seeds/7/masks.json").exists()
    assert len((pg / "history.csv").read_text().splitlines()) == 7
    assert set(json.loads(Path("artifacts/eval/pg-s0.5.json").read_text())["seed_ppl"]) == {"7"}
    # each cell records the settings it ran with: search.at_sparsity resolved for its sparsity and layout
    settings = {m: json.loads(Path(f"artifacts/masks/{m}/s0.5/summary.json").read_text())["search_settings"]
                for m in ("pg", "pg_uniform")}
    assert settings["pg"]["lr_heads"] == 0.2 and settings["pg_uniform"]["lr_heads"] == 0.05
    assert settings["pg"]["channel_group"] == 8 and "seeds" not in settings["pg"]
    uniform = json.loads((Path("artifacts/masks/pg_uniform/s0.5/summary.json")).read_text())["params"]["per_layer"]
    assert len(set(uniform["heads"])) == 1 and len(set(uniform["channels"])) == 1
    timing = json.loads(Path("artifacts/timing/search-pg-s0.5.json").read_text())
    assert set(timing["seeds"]) == {"42", "7"} and timing["time_s"] > 0
    assert not list(Path("ckpt").glob("*.ckpt"))  # completed searches leave no checkpoint behind
    # export and report
    assert (Path("models/pruned") / "model.safetensors").exists() and (Path("models/pruned") / "README.md").exists()
    assert json.loads((Path("models/pruned") / "masks.json").read_text()) == json.loads((pg / "masks.json").read_text())
    report = Path("report/report.md").read_text()
    assert "PG search (uniform layout)" in report and "mean ± sd over seeds" in report and "licenses" in report
    # recovery: each cell's model trained, saved in its layout, evaluated, and set beside the cell in the report
    from pgprune.hf.slicing import load_pruned

    for m in ("pg", "flap"):
        folder = Path("models/recovered") / m / "s0.5"
        rec = json.loads((folder / "recovery.json").read_text())
        assert rec["steps"] == 3 and len(rec["losses"]) == 3 and rec["settings"]["loss"] == "kd"
        assert rec["settings"]["teacher_topk"] == 8  # distilled from the teacher stage's top-k cache
        assert "## Recovery" in (folder / "README.md").read_text()
        assert json.loads((folder / "masks.json").read_text()) == json.loads(
            (Path("artifacts/masks") / m / "s0.5" / "masks.json").read_text())
        load_pruned(folder)  # loads as users load it
        t = json.loads(Path(f"artifacts/timing/recover-{m}-s0.5.json").read_text())
        assert [p["step"] for p in t["curve"]["points"]] == [0, 2, 3] and t["curve"]["corpus"] == "local"
        r = json.loads(Path(f"artifacts/eval/recovered/{m}-s0.5.json").read_text())
        assert r["ppl"]["local"] > 1 and r["method"] == m
        before = json.loads(Path(f"artifacts/eval/{m}-s0.5.json").read_text())
        assert r["ppl"]["local"] != before["ppl"]["local"]  # the weights changed
    assert "## Recovery" in report and "before → after" in report
    assert len(Path("report/plots/recovery_curve.csv").read_text().splitlines()) == 1 + 2 * 3
    assert Path("report/recovery_curve.png").stat().st_size > 1000

    # byte-reproducible: the same inputs give the same bytes
    teacher = json.loads(Path("artifacts/teacher/teacher.json").read_text())
    assert teacher["teacher_topk"] == 8 and teacher["blocks"] > 0
    before = {p: _digest(Path(p)) for p in ("data/prepared", "artifacts/init/scores.safetensors", "artifacts/masks",
                                            "models/base", "models/tokenizer", "models/pruned", "models/recovered",
                                            "artifacts/teacher")}
    for module, argv in cmds:
        if module in ("stages.model", "stages.data", "stages.init", "stages.search", "stages.baseline",
                      "stages.export", "stages.teacher", "stages.recover"):
            run_stage(module, argv)
    after = {p: _digest(Path(p)) for p in before}
    assert before == after


def test_stage_reports_bad_params_without_traceback(workdir, capsys):
    from stages import _common, search

    Path("params.yaml").write_text(Path("params.yaml").read_text().replace("samples: 2", "samples: 1"))
    with pytest.raises(SystemExit) as e:
        _common.run(lambda: search.main(["--method", "pg", "--sparsity", "0.5", "--model", "m", "--data", "d",
                                         "--scores", "s", "--out", "o", "--timing", "t"]))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "search" in err and "samples=1: estimator 'loo' needs samples >= 2" in err and "Traceback" not in err


def test_stage_reports_missing_and_damaged_inputs(workdir, capsys):
    from stages import _common, evaluate, model

    tmp, params = workdir
    cmds = dict((m + (a[a.index("--method") + 1] if "--method" in a else ""), a) for m, a in stage_commands(params)
                if "--pruned" not in a)
    model.main(cmds["stages.model"])
    recovered = next(a for m, a in stage_commands(params) if "--pruned" in a)
    with pytest.raises(SystemExit):
        _common.run(lambda: evaluate.main(recovered))
    assert "model folder 'models/recovered/pg/s0.5' not found (no config.json); run the stage that writes it first" \
        in capsys.readouterr().err
    argv = cmds["stages.evaluatepg"]
    with pytest.raises(SystemExit):
        _common.run(lambda: evaluate.main(argv))
    assert "masks not found at 'artifacts/masks/pg/s0.5/masks.json'" in capsys.readouterr().err
    cell = Path("artifacts/masks/pg/s0.5")
    cell.mkdir(parents=True)
    good = {"heads": [[0]] * 4, "channels": [[0, 1]] * 4, "layers": [0, 1, 2, 3],
            "sizes": {"heads": [2] * 4, "channels": [48] * 4}}
    (cell / "masks.json").write_text(json.dumps(dict(good, sizes={"heads": [2] * 4, "channels": [40] * 4})))
    with pytest.raises(SystemExit):
        _common.run(lambda: evaluate.main(argv))
    assert "masks are for a model with KV groups [2, 2, 2, 2] and channels [40, 40, 40, 40] per layer; this " \
           "model has [2, 2, 2, 2] and [48, 48, 48, 48]" in capsys.readouterr().err
    (cell / "masks.json").write_text(json.dumps(dict(good, heads=[[0, 9]] + [[0]] * 3)))
    with pytest.raises(SystemExit):
        _common.run(lambda: evaluate.main(argv))
    err = capsys.readouterr().err
    assert "heads of layer 0 has indices [9] outside the allowed range [0, 2)" in err and "masks.json" in err
    (cell / "masks.json").write_text("{not json")
    with pytest.raises(SystemExit):
        _common.run(lambda: evaluate.main(argv))
    assert "is not valid JSON" in capsys.readouterr().err
