"""The hand-off between the pipeline's steps: a method's masks and compensation, stored as ``masks.json`` +
``compensation.json`` (the recipe: none | bias | refit, :mod:`pgprune.core.compensation`) +
``compensation.safetensors`` (the mean-compensation biases; byte-reproducible: same inputs, same bytes), plus a
search's extra seeds (``seeds/<seed>/``), validated trajectory and history. The evaluation and the export slice what
they read here (recomputing the refit when the recipe says so).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from pgprune.core.compensation import Recipe
from pgprune.core.masks import Masks, sparsity_report


@dataclass
class MethodResult:
    """What a pruning method produced: the masks, the compensation biases of the pruned model (or None), and
    details (search history, timing, seeds ...)."""

    method: str
    sparsity: float
    masks: Masks
    extra_bias: dict[int, dict[str, torch.Tensor]] | None
    info: dict = field(default_factory=dict)
    history: list[dict] | None = None
    # search: every seed's (masks, compensation), the first seed's being ``masks``/``extra_bias``
    seeds: dict[int, tuple[Masks, dict | None]] = field(default_factory=dict)
    # search: the first seed's hard mask at every validation (quality vs cost), and the calibration means the
    # masks are compensated with (so that an evaluation can compensate any of them)
    trajectory: list[dict] = field(default_factory=list)
    compensation_means: dict | None = None
    # how the sliced model is compensated (the refit is recomputed from it by whoever slices)
    recipe: Recipe | None = None
    # the refit weights of ``masks`` when the method computed them on the way (SlimGPT): whoever slices in the same
    # process uses them instead of refitting again (pgprune.core.compensation.compensated_source); never saved
    refit: dict | None = None


def _write_masks(out: Path, masks: Masks, extra) -> None:
    from pgprune.io import save_tensors, write_json

    write_json(out / "masks.json", masks.to_json())
    comp = out / "compensation.safetensors"
    if extra is not None:
        save_tensors(comp, {f"layers.{i}.{name}": v for i, d in sorted(extra.items()) for name, v in sorted(d.items())})
    elif comp.exists():
        comp.unlink()


def save_masks(out_dir: str | Path, result: MethodResult, layout) -> dict:
    """Write masks.json, compensation.safetensors (when compensated), seeds/<seed>/ the same for extra seeds,
    history.csv, trajectory.json and compensation_means.safetensors (searches) and summary.json (parameter counts;
    no timings: the bytes must not vary between runs)."""
    from pgprune.io import save_tensors, write_json, write_text

    out = Path(out_dir)
    _write_masks(out, result.masks, result.extra_bias)
    recipe = result.recipe or Recipe("bias" if result.extra_bias is not None else "none")
    write_json(out / "compensation.json", recipe.to_json())
    for seed, (masks, extra) in list(result.seeds.items())[1:]:
        _write_masks(out / "seeds" / str(seed), masks, extra)
    if result.trajectory:
        write_json(out / "trajectory.json", [{"step": t["step"], "forward_passes": t["forward_passes"],
                                              "val_loss": t["val_loss"], "masks": t["masks"].to_json()}
                                             for t in result.trajectory])
    if result.compensation_means is not None:
        save_tensors(out / "compensation_means.safetensors", result.compensation_means)
    if result.history is not None:
        write_text(out / "history.csv", history_csv(result.history))
    summary = {"method": result.method, "sparsity": result.sparsity, "layout": result.info.get("layout"),
               "compensated": result.extra_bias is not None, "compensation": recipe.kind,
               "seeds": [int(s) for s in result.seeds] or None,
               "params": sparsity_report(layout, result.masks, out_bias=result.extra_bias is not None)}
    if "settings" in result.info:
        summary["search_settings"] = result.info["settings"]
    if "seeds" in result.info:
        summary["search"] = {s: {k: v for k, v in d.items() if k in ("steps", "forward_passes", "best_step",
                                                                     "best_val_loss", "init_val_loss",
                                                                     "stopped_early")}
                             for s, d in result.info["seeds"].items()}
    write_json(out / "summary.json", summary)
    return summary


def load_masks(masks_dir: str | Path, layout=None) -> tuple[Masks, dict[int, dict[str, torch.Tensor]] | None]:
    """(masks, compensation biases or None) from a folder written by :func:`save_masks`."""
    from pgprune.io import load_tensors

    d = Path(masks_dir)
    masks = Masks.load(d / "masks.json", layout)
    comp = d / "compensation.safetensors"
    if not comp.exists():
        return masks, None
    flat = load_tensors(comp, "compensation biases", nested=False)
    extra: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        _, i, name = key.split(".")
        extra.setdefault(int(i), {})[name] = v
    return masks, extra


def load_recipe(masks_dir: str | Path) -> Recipe:
    """The compensation recipe of a masks folder (``compensation.json``; a folder written before it existed:
    ``bias`` when it has compensation biases, else ``none``)."""
    from pgprune.io import read_json

    d = Path(masks_dir)
    if (d / "compensation.json").exists():
        return Recipe.from_json(read_json(d / "compensation.json"), str(d / "compensation.json"))
    return Recipe("bias" if (d / "compensation.safetensors").exists() else "none")


def load_trajectory(masks_dir: str | Path, layout=None) -> tuple[list[dict], dict | None]:
    """(the search's validated masks over time, {"step", "forward_passes", "val_loss", "masks"}, and the
    calibration means to compensate them with) from a search cell; ([], None) when the cell has none."""
    from pgprune.io import load_tensors, read_json

    d = Path(masks_dir)
    if not (d / "trajectory.json").exists():
        return [], None
    points = [dict(t, masks=Masks.from_json(t["masks"], layout, source=str(d / "trajectory.json")))
              for t in read_json(d / "trajectory.json")]
    means = d / "compensation_means.safetensors"
    return points, (load_tensors(means, "compensation means") if means.exists() else None)


def seed_results(masks_dir: str | Path, layout=None) -> dict[str, tuple[Masks, dict | None]]:
    """{seed: (masks, compensation)} of the extra seeds of a search (seeds/<seed>/)."""
    d = Path(masks_dir) / "seeds"
    if not d.is_dir():
        return {}
    return {p.name: load_masks(p, layout) for p in sorted(d.iterdir(), key=lambda x: int(x.name)) if p.is_dir()}


def history_csv(history: list[dict]) -> str:
    import csv
    import io

    keys = list(dict.fromkeys(k for row in history for k in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    return buf.getvalue()


__all__ = ["MethodResult", "save_masks", "load_masks", "load_recipe", "load_trajectory", "seed_results", "history_csv"]
