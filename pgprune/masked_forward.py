"""Forward passes of a LLaMA-family model under head / channel / layer masks, without copying the model.

Two modes:
* ``gather`` (default, the fast path): per layer, only the kept rows/columns of the weights are gathered and
  multiplied, dropped layers are skipped, so the cost shrinks with the sparsity;
* ``multiply``: the dense computation with the attention output of pruned KV groups and the pruned MLP channels
  zeroed before o_proj/down_proj (what the reference code does), a check on the fast path.
Both equal the physically sliced model (tests assert it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pgprune.adapters import get_adapter
from pgprune.adapters.base import Adapter, LayerParts
from pgprune.errors import PgpruneError
from pgprune.masks import Masks

MODES = ("gather", "multiply")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


class MaskedModel:
    """Evaluate a causal LM under masks. The wrapped model is never modified."""

    def __init__(self, model, adapter: Adapter | None = None):
        self.model = model
        self.adapter = adapter or get_adapter(model)
        self.layout = self.adapter.layout()
        self._parts = [self.adapter.parts(i) for i in range(self.layout.num_layers)]
        hd, g = self.layout.head_dim, self.layout.group_size
        # index helpers: kv group -> its query rows / kv rows
        self._hd, self._g = hd, g
        self._comp: list[dict[str, torch.Tensor]] | None = None

    # --- bias compensation --------------------------------------------------------------------------------
    @torch.no_grad()
    def set_compensation(self, means: dict[str, list[torch.Tensor]] | None) -> None:
        """Mean-input compensation (FLAP's bias compensation applied to any mask): the removed inputs of o_proj
        and down_proj are replaced by their calibration means, i.e. W[:, removed] @ mean[removed] is added to the
        module output. ``means``: {"o_proj": [per-layer mean input], "down_proj": [...]}; None turns it off."""
        if means is None:
            self._comp = None
            return
        comp = []
        for i, p in enumerate(self._parts):
            mo = means["o_proj"][i].to(p.o_proj.weight.device, torch.float32)
            md = means["down_proj"][i].to(p.down_proj.weight.device, torch.float32)
            if mo.numel() != p.o_proj.in_features or md.numel() != p.down_proj.in_features:
                raise PgpruneError(f"layer {i}: compensation means have {mo.numel()}/{md.numel()} entries, the "
                                   f"model has {p.o_proj.in_features}/{p.down_proj.in_features} inputs")
            comp.append({"o_mean": mo, "d_mean": md, "o_full": p.o_proj.weight.float() @ mo,
                         "d_full": p.down_proj.weight.float() @ md})
        self._comp = comp

    def _removed_contribution(self, i: int, which: str, kept_cols: torch.Tensor | None, weight_kept, dtype):
        """W[:, removed] @ mean[removed] = W @ mean - W[:, kept] @ mean[kept]."""
        c = self._comp[i]
        full, mean = (c["o_full"], c["o_mean"]) if which == "o" else (c["d_full"], c["d_mean"])
        if kept_cols is None:
            return full.to(dtype)
        return (full - weight_kept.float() @ mean[kept_cols]).to(dtype)

    # --- index helpers ------------------------------------------------------------------------------------
    def _rows(self, kv_idx: torch.Tensor, per_group: int) -> torch.Tensor:
        """Row indices of the kept groups when each group owns ``per_group`` heads of head_dim rows."""
        hd = self._hd
        heads = (kv_idx[:, None] * per_group + torch.arange(per_group, device=kv_idx.device)[None, :]).flatten()
        return (heads[:, None] * hd + torch.arange(hd, device=kv_idx.device)[None, :]).flatten()

    # --- attention ------------------------------------------------------------------------------------------
    def _attention(self, i: int, p: LayerParts, x, cos, sin, head_mask, mode):
        bsz, t, _ = x.shape
        hd, g = self._hd, self._g
        if mode == "gather" and head_mask is not None:
            kv_idx = torch.nonzero(head_mask.to(x.device)).flatten()
            if kv_idx.numel() == 0:
                return None if self._comp is None else self._removed_contribution(i, "o", None, None, x.dtype)
            q_rows, kv_rows = self._rows(kv_idx, g), self._rows(kv_idx, 1)
            wq, wk, wv = p.q_proj.weight[q_rows], p.k_proj.weight[kv_rows], p.v_proj.weight[kv_rows]
            bq = p.q_proj.bias[q_rows] if p.q_proj.bias is not None else None
            bk = p.k_proj.bias[kv_rows] if p.k_proj.bias is not None else None
            bv = p.v_proj.bias[kv_rows] if p.v_proj.bias is not None else None
            wo = p.o_proj.weight[:, q_rows]
        else:
            wq, wk, wv, wo = p.q_proj.weight, p.k_proj.weight, p.v_proj.weight, p.o_proj.weight
            bq, bk, bv = p.q_proj.bias, p.k_proj.bias, p.v_proj.bias
        q = _linear(x, wq, bq).view(bsz, t, -1, hd).transpose(1, 2)
        k = _linear(x, wk, bk).view(bsz, t, -1, hd).transpose(1, 2)
        v = _linear(x, wv, bv).view(bsz, t, -1, hd).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        window = self.adapter.sliding_window(i)
        scale = self.adapter.attention_scaling(i)
        if window is not None and window < t:
            pos = torch.arange(t, device=x.device)
            allowed = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=g > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=g > 1)
        out = out.transpose(1, 2)  # [b, t, heads, hd]
        if mode == "multiply" and head_mask is not None:
            keep = head_mask.to(out.device, out.dtype).repeat_interleave(g)
            out = out * keep[None, None, :, None]
        out = out.reshape(bsz, t, -1)
        y = _linear(out, wo, p.o_proj.bias)
        if self._comp is not None and head_mask is not None:
            keep_cols = head_mask.to(x.device).repeat_interleave(g * hd)
            cols = torch.nonzero(keep_cols).flatten()
            y = y + self._removed_contribution(i, "o", cols, p.o_proj.weight[:, cols], y.dtype)
        return y

    # --- MLP ------------------------------------------------------------------------------------------------
    def _mlp(self, i: int, p: LayerParts, x, channel_mask, mode):
        comp = self._comp is not None and channel_mask is not None
        if mode == "gather" and channel_mask is not None:
            idx = torch.nonzero(channel_mask.to(x.device)).flatten()
            if idx.numel() == 0:
                return self._removed_contribution(i, "d", None, None, x.dtype) if comp else None
            wg, wu, wd = p.gate_proj.weight[idx], p.up_proj.weight[idx], p.down_proj.weight[:, idx]
            bg = p.gate_proj.bias[idx] if p.gate_proj.bias is not None else None
            bu = p.up_proj.bias[idx] if p.up_proj.bias is not None else None
            hmid = p.act_fn(_linear(x, wg, bg)) * _linear(x, wu, bu)
            y = _linear(hmid, wd, p.down_proj.bias)
            return y + self._removed_contribution(i, "d", idx, wd, y.dtype) if comp else y
        hmid = p.act_fn(p.gate_proj(x)) * p.up_proj(x)
        if mode == "multiply" and channel_mask is not None:
            hmid = hmid * channel_mask.to(hmid.device, hmid.dtype)
        y = p.down_proj(hmid)
        if comp:
            idx = torch.nonzero(channel_mask.to(x.device)).flatten()
            y = y + self._removed_contribution(i, "d", idx, p.down_proj.weight[:, idx], y.dtype)
        return y

    # --- whole model ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, masks: Masks | None = None, mode: str = "gather",
                      collect: bool = False, validate: bool = True):
        """Final (pre-norm) hidden states; with ``collect`` also the input of every layer (for layer metrics)."""
        if mode not in MODES:
            raise PgpruneError(f"mode={mode!r} is not allowed; allowed: {MODES}")
        if masks is not None and validate:
            masks.validate(self.layout)
        h = self.adapter.embed(input_ids)
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :].expand(input_ids.shape[0], -1)
        cos, sin = self.adapter.rotary(h, pos)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        inputs = []
        for i, p in enumerate(self._parts):
            if collect:
                inputs.append(h)
            if masks is not None and not masks.layer_kept(i):
                continue
            hm = masks.heads[i] if masks is not None else None
            cm = masks.channels[i] if masks is not None else None
            a = self._attention(i, p, p.input_norm(h), cos, sin, hm, mode)
            if a is not None:
                h = h + a
            m = self._mlp(i, p, p.post_attention_norm(h), cm, mode)
            if m is not None:
                h = h + m
        return (h, inputs) if collect else h

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, masks: Masks | None = None, mode: str = "gather",
               validate: bool = True) -> torch.Tensor:
        h = self.hidden_states(input_ids, masks, mode, validate=validate)
        return self.adapter.lm_head()(self.adapter.final_norm(h))

    @torch.no_grad()
    def loss(self, input_ids: torch.Tensor, masks: Masks | None = None, mode: str = "gather",
             chunk: int = 256, validate: bool = True) -> float:
        """Mean next-token cross-entropy (positions 1..T-1 of every row), computed in float32 chunks."""
        h = self.adapter.final_norm(self.hidden_states(input_ids, masks, mode, validate=validate))
        h = h[:, :-1].reshape(-1, h.shape[-1])
        target = input_ids[:, 1:].reshape(-1)
        head = self.adapter.lm_head()
        total = torch.zeros((), dtype=torch.float64)
        for s in range(0, h.shape[0], chunk):
            logits = head(h[s:s + chunk]).float()
            total += F.cross_entropy(logits, target[s:s + chunk], reduction="sum").double().cpu()
        return float(total / target.numel())

    def __call__(self, input_ids, masks: Masks | None = None, mode: str = "gather", validate: bool = True):
        return self.logits(input_ids, masks, mode, validate)
