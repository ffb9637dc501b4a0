"""Generation speed-up of the physically pruned model vs dense at 50% sparsity (target >= 1.7x).

Both models generate the same number of tokens greedily from the same random prompts, interleaved; several
batch sizes (decode at batch 1 is memory/overhead bound, larger batches are compute bound).

    python -m bench.generation
    python -m bench.generation --synthetic tinyllama-1.1b --device cuda --batches 1 16 64 --new-tokens 64
    python -m bench.generation --smoke     # seconds on a CPU
"""
import torch

from bench._common import load, parser, smoke, uniform_masks
from pgprune.core.adapters import get_adapter
from pgprune.eval.speed import generation_speed
from pgprune.hf.slicing import slice_model

# --smoke: extra arguments -> the RESULT lines they must print (tests/test_bench_smoke.py)
SMOKE = {"": ["generation_speedup_batch1", "generation_speedup_batch2"]}


def main():
    ap = parser(__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", action="store_true", help="prune whole layers (layer drop) instead of heads+channels")
    args = ap.parse_args()
    smoke(args, batches=[1, 2], prompt_len=8, new_tokens=4)
    model, tok = load(args)
    layout = get_adapter(model).layout()
    if args.layers:
        from pgprune.core.allocation import masks_from_scores

        masks = masks_from_scores(layout, {"layers": torch.rand(layout.num_layers)}, args.sparsity,
                                  granularity=("layers",))
    else:
        masks = uniform_masks(layout, args.sparsity)
    pruned = slice_model(model, masks).to(args.device)
    print(f"model {args.synthetic or args.model} dtype {args.dtype} device {args.device} sparsity {args.sparsity} "
          f"({'layers' if args.layers else 'heads+channels'}); params dense "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, pruned {sum(p.numel() for p in pruned.parameters()) / 1e6:.1f}M")
    for b in args.batches:
        kw = dict(batch_size=b, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats)
        rates = {"dense": [], "pruned": []}
        for _ in range(2):  # interleave two rounds
            rates["dense"].append(generation_speed(model, tok, **kw)["tokens_per_s"])
            rates["pruned"].append(generation_speed(pruned, tok, **kw)["tokens_per_s"])
        d, p = max(rates["dense"]), max(rates["pruned"])
        print(f"  batch {b:3d}: dense {d:8.1f} tok/s, pruned {p:8.1f} tok/s, speed-up {p / d:.2f}x")
        print(f"RESULT generation_speedup_batch{b}={p / d:.2f} (target >= 1.7)")


if __name__ == "__main__":
    main()
