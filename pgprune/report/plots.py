"""Report figures (matplotlib, Agg canvas: no display, no pyplot global state; written atomically)."""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pgprune.io import atomic_path
from pgprune.report.tables import _num, kept_fractions, method_label, prob_columns

_METADATA = {"Software": None}  # no matplotlib version in the PNG: same data, same bytes


def _save(fig: Figure, path: str | os.PathLike) -> None:
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, metadata=_METADATA)


def plot_kept_per_layer(per_layer_counts: dict, layout_sizes: dict, path: str | os.PathLike,
                        title: str = "Kept fraction per layer") -> None:
    """Heatmap: rows heads (KV groups) and MLP channels, columns layers, value the kept fraction (0..1).

    ``per_layer_counts``: ``{"heads": [kept per layer], "channels": [...], "layers": [1/0 kept]}`` (the
    ``per_layer`` of a params summary); ``layout_sizes``: ``{"heads": [KV groups per layer], "channels": [...]}``
    (the ``sizes`` of masks.json). Dropped layers are 0 and marked with ×.
    """
    fr = kept_fractions(per_layer_counts, layout_sizes)
    n = len(fr["heads"])
    layers = list(per_layer_counts.get("layers") or [1] * n)
    fig = Figure(figsize=(max(6.0, 0.32 * n + 2.5), 2.8), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow([fr["heads"], fr["channels"]], aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0,
                   interpolation="nearest")
    ax.set_yticks([0, 1], ["heads (KV groups)", "MLP channels"])
    step = max(1, math.ceil(n / 32))
    ax.set_xticks(range(0, n, step))
    ax.set_xlabel("layer")
    ax.set_title(title)
    if n <= 40:
        for i in range(n):
            for j, g in enumerate(("heads", "channels")):
                v = fr[g][i]
                txt = "×" if not layers[i] else f"{v:.2f}".lstrip("0") if v < 1 else "1"
                ax.text(i, j, txt, ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    fig.colorbar(im, ax=ax, label="kept fraction", fraction=0.04, pad=0.02)
    _save(fig, path)


def plot_search_curve(history_rows: Sequence[dict], path: str | os.PathLike,
                      title: str = "Policy-gradient search") -> None:
    """Loss mean / min, the baseline and the validated hard-mask loss vs step; below, each group's mean
    keep-probability vs step."""
    steps = [_num(r.get("step")) for r in history_rows]
    probs = prob_columns(history_rows)
    fig = Figure(figsize=(7.5, 6.0 if probs else 3.8), layout="constrained")
    axes = fig.subplots(2 if probs else 1, 1, sharex=True, squeeze=False)[:, 0]
    ax = axes[0]
    for key, style in (("loss_mean", dict(lw=1.4, label="loss (mean of samples)")),
                       ("loss_min", dict(lw=0.8, alpha=0.6, label="loss (min of samples)")),
                       ("baseline", dict(lw=1.2, ls="--", label="baseline")),
                       ("val_loss", dict(lw=1.2, marker="o", ms=3, color="k",
                                         label="hard top-k mask on held-back blocks"))):
        pts = [(s, _num(r.get(key))) for s, r in zip(steps, history_rows)]
        pts = [(s, v) for s, v in pts if s is not None and v is not None]
        if pts:
            ax.plot(*zip(*pts), **style)
    ax.set_ylabel("calibration loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    if probs:
        ax2 = axes[1]
        for group, col in probs.items():
            pts = [(s, _num(r.get(col))) for s, r in zip(steps, history_rows)]
            pts = [(s, v) for s, v in pts if s is not None and v is not None]
            if pts:
                ax2.plot(*zip(*pts), label=group)
        ax2.set_ylabel("mean keep-probability")
        ax2.set_ylim(0, 1)
        ax2.grid(alpha=0.3)
        if ax2.lines:
            ax2.legend(fontsize=8)
    axes[-1].set_xlabel("step")
    _save(fig, path)


def plot_ppl_vs_sparsity(rows: Sequence[dict[str, Any]], path: str | os.PathLike,
                         title: str = "Perplexity vs sparsity") -> None:
    """One line per method (log-scale perplexity vs target sparsity), the dense model as a horizontal line.

    ``rows``: ``{"method", "sparsity", "ppl"}`` and optionally ``"corpus"`` (one panel per corpus); the method
    ``"dense"`` is drawn as a horizontal line.
    """
    corpora = list(dict.fromkeys(r.get("corpus") for r in rows)) or [None]
    fig = Figure(figsize=(6.0 * len(corpora), 4.2), layout="constrained")
    axes = fig.subplots(1, len(corpora), squeeze=False)[0]
    for ax, corpus in zip(axes, corpora):
        sel = [r for r in rows if r.get("corpus") == corpus and _num(r.get("ppl")) is not None and r["ppl"] > 0]
        for m in dict.fromkeys(r["method"] for r in sel):
            pts = sorted((float(r["sparsity"]), float(r["ppl"])) for r in sel if r["method"] == m)
            if m == "dense":
                ax.axhline(pts[0][1], color="black", ls="--", lw=1, label="dense")
            else:
                ax.plot(*zip(*pts), marker="o", ms=4, label=method_label(m))
        if sel:
            ax.set_yscale("log")
        ax.set_xlabel("sparsity (decoder linear params removed)")
        ax.set_ylabel("perplexity (log scale)" + (f", {corpus}" if corpus else ""))
        ax.set_title(title + (f": {corpus}" if corpus else ""))
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=8)
    _save(fig, path)


def plot_quality_vs_cost(curves: Sequence[dict], path: str | os.PathLike,
                         title: str = "Search quality vs cost") -> None:
    """Held-out perplexity (top) and validated calibration loss (bottom) of a search's hard masks against the
    sampled-mask forward passes spent, one line per (method, sparsity); the dotted line of each is its step-0
    mask, the metric baseline it starts from (FLAP by default), on the same blocks.

    ``curves``: ``{"method", "sparsity", "corpus", "points": [{"forward_passes", "ppl", "val_loss"}, ...]}``.
    """
    fig = Figure(figsize=(7.5, 6.2), layout="constrained")
    ax, ax2 = fig.subplots(2, 1, sharex=True)
    for c in curves:
        pts = [p for p in c["points"] if _num(p.get("ppl")) is not None]
        if not pts:
            continue
        label = f"{method_label(c['method'])} @ {c['sparsity']:g}"
        line, = ax.plot([p["forward_passes"] for p in pts], [p["ppl"] for p in pts], marker="o", ms=3, label=label)
        ax.axhline(pts[0]["ppl"], color=line.get_color(), ls=":", lw=1)
        ax2.plot([p["forward_passes"] for p in pts], [p["val_loss"] for p in pts], marker="o", ms=3,
                 color=line.get_color(), label=label)
        ax2.axhline(pts[0]["val_loss"], color=line.get_color(), ls=":", lw=1)
    corpus = next((c.get("corpus") for c in curves if c.get("corpus")), None)
    ax.set_ylabel("perplexity" + (f" ({corpus}, held out)" if corpus else ""))
    ax.set_title(title + " (dotted: the step-0 mask = the init metric's)")
    ax2.set_ylabel("validated loss (held-back calibration)")
    ax2.set_xlabel("sampled-mask forward passes")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        if a.lines:
            a.legend(fontsize=7)
    _save(fig, path)


def plot_recovery_curve(cells: Sequence[dict], path: str | os.PathLike,
                        title: str = "Recovery: held-out perplexity vs LoRA steps") -> None:
    """Held-out perplexity (log scale) of each recovered cell's model against the recovery steps done (step 0: the
    pruned model before recovery); the dashed line is the dense model's on the same blocks when given.

    ``cells``: ``{"method", "sparsity", "recovery": {"curve": {"corpus", "points": [{"step", "ppl"}]}}}``."""
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.add_subplot()
    corpus = None
    for cell in cells:
        curve = cell["recovery"].get("curve") or {}
        pts = [p for p in curve.get("points", []) if _num(p.get("ppl")) is not None]
        if not pts:
            continue
        corpus = corpus or curve.get("corpus")
        ax.plot([p["step"] for p in pts], [p["ppl"] for p in pts], marker="o", ms=3,
                label=f"{method_label(cell['method'])} @ {cell['sparsity']:g}")
    ax.set_yscale("log")
    ax.set_xlabel("recovery steps")
    ax.set_ylabel("perplexity" + (f" ({corpus}, held out)" if corpus else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize=8)
    _save(fig, path)
