"""Pruned LLaMA-family models with per-layer widths, loadable with ``AutoModelForCausalLM.from_pretrained``.

This file is copied next to the saved weights (``trust_remote_code=True``). It depends only on transformers and
torch. The config adds three lists to the family's own config:

* ``pgprune_kv_heads``: KV heads kept in each saved layer (query heads = kv heads x group size),
* ``pgprune_intermediate``: MLP channels kept in each saved layer,
* ``pgprune_kept_layers``: index of each saved layer in the original model (dropped layers are absent);
``num_hidden_layers`` is the number of saved layers. ``pgprune_out_bias`` gives o_proj and down_proj a bias
(FLAP-style compensation of the removed units' mean output).

``auto_map`` maps ``AutoConfig``, ``AutoModelForCausalLM`` (the ``Pgprune*ForCausalLM`` classes) and ``AutoModel``
(the decoder alone, ``Pgprune*Model``: hidden states, no LM head).
"""
from __future__ import annotations

from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
)


def _resize_layers(decoder, config) -> None:
    """Replace the projections of every layer of ``decoder`` (a LlamaModel-like module) by the per-layer widths."""
    kv = list(config.pgprune_kv_heads)
    inter = list(config.pgprune_intermediate)
    if len(kv) != config.num_hidden_layers or len(inter) != config.num_hidden_layers:
        raise ValueError(f"pgprune config: {len(kv)} kv-head counts and {len(inter)} intermediate sizes for "
                         f"{config.num_hidden_layers} layers")
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    d = config.hidden_size
    for i, layer in enumerate(decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        nq = kv[i] * group * hd
        nkv = kv[i] * hd
        qb, kb, vb = attn.q_proj.bias is not None, attn.k_proj.bias is not None, attn.v_proj.bias is not None
        out_bias = bool(getattr(config, "pgprune_out_bias", False))
        ob = attn.o_proj.bias is not None or out_bias
        attn.q_proj = nn.Linear(d, nq, bias=qb)
        attn.k_proj = nn.Linear(d, nkv, bias=kb)
        attn.v_proj = nn.Linear(d, nkv, bias=vb)
        attn.o_proj = nn.Linear(nq, d, bias=ob)
        attn.num_key_value_groups = group
        mb = mlp.gate_proj.bias is not None
        db = mlp.down_proj.bias is not None or out_bias
        mlp.gate_proj = nn.Linear(d, inter[i], bias=mb)
        mlp.up_proj = nn.Linear(d, inter[i], bias=mb)
        mlp.down_proj = nn.Linear(inter[i], d, bias=db)
        mlp.intermediate_size = inter[i]


class _PrunedConfig:
    """The pgprune fields on top of a family's config (mixed in before it)."""

    def __init__(self, pgprune_kv_heads=None, pgprune_intermediate=None, pgprune_kept_layers=None,
                 pgprune_out_bias=False, **kwargs):
        super().__init__(**kwargs)
        self.pgprune_out_bias = bool(pgprune_out_bias)
        self.pgprune_kv_heads = list(pgprune_kv_heads or [])
        self.pgprune_intermediate = list(pgprune_intermediate or [])
        self.pgprune_kept_layers = list(pgprune_kept_layers or [])


class _Resized:
    """A family's model (causal LM or bare decoder, mixed in before it) with the config's per-layer widths."""

    def __init__(self, config):
        super().__init__(config)
        _resize_layers(self.model if hasattr(self, "lm_head") else self, config)
        self.post_init()


class PgpruneLlamaConfig(_PrunedConfig, LlamaConfig):
    model_type = "pgprune_llama"
    base_model_type = "llama"


class PgpruneMistralConfig(_PrunedConfig, MistralConfig):
    model_type = "pgprune_mistral"
    base_model_type = "mistral"


class PgpruneQwen2Config(_PrunedConfig, Qwen2Config):
    model_type = "pgprune_qwen2"
    base_model_type = "qwen2"


class PgpruneLlamaForCausalLM(_Resized, LlamaForCausalLM):
    config_class = PgpruneLlamaConfig


class PgpruneMistralForCausalLM(_Resized, MistralForCausalLM):
    config_class = PgpruneMistralConfig


class PgpruneQwen2ForCausalLM(_Resized, Qwen2ForCausalLM):
    config_class = PgpruneQwen2Config


class PgpruneLlamaModel(_Resized, LlamaModel):
    config_class = PgpruneLlamaConfig


class PgpruneMistralModel(_Resized, MistralModel):
    config_class = PgpruneMistralConfig


class PgpruneQwen2Model(_Resized, Qwen2Model):
    config_class = PgpruneQwen2Config


# family -> (config class, causal-LM class)
PRUNED_CLASSES = {
    "llama": (PgpruneLlamaConfig, PgpruneLlamaForCausalLM),
    "mistral": (PgpruneMistralConfig, PgpruneMistralForCausalLM),
    "qwen2": (PgpruneQwen2Config, PgpruneQwen2ForCausalLM),
}

# family -> decoder-only class (``AutoModel``)
PRUNED_BASE_CLASSES = {
    "llama": PgpruneLlamaModel,
    "mistral": PgpruneMistralModel,
    "qwen2": PgpruneQwen2Model,
}
