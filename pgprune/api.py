"""The Python API: one call prunes a loaded model and returns the physically smaller model, in memory.

# --- example ---
import pgprune
from transformers import AutoModelForCausalLM, AutoTokenizer

name = "HuggingFaceTB/SmolLM2-135M"  # a hub id or a local folder
model, tokenizer = AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name)
result = pgprune.prune(model, tokenizer, sparsity=0.3, method="pg", calibration="wikitext2")
print(result.info["params"])  # parameters before/after: decoder-layer linear weights and all weights
ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
print(tokenizer.decode(result.model.generate(ids, max_new_tokens=20)[0]))  # the smaller model, in memory
result.save("smollm2-pruned")  # weights, config, tokenizer, masks.json and a model card
# --- example ---

:func:`prune` runs the same library functions as the `pgprune prune` command and the pipeline's stages
(:func:`pgprune.scorers.compute.compute_all_scores` for the scorers the method needs, :func:`pgprune.pruning.run.method_masks`,
:func:`pgprune.hf.export.build_model`); its settings are the pipeline's params schema (:mod:`pgprune.config`), given as
``config`` (a params.yaml path, a dict or a :class:`~pgprune.config.Params`) and overridden by the keyword
arguments. Unlike LLM-Pruner's ``hf_prune.py`` or llm-compressor's ``oneshot``, the input model is left unchanged
(no weights are edited in place; the pruned model is a new module) and nothing is fine-tuned.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from pgprune.config import Params, load_params, parse_params
from pgprune.errors import ConfigError, PgpruneError

log = logging.getLogger("pgprune")



# --- parameters ------------------------------------------------------------------------------------------------
def _set(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    d = data
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[keys[-1]] = value


def build_params(config: str | Path | dict | Params | None = None, overrides: dict[str, Any] | None = None,
                 source: str | None = None) -> Params:
    """The params schema's settings from ``config`` (a params.yaml path, a dict or Params; None: the defaults) with
    ``overrides`` ({"search.steps": 20, ...}; None values are skipped; a search.* override also wins over
    search.at_sparsity), validated as a whole: errors name the key, the value and what is allowed."""
    if config is None:
        data: dict = {}
        where = "the defaults"
    elif isinstance(config, Params):
        data, where = config.model_dump(mode="json"), "config"
    elif isinstance(config, dict):
        data, where = copy.deepcopy(config), "config"
    elif isinstance(config, (str, Path)):
        data, where = load_params(config).model_dump(mode="json"), str(config)
    else:
        raise ConfigError(f"config must be a params.yaml path, a dict or pgprune.config.Params; got "
                          f"{type(config).__name__}")
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    for k, v in given.items():
        _set(data, k, v)
    params = parse_params(data, source or (where + (" with overrides " + ", ".join(given) if given else "")))
    explicit = [k.split(".", 1)[1] for k in given if k.startswith("search.")]
    if explicit and params.search.at_sparsity:
        params = params.model_copy(update={"search": params.search.without_rules_for(explicit)})
    return params


def check_sparsity(sparsity) -> float:
    try:
        s = float(sparsity)
    except (TypeError, ValueError):
        raise ConfigError(f"sparsity={sparsity!r} is not a number; allowed: 0 < sparsity < 1 (the fraction of "
                          "decoder-layer linear parameters removed)") from None
    if not 0 < s < 1:
        raise ConfigError(f"sparsity={sparsity!r} is not allowed; allowed: 0 < sparsity < 1 (the fraction of "
                          "decoder-layer linear parameters removed)")
    return s


def resolve_method(method: str, layout: str | None = None, round_to: int | None = None) -> tuple[str, str, str]:
    """(method, layout of its masks, export layout) for a method of :mod:`pgprune.methods` and the requested
    ``layout`` (None: the method's own; the export then picks the layout the masks allow, "auto").

    A search searches in the layout's constraints: ``pg`` with the uniform layout is ``pg_uniform``. A metric
    baseline with the uniform layout, or with ``round_to`` > 1, keeps the same (rounded) counts in every layer
    (the uniform-count allocation of :mod:`pgprune.core.allocation`)."""
    from pgprune.methods import LAYOUTS, get_method, search_method

    m = get_method(method)
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r} is not allowed; allowed: {', '.join(LAYOUTS)}")
    if round_to is not None and (not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1):
        raise ConfigError(f"round_to={round_to!r} is not allowed; allowed: an integer >= 1")
    if m.kind == "search":
        if layout is None or layout == m.layout:
            return m.name, m.layout, layout or "auto"
        if m.name != "pg":
            raise ConfigError(f"method {m.name!r} searches the {m.layout} layout, not layout={layout!r}; use "
                              f"method {search_method(layout)!r} (or leave the layout out)")
        return search_method(layout), layout, layout
    if m.granularity == ("layers",):  # whole layers: the kept ones have full widths (uniform already)
        return m.name, "heterogeneous", layout or "auto"
    kind = layout or ("uniform" if (round_to or 1) > 1 else m.layout)
    if (round_to or 1) > 1 and kind != "uniform":
        raise ConfigError(f"round_to={round_to} with the metric baseline {m.name!r} needs the uniform layout "
                          "(the same rounded widths in every layer); allowed: layout='uniform' or round_to=1")
    return m.name, kind, layout or "auto"


# --- calibration ------------------------------------------------------------------------------------------------
def calibration_from(calibration, tokenizer, params: Params) -> tuple[torch.Tensor, str]:
    """(calibration blocks [n, T], description) from: None (the config's data.calibration), a corpus name
    (wikitext2 | c4 | ptb | local), the path of a .txt/.jsonl/.json file, a string of text, a list of strings, or a
    LongTensor of token blocks [n, T] (used as is)."""
    from pgprune.data.sources import CALIBRATION_SOURCES, is_text_file_name, source_calibration, text_calibration_blocks

    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.long, torch.int32, torch.int64):
            raise ConfigError(f"calibration tensor must be token ids [n, seq_len] (integer dtype); got shape "
                              f"{tuple(calibration.shape)}, {calibration.dtype}")
        blocks = calibration.detach().long().cpu()
        return blocks, f"{blocks.shape[0]} blocks of {blocks.shape[1]} tokens (given as token ids)"
    if tokenizer is None:
        raise ConfigError("a tokenizer is needed to turn the calibration text into tokens (or give calibration as "
                          "a LongTensor of token blocks [n, seq_len])")
    if calibration is None:
        calibration = params.data.calibration
    if isinstance(calibration, Path):
        calibration = str(calibration)
    if isinstance(calibration, str):
        one_word = not any(c.isspace() for c in calibration)
        if calibration in CALIBRATION_SOURCES or _existing_file(calibration) or \
                (one_word and is_text_file_name(calibration)):
            return source_calibration(calibration, tokenizer, params)
        if one_word:
            raise ConfigError(f"calibration={calibration!r} is neither a corpus nor a file; allowed: "
                              f"{', '.join(CALIBRATION_SOURCES)}, the path of a text/jsonl file, a text, a list of "
                              "texts or a LongTensor of token blocks")
        text, what = calibration, f"given text ({len(calibration):,} characters)"
    elif isinstance(calibration, Sequence) and calibration and all(isinstance(t, str) for t in calibration):
        text, what = "\n\n".join(calibration), f"{len(calibration)} given texts"
    else:
        raise ConfigError(f"calibration of type {type(calibration).__name__} is not allowed; allowed: a corpus name "
                          f"({', '.join(CALIBRATION_SOURCES)}), a file path, a text, a list of texts or a "
                          "LongTensor [n, seq_len]")
    blocks = text_calibration_blocks(text, tokenizer, params)
    return blocks, f"{what}: {blocks.shape[0]} blocks of {blocks.shape[1]} tokens"


def _existing_file(s: str) -> bool:
    try:
        return "\n" not in s and Path(s).is_file()
    except (OSError, ValueError):  # a long text is no file name
        return False


# --- the result ------------------------------------------------------------------------------------------------
@dataclass
class PruneResult:
    """What :func:`prune` returns.

    ``model``: the physically smaller model (a stock transformers class for the uniform layout, pgprune's
    per-layer-width class otherwise), on the input model's device; ``masks``: the kept units of the input model
    (:class:`pgprune.core.masks.Masks`); ``extra_bias``: the compensation biases folded into o_proj/down_proj
    ({layer: {"o_proj"|"down_proj": bias}}, None without compensation: the mean compensation's, or the refit's);
    ``info``: method, sparsity, layout, compensation (none | bias | refit),
    parameter counts (``info["params"]``), sparsity report, calibration, times, search details. ``base`` (the input
    model, or with ``refit`` a copy of it holding the refit kept columns) and ``tokenizer`` are the inputs
    (``save`` slices nothing again; it needs ``base`` for the card's counts)."""

    model: torch.nn.Module
    masks: Any
    extra_bias: dict | None
    info: dict
    base: torch.nn.Module = field(repr=False)
    tokenizer: Any = field(default=None, repr=False)
    layout: str = "heterogeneous"  # the layout ``model`` has ("uniform" | "heterogeneous")

    def card(self, card=None):
        """The model card fields: what the prune knew (base model, method, sparsity, calibration), overridden by
        the non-empty fields of ``card`` (a :class:`pgprune.hf.card.CardInfo` or a dict of its fields)."""
        from pgprune.hf.card import CardInfo

        given = CardInfo.coerce(card)
        base = CardInfo(base_model=self.info.get("base_model"), method=self.info["method"],
                        sparsity=self.info["sparsity"], calibration=self.info.get("calibration"),
                        compensation=self.info.get("compensation"))
        changes = {f.name: getattr(given, f.name) for f in dataclasses.fields(given)
                   if getattr(given, f.name) not in (None, [], {})}
        return dataclasses.replace(base, **changes)

    def save(self, out_dir: str | Path, card=None, *, save_dtype=None, format: str = "hf", gguf_type: str = "f16"):
        """Save a self-contained folder (weights, config, tokenizer, masks.json, model card README.md;
        ``modeling_pgprune.py`` for the heterogeneous layout) with :func:`pgprune.hf.export.save_model`. ``card``:
        extra model-card fields (e.g. ``{"evaluation": ..., "repo_id": "me/model", "license": "apache-2.0"}``).
        ``format="gguf"``: also ``<out_dir>/model.gguf`` for llama.cpp (:func:`pgprune.hf.gguf.save_gguf`,
        ``gguf_type`` f32 | f16 | bf16 | q8_0). Returns :class:`pgprune.hf.export.ExportResult`."""
        from pgprune.hf.export import save_model

        check_format(format, gguf_type)
        pruned = self.model
        if next(pruned.parameters()).device.type != "cpu":
            pruned = None  # save_model builds a CPU copy again rather than moving this one
        saved = save_model(self.base, self.masks, out_dir, self.tokenizer, extra_bias=self.extra_bias,
                           layout=self.layout, card=self.card(card), save_dtype=save_dtype, pruned=pruned)
        if format == "gguf":
            write_gguf(self.model, out_dir, gguf_type)
        return saved

    def __repr__(self) -> str:
        p = self.info["params"]
        return (f"PruneResult(method={self.info['method']!r}, sparsity={self.info['sparsity']}, "
                f"layout={self.layout!r}, model={type(self.model).__name__}, "
                f"parameters {p['model_before']:,} -> {p['model_after']:,})")


def params_summary(report: dict, model_before: int, model_after: int) -> dict:
    """Parameter counts in both conventions from :func:`pgprune.core.masks.sparsity_report`."""
    return {"decoder_linear": {"before": report["prunable_params_dense"], "after": report["prunable_params_kept"],
                               "sparsity": report["prunable_sparsity"]},
            "total": {"before": report["total_params_dense"], "after": report["total_params_kept"],
                      "sparsity": report["total_sparsity"]},
            "model_before": model_before, "model_after": model_after}


# --- pruning ---------------------------------------------------------------------------------------------------
def _device_of(model) -> str:
    from pgprune.core.weights import main_device

    d = main_device(model)
    return "cpu" if d.type == "cpu" else str(d)


def run_prune(model, tokenizer, params: Params, *, method: str, sparsity: float, calib: torch.Tensor,
              calibration: str = "", layout: str | None = None, round_to: int | None = None,
              checkpoint_dir: str | Path | None = None, progress: bool = True, base_model: str | None = None,
              compensation: str | None = None) -> PruneResult:
    """Prune ``model`` with validated ``params`` and calibration blocks ``calib``: the scorers ``method`` needs
    (:func:`pgprune.pruning.run.scorers_needed`), its masks (:func:`pgprune.pruning.run.method_masks`, search
    checkpoints in ``checkpoint_dir``), their compensation (``compensation`` overrides the method's: none, bias,
    refit; :func:`pgprune.core.compensation.compensated_source`) and the smaller model
    (:func:`pgprune.hf.export.build_model`). The command line (`pgprune prune`) and :func:`prune` both end here."""
    from pgprune.core.adapters import get_adapter
    from pgprune.core.compensation import compensated_source
    from pgprune.core.masks import sparsity_report
    from pgprune.core.weights import is_streamed, main_device
    from pgprune.hf.export import build_model, n_params, plan_export
    from pgprune.pruning.run import method_masks, scorers_needed, setup_torch
    from pgprune.scorers import compute_all_scores

    t_start = time.perf_counter()
    sparsity = check_sparsity(sparsity)
    name, kind, export_layout = resolve_method(method, layout, round_to)
    lay = get_adapter(model).layout()  # unsupported architectures fail here
    _check_search_blocks(name, params, calib)
    setup_torch(params)
    needed = scorers_needed(name, params, compensation)
    log.info("pruning with %s at sparsity %s (%s layout): scorers %s", name, sparsity, kind, ", ".join(needed))
    seed = _announce_search(name, params, checkpoint_dir)
    t0 = time.perf_counter()
    scores, score_times = compute_all_scores(params.init, model, calib, scorers=needed, progress=progress)
    t_scores = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = method_masks(name, model, calib, scores, params, sparsity, layout_kind=kind, round_to=round_to or 1,
                       seeds=None if seed is None else [seed], checkpoint_root=checkpoint_dir, progress=progress,
                       compensation=compensation)
    t_method = time.perf_counter() - t0
    del scores
    t0 = time.perf_counter()
    source, extra = compensated_source(model, res.masks, res.extra_bias, res.recipe, calib, progress=progress,
                                       refit=res.refit)
    t_refit = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = plan_export(source, res.masks, extra, export_layout)
    pruned = build_model(source, res.masks, extra, layout=plan.layout)
    home = main_device(model)
    if home.type not in ("cpu", "meta") and not is_streamed(model):
        pruned = pruned.to(home)
    t_build = time.perf_counter() - t0
    report = sparsity_report(lay, res.masks, out_bias=extra is not None)
    sparsity_note = _uniform_sparsity_note(lay, res.masks, sparsity, kind, name, params, round_to)
    seeds = res.info.get("seeds") or {}
    info = {
        "method": name, "sparsity": sparsity, "layout": plan.layout, "mask_layout": kind,
        "architecture": plan.architecture, "trust_remote_code": plan.trust_remote_code,
        "base_model": base_model or getattr(model.config, "_name_or_path", None) or None,
        "calibration": calibration or None, "compensated": extra is not None, "compensation": res.recipe.kind,
        "params": params_summary(report, n_params(model), n_params(pruned)), "report": report,
        "scorers": needed, "time_s": {"scores": t_scores, "masks": t_method, "refit": t_refit, "build": t_build,
                                      "total": time.perf_counter() - t_start, "per_scorer": score_times},
        "resumed_from_step": max((s.get("resumed_from_step") or 0 for s in seeds.values()), default=0),
        "search_seed": seed, "seeds_not_run": params.search.seeds[1:] if seed is not None else None,
        "search": seeds or None, "history": res.history, "note": plan.note or None,
        "sparsity_note": sparsity_note,
    }
    return PruneResult(model=pruned, masks=res.masks, extra_bias=extra, info=info, base=source,
                       tokenizer=tokenizer, layout=plan.layout)


def _uniform_sparsity_note(lay, masks, sparsity: float, kind: str, method: str, params: Params,
                           round_to: int | None) -> str | None:
    """Log what the uniform layout reached (whole KV groups per layer, the MLP channels taking the remainder:
    :func:`pgprune.core.allocation.uniform_widths`); a warning, returned for the summary, when it is further from
    the requested sparsity than half a channel group (the channel count hit its bounds)."""
    from pgprune.core.masks import sparsity_report
    from pgprune.methods import get_method

    counts = masks.kept_counts()
    kept = [i for i in range(lay.num_layers) if counts["layers"][i]]
    if kind != "uniform" or not kept or len(set(lay.kv_heads)) != 1 or len(set(lay.intermediate)) != 1:
        return None
    reached = sparsity_report(lay, masks)["prunable_sparsity"]
    kv, ch = counts["heads"][kept[0]], counts["channels"][kept[0]]
    log.info("uniform layout: every layer keeps %d of %d KV groups and %d of %d MLP channels: %.2f%% of the "
             "decoder-layer linear parameters removed (requested %.2f%%)", kv, lay.kv_heads[0], ch,
             lay.intermediate[0], 100 * reached, 100 * sparsity)
    group = params.search.channel_group if get_method(method).kind == "search" else (round_to or 1)
    tol = 0.5 * group * lay.channel_unit_params() / lay.layer_params(lay.kv_heads[0], lay.intermediate[0])
    if abs(reached - sparsity) <= tol + 1e-9:
        return None
    note = (f"the uniform layout reached {100 * reached:.1f}% instead of the requested {100 * sparsity:.1f}%: every "
            f"layer keeps whole KV groups ({kv} of {lay.kv_heads[0]}) and the MLP channels that make up the rest "
            f"hit their bound ({ch} of {lay.intermediate[0]})")
    log.warning(note)
    return note


def _announce_search(method: str, params: Params, checkpoint_dir: str | Path | None) -> int | None:
    """The one seed a search of ``method`` runs here (the first of search.seeds; None for a metric), logged with
    the seeds left out, and a log line when ``checkpoint_dir`` holds checkpoints a search may resume."""
    from pgprune.methods import get_method

    if get_method(method).kind != "search":
        return None
    seeds = params.search.seeds
    if len(seeds) > 1:
        log.info("search seed %d, the first of search.seeds %s: one prune runs one search (the pipeline runs every "
                 "seed to measure the spread)", seeds[0], seeds)
    else:
        log.info("search seed %d", seeds[0])
    found = sorted(Path(checkpoint_dir).glob("search-*.ckpt")) if checkpoint_dir is not None else []
    if found:
        log.info("resuming: %s holds %d checkpoint(s) of an interrupted search; a search with the same settings "
                 "continues from its last saved step (other settings start at step 0)", checkpoint_dir, len(found))
    return seeds[0]


def _check_search_blocks(method: str, params: Params, calib: torch.Tensor) -> None:
    """A search needs search.val_blocks held-back blocks plus at least one batch: fail before scoring."""
    from pgprune.methods import get_method

    p = params.search
    if get_method(method).kind == "search" and calib.shape[0] < p.val_blocks + p.batch_size:
        raise ConfigError(f"{calib.shape[0]} calibration blocks are too few for the search: it holds back "
                          f"search.val_blocks={p.val_blocks} for validation and needs search.batch_size="
                          f"{p.batch_size} more; allowed: at least {p.val_blocks + p.batch_size} blocks (raise "
                          "data.calib_blocks / --calib-blocks, or lower search.val_blocks)")


def prune(model, tokenizer=None, *, sparsity: float = 0.3, method: str = "pg", calibration=None,
          layout: str | None = None, round_to: int | None = None, steps: int | None = None,
          nsamples: int | None = None, calib_blocks: int | None = None, seq_len: int | None = None,
          seed: int | None = None, config=None, device: str | None = None, compensation: str | None = None,
          checkpoint_dir: str | Path | None = None, progress: bool = True) -> PruneResult:
    """Prune a loaded LLaMA/Mistral/Qwen2 causal LM; the input ``model`` is not modified.

    ``sparsity``: the fraction of decoder-layer linear parameters removed (0 < sparsity < 1). ``method``: ``pg``
    (the policy-gradient search, default), ``pg_uniform`` or a baseline of :mod:`pgprune.methods` (wanda_sp, flap,
    magnitude, taylor, random, layer_drop). ``calibration``: a corpus name (wikitext2 | c4 | ptb, which need the
    ``eval`` extra, or ``local``), the path of a .txt/.jsonl file, a text, a list of texts or a LongTensor of
    token blocks [n, seq_len] (None: the config's ``data.calibration``); text is cut into ``data.calib_blocks``
    random windows of ``data.seq_len`` tokens. ``layout``: ``heterogeneous`` (per-layer widths; loading the saved
    model needs ``trust_remote_code=True``) or ``uniform`` (the same widths in every layer: a stock
    ``LlamaForCausalLM``/``MistralForCausalLM``/``Qwen2ForCausalLM``); None: the method's own. ``round_to``: kept
    MLP channels a multiple of this (the search's ``search.channel_group``; a baseline's uniform layout).
    ``steps`` (search steps), ``nsamples`` (calibration blocks the metrics use), ``calib_blocks`` and ``seq_len``
    (the calibration windows cut from text), ``seed`` (the search, the calibration windows and the random scorer),
    ``compensation`` (none | bias | refit: what the kept weights get; default the method's own, search.compensation
    for a search) override ``config`` (a params.yaml path, a dict or
    :class:`pgprune.config.Params`, the pipeline's schema; None: its defaults, params.yaml's values); the params
    keys each sets are :data:`pgprune.options.OPTIONS`'s, as for `pgprune prune`. A search runs the first of
    ``search.seeds`` only (``info["search_seed"]``). ``device``: where to compute (the model is moved there for the
    call and moved back). ``checkpoint_dir``: search checkpoints (a rerun of the same call resumes), None for none.
    """
    from pgprune.core.weights import is_streamed
    from pgprune.options import overrides

    given = {"calibration": calibration, "round_to": round_to, "steps": steps, "nsamples": nsamples,
             "calib_blocks": calib_blocks, "seq_len": seq_len, "seed": seed, "compensation": compensation,
             "device": device or _device_of(model)}
    params = build_params(config, overrides("prune", given, search=_is_search(method)))
    calib, desc = calibration_from(calibration, tokenizer, params)
    home = _device_of(model)
    move = device is not None and str(device) != home and not is_streamed(model)
    if move:
        model.to(device)
    try:
        return run_prune(model, tokenizer, params, method=method, sparsity=sparsity, calib=calib, calibration=desc,
                         layout=layout, round_to=round_to, checkpoint_dir=checkpoint_dir, progress=progress,
                         compensation=compensation)
    finally:
        if move:
            model.to(home)


def check_format(format: str, gguf_type: str = "f16") -> None:
    from pgprune.options import GGUF_TYPES

    if format not in ("hf", "gguf"):
        raise PgpruneError(f"format={format!r}; allowed: hf, gguf")
    if gguf_type not in GGUF_TYPES:
        raise PgpruneError(f"gguf_type={gguf_type!r}; allowed: {', '.join(GGUF_TYPES)}")


def write_gguf(model, folder: str | Path, gguf_type: str = "f16") -> dict:
    """``<folder>/model.gguf``: ``model`` (the one saved in ``folder``) for llama.cpp, its tokenizer and card from
    ``folder``."""
    from pgprune.hf.gguf import save_gguf
    from pgprune.options import GGUF_TYPES

    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).to("cpu")
    return save_gguf(model, Path(folder) / "model.gguf", folder, dtype=GGUF_TYPES[gguf_type])


# --- recovery --------------------------------------------------------------------------------------------------
@dataclass
class RecoverResult:
    """What :func:`recover` returns: ``model``, the recovered model (LoRA merged: the same class and shapes as
    before), ``info`` (settings, losses per step, tokens, tokens/s, perplexity before/after when measured),
    ``data`` (what it was trained on) and ``path`` (the folder written, when the input was a folder)."""

    model: torch.nn.Module
    info: dict
    data: str
    source: Any = field(repr=False, default=None)
    path: Path | None = None

    def save(self, out_dir: str | Path, card=None, *, save_dtype=None, format: str = "hf", gguf_type: str = "f16"):
        """Save the recovered model of a :class:`PruneResult` like :meth:`PruneResult.save` (same layout, files and
        card; ``format="gguf"`` adds ``model.gguf``), with the card's Recovery section and ``recovery.json``.
        Returns the :class:`pgprune.hf.export.ExportResult` of the pruned folder."""
        from pgprune.hf.export import save_model
        from pgprune.recovery.folder import write_recovered

        src = self.source
        if not isinstance(src, PruneResult):
            raise PgpruneError(f"this recovery was written to {self.path} already; save() saves the recovery of a "
                               "PruneResult")
        check_format(format, gguf_type)
        model = self.model
        if next(model.parameters()).device.type != "cpu":
            model = copy.deepcopy(model).to("cpu")
        done: list = []

        def save_pruned(path):
            done.append(save_model(src.base, src.masks, path, src.tokenizer, extra_bias=src.extra_bias,
                                   layout=src.layout, card=src.card(card), save_dtype=save_dtype, pruned=model))

        write_recovered(model, None, out_dir, info=self.info, data=self.data, save_pruned=save_pruned)
        if format == "gguf":
            write_gguf(model, out_dir, gguf_type)
        return dataclasses.replace(done[0], path=Path(out_dir))


def recover(pruned, out_dir: str | Path | None = None, *, data=None, teacher=None, config=None,
            eval_ppl: Sequence[str] | None = None, checkpoint_dir: str | Path | None = None, progress: bool = True,
            inplace: bool = False, **settings) -> RecoverResult:
    """Recover a pruned model with a short LoRA tune (:mod:`pgprune.recovery.lora`), merged into its weights.

    ``pruned``: a :class:`PruneResult` (its model is copied unless ``inplace``; save the result with
    ``.save(dir)``) or a folder saved by `pgprune prune` (then ``out_dir`` is required and is written, in the same
    layout). ``data``: training text: a corpus name (its calibration split), a .txt/.jsonl file, a text or a
    LongTensor of blocks (None: the config's ``data.calibration``). ``teacher``: the dense model for
    ``loss="kd"`` (a model, or a source; None: the PruneResult's or the folder's base model). ``settings``: the
    fields of :class:`pgprune.recovery.settings.RecoverSettings` (steps, loss, rank, alpha, lr, batch_size, ...;
    the config's ``recover`` section otherwise, whose defaults are params.yaml's). ``config``: the params
    (recover.* settings, data.* corpora, model.* device/dtype/offload of the teacher, eval.* for ``eval_ppl``, the
    corpora measured before and after, folder input only)."""
    from pgprune.recovery.run import recover_folder, recover_result
    from pgprune.recovery.settings import RecoverSettings

    params = build_params(config)
    s = RecoverSettings.parse(params.recover.settings().model_dump(), **settings)  # keywords win
    if isinstance(pruned, PruneResult):
        if out_dir is not None:
            raise PgpruneError("out_dir is for a folder input; save a PruneResult's recovery with .save(dir)")
        rec, desc = recover_result(pruned, params, s, data=data, teacher=teacher, checkpoint_dir=checkpoint_dir,
                                   progress=progress, inplace=inplace)
        if inplace:
            pruned.model = rec.model
        return RecoverResult(model=rec.model, info=rec.info, data=desc, source=pruned)
    if not isinstance(pruned, (str, Path)):
        raise PgpruneError(f"recover() takes a PruneResult or a model folder, got {type(pruned).__name__}")
    if out_dir is None:
        raise PgpruneError("recover(folder) needs out_dir: the folder to write the recovered model to")
    path, rec = recover_folder(pruned, out_dir, params, s, data=data, teacher=teacher, eval_ppl=eval_ppl,
                               checkpoint_dir=checkpoint_dir, progress=progress)
    return RecoverResult(model=rec.model, info=rec.info, data=rec.info.get("data", str(data)), source=Path(pruned),
                         path=path)


def _is_search(method: str) -> bool:
    from pgprune.methods import get_method

    try:
        return get_method(method).kind == "search"
    except PgpruneError:
        return False


__all__ = ["PruneResult", "RecoverResult", "recover", "build_params", "calibration_from", "check_sparsity",
           "params_summary", "prune", "resolve_method", "run_prune"]
