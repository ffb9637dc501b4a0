"""vLLM export of a pruned model as NVIDIA's DeciLM / Nemotron-NAS architecture (``DeciLMForCausalLM``, model type
``nemotron-nas``), which vLLM runs natively (``vllm/model_executor/models/nemotron_nas.py``).

vLLM's layer is the Llama layer with a ``block_configs[i]`` per layer: ``attention.no_op`` (no attention),
``attention.n_heads_in_group`` (query heads per KV head; the layer has ``num_attention_heads // n`` KV heads),
``ffn.no_op`` (no MLP) and ``ffn.intermediate_size`` (the exact MLP width when ``ffn_mult`` is absent). Its query-head
count is the global ``num_attention_heads`` in every layer. pgprune's layers keep ``k_i`` KV groups of ``G`` query
heads each (``H = num_attention_heads``, ``G = H / num_key_value_heads``), so a layer is written as:

* ``n_i`` = the largest divisor of ``H`` with ``n_i >= G`` and ``H / n_i >= k_i`` (``n_i = H / k_i`` when ``k_i``
  divides ``H``); KV head ``g < k_i`` is kept group ``g``, the other ``H / n_i - k_i`` KV heads are zero;
* query head slot ``g * n_i + j`` (``j < G``) is kept group ``g``'s ``j``-th query head; the other slots are zero rows
  of ``q_proj`` and zero columns of ``o_proj``: their attention output is multiplied by zero, so the layer computes
  exactly what the pruned layer does (with ``H`` query heads' work: vLLM's code has no per-layer query count);
* ``k_i = 0``: ``attention.no_op``; ``0`` MLP channels: ``ffn.no_op``; neither: the layer is left out.

Biases, rewritten exactly where vLLM has none: vLLM's Llama layer has an ``o_proj`` bias when ``attention_bias`` and
``gate/up/down`` biases when ``mlp_bias`` (zeros are written where pgprune has none), q/k/v biases when ``qkv_bias``
(Qwen2). A no-op attention drops its ``o_proj`` bias and a no-op MLP its ``down_proj`` bias, so these constants are
added to the previous bias on the residual stream (the same layer's ``o_proj`` bias for a layer without MLP, else the
previous written layer's ``down_proj`` bias, else every token embedding, with the output head then written untied).
transformers' ``seed_oss`` uniform layout is written as the Llama layer it is.

The folder holds ``config.json`` (with ``auto_map`` to ``configuration_pgprune_decilm.py``, the config class that
gives ``block_configs`` the attribute access vLLM uses; load it with ``trust_remote_code``), ``model.safetensors``
and the tokenizer files. Not run here: vLLM itself (no GPU build on the project's machines); the test checks the
folder against an independent implementation of the layer described above.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pgprune.errors import PgpruneError
from pgprune.hf.gguf import ResidualFold, add_bias, family_adapter, layer_shapes

ARCHITECTURE = "DeciLMForCausalLM"
MODEL_TYPE = "nemotron-nas"
CONFIG_FILE = "configuration_pgprune_decilm.py"
CONFIG_CLASS = "PgpruneDeciLMConfig"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "generation_config.json")

CONFIG_SOURCE = '''"""Configuration of a pgprune model exported for vLLM's DeciLM / Nemotron-NAS layer (pgprune.hf.vllm)."""
from transformers import PretrainedConfig


class _Attrs(dict):
    """A dict whose keys are also attributes (vLLM reads block_configs[i].attention.no_op); a missing key raises
    AttributeError, so hasattr() tells which keys exist."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class PgpruneDeciLMConfig(PretrainedConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        super().__init__(**kwargs)
        self.block_configs = [_Attrs({k: _Attrs(v) if isinstance(v, dict) else v for k, v in dict(b).items()})
                              for b in (block_configs or [])]
'''


def _bias(linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().to("cpu", torch.float32)


def _check(model) -> None:
    act = getattr(model.config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise PgpruneError(f"hidden_act={act!r}; vLLM's DeciLM MLP is SwiGLU (LlamaMLP), allowed: silu")


def group_size_for(heads: int, group: int, kv: int) -> int:
    """vLLM's ``n_heads_in_group`` for a layer keeping ``kv`` KV groups of ``group`` query heads out of ``heads``:
    the largest divisor ``n`` of ``heads`` with ``n >= group`` and ``heads // n >= kv``."""
    ok = [n for n in range(group, heads + 1) if heads % n == 0 and heads // n >= kv]
    if not ok:
        raise PgpruneError(f"no vLLM KV-head count fits {kv} kept KV groups of {group} query heads out of {heads}")
    return max(ok)


def _slots(w: torch.Tensor, kv: int, group: int, n: int, n_slots: int, hd: int, dim: int) -> torch.Tensor:
    """``w`` with its ``kv * group`` heads of ``hd`` along ``dim`` placed at slots ``g * n + j`` of ``n_slots`` heads
    (zeros elsewhere). For q_proj rows / o_proj columns (``group`` heads per kept group) and, with ``group=1, n=1``,
    k/v rows."""
    shape = list(w.shape)
    shape[dim] = n_slots * hd
    out = w.new_zeros(shape)
    for g in range(kv):
        for j in range(group):
            src = slice((g * group + j) * hd, (g * group + j + 1) * hd)
            dst = slice((g * n + j) * hd, (g * n + j + 1) * hd)
            if dim == 0:
                out[dst] = w[src]
            else:
                out[:, dst] = w[:, src]
    return out


def plan_decilm(model) -> tuple[list[dict], torch.Tensor | None, list[str]]:
    """(written layers ``{"src", "kv", "ff", "n", "o_bias", "down_bias"}``, the constant added to every token
    embedding or None, notes on the rewrites) for ``model`` (see the module docstring)."""
    adapter = family_adapter(model)
    shapes = layer_shapes(model)
    cfg = model.config
    heads, kv_global = int(cfg.num_attention_heads), int(cfg.num_key_value_heads)
    group = heads // kv_global
    blocks: list[dict] = []
    notes: list[str] = []

    def attach(prev: dict, const: torch.Tensor) -> str:
        key = "down_bias" if prev["ff"] else "o_bias"
        prev[key] = add_bias(prev[key], const)
        return f"layer {prev['src']}'s {key.replace('_bias', '_proj')} bias"

    fold = ResidualFold(attach, "the token embeddings", notes)

    for i, s in enumerate(shapes):
        p = adapter.parts(i)
        kv, ff = s["kv_heads"], s["ff"]
        o_bias, down_bias = _bias(p.o_proj), _bias(p.down_proj)
        if kv == 0:
            fold(blocks, o_bias, f"layer {i} (no attention head): its o_proj bias")
            o_bias = None
        if kv == 0 and ff == 0:
            fold(blocks, down_bias, f"layer {i} (no head, no channel: left out): its down_proj bias")
            continue
        if ff == 0 and down_bias is not None:
            o_bias = add_bias(o_bias, down_bias)
            notes.append(f"layer {i} (no MLP channel): its down_proj bias added to its o_proj bias")
            down_bias = None
        n = group_size_for(heads, group, kv) if kv else None
        blocks.append({"src": i, "kv": kv, "ff": ff, "n": n, "o_bias": o_bias, "down_bias": down_bias})
    if not blocks:
        raise PgpruneError("the model keeps no layer with an attention head or an MLP channel; allowed: at least one")
    return blocks, fold.shift, notes


def decilm_config(model, blocks: list[dict], untie: bool) -> dict:
    """config.json of the DeciLM folder."""
    cfg = model.config
    adapter = family_adapter(model)
    hd = adapter.head_dim()
    rope = getattr(cfg, "rope_parameters", None)
    rope = dict(rope) if isinstance(rope, dict) else {}
    rope.setdefault("rope_type", "default")
    rope.setdefault("rope_theta", float(getattr(cfg, "rope_theta", None) or 10000.0))
    q_bias = any(adapter.parts(b["src"]).q_proj.bias is not None for b in blocks if b["kv"])
    block_configs = [{"attention": {"no_op": not b["kv"], "replace_with_linear": False, "n_heads_in_group": b["n"]},
                      "ffn": {"no_op": not b["ff"], "replace_with_linear": False, "intermediate_size": b["ff"] or None}}
                     for b in blocks]
    out = {
        "architectures": [ARCHITECTURE], "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": f"{CONFIG_FILE[:-3]}.{CONFIG_CLASS}"},
        "hidden_size": int(cfg.hidden_size), "num_attention_heads": int(cfg.num_attention_heads),
        "num_key_value_heads": int(cfg.num_key_value_heads), "head_dim": int(hd),
        "num_hidden_layers": len(blocks), "intermediate_size": max(int(b["ff"]) for b in blocks) or 1,
        "hidden_act": "silu", "rms_norm_eps": float(cfg.rms_norm_eps),
        "max_position_embeddings": int(cfg.max_position_embeddings), "vocab_size": int(cfg.vocab_size),
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)) and not untie,
        "rope_theta": float(rope["rope_theta"]), "rope_parameters": rope,
        "attention_bias": any(b["o_bias"] is not None for b in blocks), "qkv_bias": q_bias,
        "mlp_bias": any(b["down_bias"] is not None for b in blocks),
        "block_configs": block_configs,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key, None) is not None:
            out[key] = getattr(cfg, key)
    return out


def save_vllm(model, out_dir: str | Path, tokenizer_dir: str | Path | None = None) -> dict:
    """Write ``model`` (a pruned model of either layout, or a Llama/Mistral/Qwen2 model) as a vLLM
    ``DeciLMForCausalLM`` folder at ``out_dir`` (atomically; tokenizer files copied from ``tokenizer_dir``).
    Returns what was written: path, per written layer ``{"layer", "kv_heads", "n_heads_in_group", "ff"}``, notes."""
    from safetensors.torch import save_file

    from pgprune.io import atomic_dir

    _check(model)
    adapter = family_adapter(model)
    cfg = model.config
    hd = adapter.head_dim()
    heads = int(cfg.num_attention_heads)
    group = heads // int(cfg.num_key_value_heads)
    blocks, shift, notes = plan_decilm(model)
    config = decilm_config(model, blocks, untie=shift is not None)
    d = int(cfg.hidden_size)
    sd: dict[str, torch.Tensor] = {}
    embed = model.get_input_embeddings().weight.detach()  # [vocab, hidden]
    sd["model.embed_tokens.weight"] = embed if shift is None else (embed.float() + shift[None, :]).to(embed.dtype)
    sd["model.norm.weight"] = adapter.decoder().norm.weight.detach()
    if not config["tie_word_embeddings"]:
        sd["lm_head.weight"] = adapter.lm_head().weight.detach()
    dtype = embed.dtype
    for j, b in enumerate(blocks):
        p, pre = adapter.parts(b["src"]), f"model.layers.{j}."
        if b["kv"]:
            n, kv = b["n"], b["kv"]
            n_kv = heads // n
            sd[pre + "input_layernorm.weight"] = p.input_norm.weight.detach()
            sd[pre + "self_attn.q_proj.weight"] = _slots(p.q_proj.weight.detach(), kv, group, n, heads, hd, 0)
            sd[pre + "self_attn.k_proj.weight"] = _slots(p.k_proj.weight.detach(), kv, 1, 1, n_kv, hd, 0)
            sd[pre + "self_attn.v_proj.weight"] = _slots(p.v_proj.weight.detach(), kv, 1, 1, n_kv, hd, 0)
            sd[pre + "self_attn.o_proj.weight"] = _slots(p.o_proj.weight.detach(), kv, group, n, heads, hd, 1)
            if config["qkv_bias"]:
                for name, mod, g, m, slots in (("q_proj", p.q_proj, group, n, heads),
                                               ("k_proj", p.k_proj, 1, 1, n_kv), ("v_proj", p.v_proj, 1, 1, n_kv)):
                    bias = mod.bias.detach() if mod.bias is not None else torch.zeros(mod.out_features, dtype=dtype)
                    sd[pre + f"self_attn.{name}.bias"] = _slots(bias, kv, g, m, slots, hd, 0)
            if config["attention_bias"]:
                sd[pre + "self_attn.o_proj.bias"] = (b["o_bias"] if b["o_bias"] is not None
                                                     else torch.zeros(d)).to(dtype)
        if b["ff"]:
            sd[pre + "post_attention_layernorm.weight"] = p.post_attention_norm.weight.detach()
            for name in ("gate_proj", "up_proj", "down_proj"):
                sd[pre + f"mlp.{name}.weight"] = getattr(p, name).weight.detach()
            if config["mlp_bias"]:
                for name in ("gate_proj", "up_proj"):
                    mod = getattr(p, name)
                    sd[pre + f"mlp.{name}.bias"] = (mod.bias.detach() if mod.bias is not None
                                                    else torch.zeros(b["ff"], dtype=dtype))
                sd[pre + "mlp.down_proj.bias"] = (b["down_bias"] if b["down_bias"] is not None
                                                  else torch.zeros(d)).to(dtype)
    sd = {k: v.to("cpu").contiguous() for k, v in sd.items()}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(CONFIG_SOURCE, encoding="utf-8")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
    layers = [{"layer": b["src"], "kv_heads": b["kv"] and heads // b["n"], "n_heads_in_group": b["n"], "ff": b["ff"]}
              for b in blocks]
    return {"path": str(out), "architecture": ARCHITECTURE, "layers": layers, "notes": notes,
            "query_heads": heads}


__all__ = ["ARCHITECTURE", "MODEL_TYPE", "group_size_for", "plan_decilm", "decilm_config", "save_vllm"]
