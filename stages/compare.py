"""Stage `compare`: every method (PG search and the metric baselines) at one sparsity, sliced and evaluated."""
import json
import logging
import time
from pathlib import Path

import torch

from pgprune.adapters import get_adapter
from pgprune.errors import require_file
from pgprune.io import write_json
from pgprune.models import load_model
from pgprune.slicing import slice_model
from pgprune.workflow import baseline_masks, compensation_biases, evaluate, load_data, params_summary
from stages._common import BASE_DIR, DATA_DIR, parse, run
from stages.search import search_and_save

log = logging.getLogger("pgprune.compare")


def folder(sparsity: float) -> Path:
    from pgprune.report import compare_folder_name

    return Path("artifacts/compare") / compare_folder_name(sparsity)


def main(argv=None):
    params, args = parse(__doc__, extra=lambda ap: ap.add_argument("--sparsity", type=float, required=True),
                         argv=argv)
    s = args.sparsity
    out = folder(s)
    c = params.compare
    model, tok = load_model(BASE_DIR, params.model.dtype, params.model.device)
    calib, evals, tasks = load_data(DATA_DIR, tok, params)
    scores = torch.load(require_file("artifacts/init/scores.pt", "init scores"))
    init_summary = Path("artifacts/init/summary.json")
    scoring_time = json.loads(init_summary.read_text()).get("time_s", {}) if init_summary.exists() else {}
    layout = get_adapter(model).layout()
    result = {"sparsity": s, "dense": evaluate(model, tok, evals, tasks, params, zero_shot=c.zero_shot,
                                               speed=c.speed), "methods": {}}
    result["dense"]["params"] = {
        "prunable_params_kept": layout.prunable_params(), "total_params_kept": layout.total_params(),
        "prunable_sparsity": 0.0, "total_sparsity": 0.0}
    for method in c.methods:
        t0 = time.perf_counter()
        extra = None
        if method == "pg":
            outcome, summary = search_and_save(params, model, calib, scores, s, out / "pg",
                                               Path("artifacts/checkpoints") / f"compare_{out.name}.pt")
            t0 -= summary["time_s"] - summary["run_time_s"]  # count search time spent before a resume
            masks = outcome.masks
            if params.search.bias_compensation:
                extra = compensation_biases(model, masks, scores["flap"])
        else:
            masks = baseline_masks(method, layout, scores, s, params)
            if method == "flap" and params.init.flap_bias_compensation:
                extra = compensation_biases(model, masks, scores["flap"])
        search_time = time.perf_counter() - t0
        pruned = slice_model(model, masks, extra_bias=extra)
        r = evaluate(pruned, tok, evals, tasks, params, zero_shot=c.zero_shot, speed=c.speed)
        r["params"] = params_summary(layout, masks)
        scorer = {"pg": params.search.init, "layer_drop": "shortgpt"}.get(method, method)
        r["scoring_time_s"] = scoring_time.get(scorer)  # the calibration pass of the scorer it uses (init stage)
        r["time_s"] = search_time + (r["scoring_time_s"] or 0.0)
        result["methods"][method] = r
        log.info("%s @ %.2f: ppl %s", method, s, r["ppl"])
        write_json(out / "results.json", result)  # partial results survive an interruption
        del pruned
    write_json(out / "results.json", result)


if __name__ == "__main__":
    run(main)
