"""Stage `search@<method>-<sparsity>`: the policy-gradient search of one search method (pgprune/methods.py) at one
sparsity, one search per seed in search.seeds; writes the masks hand-off (masks.json, compensation, history).
Checkpoints ($PGPRUNE_CHECKPOINT_DIR or artifacts/checkpoints, never a DVC output) let a killed run resume."""
from pgprune.core.adapters import get_adapter
from pgprune.core.handoff import save_masks
from pgprune.data.prepare import load_calibration
from pgprune.hf.loading import load_configured
from pgprune.io import load_tensors, write_json
from pgprune.pruning.run import checkpoint_dir, method_masks
from stages._common import parse, run


def main(argv=None):
    def args(ap):
        ap.add_argument("--method", required=True)
        ap.add_argument("--sparsity", type=float, required=True)
        ap.add_argument("--model", required=True)
        ap.add_argument("--data", required=True)
        ap.add_argument("--scores", required=True)
        ap.add_argument("--out", required=True, help="masks folder")
        ap.add_argument("--timing", required=True, help="search time and peak memory (json, not cached)")

    params, a = parse(__doc__, args, argv)
    model, _ = load_configured(a.model, params.model)
    scores = load_tensors(a.scores, "init scores (init stage)")
    result = method_masks(a.method, model, load_calibration(a.data), scores, params, a.sparsity,
                          checkpoint_root=checkpoint_dir())
    summary = save_masks(a.out, result, get_adapter(model).layout())
    write_json(a.timing, {"time_s": result.info["time_s"], "seeds": result.info["seeds"],
                          "device": result.info["device"], "trajectory_s": result.info.get("trajectory_s", [])})
    print({k: v for k, v in summary.items() if k != "params"})


if __name__ == "__main__":
    run(main)
