"""Stage `report`: report/report.md, PNG figures and the DVC plots CSVs from the eval, search and compare artifacts."""
import argparse
import logging
from pathlib import Path

from pgprune.config import load_params
from pgprune.errors import require_file
from pgprune.io import read_json, write_text
from pgprune.report import compare_folder_name
from pgprune.report.plots import plot_kept_per_layer, plot_ppl_vs_sparsity, plot_search_curve
from pgprune.report.tables import (csv_text, kept_per_layer_rows, markdown_report, ppl_points, ppl_vs_sparsity_rows,
                                   read_history_csv, search_loss_rows)
from stages._common import run

OUT = Path("report")
EVAL = Path("artifacts/eval/metrics.json")
SEARCH = Path("artifacts/search")
COMPARE = Path("artifacts/compare")
log = logging.getLogger("pgprune.report")


def masks_per_layer(masks: dict) -> tuple[dict, dict]:
    """(kept counts per layer, sizes per layer) from masks.json (kept indices per layer, kept layers, sizes)."""
    kept_layers = set(masks["layers"])
    n = len(masks["sizes"]["heads"])
    counts = {"heads": [len(h) for h in masks["heads"]], "channels": [len(c) for c in masks["channels"]],
              "layers": [int(i in kept_layers) for i in range(n)]}
    return counts, masks["sizes"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml", help="parameter file (default: params.yaml)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    params = load_params(args.params)

    metrics = read_json(require_file(EVAL, "eval metrics"))
    summary = read_json(require_file(SEARCH / "summary.json", "search summary"))
    history = read_history_csv(require_file(SEARCH / "history.csv", "search history").read_text(encoding="utf-8"))
    masks = read_json(require_file(SEARCH / "masks.json", "search masks"))
    results = [read_json(require_file(COMPARE / compare_folder_name(s) / "results.json", f"compare results at {s:g}"))
               for s in params.compare.sparsities]

    # DVC plots data (dvc.yaml `plots:`)
    wide, corpus = ppl_vs_sparsity_rows(results)
    write_text(OUT / "plots" / "ppl_vs_sparsity.csv", csv_text(wide))
    write_text(OUT / "plots" / "search_loss.csv",
               csv_text(search_loss_rows(history), ["step", "loss_mean", "loss_min", "baseline"]))
    counts, sizes = masks_per_layer(masks)
    write_text(OUT / "plots" / "kept_per_layer.csv", csv_text(kept_per_layer_rows(counts, sizes)))

    # figures
    s = metrics.get("sparsity", params.search.sparsity)
    plot_ppl_vs_sparsity(ppl_points(results), OUT / "ppl_vs_sparsity.png")
    plot_search_curve(history, OUT / "search_curve.png", title=f"Policy-gradient search at sparsity {s:g}")
    plot_kept_per_layer(counts, sizes, OUT / "kept_per_layer.png",
                        title=f"Kept fraction per layer, PG search at sparsity {s:g}")
    figures = {"Perplexity vs sparsity, every method (log scale; dashed: dense)": "ppl_vs_sparsity.png",
               "Search: calibration loss, baseline and mean keep-probabilities": "search_curve.png",
               "Kept fraction of KV-head groups and MLP channels per layer (main run)": "kept_per_layer.png"}
    write_text(OUT / "report.md", markdown_report(params.report.title, compare_results=results,
                                                  eval_metrics=metrics, search_summary=summary, figures=figures))
    log.info("wrote %s (plots data: first evaluation corpus %r)", OUT / "report.md", corpus)


if __name__ == "__main__":
    run(main)
