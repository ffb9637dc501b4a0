"""Evaluate a model or a masks cell: perplexity on every eval corpus, zero-shot, speed, and a search's quality vs
cost curve (the evaluation stage and ``pgprune eval``)."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from pgprune.core.compensation import compensated_source
from pgprune.core.handoff import load_masks, load_recipe, load_trajectory, seed_results
from pgprune.core.masks import Masks, sparsity_report
from pgprune.errors import MissingFileError, PgpruneError

if TYPE_CHECKING:
    from pgprune.config import Params


def local_task_names(tasks_dir: Path) -> list[str]:
    manifest = tasks_dir / "manifest.json"
    if not manifest.exists():
        raise MissingFileError(f"no local zero-shot tasks at {tasks_dir} (data.evaluation must include 'local')")
    return sorted(json.loads(manifest.read_text())["tasks"])


def evaluate(model, tokenizer, evals: dict[str, torch.Tensor], tasks_dir: Path | None, params: Params, *,
             zero_shot: bool | None = None, speed: bool | None = None) -> dict:
    """Perplexity on every eval corpus, lm-eval zero-shot average, generation tokens/s (each when enabled)."""
    from pgprune.eval import generation_speed, perplexity

    e = params.eval
    zero_shot = e.zero_shot if zero_shot is None else zero_shot
    speed = e.speed.enabled if speed is None else speed
    out: dict = {"ppl": {}, "zero_shot": None, "tokens_per_s": None}
    t0 = time.perf_counter()
    for name, blocks in evals.items():
        out["ppl"][name] = perplexity(model, blocks, batch_size=e.ppl_batch_size, progress=True)["ppl"]
    out["ppl_time_s"] = time.perf_counter() - t0
    if zero_shot and e.zero_shot_tasks:
        from pgprune.eval import zero_shot as run_zero_shot

        tasks, include = [], None
        for t in e.zero_shot_tasks:
            if t == "local":
                if tasks_dir is None:
                    raise PgpruneError("eval.zero_shot_tasks has 'local' but no local tasks were prepared")
                tasks += local_task_names(tasks_dir)
                include = str(tasks_dir)
            else:
                tasks.append(t)
        res = run_zero_shot(model, tokenizer, tasks, include_path=include, batch_size=e.zero_shot_batch_size,
                            limit=e.zero_shot_limit, device=None, metric=e.zero_shot_metric)
        out["zero_shot"] = {"average": res["average"], "metric": res["metric"],
                            "tasks": {k: v.get(res["metric_used"][k]) for k, v in res["tasks"].items()}}
    if speed:
        s = e.speed
        r = generation_speed(model, tokenizer, batch_size=s.batch_size, prompt_len=s.prompt_len,
                             new_tokens=s.new_tokens, repeats=s.repeats, device=None)
        out["tokens_per_s"] = r["tokens_per_s"]
    return out


def evaluate_masks(model, tokenizer, masks_dir: str | Path | None, evals: dict[str, torch.Tensor],
                   tasks_dir: Path | None, params: Params, calib: torch.Tensor | None = None) -> dict:
    """The evaluation of one masks cell (or of the dense model when ``masks_dir`` is None).

    In memory: the masks are sliced out with their compensation (the biases, or the refit recomputed from ``calib``
    [n, T] when the cell's recipe says refit: :func:`pgprune.core.compensation.compensated_source`) and the
    physically smaller model is evaluated (perplexity, zero-shot, speed), plus the perplexity of every extra
    seed's masks (each refit on its own). Streamed (model.offload / device_map): perplexity through the
    layer-major executor with the masks and compensation means applied (equal to the sliced model's), and no
    zero-shot or speed (they need the model in memory); a refit cell needs the model in memory."""
    from pgprune.core.adapters import get_adapter
    from pgprune.core.weights import is_streamed
    from pgprune.eval import perplexity
    from pgprune.hf.slicing import slice_model

    layout = get_adapter(model).layout()
    masks, extra = load_masks(masks_dir, layout) if masks_dir is not None else (Masks.full(layout), None)
    recipe = load_recipe(masks_dir) if masks_dir is not None else None
    out: dict = {}
    if recipe is not None and recipe.kind == "refit" and is_streamed(model):
        raise PgpruneError(f"{masks_dir}: refit masks are evaluated with the model in memory; set model.offload: none "
                           "and model.device_map: none for this evaluation")
    if is_streamed(model):
        from pgprune.core.masked_forward import MaskedModel
        from pgprune.io import load_tensors

        means = None
        if extra is not None:
            means = load_tensors(Path(masks_dir) / "compensation_means.safetensors", "compensation means")
        masked = MaskedModel(model)
        masked.set_compensation(means)
        out = {"ppl": {n: perplexity(masked, b, masks=masks, batch_size=params.eval.ppl_batch_size)["ppl"]
                       for n, b in evals.items()}, "zero_shot": None, "tokens_per_s": None,
               "note": "streamed model (model.offload/device_map): perplexity only"}
    else:
        pruned = model
        if masks_dir is not None:
            src, extra_src = compensated_source(model, masks, extra, recipe, calib)
            pruned = slice_model(src, masks, extra_bias=extra_src)
            del src
        out = evaluate(pruned, tokenizer, evals, tasks_dir, params)
        del pruned
        seeds = {}
        seen = [(masks, extra, out["ppl"])]  # a seed whose masks and biases equal ones measured reuses the figures
        for seed, (m, x) in (seed_results(masks_dir, layout).items() if masks_dir is not None else []):
            same = next((ppl for m2, x2, ppl in seen if _same_cell(m, x, m2, x2)), None)
            if same is not None:
                seeds[seed] = dict(same)
                continue
            src, x_src = compensated_source(model, m, x, recipe, calib)
            other = slice_model(src, m, extra_bias=x_src)
            del src
            seeds[seed] = {n: perplexity(other, b, batch_size=params.eval.ppl_batch_size)["ppl"]
                           for n, b in evals.items()}
            seen.append((m, x, seeds[seed]))
            del other
        if seeds:
            out["seed_ppl"] = seeds
    out["params"] = sparsity_report(layout, masks, out_bias=extra is not None or (recipe is not None and
                                                                                recipe.kind == "refit"))
    if recipe is not None:
        out["compensation"] = recipe.kind
    if masks_dir is not None and params.eval.curve_blocks:  # a search's quality vs cost
        corpus, blocks = next(iter(evals.items()))
        curve = trajectory_curve(model, masks_dir, blocks[:params.eval.curve_blocks], params.eval.ppl_batch_size,
                                 params.model.device)
        if curve:
            out["curve"] = {"corpus": corpus, "blocks": min(len(blocks), params.eval.curve_blocks), "points": curve}
    return out


def _same_cell(m1: Masks, x1: dict | None, m2: Masks, x2: dict | None) -> bool:
    """The same masks and the same compensation biases (so the same sliced model, the same figures)."""
    if m1.to_json() != m2.to_json() or (x1 is None) != (x2 is None):
        return False
    if x1 is None:
        return True
    return x1.keys() == x2.keys() and all(d.keys() == x2[i].keys() and all(torch.equal(v, x2[i][k])
                                                                         for k, v in d.items())
                                          for i, d in x1.items())


def curve_points(points: list[dict], ppl_fn, every: int = 1) -> list[dict]:
    """Quality vs cost records of a search's validated masks (at steps that are multiples of ``every``; 0: none):
    step, sampled-mask forwards, validated loss, seconds when recorded, and ``ppl_fn(masks)``."""
    return [{"step": t["step"], "forward_passes": t["forward_passes"], "val_loss": t["val_loss"]}
            | ({"elapsed_s": t["elapsed_s"]} if "elapsed_s" in t else {}) | {"ppl": ppl_fn(t["masks"])}
            for t in points if every and t["step"] % every == 0]


def trajectory_curve(model, masks_dir: str | Path, blocks: torch.Tensor, batch_size: int, device: str = "cpu"
                     ) -> list[dict]:
    """Quality vs cost of a search: the perplexity on ``blocks`` of each validated mask it recorded, with the
    search's step, sampled-mask forwards and validated loss (mean-compensated like the sliced model)."""
    from pgprune.core.masked_forward import MaskedModel
    from pgprune.eval.perplexity import perplexity

    masked = MaskedModel(model)
    points, means = load_trajectory(masks_dir, masked.layout)
    masked.set_compensation(means)
    return curve_points(points, lambda m: perplexity(masked, blocks, masks=m, batch_size=batch_size,
                                                      device=device)["ppl"])


__all__ = ["local_task_names", "evaluate", "evaluate_masks", "curve_points", "trajectory_curve"]
