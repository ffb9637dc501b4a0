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
from transformers import (LlamaConfig, LlamaForCausalLM, LlamaModel, MistralConfig, MistralForCausalLM, MistralModel,
                          Qwen2Config, Qwen2ForCausalLM, Qwen2Model)


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


class PgpruneLlamaConfig(LlamaConfig):
    model_type = "pgprune_llama"
    base_model_type = "llama"

    def __init__(self, pgprune_kv_heads=None, pgprune_intermediate=None, pgprune_kept_layers=None,
                 pgprune_out_bias=False, **kwargs):
        super().__init__(**kwargs)
        self.pgprune_out_bias = bool(pgprune_out_bias)
        self.pgprune_kv_heads = list(pgprune_kv_heads or [])
        self.pgprune_intermediate = list(pgprune_intermediate or [])
        self.pgprune_kept_layers = list(pgprune_kept_layers or [])


class PgpruneMistralConfig(MistralConfig):
    model_type = "pgprune_mistral"
    base_model_type = "mistral"

    def __init__(self, pgprune_kv_heads=None, pgprune_intermediate=None, pgprune_kept_layers=None,
                 pgprune_out_bias=False, **kwargs):
        super().__init__(**kwargs)
        self.pgprune_out_bias = bool(pgprune_out_bias)
        self.pgprune_kv_heads = list(pgprune_kv_heads or [])
        self.pgprune_intermediate = list(pgprune_intermediate or [])
        self.pgprune_kept_layers = list(pgprune_kept_layers or [])


class PgpruneQwen2Config(Qwen2Config):
    model_type = "pgprune_qwen2"
    base_model_type = "qwen2"

    def __init__(self, pgprune_kv_heads=None, pgprune_intermediate=None, pgprune_kept_layers=None,
                 pgprune_out_bias=False, **kwargs):
        super().__init__(**kwargs)
        self.pgprune_out_bias = bool(pgprune_out_bias)
        self.pgprune_kv_heads = list(pgprune_kv_heads or [])
        self.pgprune_intermediate = list(pgprune_intermediate or [])
        self.pgprune_kept_layers = list(pgprune_kept_layers or [])


class PgpruneLlamaForCausalLM(LlamaForCausalLM):
    config_class = PgpruneLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        _resize_layers(self.model, config)
        self.post_init()


class PgpruneMistralForCausalLM(MistralForCausalLM):
    config_class = PgpruneMistralConfig

    def __init__(self, config):
        super().__init__(config)
        _resize_layers(self.model, config)
        self.post_init()


class PgpruneQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = PgpruneQwen2Config

    def __init__(self, config):
        super().__init__(config)
        _resize_layers(self.model, config)
        self.post_init()


class PgpruneLlamaModel(LlamaModel):
    config_class = PgpruneLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        _resize_layers(self, config)
        self.post_init()


class PgpruneMistralModel(MistralModel):
    config_class = PgpruneMistralConfig

    def __init__(self, config):
        super().__init__(config)
        _resize_layers(self, config)
        self.post_init()


class PgpruneQwen2Model(Qwen2Model):
    config_class = PgpruneQwen2Config

    def __init__(self, config):
        super().__init__(config)
        _resize_layers(self, config)
        self.post_init()


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
