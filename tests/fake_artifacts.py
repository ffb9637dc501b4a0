"""Fabricates the artifacts the report stage reads (per-cell evaluations, timings, masks cells), in the schemas the
stages write, with plausible numbers. No model needed."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from pgprune.methods import METHODS as REGISTRY

METHODS = list(REGISTRY)
REPORT_ARGS = ["--eval", "artifacts/eval", "--masks", "artifacts/masks", "--timing", "artifacts/timing",
               "--out", "report"]


def _params(rng, s: float, n_layers: int, kv: int, ffn: int, layer_drop: bool, uniform: bool) -> dict:
    keep = 1 - s
    heads = [max(1, round(kv * keep + (0 if uniform else rng.choice([-1, 0, 1])))) for _ in range(n_layers)]
    chans = [max(1, min(ffn, round(ffn * keep * (1 if uniform else 0.8 + 0.4 * rng.random()))))
             for _ in range(n_layers)]
    layers = [1] * n_layers
    if layer_drop:
        for i in range(round(n_layers * s)):
            layers[-1 - i] = 0
        heads, chans = [kv] * n_layers, [ffn] * n_layers
    prunable_dense, total_dense = 1_000_000 * n_layers, 1_000_000 * n_layers + 5_000_000
    kept = int(prunable_dense * keep)
    return {"prunable_params_dense": prunable_dense, "prunable_params_kept": kept,
            "prunable_sparsity": 1 - kept / prunable_dense, "total_params_dense": total_dense,
            "total_params_kept": kept + 5_000_000, "total_sparsity": 1 - (kept + 5_000_000) / total_dense,
            "per_layer": {"heads": heads, "channels": chans, "layers": layers}}


def make_fake_artifacts(root: Path, *, sparsities=(0.2, 0.3, 0.5), methods=METHODS, corpora=("local",),
                        n_layers: int = 6, kv: int = 3, ffn: int = 64, steps: int = 20, export=("pg", 0.3),
                        zero_shot: bool = True, prob_style: str = "slash", seeds=(42, 43, 44), seed: int = 0,
                        recovered=(("pg", 0.5), ("flap_refit", 0.5))) -> dict:
    """Write artifacts/{eval/<m>-s<S>.json, eval/dense.json, timing/*.json, masks/<m>/s<S>/...} under ``root``
    (and eval/recovered/<m>-s<S>.json, timing/recover-<m>-s<S>.json for ``recovered`` (method, sparsity) cells);
    returns a description of what was written. ``prob_style``: "suffix" writes ``<group>_mean_prob`` history
    columns, "slash" writes ``<group>/prob_mean`` (what the search writes)."""
    rng = random.Random(seed)
    root = Path(root)
    ev, timing, masks_root = root / "artifacts/eval", root / "artifacts/timing", root / "artifacts/masks"
    for d in (ev, timing, masks_root):
        d.mkdir(parents=True, exist_ok=True)
    ppl_base = {c: 17.2 + 3 * i for i, c in enumerate(corpora)}
    quality = {"pg": 0.3, "pg_uniform": 0.35, "wanda_sp": 0.45, "flap": 0.4, "magnitude": 0.7, "taylor": 0.6,
               "random": 1.2, "layer_drop": 1.5}
    zs = {"average": 0.45, "metric": "acc", "tasks": {"local_mc": 0.5, "local_cloze": 0.4}}
    dense = {"method": "dense", "sparsity": 0.0, "ppl": dict(ppl_base), "zero_shot": zs if zero_shot else None,
             "tokens_per_s": 50.1 if zero_shot else None,
             "params": {"prunable_params_kept": 1_000_000 * n_layers, "prunable_sparsity": 0.0,
                        "total_params_kept": 1_000_000 * n_layers + 5_000_000, "total_sparsity": 0.0}}
    (ev / "dense.json").write_text(json.dumps(dense))
    (timing / "init.json").write_text(json.dumps({"time_s": {"flap": 3.0, "wanda_sp": 4.0, "magnitude": 0.1,
                                                             "taylor": 18.0, "random": 0.0, "shortgpt": 3.0}}))
    for s in sparsities:
        for m in methods:
            spec = REGISTRY[m]
            q = quality.get(m, 1.0)
            params = _params(rng, s, n_layers, kv, ffn, m == "layer_drop", spec.layout == "uniform")
            r = {"method": m, "sparsity": s, "ppl": {c: v * math.exp(q * s * 4) for c, v in ppl_base.items()},
                 "zero_shot": ({"average": 0.45 - q * s * 0.2, "metric": "acc",
                                "tasks": {"local_mc": 0.5, "local_cloze": 0.4}} if zero_shot else None),
                 "tokens_per_s": 50.0 / ((1 - s) ** 0.8) if zero_shot else None, "params": params}
            cell = masks_root / m / f"s{float(s)}"
            cell.mkdir(parents=True, exist_ok=True)
            per_layer = params["per_layer"]
            (cell / "masks.json").write_text(json.dumps({
                "heads": [sorted(rng.sample(range(kv), k)) for k in per_layer["heads"]],
                "channels": [sorted(rng.sample(range(ffn), k)) for k in per_layer["channels"]],
                "layers": [i for i, keep in enumerate(per_layer["layers"]) if keep],
                "sizes": {"heads": [kv] * n_layers, "channels": [ffn] * n_layers}}))
            summary = {"method": m, "sparsity": s, "layout": spec.layout, "compensated": True, "params": params}
            if spec.kind == "search":
                r["seed_ppl"] = {str(x): {c: v * (1 + 0.02 * (i + 1)) for c, v in r["ppl"].items()}
                                 for i, x in enumerate(seeds[1:])}
                summary["seeds"] = list(seeds)
                summary["search"] = {str(x): {"steps": steps, "forward_passes": 2 * steps, "best_step": steps // 2,
                                              "best_val_loss": 3.1, "init_val_loss": 3.3, "stopped_early": i == 0}
                                     for i, x in enumerate(seeds)}
                (timing / f"search-{m}-s{float(s)}.json").write_text(json.dumps(
                    {"time_s": 40.0 * len(seeds), "seeds": {str(x): {"time_s": 40.0, "stopped_early": i == 0}
                                                            for i, x in enumerate(seeds)},
                     "trajectory_s": [4.0 * i for i in range(5)]}))
                first = next(iter(ppl_base))
                r["curve"] = {"corpus": first, "blocks": 64, "points": [
                    {"step": 5 * i, "forward_passes": 10 * i, "val_loss": 3.3 - 0.05 * i,
                     "ppl": r["ppl"][first] * (1.2 - 0.05 * i)} for i in range(5)]}
                _history(cell, steps, rng, prob_style)
            (cell / "summary.json").write_text(json.dumps(summary))
            (ev / f"{m}-s{float(s)}.json").write_text(json.dumps(r))
            if (m, s) in recovered:  # a recovered cell: 0.6x the perplexity, and its curve
                (ev / "recovered").mkdir(exist_ok=True)
                (ev / "recovered" / f"{m}-s{float(s)}.json").write_text(json.dumps(
                    dict(r, ppl={c: 0.6 * v for c, v in r["ppl"].items()})))
                first = next(iter(ppl_base))
                (timing / f"recover-{m}-s{float(s)}.json").write_text(json.dumps(
                    {"method": m, "sparsity": s, "time_s": 300.0, "tokens": 102400, "tokens_per_s": 341.3,
                     "steps": 100, "curve": {"corpus": first, "blocks": 32, "points": [
                         {"step": 25 * i, "ppl": r["ppl"][first] * (1 - 0.1 * i)} for i in range(5)]}}))
    return {"sparsities": list(sparsities), "methods": list(methods), "corpora": list(corpora)}


def _history(cell: Path, steps: int, rng, prob_style: str) -> None:
    groups = ["heads", "channels"]
    prob_col = (lambda g: f"{g}_mean_prob") if prob_style == "suffix" else (lambda g: f"{g}/prob_mean")
    header = ["step", "loss_mean", "loss_min", "baseline", "lr", "n_valid"] + [prob_col(g) for g in groups] + \
             ["val_loss"]
    lines = [",".join(header)]
    for t in range(steps):
        loss = 3.0 + 2.0 * math.exp(-t / 6) + 0.05 * rng.random()
        if t == 3:  # a step whose sampled masks all failed: empty losses
            lines.append(",".join([str(t), "", "", "", "1.0", "0", "0.7", "0.7", ""]))
            continue
        val = f"{loss + 0.1:.4f}" if t % 5 == 4 else ""
        lines.append(",".join(str(x) for x in [t, loss, loss - 0.1, loss + 0.05, 1.0, 2,
                                               0.7 + 0.01 * t / steps, 0.7 - 0.01 * t / steps, val]))
    (cell / "history.csv").write_text("\n".join(lines) + "\n")
