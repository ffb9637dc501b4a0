"""Stage `evaluate@<method>-<sparsity>` (and `evaluate_dense`): slice the given masks out of the base model (with
their compensation biases) and measure perplexity on every evaluation corpus, zero-shot accuracy and generation
speed; for a search with several seeds, also the perplexity of every seed's masks. Writes one JSON (metrics)."""
import time

from pgprune.adapters import get_adapter
from pgprune.eval import perplexity
from pgprune.io import write_json
from pgprune.masks import Masks, sparsity_report
from pgprune.models import load_model
from pgprune.slicing import slice_model
from pgprune.workflow import evaluate, load_eval_data, load_masks, seed_results
from stages._common import parse, run


def main(argv=None):
    def args(ap):
        ap.add_argument("--model", required=True)
        ap.add_argument("--data", required=True)
        ap.add_argument("--out", required=True, help="metrics (json)")
        ap.add_argument("--masks", default=None, help="masks folder (omit for the dense model)")
        ap.add_argument("--method", default="dense")
        ap.add_argument("--sparsity", type=float, default=0.0)

    params, a = parse(__doc__, args, argv)
    model, tok = load_model(a.model, params.model.dtype, params.model.device)
    layout = get_adapter(model).layout()
    masks, extra = load_masks(a.masks, layout) if a.masks is not None else (None, None)  # checked before the work
    evals, tasks = load_eval_data(a.data, tok, params)
    result = {"method": a.method, "sparsity": a.sparsity}
    if masks is None:
        result.update(evaluate(model, tok, evals, tasks, params))
        result["params"] = sparsity_report(layout, Masks.full(layout))
    else:
        t0 = time.perf_counter()
        pruned = slice_model(model, masks, extra_bias=extra)
        result.update(evaluate(pruned, tok, evals, tasks, params))
        result["slice_time_s"] = time.perf_counter() - t0 - result["ppl_time_s"]
        result["params"] = sparsity_report(layout, masks, out_bias=extra is not None)
        del pruned
        seeds = {}
        for seed, (m, x) in seed_results(a.masks, layout).items():
            other = slice_model(model, m, extra_bias=x)
            seeds[seed] = {name: perplexity(other, blocks, batch_size=params.eval.ppl_batch_size)["ppl"]
                           for name, blocks in evals.items()}
            del other
        if seeds:
            result["seed_ppl"] = seeds
    write_json(a.out, result)
    print({k: v for k, v in result.items() if k != "params"})


if __name__ == "__main__":
    run(main)
