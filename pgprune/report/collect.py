"""Gather the per-cell artifacts (evaluations, timings, masks summaries) into the report's inputs.

The pipeline writes one evaluation per (method, sparsity) cell (``<eval>/<method>-s<S>.json``), the dense model's
(``<eval>/dense.json``), the scorers' and searches' seconds (``<timing>/init.json``,
``<timing>/search-<method>-s<S>.json``) and the masks cells (``<masks>/<method>/s<S>/``). The report tables take,
per sparsity, ``{"sparsity": S, "dense": R, "methods": {method: R}}``: :func:`collect_results` builds that, with
each method's prune time = its scorer's calibration pass (+ the search of its first seed for a search, + a
baseline's masks: ``<timing>/baseline-<method>-s<S>.json``, e.g. SlimGPT's layer-by-layer selection).
"""
from __future__ import annotations

from pathlib import Path

from pgprune.errors import require_file
from pgprune.io import read_json
from pgprune.methods import METHODS


def sparsity_tag(sparsity: float) -> str:
    """``s`` + S as DVC renders ``${item.sparsity}`` in dvc.yaml paths (Python's ``str`` of the float read from
    params.yaml): ``s0.3``. tests/test_report.py checks it against DVC's rendering."""
    return f"s{float(sparsity)}"


def collect_results(eval_dir: str | Path, timing_dir: str | Path, sparsities, methods, search_init: str) -> list[dict]:
    """Per sparsity, the dense and every method's evaluation (with ``time_s``); a missing file is named."""
    ev, timing = Path(eval_dir), Path(timing_dir)
    dense = read_json(require_file(ev / "dense.json", "dense evaluation (evaluate_dense stage)"))
    scorer_time = read_json(require_file(timing / "init.json", "scorer timing (init stage)"))["time_s"]
    results = []
    for s in sparsities:
        tag = sparsity_tag(s)
        cells = {}
        for m in methods:
            r = read_json(require_file(ev / f"{m}-{tag}.json", f"evaluation of {m} at sparsity {s:g}"))
            spec = METHODS[m]
            if spec.kind == "search":
                t = read_json(require_file(timing / f"search-{m}-{tag}.json", f"search timing of {m} at {s:g}"))
                first = next(iter(t["seeds"].values()))  # the seed whose masks the row shows
                r["time_s"] = first["time_s"] + scorer_time.get(search_init, 0.0)
            else:  # its scorer's pass (none for a selector) + its masks (baseline timing, when recorded)
                masks_t = timing / f"baseline-{m}-{tag}.json"
                own = read_json(masks_t)["time_s"] if masks_t.is_file() else 0.0
                r["time_s"] = scorer_time.get(spec.scorer, 0.0) + own if spec.scorer or own else None
            cells[m] = r
        results.append({"sparsity": float(s), "dense": dense, "methods": cells})
    return results


def search_summary(masks_dir: str | Path, timing_dir: str | Path, method: str, sparsity: float) -> dict:
    """A search cell's summary.json (each seed's steps, best step and whether it stopped early, search.patience)
    with each seed's seconds from the timing file (``time_s``: {seed: s})."""
    tag = sparsity_tag(sparsity)
    summary = read_json(require_file(Path(masks_dir) / method / tag / "summary.json", f"{method} masks summary"))
    t = read_json(require_file(Path(timing_dir) / f"search-{method}-{tag}.json", f"search timing of {method}"))
    summary["time_s"] = {k: v["time_s"] for k, v in t["seeds"].items()}
    return summary


def collect_recovery(eval_dir: str | Path, timing_dir: str | Path, methods, sparsities) -> list[dict]:
    """Per recovered cell: ``{"method", "sparsity", "before": the cell's evaluation, "after": the recovered model's,
    "recovery": the recover stage's metrics (time, tokens/s, losses, curve)}``; a missing file is named."""
    ev, timing = Path(eval_dir), Path(timing_dir)
    out = []
    for s in sparsities:
        tag = sparsity_tag(s)
        for m in methods:
            out.append({"method": m, "sparsity": float(s),
                        "before": read_json(require_file(ev / f"{m}-{tag}.json", f"evaluation of {m} at {s:g}")),
                        "after": read_json(require_file(ev / "recovered" / f"{m}-{tag}.json",
                                                        f"evaluation of the recovered {m} at {s:g} "
                                                        "(evaluate_recovered stage)")),
                        "recovery": read_json(require_file(timing / f"recover-{m}-{tag}.json",
                                                           f"recovery of {m} at {s:g} (recover stage)"))})
    return out
