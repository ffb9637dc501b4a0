"""Refit vs bias-only compensation of one metric mask: held-out perplexity of the sliced model and the refit's time.

For ``--method`` (a metric baseline, default flap) at each ``--sparsity`` on the pipeline's prepared data (the data
stage: ``data/prepared``; the method's scores and FLAP's calibration means are computed here, in float32, on
init.nsamples blocks like the init stage), the same masks are sliced twice:

* ``bias``: FLAP's compensation (o_proj/down_proj biases += W_S · mean(x_S)), what the pipeline does today;
* ``refit``: :func:`pgprune.core.refit.refit_model`, the least-squares refit of the kept o_proj/down_proj columns
  and biases on the pruned model's own sequential calibration activations (SlimGPT's update, intercept included).

Prints ``RESULT refit_vs_bias_ppl[<corpus>]=<refit ppl / bias ppl>`` per held-out corpus, the two perplexities,
``RESULT refit_time_s=...`` and ``RESULT refit_vs_forward_time=...``: the refit's seconds over those of one forward
pass of the same calibration blocks through the dense decoder layers (``RESULT calib_forward_s``), the floor of any
sequential refit (it propagates those blocks layer by layer; the rest is the Gram matrices and the solves).
``--blocks`` calibration blocks feed the refit (default: init.nsamples, the blocks the metric and FLAP's means use).

    python -m bench.refit --sparsities 0.2 0.3 0.5        # after `dvc repro data` (or the whole pipeline)
    python -m bench.refit --smoke                         # the tiny synthetic model, random tokens (seconds)
"""
from __future__ import annotations

import time

import torch

from bench._common import SMOKE_SHAPE, parser, synthetic_model
from pgprune.config import load_params
from pgprune.core.adapters import get_adapter
from pgprune.core.refit import refit_model
from pgprune.data.prepare import load_calibration, load_eval_data
from pgprune.eval.perplexity import perplexity
from pgprune.hf.loading import load_model
from pgprune.hf.slicing import slice_model
from pgprune.methods import get_method
from pgprune.pruning.run import compensation_biases, metric_masks, setup_torch
from pgprune.scorers import compute_all_scores

SMOKE = {"": [r"refit_vs_bias_ppl\[random\]", "refit_time_s", "calib_forward_s", "refit_vs_forward_time"]}


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--method", default="flap", help="a metric baseline of the method registry (default flap)")
    ap.add_argument("--blocks", type=int, default=None, help="calibration blocks of the refit (default init.nsamples)")
    ap.add_argument("--damp", type=float, default=0.01, help="damping, a fraction of the Gram matrix's mean diagonal")
    ap.add_argument("--sparsities", type=float, nargs="+", default=None, help="several sparsities (default --sparsity)")
    args = ap.parse_args()
    params = load_params(args.params)
    setup_torch(params)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke:
        model, _ = synthetic_model(SMOKE_SHAPE, "float32", args.device)
        g = torch.Generator().manual_seed(0)
        calib = torch.randint(0, model.config.vocab_size, (12, 16), generator=g)  # [n, T]
        evals = {"random": torch.randint(0, model.config.vocab_size, (4, 16), generator=g)}
    else:
        model, tok = load_model(args.model, "float32", args.device)
        calib = load_calibration("data/prepared")
        evals, _ = load_eval_data("data/prepared", tok, params)
    need = list(dict.fromkeys([get_method(args.method).scorer, "flap"]))
    init = params.init.model_copy(update={"flap_bias_compensation": True})
    scores, _ = compute_all_scores(init, model, calib, scorers=need, progress=not args.smoke)
    layout = get_adapter(model).layout()
    n = args.blocks or min(params.init.nsamples, calib.shape[0])
    bs = params.eval.ppl_batch_size

    def ppl(m) -> dict[str, float]:
        return {c: perplexity(m, b, batch_size=bs, device=args.device)["ppl"] for c, b in evals.items()}

    decoder = model.get_decoder()  # the decoder layers without lm_head: what the refit propagates
    with torch.no_grad():
        t0 = time.perf_counter()
        for s in range(0, n, params.init.batch_size):
            decoder(input_ids=calib[s:s + params.init.batch_size].to(args.device), use_cache=False)
        forward_s = time.perf_counter() - t0
    print(f"RESULT calib_forward_s={forward_s:.2f} (one dense forward of {n} calibration blocks, no lm_head)")
    for sparsity in args.sparsities or [args.sparsity]:
        masks = metric_masks(args.method, layout, scores, sparsity, params)
        biased = slice_model(model, masks, extra_bias=compensation_biases(model, masks, scores["flap"]))
        bias_ppl = ppl(biased)
        del biased
        t0 = time.perf_counter()
        refit, extra = refit_model(model, masks, calib[:n], damp=args.damp, batch_size=params.init.batch_size,
                                   progress=not args.smoke)
        refit_s = time.perf_counter() - t0
        refit_ppl = ppl(slice_model(refit, masks, extra_bias=extra))
        del refit
        tag = "" if len(args.sparsities or []) < 2 else f"@{sparsity}"
        print(f"{args.method} at {sparsity}, {n} calibration blocks of {calib.shape[1]} tokens, damp {args.damp}")
        for c in evals:
            print(f"  {c}: bias-only {bias_ppl[c]:.2f}  refit {refit_ppl[c]:.2f}")
            print(f"RESULT refit_vs_bias_ppl[{c}]{tag}={refit_ppl[c] / bias_ppl[c]:.4f}")
        print(f"RESULT refit_time_s{tag}={refit_s:.2f}")
        print(f"RESULT refit_vs_forward_time{tag}={refit_s / forward_s:.2f}")


if __name__ == "__main__":
    main()
