"""Markdown tables and plot-data rows from the pipeline's artifacts.

Inputs (plain JSON/CSV, as the stages write them):

* per sparsity S, ``{"sparsity": S, "dense": R, "methods": {name: R, ...}}`` (the report stage assembles it from
  ``artifacts/eval/<method>-s<S>.json``, ``artifacts/eval/dense.json`` and the timing files) where a result ``R`` is
  ``{"ppl": {corpus: float}, "zero_shot": {"average", "metric", "tasks"} | None, "tokens_per_s": float | None,
  "params": {"prunable_params_kept", "prunable_sparsity", "total_params_kept", "total_sparsity", "per_layer", ...},
  "time_s": float, "seed_ppl": {seed: {corpus: float}} (searches with several seeds)}``;
* a search's ``history.csv``: ``step, loss_mean, loss_min, baseline, lr, n_valid`` and per-group columns
  (``<group>_mean_prob`` or ``<group>/prob_mean``).

Conventions (stated in the report too): *sparsity (decoder linear)* is the fraction of the decoder layers' linear
weights (q, k, v, o, gate, up, down) removed, the convention of ``search.sparsity`` / ``compare.sparsities``;
*sparsity (total)* is the fraction of all parameters removed (embeddings, norms and lm_head are never pruned, so it
is smaller).
"""
from __future__ import annotations

import csv
import io
import math
import re
import statistics
from typing import Any, Iterable, Sequence

from pgprune.methods import METHODS

METHOD_ORDER = list(METHODS)  # the registry's order (pgprune/methods.py)
METHOD_LABELS = {"dense": "dense", **{n: m.label for n, m in METHODS.items()}}
_PROB_COLUMN = re.compile(r"^(?P<group>.+?)(?:_mean_prob|/prob_mean)$")


# --- small helpers ---------------------------------------------------------------------------------------------
def _num(x: Any) -> float | None:
    """A finite float, or None (for None, '', 'nan', non-numbers)."""
    if x is None or x == "":
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(x: Any, spec: str, missing: str = "–") -> str:
    v = _num(x)
    return missing if v is None else format(v, spec)


def _ppl(x: Any) -> str:
    v = _num(x)
    if v is None:
        return "–"
    return f"{v:.3g}" if v >= 1e4 else f"{v:.2f}"


def method_label(name: str) -> str:
    return METHOD_LABELS.get(name, name)


def _method_key(name: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER), name)


# --- rows ------------------------------------------------------------------------------------------------------
def _row(method: str, target: float, r: dict, dense_tps: float | None) -> dict:
    p = r.get("params") or {}
    zs = r.get("zero_shot") or None
    tps = _num(r.get("tokens_per_s"))
    seeds: dict[str, list[float]] = {}
    if r.get("seed_ppl"):
        for c, v in (r.get("ppl") or {}).items():
            vals = [_num(v)] + [_num((d or {}).get(c)) for d in r["seed_ppl"].values()]
            seeds[c] = [x for x in vals if x is not None]
    return {
        "method": method,
        "sparsity": target,
        "prunable_params_kept": _num(p.get("prunable_params_kept")),
        "prunable_sparsity": _num(p.get("prunable_sparsity")),
        "total_params_kept": _num(p.get("total_params_kept")),
        "total_sparsity": _num(p.get("total_sparsity")),
        "ppl": {k: _num(v) for k, v in (r.get("ppl") or {}).items()},
        "zero_shot": _num(zs.get("average")) if zs else None,
        "zero_shot_metric": zs.get("metric") if zs else None,
        "zero_shot_tasks": dict(zs.get("tasks") or {}) if zs else {},
        "tokens_per_s": tps,
        "speedup": tps / dense_tps if tps is not None and dense_tps else None,
        "time_s": _num(r.get("time_s")),
        "ppl_seeds": seeds,
    }


def comparison_rows(results: Sequence[dict]) -> list[dict]:
    """One row for the dense model, then one per method and sparsity (method order, then sparsity).

    Each compare@S run measures the dense model again; the dense row shows the first run's perplexity and
    zero-shot (they do not depend on S) and the mean tokens/s, while every method's speed-up is relative to the
    dense tokens/s measured in its own run (same process, same machine state).
    """
    if not results:
        return []
    results = sorted(results, key=lambda r: float(r["sparsity"]))
    dense = results[0]["dense"]
    tps = [v for v in (_num(r["dense"].get("tokens_per_s")) for r in results) if v is not None]
    dense_row = _row("dense", 0.0, dict(dense, tokens_per_s=sum(tps) / len(tps) if tps else None), None)
    dense_row["speedup"] = 1.0 if tps else None
    for k in ("prunable_sparsity", "total_sparsity"):
        if dense_row[k] is None:
            dense_row[k] = 0.0
    rows = [dense_row]
    methods = sorted({m for r in results for m in r.get("methods", {})}, key=_method_key)
    for m in methods:
        for r in results:
            if m in r.get("methods", {}):
                rows.append(_row(m, float(r["sparsity"]), r["methods"][m], _num(r["dense"].get("tokens_per_s"))))
    return rows


def _corpora(rows: Iterable[dict]) -> list[str]:
    return list(dict.fromkeys(c for r in rows for c in r["ppl"]))


def zero_shot_metric(rows: Iterable[dict]) -> str | None:
    return next((r["zero_shot_metric"] for r in rows if r.get("zero_shot_metric")), None)


# --- markdown --------------------------------------------------------------------------------------------------
OFF_TARGET = 0.01  # achieved decoder-linear sparsity further than this from the target: not ranked


def off_target(r: dict) -> bool:
    """Whether a row's achieved sparsity misses its target by more than OFF_TARGET (e.g. the uniform layout, whose
    per-layer widths are whole KV groups and channel blocks): such a row is marked † and never bold."""
    a = r.get("prunable_sparsity")
    return r["method"] != "dense" and a is not None and abs(a - r["sparsity"]) > OFF_TARGET


def ranked(r: dict) -> bool:
    """Whether a row competes for the bold best: a pruned model on its target sparsity."""
    return r["method"] != "dense" and not off_target(r)


def markdown_table(rows: Sequence[dict], *, bold_best: bool = True) -> str:
    """GitHub markdown table: method, target sparsity, prunable params (M), sparsity in both conventions,
    perplexity per evaluation corpus, zero-shot average (metric named in the header), tokens/s, speed-up, time.
    With ``bold_best`` the lowest perplexity among the methods at each sparsity is bold (rows off their target sparsity excluded, marked †)."""
    corpora = _corpora(rows)
    metric = zero_shot_metric(rows)
    seeded = [c for c in corpora if any(len(r.get("ppl_seeds", {}).get(c, [])) > 1 for r in rows)][:1]
    header = ["method", "target sparsity", "prunable params (M)", "sparsity (decoder linear)", "sparsity (total)"]
    header += [f"ppl {c} ↓" for c in corpora]
    header += [f"ppl {c}: mean ± sd over seeds" for c in seeded]
    header += [f"zero-shot avg {metric} ↑" if metric else "zero-shot avg", "tokens/s", "speed-up vs dense",
               "prune time (s)"]
    best: dict[tuple[float, str], float] = {}
    if bold_best:
        for r in rows:
            if not ranked(r):
                continue
            for c in corpora:
                v = r["ppl"].get(c)
                if v is not None:
                    key = (r["sparsity"], c)
                    best[key] = min(best.get(key, math.inf), v)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for r in rows:
        cells = [method_label(r["method"]) + (" †" if off_target(r) else ""),
                 "0 (dense)" if r["method"] == "dense" else f"{r['sparsity']:g}",
                 _fmt(None if r["prunable_params_kept"] is None else r["prunable_params_kept"] / 1e6, ".2f"),
                 _fmt(r["prunable_sparsity"], ".1%"), _fmt(r["total_sparsity"], ".1%")]
        for c in corpora:
            v = r["ppl"].get(c)
            cell = _ppl(v)
            if bold_best and v is not None and ranked(r) and v == best.get((r["sparsity"], c)):
                cell = f"**{cell}**"
            cells.append(cell)
        for c in seeded:
            vals = r.get("ppl_seeds", {}).get(c, [])
            cells.append(f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} (n={len(vals)})"
                         if len(vals) > 1 else "–")
        cells += [_fmt(r["zero_shot"], ".3f"), _fmt(r["tokens_per_s"], ".1f"),
                  _fmt(r["speedup"], ".2f") + ("×" if r["speedup"] is not None else ""), _fmt(r["time_s"], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def conventions_text(metric: str | None, tasks: Sequence[str] = ()) -> str:
    zs = (f"average of `{metric}` over the lm-eval tasks ({', '.join(tasks) or 'see eval.zero_shot_tasks'}), "
          "0-shot" if metric else "not run (eval.zero_shot or eval.zero_shot_tasks off)")
    return "\n".join([
        "* **target sparsity**: the requested fraction (`compare.sparsities`).",
        "* **sparsity (decoder linear)**: fraction of the decoder layers' linear weights (q, k, v, o, gate, up, "
        "down projections) removed, the convention the targets use (and the paper's and FLAP's). "
        "**prunable params (M)**: those weights kept, in millions.",
        "* **sparsity (total)**: fraction of *all* parameters removed; embeddings, norms and lm_head are never "
        "pruned, so it is smaller than the decoder-linear sparsity.",
        "* **ppl**: perplexity on the held-out blocks of each evaluation corpus (`data.evaluation`; non-overlapping "
        "blocks of `eval.ppl_seq_len` tokens, exp of the token-mean NLL); lower is better; the best method at each "
        "sparsity is bold; † marks a row whose achieved sparsity misses the target by more than one point (the "
        "uniform layout keeps whole KV groups and channel blocks in every layer), which is not ranked. A policy-gradient search's row is its first seed (`search.seeds`); **mean ± sd over "
        "seeds** summarises all of its seeds.",
        f"* **zero-shot avg**: {zs}; higher is better.",
        "* **tokens/s**: greedy generation throughput (`eval.speed`); **speed-up** = tokens/s ÷ the dense model's "
        "tokens/s measured in the same run. **prune time**: finding the masks — the scorer's calibration pass "
        "(for PG search: that of its init scorer) plus allocation or the search, summed over resumed runs; "
        "excluding evaluation.",
    ]) + "\n"


def markdown_report(title: str, *, compare_results: Sequence[dict], export: dict | None = None,
                    search_summary: dict | None = None, figures: dict[str, str] | None = None,
                    extra_sections: Sequence[str] = ()) -> str:
    """The whole report.md (no timestamps: the text changes only when the numbers do)."""
    rows = comparison_rows(compare_results)
    metric = zero_shot_metric(rows)
    tasks = list(dict.fromkeys(t for r in rows for t in r["zero_shot_tasks"]))
    out = [f"# {title}", ""]
    if export:
        out += [f"`models/pruned` (the `export` stage): {method_label(export['method'])} (`{export['method']}`) at "
                f"sparsity {export['sparsity']:g}, saved as {export.get('architecture', 'a pruned model')}.", ""]
    if search_summary:
        out += [search_summary_text(search_summary), ""]
    if rows:
        sp = sorted({r["sparsity"] for r in rows if r["method"] != "dense"})
        methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
        out += [f"## Comparison at sparsities {', '.join(f'{s:g}' for s in sp)}", "",
                "Methods: " + ", ".join(f"{method_label(m)} (`{m}`)" for m in methods) + ".", "",
                markdown_table(rows)]
    out += list(extra_sections)
    out += ["## Conventions", "", conventions_text(metric, tasks)]
    if figures:
        out += ["## Figures", ""]
        for caption, rel in figures.items():
            out += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
    return "\n".join(out).rstrip() + "\n"


def search_summary_text(summary: dict) -> str:
    """One sentence on a search cell (its masks' summary.json, with the timing file's seconds)."""
    bits = []
    for seed, d in (summary.get("search") or {}).items():
        part = f"seed {seed}: {d.get('steps')} steps"
        if d.get("stopped_early"):
            patience = (summary.get("search_settings") or {}).get("patience")
            part += (f" (stopped early: {patience} validations in a row without a better loss, search.patience)"
                     if patience else " (stopped early: search.patience)")
        part += f", {d.get('forward_passes')} sampled-mask forwards"
        if d.get("best_step") == 0:
            start = "SlimGPT's masks, MLP widths rounded to channel blocks" if (
                summary.get("search_settings") or {}).get("init_allocation") == "slimgpt" else "the init metric's mask"
            part += f", masks = its start (step 0: {start}; no validated step beat it"
            if _num(d.get("best_val_loss")) is not None:
                part += f", held-back loss {d['best_val_loss']:.4f}"
            part += ")"
        elif d.get("best_step") is not None:
            part += f", masks from step {d['best_step']} (best validated"
            if _num(d.get("init_val_loss")) is not None and _num(d.get("best_val_loss")) is not None:
                part += f": held-back loss {d['init_val_loss']:.4f} at step 0 → {d['best_val_loss']:.4f}"
            part += ")"
        if _num((summary.get("time_s") or {}).get(seed)) is not None:
            part += f", {summary['time_s'][seed]:.0f} s"
        bits.append(part)
    head = f"Search `{summary.get('method')}` at sparsity {summary.get('sparsity')}"
    return head + (": " + "; ".join(bits) + "." if bits else ".")


# --- plot data (DVC plots CSVs) --------------------------------------------------------------------------------
def ppl_vs_sparsity_rows(results: Sequence[dict], corpus: str | None = None,
                         methods: Sequence[str] = tuple(METHOD_ORDER)) -> tuple[list[dict], str | None]:
    """Wide rows ``{sparsity, dense, <method>...}`` for one corpus (default: the first); a method absent from the
    results has empty cells, so the columns dvc.yaml names always exist. Returns (rows, corpus)."""
    rows = comparison_rows(results)
    corpus = corpus or next(iter(_corpora(rows)), None)
    cols = list(methods) + [m for m in dict.fromkeys(r["method"] for r in rows) if m not in methods and m != "dense"]
    out = []
    for res in sorted(results, key=lambda r: float(r["sparsity"])):
        s = float(res["sparsity"])
        line: dict[str, Any] = {"sparsity": s, "dense": _num((res["dense"].get("ppl") or {}).get(corpus))}
        for m in cols:
            r = res.get("methods", {}).get(m)
            line[m] = _num((r.get("ppl") or {}).get(corpus)) if r else None
        out.append(line)
    return out, corpus


def ppl_points(results: Sequence[dict]) -> list[dict]:
    """Long rows ``{method, sparsity, ppl, corpus}`` for plot_ppl_vs_sparsity (dense at sparsity 0)."""
    return [{"method": r["method"], "sparsity": r["sparsity"], "ppl": v, "corpus": c}
            for r in comparison_rows(results) for c, v in r["ppl"].items() if v is not None]


def read_history_csv(text: str) -> list[dict]:
    """history.csv → rows of floats (None for empty cells)."""
    return [{k: _num(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


def prob_columns(rows: Sequence[dict]) -> dict[str, str]:
    """group → its mean keep-probability column (``heads_mean_prob`` or ``heads/prob_mean``)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    return {m["group"]: c for c in cols if (m := _PROB_COLUMN.match(c))}


def search_loss_rows(history: Sequence[dict]) -> list[dict]:
    """``{step, loss_mean, loss_min, baseline, val_loss}`` per step with a loss (steps whose samples all failed are left out)."""
    out = []
    for r in history:
        if _num(r.get("loss_mean")) is None:
            continue
        out.append({"step": int(_num(r.get("step")) or 0), "loss_mean": _num(r.get("loss_mean")),
                    "loss_min": _num(r.get("loss_min")), "baseline": _num(r.get("baseline")),
                    "val_loss": _num(r.get("val_loss"))})
    return out


def kept_fractions(per_layer: dict, sizes: dict) -> dict[str, list[float]]:
    """Kept fraction per layer for heads and channels (a dropped layer keeps 0)."""
    layers = list(per_layer.get("layers") or [1] * len(sizes["heads"]))
    out = {}
    for g in ("heads", "channels"):
        out[g] = [(k / n if n and layers[i] else 0.0) for i, (k, n) in enumerate(zip(per_layer[g], sizes[g]))]
    return out


def kept_per_layer_rows(per_layer: dict, sizes: dict) -> list[dict]:
    """``{layer, heads_kept, channels_kept, layer_kept}`` per layer (fractions; layer_kept is 0/1)."""
    fr = kept_fractions(per_layer, sizes)
    layers = list(per_layer.get("layers") or [1] * len(fr["heads"]))
    return [{"layer": i, "heads_kept": round(h, 6), "channels_kept": round(c, 6), "layer_kept": int(bool(layers[i]))}
            for i, (h, c) in enumerate(zip(fr["heads"], fr["channels"]))]


def csv_text(rows: Sequence[dict], fieldnames: Sequence[str] | None = None) -> str:
    fields = list(fieldnames or dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]))
                    for k in fields})
    return buf.getvalue()


def quality_vs_cost_rows(curves: Sequence[dict]) -> list[dict]:
    """Long rows ``{method, sparsity, step, forward_passes, seconds, val_loss, ppl}`` of every search curve."""
    out = []
    for c in curves:
        secs = c.get("seconds") or []
        for i, p in enumerate(c["points"]):
            out.append({"method": c["method"], "sparsity": c["sparsity"], "step": p["step"],
                        "forward_passes": p["forward_passes"], "seconds": _num(secs[i]) if i < len(secs) else None,
                        "val_loss": _num(p.get("val_loss")), "ppl": _num(p.get("ppl"))})
    return out


def quality_vs_cost_table(curves: Sequence[dict]) -> str:
    """Markdown: per search cell, perplexity of the validated mask after 0, 1/4, 1/2 and all of the forward
    passes, relative to step 0 (the init metric's mask), and the seconds spent."""
    lines = ["| search | sparsity | " + " | ".join(f"ppl after {f} of the forwards" for f in ("0", "1/4", "1/2", "all"))
             + " | seconds |", "|---|---:|---:|---:|---:|---:|---:|"]
    for c in curves:
        pts = c["points"]
        if not pts:
            continue
        total = pts[-1]["forward_passes"] or 1
        cells = []
        for frac in (0.0, 0.25, 0.5, 1.0):
            p = min(pts, key=lambda q: abs(q["forward_passes"] - frac * total))
            rel = p["ppl"] / pts[0]["ppl"] if pts[0]["ppl"] else None
            cells.append(f"{p['ppl']:.2f}" + (f" ({rel:.3f}×)" if rel is not None and frac > 0 else ""))
        secs = c.get("seconds") or []
        lines.append(f"| {method_label(c['method'])} | {c['sparsity']:g} | " + " | ".join(cells)
                     + f" | {_fmt(secs[-1] if secs else None, '.0f')} |")
    return "\n".join(lines) + "\n"

# --- recovery --------------------------------------------------------------------------------------------------
def recovery_table(cells: Sequence[dict]) -> str:
    """Markdown: each recovered cell (``collect_recovery``) before → after recovery: perplexity on every corpus
    (and the ratio after/before), zero-shot, the recovery's steps, time and tokens/s."""
    if not cells:
        return ""
    corpora = list(dict.fromkeys(c for cell in cells for c in cell["after"].get("ppl", {})))
    head = ["method", "sparsity", *[f"ppl {c} before → after" for c in corpora], "zero-shot before → after",
            "steps", "time (s)", "tokens/s"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    for cell in cells:
        b, a, r = cell["before"], cell["after"], cell["recovery"]
        row = [f"{method_label(cell['method'])} (`{cell['method']}`)", f"{cell['sparsity']:g}"]
        for c in corpora:
            vb, va = _num(b.get("ppl", {}).get(c)), _num(a.get("ppl", {}).get(c))
            ratio = f" ({va / vb:.2f}×)" if vb and va is not None else ""
            row.append(f"{_ppl(vb)} → **{_ppl(va)}**{ratio}")
        zb, za = (b.get("zero_shot") or {}).get("average"), (a.get("zero_shot") or {}).get("average")
        row.append(f"{_fmt(zb, '.3f')} → {_fmt(za, '.3f')}")
        row += [str(r.get("steps", "–")), _fmt(r.get("time_s"), ".0f"), _fmt(r.get("tokens_per_s"), ".0f")]
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def recovery_curve_rows(cells: Sequence[dict]) -> list[dict]:
    """One row per (method, sparsity, step) of the recovery curves: the held-out perplexity after that many steps."""
    return [{"method": cell["method"], "sparsity": cell["sparsity"], "step": p["step"], "ppl": p["ppl"]}
            for cell in cells for p in (cell["recovery"].get("curve") or {}).get("points", [])]


def recovery_section(cells: Sequence[dict], settings, seed: int) -> list[str]:
    """The report's Recovery section (markdown lines; none without recovered cells): what was run, then
    :func:`recovery_table`. ``settings``: the RecoverSettings the cells ran with; ``seed``: the search seed whose
    masks a search cell exports."""
    if not cells:
        return []
    s = settings
    kd = ""
    if s.loss == "kd":
        kd = (f" (distillation from the dense model's top-{s.teacher_topk} tokens + the rest, cached once: "
              "`teacher` stage)" if s.teacher_topk else " (distillation from the dense model)")
    return ["## Recovery", "",
            f"Each cell's masks (a search cell: seed {seed}'s) after a LoRA recovery on the calibration blocks "
            f"(`recover` stage: {s.steps} steps of {s.batch_size * s.grad_accum} × {s.seq_len} tokens, loss "
            f"`{s.loss}`{kd}, rank {s.rank}, lr {s.lr:g}), evaluated like every cell (`evaluate_recovered`). "
            "Ratio: after / before.", "", recovery_table(cells), ""]
