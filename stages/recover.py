"""Stage `recover@<method>-<sparsity>`: the masks of one cell sliced out of the base model with their compensation,
a short LoRA recovery on the calibration blocks (recover.*: distillation from the base model by default), merged
and saved as a model folder in the layout the export would give it (card with a Recovery section, recovery.json).
The recovery curve (held-out perplexity every recover.curve_every steps), time and tokens/s go to a metrics JSON.
With recover.teacher_topk > 0 the distillation targets are the `teacher` stage's top-k cache (--teacher).
Checkpoints ($PGPRUNE_CHECKPOINT_DIR or artifacts/checkpoints, never a DVC output) let a killed run resume."""
from pathlib import Path

from pgprune.core.handoff import load_recipe
from pgprune.data.prepare import load_calibration, load_eval_data
from pgprune.hf.card import CardInfo
from pgprune.hf.export import save_model
from pgprune.hf.loading import load_configured
from pgprune.io import write_json
from pgprune.pruning.run import checkpoint_dir
from pgprune.recovery.folder import write_recovered
from pgprune.recovery.run import recover_masks
from pgprune.recovery.teacher import TeacherTopK
from stages._common import parse, run


def main(argv=None):
    def args(ap):
        ap.add_argument("--method", required=True)
        ap.add_argument("--sparsity", type=float, required=True)
        ap.add_argument("--model", required=True, help="the base model (also the distillation teacher)")
        ap.add_argument("--data", required=True, help="prepared data (calibration blocks; the curve's held-out blocks)")
        ap.add_argument("--masks", required=True, help="masks folder of the cell")
        ap.add_argument("--out", required=True, help="recovered model folder")
        ap.add_argument("--timing", required=True, help="recovery curve, time and tokens/s (json, not cached)")
        ap.add_argument("--teacher", default=None, help="the teacher stage's folder (its top-k cache, used when "
                        "recover.teacher_topk > 0)")

    params, a = parse(__doc__, args, argv)
    model, tok = load_configured(a.model, params.model)
    evals, _ = load_eval_data(a.data, tok, params)
    corpus = params.data.evaluation[0]
    curve_blocks = evals[corpus][: params.eval.curve_blocks] if params.eval.curve_blocks else None
    cache = None
    if params.recover.loss == "kd" and params.recover.teacher_topk and a.teacher is not None:
        cache = TeacherTopK.load(a.teacher)
    masks, extra, rec, curve = recover_masks(model, a.masks, load_calibration(a.data), params,
                                             curve_blocks=curve_blocks, checkpoint_dir=checkpoint_dir(),
                                             teacher_cache=cache)
    recipe = load_recipe(a.masks)
    card = CardInfo(base_model=params.model.source, method=a.method, sparsity=a.sparsity,
                    calibration=f"{params.data.calibration} ({params.data.calib_blocks} blocks of "
                                f"{params.data.seq_len} tokens)", compensation=recipe.kind,
                    command=f"dvc repro recover@{a.method}-{a.sparsity:g}")
    model_cpu = rec.model.to("cpu")
    write_recovered(model_cpu, None, a.out, info=rec.info, data=rec.info["data"],
                    save_pruned=lambda path: save_model(model.to("cpu"), masks, path, tok, extra_bias=extra,
                                                        layout="auto", card=card, pruned=model_cpu))
    info = rec.info
    write_json(a.timing, {"method": a.method, "sparsity": a.sparsity, "time_s": info["time_s"],
                          "tokens": info["tokens"], "tokens_per_s": info["tokens_per_s"], "steps": info["steps"],
                          "loss": info["settings"]["loss"], "first_loss": info["losses"][0],
                          "last_loss": info["losses"][-1], "curve": {"corpus": corpus, "blocks": len(curve_blocks)
                                                                     if curve_blocks is not None else 0,
                                                                     "points": curve},
                          "resumed_from_step": info.get("resumed_from_step", 0)})
    print(f"saved {Path(a.out)}: {info['steps']} steps, loss {info['losses'][0]:.4f} -> {info['losses'][-1]:.4f}"
          + (f", {corpus} ppl {curve[0]['ppl']:.2f} -> {curve[-1]['ppl']:.2f}" if curve else ""))


if __name__ == "__main__":
    run(main)
