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


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def search_params(args) -> SearchParams:
    return SearchParams(sparsity=args.sparsity, steps=args.steps, samples=args.samples, batch_size=args.batch,
                        init_map="uniform", checkpoint_every=0)


def memory_child(args) -> dict:
    before = rss_mb()
    model, _ = load(args)
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2 ** 20
    mm = MaskedModel(model)
    n = mm.layout.n_units
    scores = {"heads": torch.rand(n["heads"]), "channels": torch.rand(n["channels"])}
    calib = torch.randint(0, model.config.vocab_size, (args.batch * 2, args.seq_len))
    p = search_params(args)
    search, _ = build_search(mm, scores, p)
    if str(args.device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    search.run(make_loss_fn(mm, calib, args.batch, args.device), progress=False)
    if str(args.device).startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
        return {"weights_mb": weights, "peak_mb": peak, "ratio": peak / weights, "kind": "cuda max allocated"}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    return {"weights_mb": weights, "peak_mb": peak, "ratio": peak / weights, "kind": "cpu peak RSS growth"}


def main():
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
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
    p = search_params(args).model_copy(update={"steps": 10 ** 6})
    search, _ = build_search(mm, scores, p)
    loss_fn = make_loss_fn(mm, calib, args.batch, args.device)
    state = {"done": 0}

    def one_step():
        state["done"] += 1
        search.run(loss_fn, progress=False, stop_after=state["done"])

    t = interleaved({"search step": one_step,
                     f"{args.samples} dense forwards": lambda: [mm.loss(ids) for _ in range(args.samples)]},
                    args.device, args.repeats)
    ratio = t["search step"] / t[f"{args.samples} dense forwards"]
    print(f"model {args.model} dtype {args.dtype} device {args.device} batch {args.batch}x{args.seq_len} "
          f"K={args.samples} sparsity {args.sparsity}")
    for k, v in t.items():
        print(f"  {k:22s} {v * 1000:9.1f} ms")
    print(f"RESULT search_step_vs_K_dense={ratio:.3f} (< 1: masked forwards cost less than dense ones)")
    cmd = [sys.executable, "-m", "bench.search_cost", "--memory-child", "--model", args.model, "--dtype", args.dtype,
           "--device", args.device, "--sparsity", str(args.sparsity), "--batch", str(args.batch), "--seq-len",
           str(args.seq_len), "--samples", str(args.samples), "--steps", str(args.steps)]
    mem = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    print(f"  weights {mem['weights_mb']:.0f} MiB, search peak {mem['peak_mb']:.0f} MiB ({mem['kind']})")
    print(f"RESULT search_peak_memory_vs_weights={mem['ratio']:.2f} (target <= 1.5)")


if __name__ == "__main__":
    main()
