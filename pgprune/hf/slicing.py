"""Turn masks into a physically smaller dense model, and save / reload it in Hugging Face format.

:func:`slice_model` gives the heterogeneous layout (any width per layer): an instance of the pruned classes in
``pgprune/hf/modeling/modeling_pgprune.py``; saving writes ``model.safetensors`` + ``config.json`` (with ``auto_map``)
+ the modeling file, so that ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``,
``AutoModel.from_pretrained(path, trust_remote_code=True)`` and lm-eval's ``hf`` model with
``trust_remote_code=True`` load it directly. The stock-architecture (uniform) layout is built in
:mod:`pgprune.hf.export` from the same pieces: :func:`sliced_state_dict` (the kept rows/columns of every kept layer)
and :func:`instantiate` (an empty model of a class, filled with them).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from pgprune.core.adapters import base_model_type, get_adapter
from pgprune.core.masks import Masks, check_extra_bias
from pgprune.core.weights import layer_parts
from pgprune.errors import PgpruneError
from pgprune.hf.modeling import modeling_pgprune as mp

MODELING_FILE = Path(mp.__file__)


def pruned_config(model, masks: Masks, out_bias: bool = False):
    """The family's config plus per-layer widths, for a model sliced with ``masks``."""
    adapter = get_adapter(model)
    layout = adapter.layout()
    masks.validate(layout)
    family = base_model_type(model.config)
    if family not in mp.PRUNED_CLASSES:
        raise PgpruneError(f"no pruned model class for family {family!r}; allowed: {sorted(mp.PRUNED_CLASSES)}")
    cfg_cls, _ = mp.PRUNED_CLASSES[family]
    src = model.config.to_dict()
    for k in ("model_type", "architectures", "auto_map", "transformers_version", "pgprune_kv_heads",
              "pgprune_intermediate", "pgprune_kept_layers", "base_model_type", "quantization_config",
              "pgprune_out_bias"):
        src.pop(k, None)
    kept = masks.kept_layer_indices()
    old_kept = list(getattr(model.config, "pgprune_kept_layers", []) or range(layout.num_layers))
    if src.get("layer_types"):
        src["layer_types"] = [src["layer_types"][i] for i in kept]
    src["num_hidden_layers"] = len(kept)
    # keep head_dim explicit: num_attention_heads stays the original so that hidden_size // heads is unchanged
    src["head_dim"] = layout.head_dim
    cfg = cfg_cls(
        pgprune_kv_heads=[int(masks.heads[i].sum()) for i in kept],
        pgprune_intermediate=[int(masks.channels[i].sum()) for i in kept],
        pgprune_kept_layers=[old_kept[i] for i in kept],
        pgprune_out_bias=bool(out_bias or getattr(model.config, "pgprune_out_bias", False)),
        **src,
    )
    cfg.architectures = [mp.PRUNED_CLASSES[family][1].__name__]
    cfg.auto_map = {"AutoConfig": f"modeling_pgprune.{cfg_cls.__name__}",
                    "AutoModel": f"modeling_pgprune.{mp.PRUNED_BASE_CLASSES[family].__name__}",
                    "AutoModelForCausalLM": f"modeling_pgprune.{mp.PRUNED_CLASSES[family][1].__name__}"}
    return cfg


def _rows(kv_idx: torch.Tensor, per_group: int, hd: int) -> torch.Tensor:
    heads = (kv_idx[:, None] * per_group + torch.arange(per_group)[None, :]).flatten()
    return (heads[:, None] * hd + torch.arange(hd)[None, :]).flatten()


@torch.no_grad()
def slice_model(model, masks: Masks, extra_bias: dict[int, dict[str, torch.Tensor]] | None = None, *,
                dtype: torch.dtype | None = None):
    """A new, smaller model holding only the kept units' weights (the input model is left untouched).

    ``extra_bias``: {original layer index: {"o_proj"|"down_proj": Tensor[hidden]}} added to those layers' output
    biases (FLAP's bias compensation); the saved config then gives o_proj/down_proj a bias. ``dtype``: of the new
    model (default: the source's).
    """
    check_extra_bias(get_adapter(model).layout(), extra_bias)
    cfg = pruned_config(model, masks, out_bias=bool(extra_bias))
    family = base_model_type(model.config)
    _, model_cls = mp.PRUNED_CLASSES[family]
    sd = sliced_state_dict(model, masks, extra_bias, out_bias=cfg.pgprune_out_bias)
    return instantiate(model_cls, cfg, sd, model, dtype=dtype)


@torch.no_grad()
def sliced_state_dict(model, masks: Masks, extra_bias: dict[int, dict[str, torch.Tensor]] | None = None, *,
                      out_bias: bool = False) -> dict[str, torch.Tensor]:
    """The pruned model's weights under Hugging Face LLaMA-family names (saved layer j = j-th kept layer).

    q/k/v keep the rows of the kept KV groups (q: all G query heads of a group), o_proj the matching columns;
    gate/up keep the kept channels' rows, down_proj their columns. o_proj/down_proj get a bias when the source
    has one or ``out_bias`` is set (then the source bias, or zeros, plus ``extra_bias``); a refit's
    ``extra_bias`` (:class:`pgprune.core.refit.RefitBiases`) also gives o_proj/down_proj their refit kept columns.
    The tensors are views of the source weights where indexing allows; :func:`instantiate` copies them.
    """
    adapter = get_adapter(model)
    layout = adapter.layout()
    masks.validate(layout)
    check_extra_bias(layout, extra_bias)
    hd, g = layout.head_dim, layout.group_size
    refit = getattr(extra_bias, "weights", None)  # a refit (pgprune.core.refit.RefitBiases): its kept columns
    sd = {}
    dec = adapter.decoder()
    sd["model.embed_tokens.weight"] = dec.embed_tokens.weight
    sd["model.norm.weight"] = dec.norm.weight
    sd["lm_head.weight"] = adapter.lm_head().weight
    for j, i in enumerate(masks.kept_layer_indices()):
        p = layer_parts(model, i)  # pgprune.core.weights: the layer itself, or a CPU copy of a streamed one
        kv_idx = torch.nonzero(masks.heads[i]).flatten()
        ch = torch.nonzero(masks.channels[i]).flatten()
        q_rows, kv_rows = _rows(kv_idx, g, hd), _rows(kv_idx, 1, hd)
        pre = f"model.layers.{j}."
        sd[pre + "input_layernorm.weight"] = p.input_norm.weight
        sd[pre + "post_attention_layernorm.weight"] = p.post_attention_norm.weight
        sd[pre + "self_attn.q_proj.weight"] = p.q_proj.weight[q_rows]
        sd[pre + "self_attn.k_proj.weight"] = p.k_proj.weight[kv_rows]
        sd[pre + "self_attn.v_proj.weight"] = p.v_proj.weight[kv_rows]
        sd[pre + "self_attn.o_proj.weight"] = refit[i]["o_proj"] if refit is not None else p.o_proj.weight[:, q_rows]
        for name, mod, rows in (("q_proj", p.q_proj, q_rows), ("k_proj", p.k_proj, kv_rows), ("v_proj", p.v_proj, kv_rows)):
            if mod.bias is not None:
                sd[pre + f"self_attn.{name}.bias"] = mod.bias[rows]
        if out_bias or p.o_proj.bias is not None:
            sd[pre + "self_attn.o_proj.bias"] = _bias(p.o_proj, extra_bias, i, "o_proj")
        sd[pre + "mlp.gate_proj.weight"] = p.gate_proj.weight[ch]
        sd[pre + "mlp.up_proj.weight"] = p.up_proj.weight[ch]
        sd[pre + "mlp.down_proj.weight"] = refit[i]["down_proj"] if refit is not None else p.down_proj.weight[:, ch]
        if p.gate_proj.bias is not None:
            sd[pre + "mlp.gate_proj.bias"] = p.gate_proj.bias[ch]
            sd[pre + "mlp.up_proj.bias"] = p.up_proj.bias[ch]
        if out_bias or p.down_proj.bias is not None:
            sd[pre + "mlp.down_proj.bias"] = _bias(p.down_proj, extra_bias, i, "down_proj")
    return sd


@torch.no_grad()
def instantiate(model_cls, cfg, sd: dict[str, torch.Tensor], source, *, zero_bias: tuple[str, ...] = (),
                dtype: torch.dtype | None = None):
    """An instance of ``model_cls(cfg)`` on the CPU holding ``sd`` (copied), in ``dtype`` (default: the source's).

    Parameters of the new model that ``sd`` lacks are an error, except biases whose name ends with one of
    ``zero_bias`` (e.g. ``"q_proj.bias"``: a stock class whose bias flag covers more modules than the source has
    biases), which are set to zero. Rotary buffers and the generation config come from ``source``.
    """
    dtype = dtype or next(source.parameters()).dtype
    with torch.device("meta"):
        new = model_cls(cfg)
    new.to_empty(device="cpu")
    new.to(dtype)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    target = new.state_dict()
    sd = dict(sd)
    if tied:
        sd.pop("lm_head.weight", None)
    for k, v in target.items():
        if k not in sd and k.endswith(".bias") and any(k.endswith(z) for z in zero_bias):
            sd[k] = torch.zeros(v.shape, dtype=dtype)
    missing, unexpected = new.load_state_dict({k: v.detach().to(dtype=dtype, copy=True) for k, v in sd.items()},
                                             strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and tied)]
    if missing or unexpected:
        raise PgpruneError(f"slicing produced mismatched weights: missing={missing[:5]} unexpected={unexpected[:5]}")
    if tied:
        new.tie_weights()
    # rotary buffers were created on meta: rebuild them on cpu
    _rebuild_rotary(new, source)
    gen = getattr(source, "generation_config", None)
    if gen is not None:
        new.generation_config = copy.deepcopy(gen)
    new.eval()
    return new


def _bias(linear, extra, layer: int, name: str) -> torch.Tensor:
    b = linear.bias.detach().clone() if linear.bias is not None else torch.zeros(linear.out_features,
                                                                                  dtype=linear.weight.dtype)
    if extra and layer in extra and name in extra[layer]:
        b = b + extra[layer][name].to(b.dtype)
    return b


def _rebuild_rotary(new, old) -> None:
    src = old.model.rotary_emb
    dst = new.model.rotary_emb
    for name, buf in src.named_buffers(recurse=False):
        setattr(dst, name, buf.detach().clone())


def save_pruned(model, out_dir: str | Path, tokenizer=None, extra_files: dict[str, str] | None = None) -> Path:
    """Save a sliced model (safetensors + config + modeling file) atomically into ``out_dir``."""
    if not hasattr(model.config, "pgprune_kv_heads"):
        raise PgpruneError("save_pruned expects a model returned by slice_model (its config has per-layer widths)")
    files = {"modeling_pgprune.py": MODELING_FILE.read_text(encoding="utf-8"), **(extra_files or {})}
    return write_model_folder(model, out_dir, tokenizer, files)


def write_model_folder(model, out_dir: str | Path, tokenizer=None, extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model.save_pretrained`` + the tokenizer + ``extra_files`` ({name: text}) into ``out_dir`` at once.

    Everything is written into a temporary folder next to ``out_dir``, which then replaces it (a crash leaves
    the old folder or nothing, never half a model). The bytes depend only on the model, tokenizer and texts: the
    same inputs give the same files (a ``dvc.lock`` stays valid on a rerun). The tokenizer config names its class
    (``tokenizer_class``) so that it loads without the model's config.
    """
    from pgprune.io import atomic_dir

    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            _name_tokenizer_class(tmp / "tokenizer_config.json", tokenizer)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return Path(out_dir)


def _name_tokenizer_class(path: Path, tokenizer) -> None:
    import json

    if not path.exists():
        return
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class"):
        return
    cfg["tokenizer_class"] = type(tokenizer).__name__
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def load_pruned(path: str | Path, dtype=None, device: str = "cpu"):
    """Reload a saved pruned model the way users do: AutoModelForCausalLM, with trust_remote_code only when the
    config maps pgprune's classes (heterogeneous layout)."""
    import json

    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").exists():
        raise PgpruneError(f"no pruned model at '{path}' (config.json missing)")
    kw = {"trust_remote_code": "auto_map" in json.loads((path / "config.json").read_text(encoding="utf-8"))}
    if dtype is not None:
        kw["dtype"] = dtype
    return AutoModelForCausalLM.from_pretrained(str(path), **kw).to(device).eval()
