"""Search quality: held-out perplexity of the PG search's mask vs its metric init's mask, side by side.

Uses the pipeline's prepared inputs (models/base, data/prepared, artifacts/init: run `bash scripts/pipeline.sh init`
first). For each ``--set`` variant (search.* overrides, e.g. ``init_free_heads=0``) it runs a fresh search at
``--sparsity`` and scores both masks on the local evaluation text with the masked forward (mean compensation as in
the sliced model, which equals it). Prints one line per variant and ``RESULT`` lines with the ppl ratios.

    python -m bench.search_quality --sparsity 0.5 --set init_free_heads=0 --set init_free_heads=0.5
"""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import torch

from bench._common import parser
from pgprune.config import load_params
from pgprune.errors import ConfigError, PgpruneError, require_file
from pgprune.masked_forward import MaskedModel
from pgprune.models import load_model
from pgprune.pg_prune import run_pg_search
from pgprune.workflow import baseline_masks, load_data, search_compensation, setup_torch


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


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--set", action="append", default=[], dest="variants",
                    help="comma-separated search.* overrides of one variant (repeat for more; none: params.yaml)")
    ap.add_argument("--steps", type=int, default=None, help="search steps (default: search.steps)")
    args = ap.parse_args()
    params = load_params(args.params)
    setup_torch(params)
    model, tok = load_model(args.model, params.model.dtype, args.device)
    calib, evals, _ = load_data("data/prepared", tok, params)
    scores = torch.load(require_file("artifacts/init/scores.pt", "init scores (run the init stage)"))
    comp = search_compensation(params, scores)
    masked = MaskedModel(model)
    masked.set_compensation(comp)
    text = next(iter(evals.values()))

    def ppl(masks) -> float:
        bs = params.eval.ppl_batch_size
        losses = [masked.loss(text[i:i + bs].to(args.device), masks, validate=False) * text[i:i + bs].shape[0]
                  for i in range(0, text.shape[0], bs)]
        return math.exp(sum(losses) / text.shape[0])

    init = params.search.init
    base = ppl(baseline_masks(init, masked.layout, scores, args.sparsity, params))
    print(f"sparsity {args.sparsity}: {init} mask (the init) ppl {base:.2f}")
    for spec in args.variants or [""]:
        upd = overrides([s for s in spec.split(",") if s], params.search)
        if args.steps:
            upd["steps"] = args.steps
        sp = params.search.model_copy(update=upd)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = run_pg_search(model, calib, scores[sp.init], sp, sparsity=args.sparsity, device=args.device,
                                checkpoint_path=Path(tmp) / "ckpt.pt", compensation=comp,
                                progress=False)
        value = ppl(out.masks)
        name = spec or "params.yaml"
        print(f"  {name:40s} pg ppl {value:9.2f}  best step {out.result.best_step}  "
              f"search {time.perf_counter() - t0:.0f}s")
        print(f"RESULT pg_vs_{init}_ppl[{name}]={value / base:.3f}")


if __name__ == "__main__":
    try:
        main()
    except PgpruneError as e:
        raise SystemExit(f"error: {e}") from None
