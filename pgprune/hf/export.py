"""Build and save a pruned model in one of two layouts, with its model card, masks and tokenizer.

* ``uniform``: every kept layer keeps the same number of KV groups ``k`` and MLP channels ``c``. The model is a
  stock transformers class (normally the family's own: ``LlamaForCausalLM`` / ``MistralForCausalLM`` /
  ``Qwen2ForCausalLM``) with ``num_key_value_heads = k``, ``num_attention_heads = k * G`` (G query heads per KV
  group), an explicit ``head_dim`` (hidden_size / heads no longer gives it), ``intermediate_size = c`` and
  ``num_hidden_layers`` = kept layers (``layer_types`` cut to the kept ones). It loads with
  ``AutoModelForCausalLM.from_pretrained(dir)`` without remote code.
* ``heterogeneous``: per-layer widths (:mod:`pgprune.hf.slicing`, pgprune's classes, ``trust_remote_code=True``).

Mean compensation (``extra_bias``: the removed units' calibration-mean output folded into o_proj/down_proj biases,
see :func:`pgprune.hf.slicing.slice_model`) needs those biases. ``LlamaConfig`` has them (``attention_bias`` gives
q/k/v/o a bias, ``mlp_bias`` gate/up/down; the ones the source lacks are zero). Mistral and Qwen2 have no such
option: a compensated Mistral/Qwen2 model is saved as a Llama layer when that computes the same function
(no sliding-window attention in a kept layer; Qwen2's q/k/v biases are Llama's ``attention_bias``), and the config
says so in ``pgprune_converted_from``; otherwise the uniform layout is refused with the reason.

``LlamaConfig`` refuses ``hidden_size % num_attention_heads != 0`` even with an explicit ``head_dim`` (its
``validate_architecture``, run on construction and by ``from_pretrained``), so a Llama layer that keeps e.g. 24 of
32 heads (LLaMA-2-7B at 25%) or 6 of 8 KV groups (Llama-3-8B) cannot be a ``LlamaForCausalLM``. Those are saved as
``SeedOssForCausalLM`` (transformers' ``seed_oss``, in every transformers 5.x): exactly the Llama decoder
(RMSNorm, RoPE with ``rope_parameters``, GQA attention with an explicit ``head_dim`` and scaling head_dim^-1/2,
SwiGLU MLP) with separate bias flags (``attention_bias`` q/k/v, ``attention_out_bias`` o_proj, ``mlp_bias``
gate/up/down) and no divisibility check; its only other difference, residual/attention dropout, is set to 0.
Mistral and Qwen2 configs have no such check, so an uncompensated Mistral/Qwen2 model keeps its own class at any
count. ``pgprune_converted_from`` records the source family whenever the saved class is not the family's own.

``layout="auto"`` takes ``uniform`` when the masks are uniform and the model is expressible as a stock class, else
``heterogeneous``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from pgprune.core.adapters import base_model_type, get_adapter
from pgprune.core.masks import Masks, check_extra_bias, sparsity_report
from pgprune.errors import ConfigError, PgpruneError
from pgprune.hf.card import CardFacts, CardInfo, render_card
from pgprune.hf.slicing import instantiate, slice_model, sliced_state_dict, write_model_folder

log = logging.getLogger("pgprune")

LAYOUTS = ("auto", "uniform", "heterogeneous")
SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# family -> (config class, causal-LM class) in transformers
STOCK = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
         "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
         # a Llama layer without LlamaConfig's hidden_size % num_attention_heads check (see the module docstring)
         "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM")}
# config keys that are pgprune's own or describe the source checkpoint, never copied into a stock config
_DROP_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "pgprune_kv_heads",
              "pgprune_intermediate", "pgprune_kept_layers", "pgprune_out_bias", "pgprune_converted_from",
              "base_model_type", "quantization_config", "_name_or_path")


class LayoutError(ConfigError):
    """The masks or the model do not fit the requested export layout."""


@dataclass(frozen=True)
class ExportPlan:
    """How a (model, masks, compensation) is exported."""

    layout: str  # "uniform" | "heterogeneous"
    family: str  # the source family
    target_family: str  # the family of the saved config ("llama" when converted)
    architecture: str  # the saved class name
    o_bias: bool  # o_proj needs a bias (source bias or compensation)
    down_bias: bool  # down_proj needs a bias
    converted_from: str | None = None  # source family when saved as another family's class
    note: str = ""  # why "auto" did not take the uniform layout, or why the saved class is not the family's own

    @property
    def trust_remote_code(self) -> bool:
        return self.layout == "heterogeneous"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    plan: ExportPlan
    params_before: int
    params_after: int
    summary: dict  # pgprune.core.masks.sparsity_report


# --- widths ----------------------------------------------------------------------------------------------------
def kept_widths(masks: Masks) -> list[tuple[int, int, int]]:
    """(original layer index, KV groups kept, MLP channels kept) of every kept layer."""
    return [(i, int(masks.heads[i].sum()), int(masks.channels[i].sum())) for i in masks.kept_layer_indices()]


def _describe(widths: list[tuple[int, int, int]]) -> str:
    return ", ".join(f"{i}: ({kv}, {ch})" for i, kv, ch in widths)


def uniform_widths(masks: Masks) -> tuple[int, int]:
    """(KV groups, MLP channels) that every kept layer keeps; LayoutError naming the per-layer widths otherwise."""
    w = kept_widths(masks)
    if not w:
        raise LayoutError("the masks keep no layer")
    if not masks.is_uniform():
        raise LayoutError(
            "the uniform (stock architecture) layout needs every kept layer to keep the same number of KV groups "
            f"and MLP channels; these masks keep (KV groups, MLP channels) per kept layer {{{_describe(w)}}}. "
            "Prune with the uniform allocation (method pg_uniform, or a metric baseline's uniform-count "
            "allocation) or save with layout='heterogeneous' (needs trust_remote_code=True to load)")
    return w[0][1], w[0][2]


# --- plan ------------------------------------------------------------------------------------------------------
def llama_heads_ok(hidden_size: int, num_attention_heads: int) -> bool:
    """Whether ``LlamaConfig`` accepts this head count (its validate_architecture: hidden_size % heads == 0)."""
    return num_attention_heads > 0 and hidden_size % num_attention_heads == 0


def _needs_out_bias(adapter, masks: Masks, extra_bias) -> tuple[bool, bool]:
    kept = masks.kept_layer_indices()
    extra = extra_bias or {}
    o = any(adapter.parts(i).o_proj.bias is not None or extra.get(i, {}).get("o_proj") is not None for i in kept)
    d = any(adapter.parts(i).down_proj.bias is not None or extra.get(i, {}).get("down_proj") is not None
            for i in kept)
    return o, d


def plan_export(model, masks: Masks, extra_bias: dict | None = None, layout: str = "auto") -> ExportPlan:
    """Decide the layout and class a model is saved as; errors name the reason and the alternatives."""
    if layout not in LAYOUTS:
        raise LayoutError(f"layout={layout!r} is not allowed; allowed: {', '.join(LAYOUTS)}")
    adapter = get_adapter(model)
    lay = adapter.layout()
    masks.validate(lay)
    check_extra_bias(lay, extra_bias)
    family = base_model_type(model.config)
    o_bias, down_bias = _needs_out_bias(adapter, masks, extra_bias)
    from pgprune.hf.modeling.modeling_pgprune import PRUNED_CLASSES

    hetero = ExportPlan("heterogeneous", family, family, PRUNED_CLASSES[family][1].__name__, o_bias, down_bias)
    if layout == "heterogeneous":
        return hetero
    if not (masks.kept_layer_indices() and masks.is_uniform()):
        if layout == "uniform":
            uniform_widths(masks)  # raises with the widths
        return hetero
    heads = uniform_widths(masks)[0] * lay.group_size
    if family != "llama" and not (o_bias or down_bias):
        return ExportPlan("uniform", family, family, STOCK[family][1], o_bias, down_bias)
    windows = {i: lay.sliding_window[i] for i in masks.kept_layer_indices()
               if i < len(lay.sliding_window) and lay.sliding_window[i] is not None}
    if family == "llama" or not windows:
        # a Llama layer: LlamaForCausalLM when LlamaConfig accepts the head count, else SeedOssForCausalLM
        target = "llama" if llama_heads_ok(lay.hidden_size, heads) else "seed_oss"
        why = []
        if family != "llama":
            why.append(f"{STOCK[family][1]} has no o_proj/down_proj bias for the mean compensation, so the layers "
                       "are saved as Llama layers (no sliding-window attention in a kept layer: the same function)")
        if target == "seed_oss":
            why.append(f"LlamaConfig refuses hidden_size {lay.hidden_size} with {heads} attention heads "
                       f"({heads // lay.group_size} KV groups x {lay.group_size}: not a divisor), so the Llama "
                       f"layers are saved as {STOCK['seed_oss'][1]}, transformers' Llama layer with an explicit "
                       "head_dim and no such check (outputs identical; dropout 0)")
        note = ("Saved as " + STOCK[target][1] + ": " + "; ".join(why) + ".") if target != family else ""
        return ExportPlan("uniform", family, target, STOCK[target][1], o_bias, down_bias,
                          converted_from=family if target != family else None, note=note)
    reason = (f"{STOCK[family][1]} has no o_proj/down_proj bias for the mean compensation, and the model cannot be "
              f"saved as LlamaForCausalLM instead: kept layers use sliding-window attention "
              f"(window {sorted(set(windows.values()))} on layers {sorted(windows)}), which Llama does not have")
    if layout == "uniform":
        raise LayoutError(f"cannot save this model in the uniform (stock architecture) layout: {reason}. "
                          "Alternatives: layout='heterogeneous' (per-layer widths, loads with trust_remote_code=True), "
                          "or prune without mean compensation (--compensation none / search.compensation: none / "
                          "a method without it)")
    note = f"Saved in the heterogeneous layout although the widths are uniform: {reason}."
    log.warning(note)
    return ExportPlan("heterogeneous", family, family, hetero.architecture, o_bias, down_bias, note=note)


# --- stock config and model ------------------------------------------------------------------------------------
def stock_config(model, masks: Masks, plan: ExportPlan):
    """The stock transformers config of the uniform layout (see the module docstring)."""
    import transformers

    kv, ch = uniform_widths(masks)
    lay = get_adapter(model).layout()
    cfg_cls = getattr(transformers, STOCK[plan.target_family][0])
    src = model.config.to_dict()
    for k in _DROP_KEYS:
        src.pop(k, None)
    kept = masks.kept_layer_indices()
    if src.get("layer_types"):
        src["layer_types"] = [src["layer_types"][i] for i in kept]
    if src.get("max_window_layers") is not None:
        # Qwen2: layers from this index on use the sliding window; count the kept layers below it
        src["max_window_layers"] = sum(1 for i in kept if i < src["max_window_layers"])
    if plan.target_family != plan.family:
        # keep only what the target config knows (no sliding-window keys etc. of the source family)
        known = set(cfg_cls().to_dict()) | set(transformers.PretrainedConfig().to_dict())
        src = {k: v for k, v in src.items() if k in known}
    src.update(num_hidden_layers=len(kept), num_key_value_heads=kv, num_attention_heads=kv * lay.group_size,
               head_dim=lay.head_dim, intermediate_size=ch)
    if plan.target_family == "llama":
        src["attention_bias"] = bool(lay.qkv_bias or plan.o_bias)
        src["mlp_bias"] = bool(lay.mlp_bias or plan.down_bias)
    elif plan.target_family == "seed_oss":
        src.update(attention_bias=bool(lay.qkv_bias), attention_out_bias=bool(plan.o_bias),
                   mlp_bias=bool(lay.mlp_bias or plan.down_bias), residual_dropout=0.0,
                   attention_dropout=float(src.get("attention_dropout") or 0.0))
    cfg = cfg_cls(**src)
    cfg.architectures = [plan.architecture]
    if plan.converted_from:
        cfg.pgprune_converted_from = plan.converted_from
    return cfg


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) not in SAVE_DTYPES:
        raise ConfigError(f"save_dtype={dtype!r} is not allowed; allowed: {', '.join(SAVE_DTYPES)}")
    return SAVE_DTYPES[str(dtype)]


@torch.no_grad()
def build_model(model, masks: Masks, extra_bias: dict | None = None, layout: str = "auto", *, dtype=None):
    """The physically smaller model in memory: a stock class for the uniform layout, pgprune's per-layer-width
    class for the heterogeneous one (see :func:`plan_export`). ``model`` is left untouched; ``dtype`` (a
    ``torch.dtype`` or "float32"/"bfloat16"/"float16") defaults to the model's."""
    plan = plan_export(model, masks, extra_bias, layout)
    return _build(model, masks, extra_bias, plan, _resolve_dtype(dtype))


def _build(model, masks: Masks, extra_bias, plan: ExportPlan, dtype):
    if plan.layout == "heterogeneous":
        return slice_model(model, masks, extra_bias, dtype=dtype)
    import transformers

    cfg = stock_config(model, masks, plan)
    sd = sliced_state_dict(model, masks, extra_bias, out_bias=plan.o_bias or plan.down_bias)
    if not plan.o_bias:
        sd = {k: v for k, v in sd.items() if not k.endswith("o_proj.bias")}
    if not plan.down_bias:
        sd = {k: v for k, v in sd.items() if not k.endswith("down_proj.bias")}
    zero = ()
    if plan.target_family in ("llama", "seed_oss"):
        # a bias flag covers several projections (Llama: q/k/v/o, gate/up/down; SeedOss: q/k/v, o, gate/up/down);
        # the biases the source lacks are zero
        attn = ("q_proj.bias", "k_proj.bias", "v_proj.bias") + (("o_proj.bias",) if plan.target_family == "llama"
                                                                 else ())
        zero = (attn if cfg.attention_bias else ()) + \
               (("o_proj.bias",) if getattr(cfg, "attention_out_bias", False) else ()) + \
               (("gate_proj.bias", "up_proj.bias", "down_proj.bias") if cfg.mlp_bias else ())
    model_cls = getattr(transformers, plan.architecture)
    return instantiate(model_cls, cfg, sd, model, zero_bias=zero, dtype=dtype)


# --- save ------------------------------------------------------------------------------------------------------
def n_params(model) -> int:
    """Parameters of a model, tied weights counted once."""
    return sum(p.numel() for p in model.parameters())


def save_model(model, masks: Masks, out_dir: str | Path, tokenizer=None, *, extra_bias: dict | None = None,
               layout: str = "auto", card: CardInfo | dict | None = None, masks_json: bool = True,
               save_dtype=None, pruned=None) -> ExportResult:
    """Build the pruned model of ``model`` under ``masks`` and save a self-contained folder at ``out_dir``.

    The folder holds ``config.json`` + ``model.safetensors`` (+ ``generation_config.json``), the tokenizer files,
    ``README.md`` (the model card, :mod:`pgprune.hf.card`, from ``card``'s fields and the measured counts),
    ``masks.json`` (:meth:`pgprune.core.masks.Masks.to_json`, unless ``masks_json`` is False) and, for the
    heterogeneous layout only, ``modeling_pgprune.py``. It is written atomically and its bytes depend only on
    the inputs. ``layout``: "auto" (uniform when the masks allow it, see :func:`plan_export`), "uniform" (an error
    naming the per-layer widths if they differ) or "heterogeneous". ``save_dtype``: the weights' dtype (default:
    the model's). ``pruned``: the result of :func:`build_model` for the same arguments, to save it without
    building it again.
    """
    plan = plan_export(model, masks, extra_bias, layout)
    dtype = _resolve_dtype(save_dtype)
    if pruned is None:
        pruned = _build(model, masks, extra_bias, plan, dtype)
    else:
        if type(pruned).__name__ != plan.architecture:
            raise PgpruneError(f"pruned is a {type(pruned).__name__}, but these masks and layout={layout!r} save a "
                               f"{plan.architecture}; build it with build_model(model, masks, extra_bias, "
                               f"layout={plan.layout!r})")
        if dtype is not None and next(pruned.parameters()).dtype != dtype:
            import copy

            pruned = copy.deepcopy(pruned).to(dtype)
    if tokenizer is None:
        log.warning("save_model: no tokenizer given; %s will have no tokenizer files", out_dir)
    lay = get_adapter(model).layout()
    # the summary's convention (pgprune.api.run_prune): the compensation biases count as kept parameters
    compensated = bool(extra_bias)
    summary = sparsity_report(lay, masks, out_bias=compensated)
    bias_params = summary["total_params_kept"] - sparsity_report(lay, masks)["total_params_kept"]
    counts = masks.kept_counts()
    facts = CardFacts(
        layout=plan.layout, architecture=plan.architecture, family=plan.family, summary=summary,
        params_before=n_params(model), params_after=n_params(pruned),
        widths=[(i, counts["heads"][i], counts["channels"][i]) for i in range(lay.num_layers)],
        group_size=lay.group_size, head_dim=lay.head_dim, compensated=compensated, bias_params=bias_params,
        # the card's conversion note explains a mistral/qwen2 -> Llama conversion; plan.note covers the others
        converted_from=plan.converted_from if plan.target_family == "llama" else None,
        layout_note=plan.note if plan.layout == "heterogeneous" or plan.target_family != "llama" else "",
        dtype=str(next(pruned.parameters()).dtype).replace("torch.", ""))
    info = CardInfo.coerce(card)
    if info.base_model is None:
        info = dataclasses.replace(info, base_model=getattr(model.config, "_name_or_path", None) or None)
    files = {"README.md": render_card(info, facts)}
    if masks_json:
        files["masks.json"] = json.dumps(masks.to_json()) + "\n"
    if plan.layout == "heterogeneous":
        from pgprune.hf.slicing import MODELING_FILE

        files["modeling_pgprune.py"] = MODELING_FILE.read_text(encoding="utf-8")
    path = write_model_folder(pruned, out_dir, tokenizer, files)
    log.info("saved %s (%s layout, %s) to %s", plan.architecture, plan.layout,
             f"{facts.params_before:,} -> {facts.params_after:,} parameters", path)
    return ExportResult(path=Path(path), plan=plan, params_before=facts.params_before,
                        params_after=facts.params_after, summary=summary)

