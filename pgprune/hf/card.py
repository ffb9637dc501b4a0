"""The model card (``README.md``) of a saved pruned model: Hugging Face metadata + what was done and how to load it.

The card is a :class:`huggingface_hub.ModelCard`: YAML front matter from :class:`huggingface_hub.ModelCardData`
(``base_model`` when it is a Hub id, ``library_name: transformers``, ``tags: [pruned, structured-pruning, pgprune]``,
``pipeline_tag: text-generation``, ``license`` when known) and a markdown body with the base model, the method, the
sparsity in both conventions (decoder-layer linear parameters, which is what the paper and LLM-Pruner/FLAP report,
and all parameters including embeddings and the LM head), parameter counts before/after, per-layer widths, the
calibration data, the evaluation results when given, the exact command, the pgprune version, and loading snippets
(with ``trust_remote_code=True`` only for the heterogeneous layout).

What the caller knows (the base model's name, method, calibration data, evaluation, command) comes in a
:class:`CardInfo`; what the export measures (layout, architecture, counts, widths) in a :class:`CardFacts`.
The text has no timestamps or machine paths: the same inputs give the same bytes.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from pgprune.errors import PgpruneError

TAGS = ["pruned", "structured-pruning", "pgprune"]
DEFAULT_REPO = "path/to/this/folder"
COMPENSATION_LINE = "yes: o_proj/down_proj biases add the removed units' mean output on the calibration data"
REFIT_LINE = ("refit: the kept o_proj/down_proj columns and their biases were refit by least squares to the dense "
              "layer outputs on the calibration data (layer by layer, on the already pruned earlier layers)")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


@dataclass
class CardInfo:
    """What the caller knows about a pruned model; every field is optional.

    ``base_model``: the model that was pruned (a Hub id goes into the metadata; a local folder only into the text);
    ``method``: a method name of :mod:`pgprune.methods` (its label is shown) or free text; ``sparsity``: the
    requested sparsity; ``calibration``: a description of the calibration data (e.g. "wikitext2 train, 128 blocks
    of 2048 tokens"); ``evaluation``: results in the shape of :func:`pgprune.eval.evaluate.evaluate` (``{"ppl":
    {corpus: value}, "zero_shot": {"average", "metric", "tasks": {task: value}}, "tokens_per_s": x}``), optionally
    with the dense model's results of the same shape under ``"dense"``; ``command``: the exact command that made
    the model; ``repo_id``: how users will name the folder in ``from_pretrained`` (a Hub id or a path; default a
    placeholder); ``license``: the base model's license id (e.g. ``apache-2.0``); ``compensation``: none | bias |
    refit (default: bias when the saved model has compensation biases, else none); ``notes``: extra lines.
    """

    base_model: str | None = None
    method: str | None = None
    sparsity: float | None = None
    calibration: str | None = None
    evaluation: dict | None = None
    command: str | None = None
    repo_id: str | None = None
    license: str | None = None
    compensation: str | None = None
    notes: list[str] = field(default_factory=list)

    @classmethod
    def coerce(cls, card: "CardInfo | dict | None") -> "CardInfo":
        if card is None:
            return cls()
        if isinstance(card, cls):
            return card
        if isinstance(card, dict):
            bad = sorted(set(card) - set(cls.__dataclass_fields__))
            if bad:
                raise PgpruneError(f"unknown model-card field(s) {bad}; allowed: {sorted(cls.__dataclass_fields__)}")
            return cls(**card)
        raise PgpruneError(f"card must be a CardInfo, a dict or None, got {type(card).__name__}")


@dataclass
class CardFacts:
    """What the export measured. ``widths``: (original layer index, KV groups, MLP channels) of every layer, with
    (i, 0, 0) for a dropped layer; ``summary``: :func:`pgprune.core.masks.sparsity_report` of the masks."""

    layout: str  # "uniform" | "heterogeneous"
    architecture: str  # saved class name
    family: str  # the base model's family (llama, mistral, qwen2)
    summary: dict
    params_before: int
    params_after: int
    widths: list[tuple[int, int, int]]
    group_size: int
    head_dim: int
    compensated: bool = False
    bias_params: int = 0  # o_proj/down_proj compensation biases, counted as kept in ``summary`` (as the CLI does)
    converted_from: str | None = None  # family when a mistral/qwen2 model is saved as LlamaForCausalLM
    layout_note: str = ""
    dtype: str | None = None

    @property
    def trust_remote_code(self) -> bool:
        return self.layout == "heterogeneous"


def hub_base_model(name: str | None) -> str | None:
    """``name`` when it looks like a Hub id ("org/model") and is not a local folder, else None."""
    if not name or not _HUB_ID.match(name) or os.path.exists(name):
        return None
    return name


def display_name(name: str | None) -> str:
    """A name without this machine's paths (an absolute path shows only its last part); the embedded model (or a
    folder converted from it) by its real name, e.g. "SmolLM2-135M-Instruct (Q4_1 GGUF, de-quantized)"."""
    if not name:
        return "(not recorded)"
    from pgprune.hf.loading import embedded_name

    name = str(name)
    embedded = embedded_name(name)
    if embedded:
        return embedded
    return os.path.basename(name.rstrip("/")) if os.path.isabs(name) else name


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return "n/a" if math.isnan(x) else f"{x:.4g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x)


# what a metric baseline's allocation (pgprune.methods.Method.allocation) does, as pgprune.core.allocation runs it
_ALLOCATION_LINE = {
    "uniform": "the same fraction of every layer's KV-head groups and of its MLP channels, each layer's count "
               "rounded (largest remainder), so the counts can differ by one unit between layers",
    "global": "the top units over all layers together (per-layer widths free)",
    "ipr": "per-layer fractions of KV-head groups and MLP channels rising with depth on a log curve (SlimGPT's "
           "Incremental Pruning Ratio), chosen layer by layer on the calibration text",
}


def _method_line(method: str | None, facts: "CardFacts | None" = None) -> str:
    """The method's label and what it did: a metric baseline's line says how it allocated the units (the registry's
    ``allocation``, or one width for every layer in the uniform layout), not only its scorer."""
    if not method:
        return "(not recorded)"
    from pgprune.methods import METHODS

    key = str(method).strip().lower().replace("-", "_")
    if key not in METHODS:
        return str(method)
    m = METHODS[key]
    head = f"{m.label} (`{m.name}`)"
    if m.kind != "metric" or m.granularity == ("layers",):
        return f"{head}: {m.description}" if m.description else head
    desc = re.sub(r",?\s*(the )?same fraction (per|in every) layer", "", m.description or "").strip(" ,")
    if facts is not None and facts.layout == "uniform":
        alloc = "keeps the same number of KV-head groups and MLP channels in every layer"
    else:
        alloc = f"keeps {_ALLOCATION_LINE.get(m.allocation, m.allocation)}"
    return f"{head}: {desc}; {alloc}" if desc else f"{head}: {alloc}"


def _width_rows(facts: CardFacts) -> list[str]:
    rows = ["| layer | KV groups | query heads | MLP channels |", "| ---: | ---: | ---: | ---: |"]
    for i, kv, ch in facts.widths:
        if kv == 0 and ch == 0:
            rows.append(f"| {i} | dropped | dropped | dropped |")
        else:
            rows.append(f"| {i} | {kv} | {kv * facts.group_size} | {ch} |")
    return rows


def _eval_rows(evaluation: dict) -> list[str]:
    dense = evaluation.get("dense") or {}
    has_dense = bool(dense)
    head = "| metric | pruned | dense |" if has_dense else "| metric | pruned |"
    rows = [head, "| --- | ---: | ---: |" if has_dense else "| --- | ---: |"]

    def row(name: str, value: Any, base: Any = None) -> None:
        rows.append(f"| {name} | {_num(value)} | {_num(base)} |" if has_dense else f"| {name} | {_num(value)} |")

    for corpus, v in sorted((evaluation.get("ppl") or {}).items()):
        row(f"perplexity ({corpus})", v, (dense.get("ppl") or {}).get(corpus))
    zs, zd = evaluation.get("zero_shot") or {}, dense.get("zero_shot") or {}
    if zs:
        metric = zs.get("metric", "acc")
        for task, v in sorted((zs.get("tasks") or {}).items()):
            row(f"zero-shot {task} ({metric})", v, (zd.get("tasks") or {}).get(task))
        if "average" in zs:
            row(f"zero-shot average ({metric})", zs["average"], zd.get("average"))
    if evaluation.get("tokens_per_s") is not None:
        row("generation tokens/s", evaluation["tokens_per_s"], dense.get("tokens_per_s"))
    return rows if len(rows) > 2 else []


def _load_snippet(facts: CardFacts, repo: str) -> str:
    trc = ", trust_remote_code=True" if facts.trust_remote_code else ""
    return "\n".join([
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}"{trc})',
        f'model = AutoModelForCausalLM.from_pretrained("{repo}"{trc})',
        'inputs = tokenizer("The quick brown fox", return_tensors="pt")',
        "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=20)[0]))",
        "```",
    ])


def _compensation_line(info: CardInfo, facts: CardFacts) -> str:
    kind = info.compensation or ("bias" if facts.compensated else "none")
    return {"refit": REFIT_LINE, "bias": COMPENSATION_LINE}.get(kind, "no")


def render_card(info: CardInfo | dict | None, facts: CardFacts) -> str:
    """The card's full text (YAML front matter + markdown)."""
    from huggingface_hub import ModelCard, ModelCardData

    import pgprune

    info = CardInfo.coerce(info)
    s = facts.summary
    repo = info.repo_id or DEFAULT_REPO
    data = ModelCardData(base_model=hub_base_model(info.base_model), library_name="transformers", tags=list(TAGS),
                         pipeline_tag="text-generation", license=info.license or None)
    base = display_name(info.base_model)
    removed = [g for g, n in (("KV-head groups", s["kv_groups_total"] - s["kv_groups_kept"]),
                              ("MLP channels", s["channels_total"] - s["channels_kept"]),
                              ("decoder layers", s["layers_total"] - s["layers_kept"])) if n]
    if facts.layout == "uniform":
        layout_line = (f"uniform: every kept layer has the same width, saved as the stock `{facts.architecture}` "
                       "(loads without remote code in transformers, vLLM and llama.cpp's converter)")
    else:
        layout_line = (f"heterogeneous: per-layer widths, saved as `{facts.architecture}` from the bundled "
                       "`modeling_pgprune.py` (load with `trust_remote_code=True`)")
    title = display_name(info.repo_id) if info.repo_id else (f"{base} (pruned)" if info.base_model else "Pruned model")
    lines = [
        f"# {title}",
        "",
        f"`{base}` with {_pct(s['prunable_sparsity'])} of its decoder-layer linear parameters removed by structured "
        f"pruning ({', '.join(removed) if removed else 'nothing removed'}), made with "
        f"pgprune {pgprune.__version__}. The weights are physically smaller: "
        "no masks are applied at run time.",
        "",
        "| | |",
        "| --- | --- |",
        f"| Base model | `{base}` |",
        f"| Method | {_method_line(info.method, facts)} |",
        f"| Layout | {layout_line} |",
    ]
    if info.sparsity is not None:
        lines.append(f"| Requested sparsity | {_pct(float(info.sparsity))} |")
    counted = (f"; the {_num(facts.bias_params)} o_proj/down_proj compensation biases count as kept"
               if facts.bias_params else "")
    lines += [
        f"| Sparsity of decoder-layer linear parameters | {_pct(s['prunable_sparsity'])} "
        f"({_num(s['prunable_params_dense'])} -> {_num(s['prunable_params_kept'])}{counted}) |",
        f"| Sparsity of all parameters | {_pct(s['total_sparsity'])} "
        f"({_num(s['total_params_dense'])} -> {_num(s['total_params_kept'])}{counted}) |",
        f"| Parameters (model before / saved model) | {_num(facts.params_before)} / {_num(facts.params_after)} |",
        f"| KV-head groups kept | {s['kv_groups_kept']} of {s['kv_groups_total']} "
        f"({facts.group_size} query heads each, head_dim {facts.head_dim}) |",
        f"| MLP channels kept | {_num(s['channels_kept'])} of {_num(s['channels_total'])} |",
        f"| Decoder layers kept | {s['layers_kept']} of {s['layers_total']} |",
        f"| Compensation | {_compensation_line(info, facts)} |",
        f"| Calibration data | {info.calibration or '(not recorded)'} |",
        f"| Weights dtype | {facts.dtype or 'n/a'} |",
        f"| pgprune version | {pgprune.__version__} |",
        "",
    ]
    notes = list(info.notes)
    if facts.converted_from:
        notes.append(f"The base model is a `{facts.converted_from}` model; it is saved as `LlamaForCausalLM` because "
                     f"`{facts.converted_from}` has no o_proj/down_proj bias option for the mean compensation. "
                     "The two architectures compute the same function here (no sliding-window attention), so the "
                     "outputs equal the pruned original's; unused biases are zero.")
    if facts.layout_note:
        notes.append(facts.layout_note)
    if s["total_params_kept"] != facts.params_after:
        extra = facts.params_after - s["total_params_kept"]
        if extra > 0:
            notes.append(f"The saved model has {_num(facts.params_after)} parameters, {_num(extra)} more than the "
                         "count above: biases that the saved architecture's bias flags add to modules that had "
                         "none (e.g. q/k/v or gate/up next to a compensated o_proj/down_proj); they are all zero.")
        else:
            notes.append(f"The saved model has {_num(facts.params_after)} parameters, {_num(-extra)} fewer than the "
                         "count above (tied or shared weights are stored once).")
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    ev = _eval_rows(info.evaluation) if info.evaluation else []
    lines += ["## Evaluation", ""]
    lines += ev + [""] if ev else ["Not evaluated when it was saved.", ""]
    lines += ["## How to load", "", _load_snippet(facts, repo), ""]
    if facts.layout == "uniform":
        lines += [f"It is a standard `{facts.architecture}` checkpoint: vLLM (`vllm serve {repo}`) and llama.cpp's "
                  "`convert_hf_to_gguf.py` take it as they take the base model.", ""]
    else:
        lines += ["Each layer has its own width, which the stock classes cannot express: `config.json` maps "
                  "`AutoConfig`, `AutoModel` and `AutoModelForCausalLM` to `modeling_pgprune.py` in this folder "
                  "(it needs only torch and transformers). Pass `trust_remote_code=True` to every `from_pretrained` "
                  "call, also the tokenizer's (lm-eval: `--model_args pretrained=...,trust_remote_code=True`).", ""]
    lines += ["## Per-layer widths", "", *_width_rows(facts), "",
              "`masks.json` lists the kept units of the base model (KV-head groups and MLP channels by index per "
              "layer, kept layers) and can be applied to the base model again with `pgprune.core.masks.Masks.from_json`.",
              "", "## How it was made", ""]
    lines += (["```bash", info.command, "```"] if info.command else
              ["The command was not recorded (pruned with the Python API)."])
    body = "\n".join(lines).rstrip() + "\n"
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
