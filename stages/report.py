"""Stage `report`: report/report.md, PNG figures and the DVC plots CSVs from the evaluation, masks and timing
artifacts of every (method, sparsity) cell."""
import logging
from pathlib import Path

from pgprune.errors import require_file
from pgprune.io import read_json, write_text
from pgprune.methods import METHODS
from pgprune.report import collect_results, search_summary, sparsity_tag
from pgprune.report.collect import collect_recovery
from pgprune.report.plots import (
    plot_kept_per_layer,
    plot_ppl_vs_sparsity,
    plot_quality_vs_cost,
    plot_recovery_curve,
    plot_search_curve,
)
from pgprune.report.tables import (
    csv_text,
    kept_per_layer_rows,
    markdown_report,
    ppl_points,
    ppl_vs_sparsity_rows,
    quality_vs_cost_rows,
    quality_vs_cost_table,
    read_history_csv,
    recovery_curve_rows,
    recovery_section,
    search_loss_rows,
)
from stages._common import parse, run

log = logging.getLogger("pgprune.report")


def main(argv=None):
    def args(ap):
        ap.add_argument("--eval", required=True, help="folder of the evaluation JSONs")
        ap.add_argument("--masks", required=True, help="folder of the masks cells")
        ap.add_argument("--timing", required=True, help="folder of the timing JSONs")
        ap.add_argument("--out", required=True, help="report folder")

    params, a = parse(__doc__, args, argv)
    c, e, out = params.compare, params.export, Path(a.out)
    results = collect_results(a.eval, a.timing, c.sparsities, [*c.searches, *c.baselines], params.search.init)
    exported = Path(a.masks) / e.method / sparsity_tag(e.sparsity)
    sizes = read_json(require_file(exported / "masks.json", "exported masks"))["sizes"]
    counts = read_json(require_file(exported / "summary.json", "exported masks summary"))["params"]["per_layer"]
    search = e.method if METHODS[e.method].kind == "search" else (c.searches[0] if c.searches else None)
    history, summary = [], None
    if search is not None:
        cell = Path(a.masks) / search / sparsity_tag(e.sparsity)
        history = read_history_csv(require_file(cell / "history.csv", "search history").read_text("utf-8"))
        summary = search_summary(a.masks, a.timing, search, e.sparsity)

    # DVC plots data (dvc.yaml `plots:`) and figures
    wide, corpus = ppl_vs_sparsity_rows(results)
    write_text(out / "plots" / "ppl_vs_sparsity.csv", csv_text(wide))
    write_text(out / "plots" / "search_loss.csv",
               csv_text(search_loss_rows(history), ["step", "loss_mean", "loss_min", "baseline", "val_loss"]))
    write_text(out / "plots" / "kept_per_layer.csv", csv_text(kept_per_layer_rows(counts, sizes)))
    plot_ppl_vs_sparsity(ppl_points(results), out / "ppl_vs_sparsity.png")
    plot_search_curve(history, out / "search_curve.png", title=f"Search `{search}` at sparsity {e.sparsity:g}")
    plot_kept_per_layer(counts, sizes, out / "kept_per_layer.png",
                        title=f"Kept fraction per layer: {METHODS[e.method].label} at sparsity {e.sparsity:g}")
    figures = {"Perplexity vs sparsity, every method (log scale; dashed: dense)": "ppl_vs_sparsity.png",
               "Search: calibration loss, baseline, validated hard-mask loss and mean keep-probabilities":
                   "search_curve.png",
               "Kept fraction of KV-head groups and MLP channels per layer (exported masks)": "kept_per_layer.png"}
    curves = [{"method": m, "sparsity": r["sparsity"], "corpus": cell["curve"]["corpus"],
               "points": cell["curve"]["points"],
               "seconds": read_json(Path(a.timing) / f"search-{m}-{sparsity_tag(r['sparsity'])}.json")
               .get("trajectory_s")}
              for r in results for m, cell in r["methods"].items() if cell.get("curve")]
    write_text(out / "plots" / "quality_vs_cost.csv", csv_text(quality_vs_cost_rows(curves), [
        "method", "sparsity", "step", "forward_passes", "seconds", "val_loss", "ppl"]))
    plot_quality_vs_cost(curves, out / "quality_vs_cost.png")
    figures["Search quality vs cost: held-out perplexity and validated loss of the search's masks vs forward "
            "passes (dotted: the init metric's mask)"] = "quality_vs_cost.png"
    extra = []
    if curves:
        extra = ["## Search quality vs cost", "",
                 f"Perplexity ({curves[0]['corpus']}, first {results[0]['methods'][curves[0]['method']]['curve']['blocks']}"
                 " blocks) of the mask each search would return after a fraction of its sampled-mask forward passes "
                 "(its validated hard mask then); step 0 is the init metric's mask. `report/plots/quality_vs_cost.csv` "
                 "has every point with seconds.", "", quality_vs_cost_table(curves)]
    rec = params.recover
    recovered = collect_recovery(a.eval, a.timing, rec.methods, rec.sparsities)
    write_text(out / "plots" / "recovery_curve.csv", csv_text(recovery_curve_rows(recovered),
                                                              ["method", "sparsity", "step", "ppl"]))
    plot_recovery_curve(recovered, out / "recovery_curve.png")
    figures["Recovery: held-out perplexity of each recovered cell vs LoRA steps (step 0: before recovery)"] = \
        "recovery_curve.png"
    extra += recovery_section(recovered, rec.settings(), params.search.seeds[0])
    kept = [i for i, k in enumerate(counts["layers"]) if k]
    uniform = len({counts["heads"][i] for i in kept}) <= 1 and len({counts["channels"][i] for i in kept}) <= 1
    export = {"method": e.method, "sparsity": e.sparsity,
              "architecture": "the base model's stock architecture (loads without remote code)" if uniform
              else "per-layer widths (loads with trust_remote_code=True)"}
    write_text(out / "report.md", markdown_report(params.report.title, compare_results=results, export=export,
                                                  search_summary=summary, figures=figures, extra_sections=extra))
    log.info("wrote %s (plots data: first evaluation corpus %r)", out / "report.md", corpus)


if __name__ == "__main__":
    run(main)
