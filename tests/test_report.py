"""Report stage: tables, figures and DVC plots data from fabricated artifacts; the offline plots template."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fake_artifacts import METHODS, REPORT_ARGS, make_fake_artifacts

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "pgprune" / "assets" / "dvc_plots_template.html"
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _set(path: Path, key: str, value) -> None:
    p = yaml.safe_load(path.read_text())
    d = p
    *head, last = key.split(".")
    for k in head:
        d = d[k]
    d[last] = value
    path.write_text(yaml.safe_dump(p))


def test_report_stage_writes_report_figures_and_plots_data(workdir):
    from stages import report

    from pgprune.methods import METRIC_METHODS, SEARCH_METHODS
    from pgprune.scorers.registry import SCORER_NAMES

    _set(workdir / "params.yaml", "compare.sparsities", [0.2, 0.3, 0.5])
    _set(workdir / "params.yaml", "compare.searches", list(SEARCH_METHODS))  # every method of the registry
    _set(workdir / "params.yaml", "compare.baselines", list(METRIC_METHODS))
    _set(workdir / "params.yaml", "init.scorers", list(SCORER_NAMES))
    make_fake_artifacts(workdir, sparsities=(0.2, 0.3, 0.5), corpora=("local", "wikitext2"))
    report.main(REPORT_ARGS)
    for png in ("ppl_vs_sparsity.png", "search_curve.png", "kept_per_layer.png", "quality_vs_cost.png",
                "recovery_curve.png"):
        data = (workdir / "report" / png).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, png
    md = (workdir / "report" / "report.md").read_text()
    from pgprune.report.tables import method_label

    for m in METHODS:
        assert method_label(m) in md and f"(`{m}`)" in md, m
    assert "zero-shot avg acc" in md and "average of `acc`" in md  # the metric is named
    assert "sparsity (decoder linear)" in md and "sparsity (total)" in md and "ppl wikitext2" in md
    assert "![" in md and "(ppl_vs_sparsity.png)" in md
    assert "ppl local: mean ± sd over seeds" in md and "(n=3)" in md  # the search rows' spread over seeds
    assert "`models/pruned` (the `export` stage): PG search (`pg`) at sparsity 0.5" in md
    assert "## Search quality vs cost" in md and "(0.958×)" in md  # ppl after 1/4 of the forwards vs step 0
    assert "steps (stopped early: " in md  # the timing file says the first seed stopped early (search.patience)
    # recovery: each recovered cell before -> after with the ratio, and the curve's rows
    assert "## Recovery" in md and "75 steps of 8 × 128 tokens, loss `kd`" in md
    rec_row = next(ln for ln in md.splitlines() if ln.startswith("| PG search (`pg`) | 0.5 |"))
    assert "(0.60×)" in rec_row and "| 100 | 300 | 341 |" in rec_row
    rec_curve = list(csv.DictReader(open(workdir / "report/plots/recovery_curve.csv")))
    assert len(rec_curve) == 2 * 5 and rec_curve[0] == {"method": "pg", "sparsity": "0.5", "step": "0",
                                                        "ppl": rec_curve[0]["ppl"]}
    curve = list(csv.DictReader(open(workdir / "report/plots/quality_vs_cost.csv")))
    assert len(curve) == 5 * 2 * 3 and curve[1]["seconds"] == "4"

    # the DVC plots CSVs have the columns dvc.yaml's `plots:` draws
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for entry in spec["plots"]:
        if not isinstance(entry, dict):
            continue
        (_, p), = entry.items()
        for f, cols in p["y"].items():
            rows = list(csv.DictReader(io.StringIO((workdir / f).read_text())))
            assert rows and {p["x"], *cols} <= set(rows[0]), f
    wide = list(csv.DictReader(open(workdir / "report/plots/ppl_vs_sparsity.csv")))
    assert [r["sparsity"] for r in wide] == ["0.2", "0.3", "0.5"]
    assert float(wide[0]["pg"]) < float(wide[0]["random"]) and float(wide[0]["dense"]) == pytest.approx(17.2)
    kept = list(csv.DictReader(open(workdir / "report/plots/kept_per_layer.csv")))
    assert len(kept) == 6 and all(0 <= float(r["heads_kept"]) <= 1 for r in kept)
    loss = list(csv.DictReader(open(workdir / "report/plots/search_loss.csv")))
    assert len(loss) == 19  # the step whose samples all failed is left out
    assert sum(1 for r in loss if r["val_loss"]) == 4

    # same inputs, same bytes (no timestamps): git diffs of the report show real changes only
    before = {p.name: p.read_bytes() for p in (workdir / "report").rglob("*") if p.is_file()}
    report.main(REPORT_ARGS)
    assert before == {p.name: p.read_bytes() for p in (workdir / "report").rglob("*") if p.is_file()}


def test_report_stage_names_a_missing_result(workdir, capsys):
    from stages import _common, report

    make_fake_artifacts(workdir, sparsities=(0.2, 0.3), recovered=[("pg", 0.3)])
    _set(workdir / "params.yaml", "compare.sparsities", [0.2, 0.3, 0.4])
    _set(workdir / "params.yaml", "export.sparsity", 0.3)
    _set(workdir / "params.yaml", "recover.sparsities", [0.3])
    with pytest.raises(SystemExit) as e:
        _common.run(lambda: report.main(REPORT_ARGS))
    assert e.value.code == 2
    assert "evaluation of pg at sparsity 0.4 not found at 'artifacts/eval/pg-s0.4.json'" in capsys.readouterr().err
    # a recovered cell without its evaluation is named too
    _set(workdir / "params.yaml", "compare.sparsities", [0.2, 0.3])
    _set(workdir / "params.yaml", "recover.methods", ["pg", "flap_refit"])
    with pytest.raises(SystemExit) as e:
        _common.run(lambda: report.main(REPORT_ARGS))
    assert e.value.code == 2
    assert ("evaluation of the recovered flap_refit at 0.3 (evaluate_recovered stage) not found at "
            "'artifacts/eval/recovered/flap_refit-s0.3.json'") in capsys.readouterr().err


def test_comparison_rows_conventions_and_speedup(tmp_path):
    from pgprune.report import collect_results
    from pgprune.report.tables import comparison_rows, markdown_table

    make_fake_artifacts(tmp_path, sparsities=(0.5, 0.2), methods=["pg", "flap"])
    results = collect_results(tmp_path / "artifacts/eval", tmp_path / "artifacts/timing", [0.5, 0.2], ["pg", "flap"],
                              "flap")
    assert results[1]["methods"]["pg"]["time_s"] == 43.0 and results[1]["methods"]["flap"]["time_s"] == 3.0
    rows = comparison_rows(results)
    assert [(r["method"], r["sparsity"]) for r in rows] == [("dense", 0.0), ("pg", 0.2), ("pg", 0.5),
                                                            ("flap", 0.2), ("flap", 0.5)]
    dense, pg = rows[0], rows[2]
    assert dense["speedup"] == 1.0 and dense["prunable_sparsity"] == 0.0
    assert pg["speedup"] == pytest.approx(pg["tokens_per_s"] / 50.1)
    assert pg["prunable_sparsity"] == pytest.approx(0.5) and pg["total_sparsity"] < pg["prunable_sparsity"]
    table = markdown_table(rows)
    lines = table.strip().splitlines()
    assert len(lines) == 2 + len(rows) and all(ln.count("|") == lines[0].count("|") for ln in lines)
    assert "prunable params (M)" in lines[0] and "tokens/s" in lines[0] and "speed-up vs dense" in lines[0]
    assert "| 6.00 |" in lines[2] and "| 3.00 |" in lines[4]  # prunable params kept, in millions (dense, pg@0.5)
    assert lines[4].count("**") == 2 and "**" not in lines[6]  # PG is best at 0.5 on the one corpus, FLAP not


def test_report_without_zero_shot_and_speed(tmp_path):
    from pgprune.report import collect_results
    from pgprune.report.tables import markdown_report

    make_fake_artifacts(tmp_path, sparsities=(0.3,), methods=["pg", "random"], zero_shot=False)
    res = collect_results(tmp_path / "artifacts/eval", tmp_path / "artifacts/timing", [0.3], ["pg", "random"], "flap")
    md = markdown_report("t", compare_results=res)
    assert "zero-shot avg |" in md and "not run" in md and "–" in md


def test_plots_accept_both_history_styles_and_dropped_layers(tmp_path):
    from pgprune.report.plots import plot_kept_per_layer, plot_ppl_vs_sparsity, plot_search_curve
    from pgprune.report.tables import kept_per_layer_rows, prob_columns, read_history_csv

    for style in ("suffix", "slash"):
        make_fake_artifacts(tmp_path / style, prob_style=style)
        rows = read_history_csv((tmp_path / style / "artifacts/masks/pg/s0.3/history.csv").read_text())
        assert set(prob_columns(rows)) == {"heads", "channels"}
        plot_search_curve(rows, tmp_path / f"{style}.png")
        assert (tmp_path / f"{style}.png").read_bytes().startswith(PNG)
    per_layer = {"heads": [3, 2, 0, 1], "channels": [64, 30, 0, 10], "layers": [1, 1, 0, 1]}
    sizes = {"heads": [3] * 4, "channels": [64] * 4}
    plot_kept_per_layer(per_layer, sizes, tmp_path / "kept.png")
    assert (tmp_path / "kept.png").stat().st_size > 1000
    assert [r["layer_kept"] for r in kept_per_layer_rows(per_layer, sizes)] == [1, 1, 0, 1]
    assert kept_per_layer_rows(per_layer, sizes)[1]["heads_kept"] == pytest.approx(2 / 3, abs=1e-6)
    plot_ppl_vs_sparsity([{"method": "dense", "sparsity": 0.0, "ppl": 17.0},
                          {"method": "pg", "sparsity": 0.2, "ppl": 20.0},
                          {"method": "pg", "sparsity": 0.5, "ppl": 35.0},
                          {"method": "random", "sparsity": 0.5, "ppl": float("inf")}], tmp_path / "ppl.png")
    assert (tmp_path / "ppl.png").read_bytes().startswith(PNG)
    plot_search_curve([], tmp_path / "empty.png")  # no history: an empty figure, no crash
    assert (tmp_path / "empty.png").exists()


def test_sparsity_tag_agrees_with_dvc():
    from dvc.parsing.interpolate import to_str

    from pgprune.config import load_params
    from pgprune.report import sparsity_tag

    values = [0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.05, 0.125, 0.33]
    values += load_params(ROOT / "params.yaml").compare.sparsities
    for s in values:
        assert sparsity_tag(s) == "s" + to_str(s)  # dvc.yaml: artifacts/masks/<m>/s${item.sparsity}


def test_offline_plots_template():
    html = TEMPLATE.read_text(encoding="utf-8")
    assert "{plot_divs}" in html and html.count("{plot_divs}") == 1
    assert "https://cdn" not in html and "cdn.jsdelivr" not in html
    assert "vegaEmbed" in html and "vega-lite" in html and len(html) > 500_000
    assert "<script src" not in html  # everything inline


def test_dvc_plots_show_renders_offline(tmp_path):
    dvc = Path(sys.executable).with_name("dvc")
    if not dvc.exists():
        pytest.skip("dvc not installed next to this Python")
    make_fake_artifacts(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    env = dict(os.environ, PYTHONPATH=str(ROOT), DVC_NO_ANALYTICS="1")
    subprocess.run([sys.executable, "-m", "stages.report", *REPORT_ARGS], cwd=tmp_path, env=env, check=True,
                   capture_output=True)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(dvc), "init", "-q"], cwd=tmp_path, env=env, check=True)
    r = subprocess.run([str(dvc), "plots", "show", "--html-template", str(TEMPLATE), "-o", "dvc_plots"],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    page = (tmp_path / "dvc_plots" / "index.html").read_text()
    assert "https://cdn" not in page and "<script src" not in page
    for plot in ("ppl_vs_sparsity", "search_loss", "kept_per_layer"):
        assert f'id = "{plot}"' in page or f'id="{plot}"' in page, plot
    assert len(list((tmp_path / "dvc_plots" / "static").glob("*.png"))) == 5


def test_rows_off_their_target_sparsity_are_marked_and_never_bold():
    """A uniform-layout row that keeps more than the target (whole KV groups / channel blocks) is not ranked."""
    from pgprune.report.tables import markdown_table

    def row(method, achieved, ppl):
        return {"method": method, "sparsity": 0.5, "prunable_params_kept": 1e6, "prunable_sparsity": achieved,
                "total_sparsity": achieved * 0.8, "ppl": {"local": ppl}, "zero_shot": None, "zero_shot_tasks": [],
                "tokens_per_s": None, "speedup": None, "time_s": None}

    table = markdown_table([row("pg", 0.5, 240.0), row("pg_uniform", 0.458, 212.0), row("flap", 0.5, 284.0)])
    lines = {ln.split("|")[1].strip(): ln for ln in table.splitlines()[2:]}
    assert "**240.00**" in lines["PG search"]
    assert "PG search (uniform layout) †" in lines and "**" not in lines["PG search (uniform layout) †"]
    assert "**" not in lines["FLAP"]


def test_search_sentence_says_where_each_seed_stopped_and_what_it_returned():
    from pgprune.report.tables import search_summary_text

    summary = {"method": "pg", "sparsity": 0.5, "search_settings": {"init_allocation": "slimgpt", "patience": 3},
               "search": {"42": {"steps": 30, "forward_passes": 60, "best_step": 0, "best_val_loss": 4.8384,
                                 "stopped_early": True},
                          "43": {"steps": 40, "forward_passes": 80, "best_step": 10, "init_val_loss": 4.8384,
                                 "best_val_loss": 4.8012, "stopped_early": True},
                          "44": {"steps": 100, "forward_passes": 200, "best_step": 90, "stopped_early": False}},
               "time_s": {"42": 61.0, "43": 80.4}}
    text = search_summary_text(summary)
    assert text.startswith("Search `pg` at sparsity 0.5: seed 42: 30 steps (stopped early: 3 validations in a row "
                           "without a better loss, search.patience), 60 sampled-mask forwards, masks = its start "
                           "(step 0: SlimGPT's masks")
    assert "seed 43: 40 steps (stopped early" in text and "4.8384 at step 0 → 4.8012" in text and "80 s" in text
    assert "seed 44: 100 steps, 200 sampled-mask forwards, masks from step 90" in text
