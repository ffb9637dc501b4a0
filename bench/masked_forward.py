"""Masked-forward cost vs a dense forward at 50% sparsity (target <= 0.6), measured side by side.

Prints the median time of: HF dense forward, our dense functional forward, the gather fast path and the
multiply path under random 50% head+channel masks; ratios are vs our dense forward (same loss computation).
The decoder-only lines time the decoder layers alone (no lm_head / loss), the part that pruning shrinks.

    python -m bench.masked_forward
    python -m bench.masked_forward --synthetic tinyllama-1.1b --device cuda --batch 8 --seq-len 512
    python -m bench.masked_forward --smoke     # seconds on a CPU
"""
import torch

from bench._common import interleaved, load, parser, smoke, uniform_masks
from pgprune.core.masked_forward import MaskedModel

# --smoke: extra arguments -> the RESULT lines they must print (tests/test_bench_smoke.py)
SMOKE = {"": ["masked_forward_ratio", "masked_decoder_ratio"]}


def main():
    ap = parser(__doc__)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    smoke(args, batch=2, seq_len=16)
    model, _ = load(args)
    mm = MaskedModel(model)
    masks = uniform_masks(mm.layout, args.sparsity)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), device=args.device)
    t = interleaved({
        "dense (ours)": lambda: mm.loss(ids),
        "masked gather": lambda: mm.loss(ids, masks, mode="gather"),
        "masked multiply": lambda: mm.loss(ids, masks, mode="multiply"),
        "dense (HF forward)": lambda: model(input_ids=ids),
        "decoder dense": lambda: mm.hidden_states(ids),
        "decoder gather": lambda: mm.hidden_states(ids, masks, mode="gather"),
    }, args.device, args.repeats)
    print(f"model {args.synthetic or args.model} dtype {args.dtype} device {args.device} batch {args.batch}x{args.seq_len} "
          f"sparsity {args.sparsity}")
    for k, v in t.items():
        print(f"  {k:20s} {v * 1000:9.1f} ms   ratio vs dense {v / t['dense (ours)']:.3f}")
    print(f"RESULT masked_forward_ratio={t['masked gather'] / t['dense (ours)']:.3f} (target <= 0.6; whole model "
          "incl. the unprunable embedding/lm_head/loss)")
    print(f"RESULT masked_decoder_ratio={t['decoder gather'] / t['decoder dense']:.3f} (decoder layers only, the "
          "prunable part)")


if __name__ == "__main__":
    main()
