"""Stage `init`: importance scores of every scorer (metric init of the search, and the baselines)."""
from pgprune.io import torch_save, write_json
from pgprune.models import load_model
from pgprune.workflow import compute_all_scores, load_data
from stages._common import BASE_DIR, DATA_DIR, parse, run

OUT = "artifacts/init"


def main(argv=None):
    params, _ = parse(__doc__, argv=argv)
    model, _ = load_model(BASE_DIR, params.model.dtype, params.model.device)
    calib, _, _ = load_data(DATA_DIR)
    scores, timing = compute_all_scores(params, model, calib)
    torch_save(scores, f"{OUT}/scores.pt")
    write_json(f"{OUT}/summary.json", {"time_s": timing,
                                       "groups": {k: sorted(v) for k, v in scores.items()}})


if __name__ == "__main__":
    run(main)
