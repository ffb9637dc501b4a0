"""Search quality: held-out perplexity of the PG search's masks vs its metric init's masks, side by side.

Uses the pipeline's prepared inputs (models/base, data/prepared, artifacts/init: `bash scripts/pipeline.sh init`
first). For each ``--set`` variant (search.* overrides, e.g. ``init_free_heads=0``) it runs a fresh search at
``--sparsity`` for every ``--seeds`` seed and scores the masks on every evaluation corpus with the masked forward
(mean compensation as in the sliced model, which equals it), or, with search.compensation refit, the sliced refit
model (the init metric's mask refit too). Prints one line per variant and seed, and ``RESULT`` lines with the ratio
of the mean perplexity to the init metric's under the same compensation (first corpus) and, with refit, to the init
metric's with bias-only compensation (``pg_vs_<init>_bias_ppl``), and ``refit_vs_search_time``: the refit's seconds (the
final masks' refit, plus the Gram matrices of the refit loss once per run) over the searches' seconds.
``--eval-blocks N`` scores on fewer blocks.

    python -m bench.search_quality --sparsity 0.5 --set init_free_heads=0 --set init_free_heads=0.5
    python -m bench.search_quality --sparsity 0.5 --layout uniform --seeds 42 43 44
    python -m bench.search_quality --sparsity 0.5 --seeds 42 --set steps=800 --curve-every 50   # within one run
    python -m bench.search_quality --smoke   # no prepared inputs: the tiny random model, random tokens, 2 steps

With ``--smoke`` the model is the tiny synthetic one and calibration and evaluation blocks are random tokens (init
scores computed on them by the search's init scorer): the same code path in seconds, meaningless numbers.
"""
from __future__ import annotations

import json
import statistics
import time

import torch

from bench._common import SMOKE_SHAPE, parser, synthetic_model
from pgprune.config import load_params
from pgprune.core.compensation import compensated_source
from pgprune.core.masked_forward import MaskedModel
from pgprune.core.masks import Masks
from pgprune.data.prepare import load_calibration, load_eval_data
from pgprune.errors import ConfigError, PgpruneError
from pgprune.eval.evaluate import curve_points
from pgprune.eval.perplexity import perplexity
from pgprune.hf.loading import load_model
from pgprune.hf.slicing import slice_model
from pgprune.io import load_tensors
from pgprune.pruning.pg import run_pg_search
from pgprune.pruning.run import (metric_masks, recipe_of, search_compensation, search_init, search_refit,
                                 setup_torch)
from pgprune.scorers import compute_all_scores

# --smoke: extra arguments -> the RESULT lines they must print, as regular expressions (tests/test_bench_smoke.py)
SMOKE = {"": [r"pg_vs_\w+_ppl\[params\.yaml\]", r"refit_vs_search_time\[params\.yaml\]"]}
SMOKE_SEARCH = dict(steps=2, batch_size=2, val_blocks=2, validate_every=1)


def overrides(items: list[str], search) -> dict:
    """``key=value`` strings to typed search.* updates (bad keys or values name what is allowed)."""
    fields = type(search).model_fields
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ConfigError(f"--set {item!r}: expected search.<key>=<value> with key one of {sorted(fields)}")
        out[key] = json.loads(value) if value[:1] in "[{" or value in ("true", "false", "null") else value
    return type(search).model_validate({**search.model_dump(), **out}).model_dump(include=set(out))


def smoke_inputs(params, device: str):
    """--smoke: the tiny synthetic model, random calibration (12 x 16) and evaluation (4 x 16) blocks, and the init
    scores the search needs computed on them."""
    model, tok = synthetic_model(SMOKE_SHAPE, "float32", device)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    calib = torch.randint(0, vocab, (12, 16), generator=g)
    evals = {"random": torch.randint(0, vocab, (4, 16), generator=g)}
    need = list(dict.fromkeys([params.search.init] + (["flap"] if params.search.compensation != "none" else [])))
    scores, _ = compute_all_scores(params.init, model, calib, scorers=need, progress=False)
    return model, tok, calib, evals, scores


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], dest="variants",
                    help="comma-separated search.* overrides of one variant (repeat for more; none: params.yaml)")
    ap.add_argument("--steps", type=int, default=None, help="search steps (default: search.steps)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="search seeds (default: search.seeds)")
    ap.add_argument("--layout", default="heterogeneous", choices=["heterogeneous", "uniform"])
    ap.add_argument("--json", default=None, help="also write every result to this JSON file")
    ap.add_argument("--eval-blocks", type=int, default=0, help="score on the first N blocks of each evaluation "
                    "corpus (0: eval.ppl_blocks)")
    ap.add_argument("--curve-every", type=int, default=0,
                    help="also score the hard mask validated every N steps inside each search (quality vs cost "
                         "within one run; 0: only the final mask)")
    args = ap.parse_args()
    params = load_params(args.params)
    setup_torch(params)
    if args.smoke:
        model, tok, calib, evals, scores = smoke_inputs(params, args.device)
        args.seeds = args.seeds or [params.search.seeds[0]]
    else:
        model, tok = load_model(args.model, params.model.dtype, args.device)
        calib = load_calibration("data/prepared")
        evals, _ = load_eval_data("data/prepared", tok, params)
        scores = load_tensors("artifacts/init/scores.safetensors", "init scores (run the init stage)")
    if args.eval_blocks:
        evals = {c: b[:args.eval_blocks] for c, b in evals.items()}
    comp = search_compensation(params.search.compensation, scores)
    recipe = recipe_of(params.search.compensation, params)
    masked = MaskedModel(model)
    masked.set_compensation(comp)
    bs = params.eval.ppl_batch_size

    def ppl(masks) -> dict[str, float]:
        """Perplexity of the masked model as the search sees it (mean-compensated unless compensation none)."""
        return {c: perplexity(masked, b, masks=masks, batch_size=bs, device=args.device)["ppl"]
                for c, b in evals.items()}

    refit_times: list[float] = []

    def final_ppl(masks) -> dict[str, float]:
        """Perplexity of the sliced model with the compensation the pipeline gives it (refit: recomputed, its time
        kept in refit_times)."""
        if recipe.kind != "refit":
            return ppl(masks)
        t = time.perf_counter()
        src, extra = compensated_source(model, masks, None, recipe, calib)
        refit_times.append(time.perf_counter() - t)
        pruned = slice_model(src, masks, extra).to(args.device)  # slice_model builds the new model on the CPU
        return {c: perplexity(pruned, b, batch_size=bs, device=args.device)["ppl"] for c, b in evals.items()}

    init = params.search.init
    init_masks = metric_masks(init, masked.layout, scores, args.sparsity, params, layout_kind=args.layout,
                              round_to=params.search.channel_group)
    base_bias = ppl(init_masks)  # the init metric's mask as the search sees it (FLAP: bias-only compensation)
    base = final_ppl(init_masks)
    first = next(iter(evals))
    print(f"sparsity {args.sparsity} ({args.layout}): {init} mask (the init) ppl "
          + ", ".join(f"{c} {v:.2f}" for c, v in base_bias.items())
          + (f"; with refit " + ", ".join(f"{c} {v:.2f}" for c, v in base.items()) if recipe.kind == "refit" else ""))
    record = {"sparsity": args.sparsity, "layout": args.layout, "device": str(args.device), "init": base,
              "init_search_view": base_bias, "compensation": recipe.kind, "variants": []}
    grams: dict = {}  # the search's refit loss: Gram matrices computed once, shared by the variants
    init_for: dict = {}  # the search's init scores per init_allocation (slimgpt: SlimGPT's masks as scores)
    sums: dict = {}  # per init_allocation: the Gram sums SlimGPT's pass left (its refit loss needs no second pass)
    gram_s = 0.0
    for spec in args.variants or [""]:
        upd = overrides([s for s in spec.split(",") if s], params.search)
        if args.steps:
            upd["steps"] = args.steps
        if args.smoke:
            upd.update(SMOKE_SEARCH)
        # the settings of this sparsity (search.at_sparsity), then the variant's values on top
        sp = params.search.without_rules_for(upd).at(args.sparsity, args.layout).model_copy(update=upd)
        values, runs = [], []
        for seed in args.seeds or sp.seeds:
            if init_for.get(sp.init_allocation) is None:  # SlimGPT's masks as the start: once per run
                sums[sp.init_allocation] = {}  # the Gram sums of SlimGPT's stream (the refit loss's reference)
                init_for[sp.init_allocation] = search_init(model, calib, scores, sp, args.sparsity, args.layout,
                                                           recipe, progress=False, sums=sums[sp.init_allocation]
                                                           )[::2]  # scores, start masks
                sg = init_for[sp.init_allocation][1]
                if sg is not None:  # SlimGPT's masks, the start
                    record["slimgpt"] = final_ppl(sg)
                    print("  slimgpt masks (the start): ppl " + ", ".join(f"{c} {v:.2f}" for c, v in
                                                                          record["slimgpt"].items()), flush=True)
            t0 = time.perf_counter()
            gram = None
            start = init_for[sp.init_allocation][1] if sp.refit_reference else None
            if recipe.kind == "refit" and sp.refit_loss:
                which = "dense" if start is None else f"reference {sp.init_allocation}"
                if grams.get(which) is None:
                    t1 = time.perf_counter()
                    grams[which] = search_refit(model, calib, sp, recipe, start, sums.get(sp.init_allocation),
                                                progress=False)
                    gram_s = time.perf_counter() - t1
                    print(f"  refit Gram matrices ({which} inputs): {gram_s:.0f}s", flush=True)
                gram = grams[which]
                t0 = time.perf_counter()
            out = run_pg_search(model, calib, init_for[sp.init_allocation][0], sp, sparsity=args.sparsity,
                                layout=args.layout,
                                seed=seed, device=args.device, compensation=comp, progress=False, refit=gram,
                                record_trajectory=args.curve_every > 0)
            seconds = time.perf_counter() - t0  # the search alone, not the scoring below
            t0 = time.perf_counter()
            p = final_ppl(out.masks)
            refit_s = refit_times[-1] if recipe.kind == "refit" else 0.0
            curve = curve_points(out.trajectory, lambda m: ppl(m)[first], args.curve_every)
            for c in curve:
                print(f"    step {c['step']:5d}  forwards {c['forward_passes']:5d}  {c['elapsed_s']:6.0f}s  "
                      f"val loss {c['val_loss']:.4f}  {first} ppl {c['ppl']:.2f}", flush=True)
            values.append(p[first])
            runs.append({"seed": seed, "ppl": p, "best_step": out.result.best_step,
                         "seconds": seconds, "refit_s": refit_s,
                         "forward_passes": out.result.forward_passes,
                         "curve": curve})
            print(f"  {spec or 'params.yaml':40s} seed {seed}: pg ppl " + ", ".join(f"{c} {v:.2f}" for c, v in
                                                                                     p.items())
                  + f"  best step {out.result.best_step}  search {seconds:.0f}s")
        mean = statistics.mean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"RESULT pg_vs_{init}_ppl[{spec or 'params.yaml'}]={mean / base[first]:.3f} "
              f"(mean {mean:.2f} ± {sd:.2f} over {len(values)} seeds, {first}; both {recipe.kind})", flush=True)
        if recipe.kind == "refit":  # the yardstick: the init metric with its bias-only compensation
            print(f"RESULT pg_vs_{init}_bias_ppl[{spec or 'params.yaml'}]={mean / base_bias[first]:.3f}", flush=True)
            # what the refit costs next to the search: the final mask's refit (+ the Gram matrices of the refit
            # loss, once per run) over the search's own time
            searched = sum(r["seconds"] for r in runs)
            refits = sum(r["refit_s"] for r in runs) + (gram_s if sp.refit_loss else 0.0)
            print(f"RESULT refit_vs_search_time[{spec or 'params.yaml'}]={refits / searched:.3f} "
                  f"(refit {refits:.0f}s, search {searched:.0f}s over {len(runs)} seeds)", flush=True)
        record["variants"].append({"set": spec, "runs": runs, "mean": mean, "sd": sd, "ratio": mean / base[first]})
        if args.json:
            from pgprune.io import write_json

            write_json(args.json, record)


if __name__ == "__main__":
    try:
        main()
    except PgpruneError as e:
        raise SystemExit(f"error: {e}") from None
