"""Stage `slice`: physically remove the pruned units and save a from_pretrained-loadable model."""
from pgprune.io import read_json, write_json
from pgprune.masks import Masks
from pgprune.models import load_model
from pgprune.slicing import save_pruned, slice_model
from pgprune.errors import require_file
from pgprune.workflow import params_summary
from stages._common import BASE_DIR, parse, run

OUT = "models/pruned"


def main(argv=None):
    params, _ = parse(__doc__, argv=argv)
    model, tok = load_model(BASE_DIR, params.slice.save_dtype, "cpu")
    masks = Masks.from_json(read_json(require_file("artifacts/search/masks.json", "search masks")))
    from pgprune.adapters import get_adapter

    layout = get_adapter(model).layout()
    extra = None
    if params.search.bias_compensation:
        import torch

        from pgprune.workflow import compensation_biases

        scores = torch.load(require_file("artifacts/init/scores.pt", "init scores"))
        extra = compensation_biases(model, masks, scores["flap"])
    pruned = slice_model(model, masks, extra_bias=extra)
    save_pruned(pruned, OUT, tokenizer=tok)
    summary = params_summary(layout, masks)
    summary["saved_params"] = sum(p.numel() for p in pruned.parameters())
    write_json("artifacts/slice/summary.json", summary)
    print({k: v for k, v in summary.items() if k != "per_layer"})


if __name__ == "__main__":
    run(main)
