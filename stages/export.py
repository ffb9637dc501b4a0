"""Stage `export`: models/pruned, the model users load: export.method's masks at export.sparsity sliced out of the
base model, saved with its tokenizer, masks.json and a model card (a stock architecture when the masks are uniform,
per-layer widths with trust_remote_code otherwise)."""
from pathlib import Path

from pgprune.core.adapters import get_adapter
from pgprune.core.compensation import compensated_source
from pgprune.core.handoff import load_masks, load_recipe
from pgprune.data.prepare import load_calibration
from pgprune.hf.card import CardInfo
from pgprune.hf.export import save_model
from pgprune.hf.loading import load_model, resolve
from pgprune.io import read_json
from stages._common import parse, run


def main(argv=None):
    def args(ap):
        ap.add_argument("--model", required=True)
        ap.add_argument("--masks", required=True)
        ap.add_argument("--metrics", required=True, help="evaluation of these masks (json)")
        ap.add_argument("--calib", required=True, help="calibration blocks (a refit recipe refits on them)")
        ap.add_argument("--out", required=True)

    params, a = parse(__doc__, args, argv)
    e = params.export
    model, tok = load_model(a.model, params.model.dtype, "cpu")  # the dtype the masks were evaluated in
    masks, extra = load_masks(a.masks, get_adapter(model).layout())
    recipe = load_recipe(a.masks)
    calib = load_calibration(Path(a.calib).parent) if recipe.kind == "refit" else None
    model, extra = compensated_source(model, masks, extra, recipe, calib)
    metrics = read_json(a.metrics) if Path(a.metrics).exists() else None
    card = CardInfo(base_model=resolve(a.model) if not Path(resolve(a.model)).exists() else params.model.source,
                    method=e.method, sparsity=e.sparsity,
                    calibration=f"{params.data.calibration} ({params.data.calib_blocks} blocks of "
                                f"{params.data.seq_len} tokens)",
                    evaluation=metrics, compensation=recipe.kind,
                    command=f"dvc repro export  # params.yaml: export.method={e.method}, "
                            f"export.sparsity={e.sparsity}")
    save_model(model, masks, a.out, tok, extra_bias=extra, layout="auto", card=card, save_dtype=e.save_dtype)
    print(f"saved {a.out}")


if __name__ == "__main__":
    run(main)
