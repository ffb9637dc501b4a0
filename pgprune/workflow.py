"""Library functions behind the pipeline stages and the `pgprune` command (stages only parse params, call these and
write outputs).

Masks are the hand-off between the steps: :func:`method_masks` turns (method, sparsity) into ``Masks`` plus the
mean-compensation biases the pruned model gets; :func:`save_masks` / :func:`load_masks` store them as
``masks.json`` + ``compensation.safetensors`` (byte-reproducible: same inputs, same bytes); the evaluation and the
export only slice what they are given.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pgprune.allocation import masks_from_scores
from pgprune.config import Params
from pgprune.errors import MissingFileError, PgpruneError
from pgprune.masks import Masks, sparsity_report
from pgprune.methods import METHODS, get_method

log = logging.getLogger("pgprune")

CHECKPOINT_DIR_ENV = "PGPRUNE_CHECKPOINT_DIR"
DEFAULT_CHECKPOINT_DIR = "artifacts/checkpoints"


def setup_torch(params: Params) -> None:
    if params.model.threads:
        torch.set_num_threads(params.model.threads)


def checkpoint_dir(default: str | Path = DEFAULT_CHECKPOINT_DIR) -> Path:
    """Where search checkpoints live: $PGPRUNE_CHECKPOINT_DIR, else ``default`` (never a DVC output)."""
    return Path(os.environ.get(CHECKPOINT_DIR_ENV) or default)


# --- model ---------------------------------------------------------------------------------------------------
def save_tokenizer(model_dir: str | Path, out_dir: str | Path) -> Path:
    """Save the base model's tokenizer on its own (the data stage depends on it, not on the weights)."""
    from transformers import AutoTokenizer

    from pgprune.io import atomic_dir
    from pgprune.models import resolve

    tok = AutoTokenizer.from_pretrained(resolve(model_dir))
    with atomic_dir(out_dir) as tmp:
        tok.save_pretrained(tmp)
    return Path(out_dir)


# --- data ---------------------------------------------------------------------------------------------------
def corpus_texts(params: Params) -> tuple[str, dict[str, str]]:
    """(calibration text, {eval corpus name: held-out text})."""
    from pgprune.data import load_hub_text
    from pgprune.data.corpus import interleave, license_text, load_local_corpus

    d = params.data
    local = None
    if d.calibration == "local" or "local" in d.evaluation:
        local = load_local_corpus(d.local_sources, d.heldout_fraction, d.seed)
    max_chars = d.calib_blocks * d.seq_len * 8
    if d.calibration == "local":
        calib = interleave({s: v["calibration"] for s, v in local.items()}, d.seed)
    else:
        calib = load_hub_text(d.calibration, "train", data_files=d.data_files.get(d.calibration), max_chars=max_chars)
    evals = {}
    for name in d.evaluation:
        if name == "local":
            evals["local"] = interleave({s: v["heldout"] for s, v in local.items()}, d.seed)
        elif name == "licenses":
            evals["licenses"] = license_text()
        else:
            split = "validation" if name == "c4" else "test"
            evals[name] = load_hub_text(name, split, data_files=d.data_files.get(name),
                                        max_chars=params.eval.ppl_blocks * d.seq_len * 8 if name == "c4" else None)
    return calib, evals


def prepare_data(params: Params, tokenizer, out_dir: str | Path) -> dict:
    """Write calib.safetensors, eval/<corpus>.txt, tasks/ (offline lm-eval tasks over the held-out text) and
    stats.json: everything deterministic, so a rerun gives the same bytes."""
    from pgprune.data import calibration_blocks
    from pgprune.eval.local_tasks import write_local_tasks
    from pgprune.io import save_tensors, write_json, write_text

    d = params.data
    out = Path(out_dir)
    calib_text, evals = corpus_texts(params)
    calib = calibration_blocks(calib_text, tokenizer, d.seq_len, d.calib_blocks, d.seed)
    save_tensors(out / "calib.safetensors", {"blocks": calib})
    stats = {"calibration": {"source": d.calibration, "chars": len(calib_text), "blocks": list(calib.shape)},
             "evaluation": {}}
    for name, text in evals.items():
        # held-out text is stored as text: the evaluation tokenizes it with its own eval.ppl_seq_len, so that
        # changing an eval parameter reruns only the evaluation
        write_text(out / "eval" / f"{name}.txt", text)
        stats["evaluation"][name] = {"chars": len(text)}
    if "local" in evals:
        tasks = write_local_tasks({"heldout": evals["local"]}, out / "tasks", n_items=d.zero_shot_items, seed=d.seed)
        stats["local_tasks"] = tasks
    write_json(out / "stats.json", stats)
    return stats


def load_calibration(data_dir: str | Path) -> torch.Tensor:
    """The calibration blocks [n, seq_len] written by the data stage."""
    from pgprune.io import load_tensors

    blocks = load_tensors(Path(data_dir) / "calib.safetensors", "calibration blocks (data stage)")["blocks"]
    if blocks.dim() != 2 or blocks.dtype != torch.long:
        raise PgpruneError(f"calibration blocks in {data_dir} have shape {tuple(blocks.shape)} / {blocks.dtype}; "
                           "expected int64 [n, seq_len]; rerun the data stage")
    return blocks


def load_eval_data(data_dir: str | Path, tokenizer, params: Params) -> tuple[dict[str, torch.Tensor], Path]:
    """({eval corpus: blocks of eval.ppl_seq_len tokens (the first eval.ppl_blocks)}, tasks folder)."""
    from pgprune.data import tokenize_blocks

    data = Path(data_dir)
    order = {name: i for i, name in enumerate(params.data.evaluation)}  # data.evaluation's order, then the rest
    texts = sorted((data / "eval").glob("*.txt"), key=lambda p: (order.get(p.stem, len(order)), p.stem))
    if not texts:
        raise MissingFileError(f"no held-out evaluation text in {data / 'eval'}; run the data stage")
    evals = {p.stem: tokenize_blocks(p.read_text(encoding="utf-8"), tokenizer, params.eval.ppl_seq_len,
                                     max_blocks=params.eval.ppl_blocks) for p in texts}
    return evals, data / "tasks"


# --- scores ----------------------------------------------------------------------------------------------------
def compute_all_scores(params: Params, model, calib: torch.Tensor, scorers=None, progress: bool = True
                       ) -> tuple[dict, dict]:
    """{scorer: its importance scores} for ``scorers`` (default init.scorers), and the seconds each took."""
    from pgprune.scorers import compute_scores

    n = min(params.init.nsamples, calib.shape[0])
    scores, timing = {}, {}
    for name in scorers or params.init.scorers:
        t0 = time.perf_counter()
        opts = {"seed": params.init.seed} if name == "random" else {}
        if name == "flap":
            opts["bias_compensation"] = params.init.flap_bias_compensation
        opts["progress"] = progress
        scores[name] = compute_scores(name, model, calib[:n], batch_size=params.init.batch_size, **opts)
        timing[name] = time.perf_counter() - t0
        log.info("scorer %s: %.1fs", name, timing[name])
    return scores, timing


def scorers_needed(method: str, params: Params) -> list[str]:
    """The scorers a method needs: its own metric, or the search's init metric (+ flap for compensation)."""
    m = get_method(method)
    need = [m.scorer] if m.kind == "metric" else [params.search.init]
    if (m.kind == "search" and params.search.bias_compensation) or (m.compensated and
                                                                      params.init.flap_bias_compensation):
        need.append("flap")
    return list(dict.fromkeys(need))


# --- masks -------------------------------------------------------------------------------------------------------
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


def compensation_biases(model, masks: Masks, flap_scores: dict) -> dict[int, dict[str, torch.Tensor]]:
    """FLAP bias compensation for ``masks``: {layer: {"o_proj"|"down_proj": bias to add}}."""
    from pgprune.scorers.flap import as_extra_bias, flap_compensation_biases

    if "bias" not in flap_scores:
        raise PgpruneError("FLAP scores were computed without bias compensation; set init.flap_bias_compensation")
    return as_extra_bias(flap_compensation_biases(model, masks, flap_scores))


def search_compensation(params: Params, all_scores: dict) -> dict | None:
    """The calibration means the search compensates with (None when search.bias_compensation is off)."""
    if not params.search.bias_compensation:
        return None
    flap = all_scores.get("flap", {})
    if "bias" not in flap:
        raise PgpruneError("search.bias_compensation needs the flap scorer's calibration means (init scores "
                           "computed with init.flap_bias_compensation: true); rerun the init stage")
    return flap["bias"]


def metric_masks(method: str, layout, scores: dict, sparsity: float, params: Params,
                 layout_kind: str = "heterogeneous", round_to: int = 1) -> Masks:
    """Masks of a metric baseline at ``sparsity``, by the registry's scorer/allocation/granularity."""
    m = get_method(method)
    if m.kind != "metric":
        raise PgpruneError(f"{method!r} is a search method, not a metric baseline")
    if m.scorer not in scores:
        raise PgpruneError(f"method {method!r} needs the scorer {m.scorer!r}; scores exist for {sorted(scores)}")
    return masks_from_scores(layout, scores[m.scorer], sparsity, allocation=m.allocation, granularity=m.granularity,
                             min_heads_per_layer=params.search.min_heads_per_layer,
                             layout_kind=layout_kind if m.granularity != ("layers",) else "heterogeneous",
                             round_to=round_to)


def method_masks(method: str, model, calib: torch.Tensor, scores: dict, params: Params, sparsity: float, *,
                 seeds: list[int] | None = None, layout_kind: str | None = None, round_to: int = 1,
                 checkpoint_root: str | Path | None = None, progress: bool = True) -> MethodResult:
    """Masks (and compensation) of ``method`` at ``sparsity``. Search methods run one search per seed (default
    search.seeds; the first seed's masks are the result). ``layout_kind`` overrides the method's layout (the
    `pgprune prune --layout` option); ``round_to`` rounds a uniform metric layout's channels."""
    from pgprune.adapters import get_adapter
    from pgprune.pg_prune import run_pg_search

    m = get_method(method)
    layout = get_adapter(model).layout()
    kind = layout_kind or m.layout
    t0 = time.perf_counter()
    if m.kind == "metric":
        masks = metric_masks(method, layout, scores, sparsity, params, kind, round_to)
        extra, means = None, None
        if m.compensated and params.init.flap_bias_compensation:
            extra = compensation_biases(model, masks, scores["flap"])
            means = scores["flap"]["bias"]
        return MethodResult(method, sparsity, masks, extra, {"time_s": time.perf_counter() - t0, "layout": kind},
                            compensation_means=means)
    p = params.search.at(sparsity, kind)
    comp = search_compensation(params, scores)
    if p.init not in scores:
        raise PgpruneError(f"search.init={p.init!r} scores are missing; computed scorers: {sorted(scores)}")
    seeds = list(seeds or p.seeds)
    # the settings this cell ran with (search.at_sparsity resolved), less the knobs that only place the work
    settings = p.model_dump(mode="json", exclude={"seeds", "at_sparsity", "devices", "sample_mode",
                                                   "checkpoint_every"})
    outcomes, info = [], {"seeds": {}, "layout": kind, "device": params.model.device, "settings": settings}
    for i, seed in enumerate(seeds):
        out = run_pg_search(model, calib, scores[p.init], p, sparsity=sparsity, layout=kind, seed=seed,
                            checkpoint_dir=checkpoint_root, device=params.model.device, progress=progress,
                            compensation=comp, record_trajectory=i == 0)
        r = out.result
        info["seeds"][str(seed)] = {
            "time_s": r.elapsed_s, "resumed_from_step": r.resumed_from, "steps": r.steps_done,
            "forward_passes": r.forward_passes, "best_step": r.best_step,
            "best_val_loss": min((v["val_loss"] for v in r.validation), default=None),
            "init_val_loss": r.validation[0]["val_loss"] if r.validation else None}
        outcomes.append(out)
    per_seed = {o.seed: (o.masks, compensation_biases(model, o.masks, scores["flap"]) if comp is not None else None)
                for o in outcomes}
    main = outcomes[0]
    info["time_s"] = sum(v["time_s"] for v in info["seeds"].values())
    info["trajectory_s"] = [t["elapsed_s"] for t in main.trajectory]
    return MethodResult(method, sparsity, main.masks, per_seed[main.seed][1], info, history=main.result.history,
                        seeds=per_seed, trajectory=main.trajectory, compensation_means=comp)


# --- the hand-off: masks.json + compensation.safetensors ------------------------------------------------------
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
               "compensated": result.extra_bias is not None, "seeds": [int(s) for s in result.seeds] or None,
               "params": sparsity_report(layout, result.masks, out_bias=result.extra_bias is not None)}
    if "settings" in result.info:
        summary["search_settings"] = result.info["settings"]
    if "seeds" in result.info:
        summary["search"] = {s: {k: v for k, v in d.items() if k in ("steps", "forward_passes", "best_step",
                                                                     "best_val_loss", "init_val_loss")}
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


# --- evaluation ----------------------------------------------------------------------------------------------
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
                   tasks_dir: Path | None, params: Params) -> dict:
    """The evaluation of one masks cell (or of the dense model when ``masks_dir`` is None).

    In memory: the masks are sliced out (with their compensation biases) and the physically smaller model is
    evaluated (perplexity, zero-shot, speed), plus the perplexity of every extra seed's masks. Streamed
    (model.offload / device_map): perplexity through the layer-major executor with the masks and compensation
    means applied (equal to the sliced model's), and no zero-shot or speed (they need the model in memory)."""
    from pgprune.adapters import get_adapter
    from pgprune.eval import perplexity
    from pgprune.slicing import slice_model
    from pgprune.weights import is_streamed

    layout = get_adapter(model).layout()
    masks, extra = load_masks(masks_dir, layout) if masks_dir is not None else (Masks.full(layout), None)
    out: dict = {}
    if is_streamed(model):
        from pgprune.io import load_tensors
        from pgprune.masked_forward import MaskedModel

        means = None
        if extra is not None:
            means = load_tensors(Path(masks_dir) / "compensation_means.safetensors", "compensation means")
        masked = MaskedModel(model)
        masked.set_compensation(means)
        out = {"ppl": {n: masked.perplexity(b, masks=masks, batch_size=params.eval.ppl_batch_size)["ppl"]
                       for n, b in evals.items()}, "zero_shot": None, "tokens_per_s": None,
               "note": "streamed model (model.offload/device_map): perplexity only"}
    else:
        pruned = slice_model(model, masks, extra_bias=extra) if masks_dir is not None else model
        out = evaluate(pruned, tokenizer, evals, tasks_dir, params)
        del pruned
        seeds = {}
        for seed, (m, x) in (seed_results(masks_dir, layout).items() if masks_dir is not None else []):
            other = slice_model(model, m, extra_bias=x)
            seeds[seed] = {n: perplexity(other, b, batch_size=params.eval.ppl_batch_size)["ppl"]
                           for n, b in evals.items()}
            del other
        if seeds:
            out["seed_ppl"] = seeds
    out["params"] = sparsity_report(layout, masks, out_bias=extra is not None)
    if masks_dir is not None and params.eval.curve_blocks:  # a search's quality vs cost
        corpus, blocks = next(iter(evals.items()))
        curve = trajectory_curve(model, masks_dir, blocks[:params.eval.curve_blocks], params.eval.ppl_batch_size,
                                 params.model.device)
        if curve:
            out["curve"] = {"corpus": corpus, "blocks": min(len(blocks), params.eval.curve_blocks), "points": curve}
    return out


def masked_ppl(masked, blocks: torch.Tensor, masks, batch_size: int, device: str = "cpu") -> float:
    """exp of the block-mean LM loss of ``masked`` (a MaskedModel) under ``masks`` on ``blocks`` [n, T]."""
    import math

    total = 0.0
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i:i + batch_size].to(device)  # [b, T]
        total += masked.loss(ids, masks, validate=False) * ids.shape[0]
    return math.exp(total / blocks.shape[0])


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
    from pgprune.masked_forward import MaskedModel

    masked = MaskedModel(model)
    points, means = load_trajectory(masks_dir, masked.layout)
    masked.set_compensation(means)
    return curve_points(points, lambda m: masked_ppl(masked, blocks, m, batch_size, device))


__all__ = ["METHODS", "MethodResult", "checkpoint_dir", "compensation_biases", "compute_all_scores",
           "corpus_texts", "evaluate", "evaluate_masks", "history_csv", "load_calibration", "load_eval_data", "load_masks",
           "method_masks", "metric_masks", "prepare_data", "save_masks", "scorers_needed", "search_compensation",
           "load_trajectory", "seed_results", "setup_torch",
           "curve_points", "masked_ppl", "trajectory_curve"]


# =====================================================================================================================
# The `pgprune` command and the Python API (pgprune/cli.py, pgprune/api.py): text sources by name or file.
# (Added for issue 10; the functions above are unchanged. corpus_texts could read its texts through named_text.)
# =====================================================================================================================
from pgprune.errors import ConfigError  # noqa: E402

HUB_TEXTS = ("wikitext2", "c4", "ptb")
CALIBRATION_SOURCES = (*HUB_TEXTS, "local")
EVAL_SOURCES = (*HUB_TEXTS, "local", "licenses")
TEXT_FILE_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json")


def read_text_file(path: str | Path, field_name: str = "text") -> str:
    """The text of a local file: ``.txt``/``.text``/``.md`` as is; ``.jsonl`` (one JSON record per line) or ``.json``
    (a list of records, or one record) joined from each record's ``field_name`` with blank lines between records.
    Errors name the file and what is wrong."""
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"text file '{p}' not found")
    suffix = p.suffix.lower()
    if suffix not in TEXT_FILE_SUFFIXES:
        raise PgpruneError(f"text file '{p}' has the extension '{suffix or '(none)'}'; allowed: "
                           f"{', '.join(TEXT_FILE_SUFFIXES)} (.jsonl/.json: records with a '{field_name}' field)")
    raw = p.read_text(encoding="utf-8")
    if suffix not in (".jsonl", ".json"):
        text = raw
    else:
        try:
            if suffix == ".jsonl":
                records = [json.loads(line) for line in raw.splitlines() if line.strip()]
            else:
                doc = json.loads(raw)
                records = doc if isinstance(doc, list) else [doc]
        except json.JSONDecodeError as e:
            raise PgpruneError(f"'{p}' is not valid {suffix[1:].upper()}: {e}") from None
        bad = [i for i, r in enumerate(records) if not (isinstance(r, dict) and isinstance(r.get(field_name), str))]
        if bad:
            raise PgpruneError(f"'{p}': record {bad[0] + 1} has no string field '{field_name}' (each record must be "
                               f'an object like {{"{field_name}": "..."}})')
        text = "\n\n".join(r[field_name] for r in records)
    if not text.strip():
        raise PgpruneError(f"text file '{p}' holds no text")
    return text


def is_text_file_name(source: str) -> bool:
    return Path(str(source)).suffix.lower() in TEXT_FILE_SUFFIXES


def named_text(source: str, params: Params, purpose: str = "calibration") -> tuple[str, str]:
    """(text, description) of a text source for ``purpose`` "calibration" (the train split / calibration part) or
    "evaluation" (the test split, C4's validation shard / the held-out part): ``wikitext2`` | ``c4`` | ``ptb`` (the
    hub, or params.data.data_files[name] offline), ``local`` (the embedded Debian corpus), ``licenses``
    (evaluation only) or the path of a text/jsonl file (:func:`read_text_file`)."""
    from pgprune.data import load_hub_text

    d = params.data
    allowed = CALIBRATION_SOURCES if purpose == "calibration" else EVAL_SOURCES
    name = str(source)
    if name in allowed:
        if name == "local":
            from pgprune.data.corpus import interleave, load_local_corpus

            local = load_local_corpus(d.local_sources, d.heldout_fraction, d.seed)
            part = "calibration" if purpose == "calibration" else "heldout"
            return (interleave({s: v[part] for s, v in local.items()}, d.seed),
                    f"local ({'+'.join(d.local_sources)}, {'calibration' if part == 'calibration' else 'held-out'} "
                    "documents)")
        if name == "licenses":
            from pgprune.data.corpus import license_text

            return license_text(), "licenses (/usr/share/common-licenses)"
        if purpose == "calibration":
            split, max_chars = "train", d.calib_blocks * d.seq_len * 8
        else:
            split = "validation" if name == "c4" else "test"
            max_chars = params.eval.ppl_blocks * params.eval.ppl_seq_len * 8 if name == "c4" else None
        text = load_hub_text(name, split, data_files=d.data_files.get(name), max_chars=max_chars)
        return text, f"{name} ({split} split{', local files' if name in d.data_files else ''})"
    p = Path(name)
    if p.is_file() or is_text_file_name(name):
        return read_text_file(p), f"text file {p.name}"
    raise ConfigError(f"{purpose} source {name!r} is neither a corpus nor a file; allowed: {', '.join(allowed)} or "
                      f"the path of a {'/'.join(TEXT_FILE_SUFFIXES)} file")


def text_calibration_blocks(text: str, tokenizer, params: Params) -> torch.Tensor:
    """data.calib_blocks random windows of data.seq_len tokens of ``text`` (seed data.seed) [n, seq_len]."""
    from pgprune.data import calibration_blocks

    d = params.data
    return calibration_blocks(text, tokenizer, d.seq_len, d.calib_blocks, d.seed)


def source_calibration(source: str, tokenizer, params: Params) -> tuple[torch.Tensor, str]:
    """(calibration blocks [data.calib_blocks, data.seq_len], description) of a named corpus or text file."""
    text, desc = named_text(source, params, "calibration")
    blocks = text_calibration_blocks(text, tokenizer, params)
    return blocks, f"{desc}: {blocks.shape[0]} blocks of {blocks.shape[1]} tokens"


def eval_blocks(source: str, tokenizer, params: Params) -> tuple[torch.Tensor, str]:
    """(the first eval.ppl_blocks non-overlapping blocks of eval.ppl_seq_len tokens, description) of a named corpus
    or a text file (the evaluation split / held-out part)."""
    from pgprune.data import tokenize_blocks

    text, desc = named_text(source, params, "evaluation")
    return tokenize_blocks(text, tokenizer, params.eval.ppl_seq_len, max_blocks=params.eval.ppl_blocks), desc


def find_checkout(start: str | Path | None = None) -> Path | None:
    """The pgprune checkout (a folder with dvc.yaml, params.yaml and stages/) holding ``start`` (default: the
    current folder), or None."""
    here = Path(start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file() and (d / "params.yaml").is_file() and (d / "stages").is_dir():
            return d
    return None


__all__ += ["CALIBRATION_SOURCES", "EVAL_SOURCES", "eval_blocks", "find_checkout", "named_text", "read_text_file",
            "source_calibration", "text_calibration_blocks"]
