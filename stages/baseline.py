"""Stage `baseline@<method>-<sparsity>`: the masks of one metric baseline (pgprune/methods.py) at one sparsity,
from the init stage's scores (SlimGPT: chosen layer by layer on the calibration blocks); writes the masks hand-off
(masks.json, compensation)."""
from pgprune.core.adapters import get_adapter
from pgprune.core.handoff import save_masks
from pgprune.data.prepare import load_calibration
from pgprune.hf.loading import load_model
from pgprune.io import load_tensors, write_json
from pgprune.pruning.run import method_masks
from stages._common import parse, run


def main(argv=None):
    def args(ap):
        ap.add_argument("--method", required=True)
        ap.add_argument("--sparsity", type=float, required=True)
        ap.add_argument("--model", required=True)
        ap.add_argument("--scores", required=True)
        ap.add_argument("--data", required=True, help="prepared data (its calibration blocks: SlimGPT's)")
        ap.add_argument("--out", required=True, help="masks folder")
        ap.add_argument("--timing", help="seconds the masks took (metrics json, not cached)")

    params, a = parse(__doc__, args, argv)
    model, _ = load_model(a.model, params.model.dtype, "cpu", offload=params.model.offload)
    scores = load_tensors(a.scores, "init scores (init stage)")
    result = method_masks(a.method, model, load_calibration(a.data), scores, params, a.sparsity)
    summary = save_masks(a.out, result, get_adapter(model).layout())
    if a.timing:
        write_json(a.timing, {"method": a.method, "sparsity": a.sparsity, "time_s": result.info["time_s"]})
    print({k: v for k, v in summary.items() if k != "params"})


if __name__ == "__main__":
    run(main)
