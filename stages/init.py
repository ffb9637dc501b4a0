"""Stage `init`: importance scores of every scorer in init.scorers (the search's init and the baselines)."""
from pgprune.data.prepare import load_calibration
from pgprune.hf.loading import load_configured
from pgprune.io import save_tensors, write_json
from pgprune.scorers import compute_all_scores
from stages._common import parse, run


def main(argv=None):
    def args(ap):
        ap.add_argument("--model", required=True)
        ap.add_argument("--data", required=True)
        ap.add_argument("--out", required=True, help="scores (safetensors)")
        ap.add_argument("--timing", required=True, help="seconds per scorer (json, not cached)")

    params, a = parse(__doc__, args, argv)
    model, _ = load_configured(a.model, params.model)
    scores, timing = compute_all_scores(params.init, model, load_calibration(a.data))
    save_tensors(a.out, scores)
    write_json(a.timing, {"time_s": timing})


if __name__ == "__main__":
    run(main)
