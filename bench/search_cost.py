"""Search cost: one policy-gradient step vs K dense forwards, and the search's peak memory vs the weights.

Step time: a real search step (sample K masks, K masked forwards, estimator, projection) vs K dense forwards
of the same batch, interleaved. Memory: on CUDA, peak allocated during the search / weight bytes; on CPU, the
peak RSS growth of a fresh process over its state just before loading the model (so it counts the weights once,
activations and search state) / weight bytes (target <= 1.5x).
"""
import json
import resource
import subprocess
import sys

import torch

from bench._common import interleaved, load, parser
from pgprune.config import SearchParams
from pgprune.masked_forward import MaskedModel
from pgprune.pg_prune import build_search, make_loss_fn


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) of this process."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def search_params(args) -> SearchParams:
    return SearchParams(sparsity=args.sparsity, steps=args.steps, samples=args.samples, batch_size=args.batch,
                        init_map="uniform", checkpoint_every=0)


def memory_child(args) -> dict:
    import transformers  # noqa: F401  (libraries are not the search's memory)
    from transformers import AutoModelForCausalLM  # noqa: F401

    before = _status("VmRSS")
    model, _ = load(args)
    from pgprune.models import release_unused_memory

    release_unused_memory()
    resident = _status("VmRSS") - before
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    mm = MaskedModel(model)
    n = mm.layout.n_units
    scores = {"heads": torch.rand(n["heads"]), "channels": torch.rand(n["channels"])}
    calib = torch.randint(0, model.config.vocab_size, (args.batch * 2, args.seq_len))
    p = search_params(args)
    search, _ = build_search(mm, scores, p)
    if str(args.device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    search.run(make_loss_fn(mm, calib, args.batch, args.device), progress=False)
    if str(args.device).startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
        return {"weights_mb": weights, "peak_mb": peak, "ratio": peak / weights, "kind": "cuda max allocated"}
    peak = _status("VmHWM") - before
    return {"weights_mb": weights, "peak_mb": peak, "ratio": peak / weights, "resident_after_load_mb": resident,
            "search_extra_mb": peak - resident,
            "kind": "cpu peak RSS during the search, over the RSS before loading the model"}


def main():
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--memory-child", action="store_true", help="internal: measure memory in a fresh process")
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args)))
        return
    model, _ = load(args)
    mm = MaskedModel(model)
    n = mm.layout.n_units
    scores = {"heads": torch.rand(n["heads"]), "channels": torch.rand(n["channels"])}
    calib = torch.randint(0, model.config.vocab_size, (args.batch * 4, args.seq_len), device=args.device)
    ids = calib[: args.batch]
    p = search_params(args)
    loss_fn = make_loss_fn(mm, calib, args.batch, args.device)

    def search_steps():  # a fresh search of args.steps steps, timed per step
        search, _ = build_search(mm, scores, p)
        search.run(loss_fn, progress=False)

    def dense_forwards():
        for _ in range(args.steps):
            for _ in range(args.samples):
                mm.loss(ids)

    t = interleaved({"search step": search_steps, f"{args.samples} dense forwards": dense_forwards},
                    args.device, args.repeats)
    t = {k: v / args.steps for k, v in t.items()}
    ratio = t["search step"] / t[f"{args.samples} dense forwards"]
    print(f"model {args.synthetic or args.model} dtype {args.dtype} device {args.device} batch {args.batch}x{args.seq_len} "
          f"K={args.samples} sparsity {args.sparsity}")
    for k, v in t.items():
        print(f"  {k:22s} {v * 1000:9.1f} ms")
    print(f"RESULT search_step_vs_K_dense={ratio:.3f} (< 1: masked forwards cost less than dense ones)")
    cmd = [sys.executable, "-m", "bench.search_cost", "--memory-child", "--model", args.model, "--dtype", args.dtype,
           "--device", args.device, "--sparsity", str(args.sparsity), "--batch", str(args.batch), "--seq-len",
           str(args.seq_len), "--samples", str(args.samples), "--steps", str(args.steps)]
    if args.synthetic:
        cmd += ["--synthetic", args.synthetic]
    mem = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    print(f"  weights {mem['weights_mb']:.0f} MiB, search peak {mem['peak_mb']:.0f} MiB ({mem['kind']})")
    if "search_extra_mb" in mem:
        print(f"  of which: process after loading {mem['resident_after_load_mb']:.0f} MiB, search working memory "
              f"{mem['search_extra_mb']:.0f} MiB ({mem['search_extra_mb'] / mem['weights_mb']:.2f}x weights)")
    print(f"RESULT search_peak_memory_vs_weights={mem['ratio']:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
