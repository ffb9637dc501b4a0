"""Library functions behind the pipeline stages (the stages only parse params, call these, write outputs)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from pgprune.allocation import masks_from_scores
from pgprune.config import Params
from pgprune.errors import MissingFileError, PgpruneError, require_file
from pgprune.masks import Masks, sparsity_report

log = logging.getLogger("pgprune")

# the allocation of each baseline: the same sparsity in every layer. For FLAP that is its UL-UM variant, which on
# the embedded SmolLM2 beats its global AL-AM variant (held-out ppl 278 vs 506 at 50%), so the comparison uses
# the stronger one. Wanda-sp, LLM-Pruner's Taylor, magnitude and random use it in their own papers.
BASELINE_ALLOCATION = {"wanda_sp": "uniform", "flap": "uniform", "magnitude": "uniform", "taylor": "uniform",
                       "random": "uniform"}


def setup_torch(params: Params) -> None:
    if params.model.threads:
        torch.set_num_threads(params.model.threads)


# --- data ---------------------------------------------------------------------------------------------------
def corpus_texts(params: Params) -> tuple[str, dict[str, str]]:
    """(calibration text, {eval corpus name: held-out text})."""
    from pgprune.data import load_hub_text
    from pgprune.data.corpus import interleave, load_local_corpus

    d = params.data
    local = None
    if d.calibration == "local" or "local" in d.evaluation:
        local = load_local_corpus(d.local_sources, d.heldout_fraction, d.seed)
    max_chars = d.calib_blocks * d.seq_len * 8
    if d.calibration == "local":
        calib = interleave({s: v["calibration"] for s, v in local.items()}, d.seed)
    else:
        split = "train"
        calib = load_hub_text(d.calibration, split, data_files=d.data_files.get(d.calibration), max_chars=max_chars)
    evals = {}
    for name in d.evaluation:
        if name == "local":
            evals["local"] = interleave({s: v["heldout"] for s, v in local.items()}, d.seed)
        else:
            split = "validation" if name == "c4" else "test"
            evals[name] = load_hub_text(name, split, data_files=d.data_files.get(name),
                                        max_chars=d.eval_blocks * d.seq_len * 8 if name == "c4" else None)
    return calib, evals


def prepare_data(params: Params, tokenizer, out_dir: str | Path) -> dict:
    """Write calib.pt, eval/<corpus>.pt, tasks/ (offline lm-eval tasks over the held-out text) and stats.json."""
    from pgprune.data import calibration_blocks, tokenize_blocks
    from pgprune.eval.local_tasks import write_local_tasks
    from pgprune.io import torch_save, write_json

    d = params.data
    out = Path(out_dir)
    calib_text, evals = corpus_texts(params)
    calib = calibration_blocks(calib_text, tokenizer, d.seq_len, d.calib_blocks, d.seed)
    torch_save(calib, out / "calib.pt")
    stats = {"calibration": {"source": d.calibration, "chars": len(calib_text), "blocks": list(calib.shape)},
             "evaluation": {}}
    from pgprune.io import write_text

    for name, text in evals.items():
        # held-out text is stored as text: the evaluation tokenizes it with its own eval.ppl_seq_len, so that
        # changing an eval parameter reruns only the evaluation
        write_text(out / "eval" / f"{name}.txt", text)
        probe = tokenize_blocks(text, tokenizer, d.seq_len, max_blocks=d.eval_blocks)
        stats["evaluation"][name] = {"chars": len(text), "blocks_at_data_seq_len": list(probe.shape)}
    if "local" in evals:
        tasks = write_local_tasks({"heldout": evals["local"]}, out / "tasks", n_items=d.zero_shot_items, seed=d.seed)
        stats["local_tasks"] = tasks
    write_json(out / "stats.json", stats)
    return stats


def load_data(data_dir: str | Path, tokenizer=None, params: Params | None = None
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor], Path]:
    """(calibration blocks, {eval corpus: blocks of eval.ppl_seq_len tokens}, tasks folder).

    Without a tokenizer the evaluation blocks are not built (an empty dict)."""
    from pgprune.data import tokenize_blocks

    data = Path(data_dir)
    calib = torch.load(require_file(data / "calib.pt", "calibration blocks"))
    texts = sorted((data / "eval").glob("*.txt"))
    if not texts:
        raise MissingFileError(f"no held-out evaluation text in {data / 'eval'}; run the data stage")
    evals = {}
    if tokenizer is not None:
        seq_len = params.eval.ppl_seq_len if params else 128
        max_blocks = params.data.eval_blocks if params else None
        evals = {p.stem: tokenize_blocks(p.read_text(encoding="utf-8"), tokenizer, seq_len, max_blocks=max_blocks)
                 for p in texts}
    return calib, evals, data / "tasks"


# --- scores and masks ----------------------------------------------------------------------------------------
def compute_all_scores(params: Params, model, calib: torch.Tensor) -> tuple[dict, dict]:
    from pgprune.scorers import compute_scores

    n = min(params.init.nsamples, calib.shape[0])
    scores, timing = {}, {}
    for name in params.init.scorers:
        t0 = time.perf_counter()
        opts = {"seed": params.init.seed} if name == "random" else {}
        if name == "flap":
            opts["bias_compensation"] = params.init.flap_bias_compensation
        scores[name] = compute_scores(name, model, calib[:n], batch_size=params.init.batch_size, **opts)
        timing[name] = time.perf_counter() - t0
        log.info("scorer %s: %.1fs", name, timing[name])
    return scores, timing


def baseline_masks(method: str, layout, scores: dict, sparsity: float, params: Params) -> Masks:
    """Masks of a metric baseline at ``sparsity`` (layer_drop: ShortGPT block influence, whole layers)."""
    if method == "layer_drop":
        if "shortgpt" not in scores:
            raise PgpruneError("layer_drop needs the 'shortgpt' scorer in init.scorers")
        return masks_from_scores(layout, scores["shortgpt"], sparsity, granularity=("layers",))
    if method not in BASELINE_ALLOCATION:
        raise PgpruneError(f"unknown baseline {method!r}; allowed: {sorted(BASELINE_ALLOCATION) + ['layer_drop']}")
    if method not in scores:
        raise PgpruneError(f"baseline {method!r} needs the scorer {method!r} in init.scorers={sorted(scores)}")
    return masks_from_scores(layout, scores[method], sparsity, allocation=BASELINE_ALLOCATION[method],
                             min_heads_per_layer=params.search.min_heads_per_layer)


# --- evaluation ----------------------------------------------------------------------------------------------
def local_task_names(tasks_dir: Path) -> list[str]:
    manifest = tasks_dir / "manifest.json"
    if not manifest.exists():
        raise MissingFileError(f"no local zero-shot tasks at {tasks_dir} (data.evaluation must include 'local')")
    return sorted(json.loads(manifest.read_text())["tasks"])


def evaluate(model, tokenizer, evals: dict[str, torch.Tensor], tasks_dir: Path, params: Params, *,
             zero_shot: bool = True, speed: bool = True) -> dict:
    """Perplexity on every eval corpus, lm-eval zero-shot average, generation tokens/s."""
    from pgprune.eval import generation_speed, perplexity, zero_shot as run_zero_shot

    e = params.eval
    out: dict = {"ppl": {}, "zero_shot": None, "tokens_per_s": None}
    t0 = time.perf_counter()
    for name, blocks in evals.items():
        out["ppl"][name] = perplexity(model, blocks, batch_size=e.ppl_batch_size, progress=True)["ppl"]
    out["ppl_time_s"] = time.perf_counter() - t0
    if zero_shot and e.zero_shot_tasks:
        tasks, include = [], None
        for t in e.zero_shot_tasks:
            if t == "local":
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


def params_summary(layout, masks: Masks) -> dict:
    return sparsity_report(layout, masks)


def search_compensation(params: Params, all_scores: dict) -> dict | None:
    """The calibration means the search compensates with (None when search.bias_compensation is off)."""
    if not params.search.bias_compensation:
        return None
    flap = all_scores.get("flap", {})
    if "bias" not in flap:
        raise PgpruneError("search.bias_compensation needs artifacts/init/scores.pt from the flap scorer with "
                           "init.flap_bias_compensation: true; rerun the init stage")
    return flap["bias"]


def compensation_biases(model, masks: Masks, flap_scores: dict) -> dict[int, dict[str, torch.Tensor]]:
    """FLAP bias compensation for ``masks``: {layer: {"o_proj"|"down_proj": bias to add}}."""
    from pgprune.scorers.flap import as_extra_bias, flap_compensation_biases

    if "bias" not in flap_scores:
        raise PgpruneError("FLAP scores were computed without bias compensation; set init.flap_bias_compensation")
    return as_extra_bias(flap_compensation_biases(model, masks, flap_scores))
