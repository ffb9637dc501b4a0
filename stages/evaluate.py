"""Stage `evaluate@<method>-<sparsity>` (and `evaluate_dense`): slice the given masks out of the base model (with
their compensation: the biases, or the refit recomputed on the calibration blocks) and measure perplexity on every evaluation corpus, zero-shot accuracy and generation
speed; for a search, also the perplexity of every seed's masks and of its validated masks over the search (quality
vs cost). A streamed model (model.offload) gets perplexity only. With --pruned (`evaluate_recovered@...`): a saved
model folder (a recovered cell) evaluated as it loads. Writes one JSON (metrics, kept in git)."""
from pathlib import Path

from pgprune.data.prepare import load_calibration, load_eval_data
from pgprune.errors import MissingFileError, PgpruneError
from pgprune.eval.evaluate import evaluate, evaluate_masks
from pgprune.hf.loading import load_configured
from pgprune.io import write_json
from stages._common import parse, run


def main(argv=None):
    def args(ap):
        ap.add_argument("--model", help="the base model (masks are sliced out of it)")
        ap.add_argument("--pruned", help="a saved model folder evaluated as it is (instead of --model and --masks)")
        ap.add_argument("--data", required=True)
        ap.add_argument("--out", required=True, help="metrics (json)")
        ap.add_argument("--masks", default=None, help="masks folder (omit for the dense model)")
        ap.add_argument("--method", default="dense")
        ap.add_argument("--sparsity", type=float, default=0.0)

    params, a = parse(__doc__, args, argv)
    if (a.model is None) == (a.pruned is None):
        raise PgpruneError("give one of --model (with --masks, or none for the dense model) and --pruned")
    if a.pruned is not None:
        if not (Path(a.pruned) / "config.json").is_file():
            raise MissingFileError(f"model folder '{a.pruned}' not found (no config.json); run the stage that writes "
                                   "it first (the recover stage: dvc repro)")
        model, tok = load_configured(a.pruned, params.model)
        evals, tasks = load_eval_data(a.data, tok, params)
        result = {"method": a.method, "sparsity": a.sparsity, **evaluate(model, tok, evals, tasks, params)}
        write_json(a.out, result)
        print(result)
        return
    model, tok = load_configured(a.model, params.model)
    if a.masks is not None:  # a missing or damaged masks file fails before any work
        from pgprune.core.adapters import get_adapter
        from pgprune.core.handoff import load_masks

        load_masks(a.masks, get_adapter(model).layout())
    evals, tasks = load_eval_data(a.data, tok, params)
    calib = load_calibration(a.data) if a.masks is not None else None  # a refit recipe refits on them
    result = {"method": a.method, "sparsity": a.sparsity,
              **evaluate_masks(model, tok, a.masks, evals, tasks, params, calib)}
    write_json(a.out, result)
    print({k: v for k, v in result.items() if k not in ("params", "curve")})


if __name__ == "__main__":
    run(main)
