"""What every model-family adapter provides: the prunable layout and access to a decoder layer's parts.

The prunable units are
* ``heads``: one unit per KV-head group (a KV head with its G query heads and their o_proj columns),
* ``channels``: one unit per MLP intermediate channel (gate/up rows and the down_proj column),
* ``layers``: one unit per decoder layer.
Parameter counts follow the paper: the decoder layers' linear weights (plus their biases where a family has them)
are the prunable parameters; embeddings, lm_head and norms are counted only in the total.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from pgprune.errors import PgpruneError


@dataclass(frozen=True)
class LayerParts:
    """Modules of one decoder layer (whatever the family calls them)."""

    input_norm: nn.Module
    post_attention_norm: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    act_fn: nn.Module


@dataclass(frozen=True)
class Layout:
    """Shape of a model's prunable structure, per layer (per-layer lists allow already-pruned models)."""

    family: str
    hidden_size: int
    head_dim: int
    group_size: int  # query heads per KV head
    kv_heads: tuple[int, ...]  # per layer
    intermediate: tuple[int, ...]  # per layer
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    non_prunable_params: int = 0  # embeddings, lm_head (if untied), norms
    sliding_window: tuple[int | None, ...] = field(default=())

    @property
    def num_layers(self) -> int:
        return len(self.kv_heads)

    @property
    def n_units(self) -> dict[str, int]:
        return {"heads": sum(self.kv_heads), "channels": sum(self.intermediate), "layers": self.num_layers}

    # --- parameter accounting -------------------------------------------------------------------------------
    def head_unit_params(self) -> int:
        """Parameters removed with one KV group: G query rows + k,v rows + G o_proj columns (+ biases)."""
        d, hd, g = self.hidden_size, self.head_dim, self.group_size
        n = 2 * g * hd * d + 2 * hd * d
        if self.qkv_bias:
            n += g * hd + 2 * hd
        return n

    def channel_unit_params(self) -> int:
        n = 3 * self.hidden_size
        if self.mlp_bias:
            n += 2  # gate and up bias entries (down's bias is per output, not per channel)
        return n

    def layer_fixed_params(self, out_bias: bool = False) -> int:
        """Per-layer parameters not attached to a unit: o_proj/down_proj biases (norms are non-prunable).
        ``out_bias``: the pruned model gains both (mean compensation) where the family has none."""
        n = 0
        if self.o_bias or out_bias:
            n += self.hidden_size
        if self.mlp_bias or out_bias:
            n += self.hidden_size
        return n

    def layer_params(self, kv_heads: int, channels: int, out_bias: bool = False) -> int:
        if kv_heads == 0 and channels == 0:
            return 0
        return (kv_heads * self.head_unit_params() + channels * self.channel_unit_params()
                + self.layer_fixed_params(out_bias))

    def prunable_params(self, masks=None, out_bias: bool = False) -> int:
        """Decoder-layer linear parameters kept under ``masks`` (all of them when masks is None), with the
        compensation biases of a pruned model when ``out_bias``."""
        total = 0
        for i in range(self.num_layers):
            if masks is None:
                total += self.layer_params(self.kv_heads[i], self.intermediate[i])
            elif masks.layer_kept(i):
                total += self.layer_params(int(masks.heads[i].sum()), int(masks.channels[i].sum()), out_bias)
        return total

    def norm_params_per_layer(self) -> int:
        return 2 * self.hidden_size

    def total_params(self, masks=None, out_bias: bool = False) -> int:
        """All parameters: prunable + embeddings/head/final norm + the norms of kept layers."""
        kept_layers = self.num_layers if masks is None else sum(masks.layer_kept(i) for i in range(self.num_layers))
        return (self.prunable_params(masks, out_bias) + self.non_prunable_params
                + kept_layers * self.norm_params_per_layer())


class Adapter:
    """Base class: subclasses bind one model family (module names, biases, attention details)."""

    family: str = "base"
    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.check_supported(self.config)

    # --- validation -----------------------------------------------------------------------------------------
    @classmethod
    def check_supported(cls, config) -> None:
        heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        if heads % kv:
            raise PgpruneError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        act = getattr(config, "hidden_act", "silu")
        if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"):
            raise PgpruneError(f"hidden_act={act!r} is not supported; allowed: silu, swish, gelu, gelu_pytorch_tanh, relu")
        tp = getattr(config, "pretraining_tp", 1) or 1
        if tp != 1:
            # the reference code silently ignored MLP masks here; our functional forward does not use the tp path,
            # but the HF forward we compare against would differ, so refuse loudly.
            raise PgpruneError(f"pretraining_tp={tp} is not supported (allowed: 1); set config.pretraining_tp = 1")

    # --- structure ------------------------------------------------------------------------------------------
    def decoder(self) -> nn.Module:
        return self.model.model

    def layers(self) -> nn.ModuleList:
        return self.decoder().layers

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.decoder().embed_tokens(input_ids)

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder().norm(h)

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def rotary(self, h: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.decoder().rotary_emb(h, position_ids)

    def parts(self, i: int) -> LayerParts:
        layer = self.layers()[i]
        attn, mlp = layer.self_attn, layer.mlp
        return LayerParts(layer.input_layernorm, layer.post_attention_layernorm, attn.q_proj, attn.k_proj,
                          attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)

    def head_dim(self) -> int:
        cfg = self.config
        return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def attention_scaling(self, i: int) -> float:
        return float(getattr(self.layers()[i].self_attn, "scaling", self.head_dim() ** -0.5))

    def sliding_window(self, i: int) -> int | None:
        """Window of layer i's attention, None for full attention."""
        cfg = self.config
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if window is None:
            return None
        if types is not None and i < len(types):
            return int(window) if types[i] == "sliding_attention" else None
        return int(window)

    def layout(self) -> Layout:
        hd = self.head_dim()
        kv, inter = [], []
        for i in range(len(self.layers())):
            p = self.parts(i)
            kv.append(p.k_proj.out_features // hd)
            inter.append(p.gate_proj.out_features)
        q0 = self.parts(0).q_proj.out_features // hd if len(self.layers()) else 0
        group = q0 // kv[0] if kv and kv[0] else self.config.num_attention_heads // max(1, self.config.num_key_value_heads)
        prunable_ids = set()
        for i in range(len(self.layers())):
            p = self.parts(i)
            for m in (p.q_proj, p.k_proj, p.v_proj, p.o_proj, p.gate_proj, p.up_proj, p.down_proj, p.input_norm,
                      p.post_attention_norm):
                for t in m.parameters():
                    prunable_ids.add(id(t))
        non_prunable = sum(t.numel() for t in self.model.parameters() if id(t) not in prunable_ids)
        p0 = self.parts(0)
        return Layout(
            family=self.family, hidden_size=self.config.hidden_size, head_dim=hd, group_size=group,
            kv_heads=tuple(kv), intermediate=tuple(inter), qkv_bias=p0.q_proj.bias is not None,
            o_bias=p0.o_proj.bias is not None, mlp_bias=p0.gate_proj.bias is not None,
            non_prunable_params=non_prunable,
            sliding_window=tuple(self.sliding_window(i) for i in range(len(self.layers()))),
        )
