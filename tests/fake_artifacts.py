"""Fabricates the artifacts the report stage reads (compare results, eval metrics, search outputs), in the
schemas the stages write, with plausible numbers. No model needed."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

METHODS = ["pg", "wanda_sp", "flap", "magnitude", "taylor", "random", "layer_drop"]


def _result(rng, ppl_base: dict, s: float, quality: float, n_layers: int, kv: int, ffn: int, with_zs: bool,
            layer_drop: bool = False) -> dict:
    keep = 1 - s
    heads = [max(1, round(kv * keep + rng.choice([-1, 0, 1]))) for _ in range(n_layers)]
    chans = [max(1, min(ffn, round(ffn * keep * (0.8 + 0.4 * rng.random())))) for _ in range(n_layers)]
    layers = [1] * n_layers
    if layer_drop:
        for i in range(round(n_layers * s)):
            layers[-1 - i] = 0
        heads, chans = [kv] * n_layers, [ffn] * n_layers
    prunable_dense, total_dense = 1_000_000 * n_layers, 1_000_000 * n_layers + 5_000_000
    kept = int(prunable_dense * keep)
    return {
        "ppl": {c: v * math.exp(quality * s * 4) for c, v in ppl_base.items()},
        "zero_shot": ({"average": 0.45 - quality * s * 0.2, "metric": "acc", "tasks": {"local_mc": 0.5, "local_cloze": 0.4}}
                      if with_zs else None),
        "tokens_per_s": 50.0 / (keep ** 0.8) if with_zs else None,
        "params": {"prunable_params_dense": prunable_dense, "prunable_params_kept": kept,
                   "prunable_sparsity": 1 - kept / prunable_dense, "total_params_dense": total_dense,
                   "total_params_kept": kept + 5_000_000, "total_sparsity": 1 - (kept + 5_000_000) / total_dense,
                   "per_layer": {"heads": heads, "channels": chans, "layers": layers}},
        "time_s": 12.5 * (1 + rng.random()),
    }


def make_fake_artifacts(root: Path, *, sparsities=(0.2, 0.3, 0.5), methods=METHODS, corpora=("local",),
                        n_layers: int = 6, kv: int = 3, ffn: int = 64, steps: int = 20, search_sparsity: float = 0.3,
                        zero_shot: bool = True, prob_style: str = "suffix", seed: int = 0) -> dict:
    """Write artifacts/{compare/s<S>/results.json, eval/metrics.json, search/{summary.json,history.csv,masks.json}}
    under ``root``; returns a description of what was written. ``prob_style``: "suffix" writes
    ``<group>_mean_prob`` history columns, "slash" writes ``<group>/prob_mean`` (what the search writes now)."""
    rng = random.Random(seed)
    root = Path(root)
    ppl_base = {c: 17.2 + 3 * i for i, c in enumerate(corpora)}
    quality = {m: q for m, q in zip(METHODS, [0.3, 0.45, 0.4, 0.7, 0.6, 1.2, 1.5])}
    dense = {"ppl": dict(ppl_base),
             "zero_shot": {"average": 0.45, "metric": "acc", "tasks": {"local_mc": 0.5, "local_cloze": 0.4}}
             if zero_shot else None,
             "tokens_per_s": 50.1 if zero_shot else None,
             "params": {"prunable_params_kept": 1_000_000 * n_layers, "prunable_sparsity": 0.0,
                        "total_params_kept": 1_000_000 * n_layers + 5_000_000, "total_sparsity": 0.0}}
    for s in sparsities:
        res = {"sparsity": s, "dense": dense, "methods": {}}
        for m in methods:
            res["methods"][m] = _result(rng, ppl_base, s, quality.get(m, 1.0), n_layers, kv, ffn, zero_shot,
                                        layer_drop=(m == "layer_drop"))
        d = root / "artifacts" / "compare" / f"s{s:g}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.json").write_text(json.dumps(res, indent=2))

    pruned = _result(rng, ppl_base, search_sparsity, quality["pg"], n_layers, kv, ffn, zero_shot)
    metrics = {"sparsity": search_sparsity, "dense": {k: v for k, v in dense.items() if k != "params"},
               "pruned": pruned}
    (root / "artifacts" / "eval").mkdir(parents=True, exist_ok=True)
    (root / "artifacts" / "eval" / "metrics.json").write_text(json.dumps(metrics, indent=2))

    search = root / "artifacts" / "search"
    search.mkdir(parents=True, exist_ok=True)
    per_layer = pruned["params"]["per_layer"]
    masks = {"heads": [sorted(rng.sample(range(kv), k)) for k in per_layer["heads"]],
             "channels": [sorted(rng.sample(range(ffn), k)) for k in per_layer["channels"]],
             "layers": [i for i, keep in enumerate(per_layer["layers"]) if keep],
             "sizes": {"heads": [kv] * n_layers, "channels": [ffn] * n_layers}}
    (search / "masks.json").write_text(json.dumps(masks))
    groups = ["heads", "channels"]
    prob_col = (lambda g: f"{g}_mean_prob") if prob_style == "suffix" else (lambda g: f"{g}/prob_mean")
    header = ["step", "loss_mean", "loss_min", "baseline", "lr", "n_valid"] + [prob_col(g) for g in groups]
    lines = [",".join(header)]
    for t in range(steps):
        loss = 3.0 + 2.0 * math.exp(-t / 6) + 0.05 * rng.random()
        if t == 3:  # a step whose sampled masks all failed: empty losses
            lines.append(",".join([str(t), "", "", "", "1.0", "0", "0.7", "0.7"]))
            continue
        lines.append(",".join(str(x) for x in [t, loss, loss - 0.1, loss + 0.05, 1.0, 2,
                                               0.7 + 0.01 * t / steps, 0.7 - 0.01 * t / steps]))
    (search / "history.csv").write_text("\n".join(lines) + "\n")
    (search / "summary.json").write_text(json.dumps({"sparsity": search_sparsity, "time_s": 42.0, "steps": steps,
                                                     "final_loss_mean": 3.01, "params": pruned["params"]}))
    return {"sparsities": list(sparsities), "methods": list(methods), "corpora": list(corpora)}
