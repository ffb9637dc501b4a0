"""Forward passes of a LLaMA-family model under head / channel / layer masks, without copying the model.

Per layer, the masks become a *plan* (built on the CPU, where the masks are, and sent to the layer's device in one
copy per call): which samples keep the layer, which KV groups / MLP channels are computed (gathered weight rows and
columns) and, per sample, which of those are zeroed.

Modes of one mask (``hidden_states`` / ``logits`` / ``loss``):

* ``gather`` (default, the fast path): only the kept rows/columns of the weights are gathered and multiplied,
  dropped layers are skipped, so the cost shrinks with the sparsity;
* ``multiply``: the dense computation with the attention output of pruned KV groups and the pruned MLP channels
  zeroed before o_proj/down_proj (what the reference code does), a check on the fast path.

Modes of K masks on one batch (``sample_losses``, the search's step):

* ``separate``: one gathered forward per mask;
* ``batched``: one forward over K*B rows. Per layer the weights of the *union* of the units kept by any sample are
  gathered once, each sample's rows zero the units its own mask removes (after attention / the MLP activation, so
  the sum over the union equals the sum over its kept units), the rows of samples that drop the layer bypass it
  (only the rows of samples keeping the layer are computed; a layer no sample keeps is skipped), and the mean
  compensation is per sample (see below). Weights are read once per step instead of K times, which pays on GPUs
  (memory-bound small batches); on a CPU the cost is the union's width times K rows, more than K own widths.
* ``auto``: batched on CUDA, separate elsewhere.

All modes equal the physically sliced model (tests assert it), up to float rounding (the union's zeroed columns
add exact zeros, but the summation order of the matmuls differs).

Execution is layer-major: every row of every sample (and every calibration batch of a sweep) passes through layer
i before layer i+1 starts, so a layer streamed from CPU memory or disk (:mod:`pgprune.core.weights`) is loaded once per
step. Layers spread over several devices (``model.device_map: auto``) are followed by moving the hidden states.

Mean compensation (``set_compensation``): the removed inputs of o_proj and down_proj are replaced by their
calibration means, i.e. W[:, removed_j] @ mean[removed_j] is added to the module output of sample j; computed as
W @ mean - W_U @ (mean_U * keep_j) with U the computed union (W @ mean is precomputed per layer).

Numerics: the model's dtype is used throughout (bf16 on GPUs: load the model in bfloat16; no autocast, so the search
sees exactly the numbers of the evaluated model); log-softmax / cross-entropy and the compensation run in float32,
per-token losses are summed in float64. The step's only host synchronisation is the final copy of the K losses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pgprune.core.adapters import get_adapter
from pgprune.core.adapters.base import Adapter, LayerParts
from pgprune.core.masks import Masks
from pgprune.core.weights import WeightSource
from pgprune.errors import PgpruneError

MODES = ("gather", "multiply")
SAMPLE_MODES = ("auto", "batched", "separate")

Taps = Callable[..., None]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


_F32_CHUNK = 1 << 20  # elements of a weight converted to float32 at a time


def _f32_matmul_t(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """float32 ``v @ w.T`` (v [k, cols] float32, w [rows, cols] any dtype) converting ``w`` a block of rows at a
    time: no float32 copy of the whole weight (small transients keep the CPU allocator from growing)."""
    if w.dtype == torch.float32 or w.device.type != "cpu":  # GPUs: the caching allocator reuses the copy
        return v @ w.float().t()
    rows = max(1, _F32_CHUNK // max(1, w.shape[1]))
    if rows >= w.shape[0]:
        return v @ w.float().t()
    return torch.cat([v @ w[s:s + rows].float().t() for s in range(0, w.shape[0], rows)], dim=1)


@dataclass
class _LayerPlan:
    """What one layer computes for one group of rows (K samples x B rows each, sample-major)."""

    skip: bool = False
    samples: torch.Tensor | None = None  # long [K']: samples keeping the layer (None: all K)
    n_keep: int = 1  # K'
    comp: bool = False  # masks given: apply mean compensation (if set)
    # attention: computed KV groups (None: all), per-sample keep over them [K', n_groups] (None: all kept)
    q_rows: torch.Tensor | None = None
    kv_rows: torch.Tensor | None = None
    n_groups: int = -1
    head_keep: torch.Tensor | None = None
    head_comp: bool = True  # some sample removes a group here (else its compensation is exactly zero)
    head_flag: torch.Tensor | None = None  # float [K']: 1 where the sample removes a group (None: every sample)
    head_none: torch.Tensor | None = None  # float [K']: 1 where the sample keeps no group (its o_proj bias is off)
    # MLP: computed channels (None: all), per-sample keep [K', n_ch]
    ch_idx: torch.Tensor | None = None
    n_ch: int = -1
    ch_keep: torch.Tensor | None = None
    ch_comp: bool = True
    ch_flag: torch.Tensor | None = None
    ch_none: torch.Tensor | None = None


_FULL = _LayerPlan()


@dataclass
class _Group:
    """Rows that share one plan: ``k`` samples of ``b`` rows each (h is [k*b, t, d])."""

    h: torch.Tensor
    plans: list
    k: int
    b: int


def _np_bool(t) -> np.ndarray:
    return t.numpy() if t.dtype == torch.bool else t.bool().numpy()


class _Packer:
    """Collects the (numpy) index/keep arrays of a call's plans and sends them to each device in one copy per
    dtype (int64 indices, float32 keep factors): the only host-to-device traffic of a step besides the ids."""

    def __init__(self):
        self.parts: dict[str, dict[str, list[np.ndarray]]] = {}
        self.refs: list[tuple[object, str, str, str, int, tuple]] = []

    def put(self, obj, attr: str, a: np.ndarray | None, device: torch.device) -> None:
        if a is None:
            return
        if device.type == "cpu":
            setattr(obj, attr, torch.from_numpy(np.ascontiguousarray(a)))
            return
        key = a.dtype.str
        lst = self.parts.setdefault(str(device), {}).setdefault(key, [])
        lst.append(a.reshape(-1))
        self.refs.append((obj, attr, str(device), key, len(lst) - 1, tuple(a.shape)))

    def send(self) -> None:
        sent: dict[tuple[str, str], list[torch.Tensor]] = {}
        for dev, by_dtype in self.parts.items():
            for key, lst in by_dtype.items():
                buf = torch.from_numpy(np.concatenate(lst))
                if dev.startswith("cuda"):
                    buf = buf.pin_memory()
                buf = buf.to(dev, non_blocking=True)
                sent[(dev, key)] = list(torch.split(buf, [x.size for x in lst]))
        for obj, attr, dev, key, k, shape in self.refs:
            setattr(obj, attr, sent[(dev, key)][k].view(shape))


class MaskedModel:
    """Evaluate a causal LM under masks. The wrapped model is never modified.

    ``device``: where streamed layers run and input ids go (default: the device the model was loaded for).
    """

    def __init__(self, model, adapter: Adapter | None = None, device: torch.device | str | None = None,
                 prefetch: bool = True):
        self.model = model
        self.adapter = adapter or get_adapter(model)
        self.layout = self.adapter.layout()
        self.source = WeightSource(model, self.adapter, device, prefetch=prefetch)
        self.device = self.source.main
        self._hd, self._g = self.layout.head_dim, self.layout.group_size
        self._head_off = np.concatenate([[0], np.cumsum(self.layout.kv_heads)]).astype(np.int64)
        self._ch_off = np.concatenate([[0], np.cumsum(self.layout.intermediate)]).astype(np.int64)
        n = self.layout.num_layers
        self._window = [self.adapter.sliding_window(i) for i in range(n)]
        self._scale = [self.adapter.attention_scaling(i) for i in range(n)]
        self._comp: list[dict[str, torch.Tensor]] | None = None
        self._refit = None
        self._head_device = self.adapter.lm_head().weight.device
        if self._head_device.type == "meta":
            raise PgpruneError("lm_head is on the meta device; load the model with pgprune.hf.loading.load_model")

    @property
    def streamed(self) -> bool:
        return self.source.streamed

    # --- refit of the kept weights --------------------------------------------------------------------------
    def set_refit(self, refit) -> None:
        """Evaluate every mask with o_proj/down_proj refit for its kept inputs: ``refit.weights(i, name, cols)``
        gives (W' [out, k], b' [out]) for the kept input columns ``cols`` (:class:`pgprune.core.refit.GramRefit`);
        it replaces the gathered weight and bias (and the mean compensation, which the refit's intercept
        contains) wherever a mask removes inputs. One mask per row group (sample_mode separate, the CPU default);
        None turns it off. Not with a streamed model."""
        if refit is not None and self.streamed:
            raise PgpruneError("the search's refit loss needs the model in memory (model.offload: none)")
        self._refit = refit

    def _refit_cols(self, lp: _LayerPlan, which: str) -> bool:
        if self._refit is None or not lp.comp or not getattr(lp, f"{which}_comp"):
            return False
        if getattr(lp, f"{which}_keep") is not None or lp.n_keep != 1:
            raise PgpruneError("the search's refit loss evaluates one mask per forward; set search.sample_mode: "
                               "separate")
        return True

    # --- bias compensation --------------------------------------------------------------------------------
    @torch.no_grad()
    def set_compensation(self, means: dict[str, list[torch.Tensor]] | None) -> None:
        """Mean-input compensation (FLAP's bias compensation applied to any mask): the removed inputs of o_proj
        and down_proj are replaced by their calibration means, i.e. W[:, removed] @ mean[removed] is added to the
        module output. ``means``: {"o_proj": [per-layer mean input], "down_proj": [...]}; None turns it off.
        (A streamed model reads every layer once here to precompute W @ mean.)"""
        if means is None:
            self._comp = None
            return
        n = self.layout.num_layers
        if len(means["o_proj"]) != n or len(means["down_proj"]) != n:
            raise PgpruneError(f"compensation means cover {len(means['o_proj'])}/{len(means['down_proj'])} layers, "
                               f"the model has {n}")
        comp = []
        try:
            for i in range(n):
                with self.source.layer(i, i + 1 if i + 1 < n else None) as p:
                    dev = self.source.devices[i]
                    mo = means["o_proj"][i].to(dev, torch.float32)
                    md = means["down_proj"][i].to(dev, torch.float32)
                    if mo.numel() != p.o_proj.in_features or md.numel() != p.down_proj.in_features:
                        raise PgpruneError(f"layer {i}: compensation means have {mo.numel()}/{md.numel()} entries, the"
                                           f" model has {p.o_proj.in_features}/{p.down_proj.in_features} inputs")
                    comp.append({"o_mean": mo, "d_mean": md, "o_full": _f32_matmul_t(mo[None], p.o_proj.weight)[0],
                                 "d_full": _f32_matmul_t(md[None], p.down_proj.weight)[0]})
        finally:
            self.source.release()
        self._comp = comp

    def _comp_term(self, i: int, which: str, w_u: torch.Tensor, cols: torch.Tensor | None,
                   keep_cols: torch.Tensor | None, flag: torch.Tensor | None) -> torch.Tensor:
        """W[:, removed_j] @ mean[removed_j] per sample: float32 [K' or 1, d] = W @ mean - W_U @ (mean_U * keep_j)."""
        c = self._comp[i]
        full, mean = (c["o_full"], c["o_mean"]) if which == "o" else (c["d_full"], c["d_mean"])
        if w_u is None:  # nothing computed: everything removed
            return full[None, :]
        mean_u = mean if cols is None else mean[cols]
        v = mean_u[None, :] if keep_cols is None else mean_u[None, :] * keep_cols  # [K' or 1, cols]
        out = full[None, :] - _f32_matmul_t(v, w_u)  # [K' or 1, d]
        return out if flag is None else out * flag[:, None]

    @staticmethod
    def _add_per_sample(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """y [K'*B, t, d] + v [K' or 1, d] (row block j gets v[j])."""
        if v.shape[0] == 1:
            return y + v[0].to(y.dtype)
        kp = v.shape[0]
        return (y.view(kp, -1, *y.shape[1:]) + v.to(y.dtype)[:, None, None, :]).view(y.shape)

    # --- plans ----------------------------------------------------------------------------------------------
    def _plans(self, masks: list[Masks] | None, multiply: bool = False, packer: _Packer | None = None) -> list:
        """Per-layer plans of one group of samples, built with numpy on the CPU (unions and per-layer kept counts
        for all layers at once; a few cheap calls per layer); the index/keep arrays are queued on ``packer``."""
        n = self.layout.num_layers
        if masks is None:
            return [_FULL] * n
        own = packer is None
        packer = packer or _Packer()
        k = len(masks)
        layers = np.stack([_np_bool(m.layers) for m in masks])  # [K, L]
        units = {}
        for kind, lists, off in (("head", [m.heads for m in masks], self._head_off),
                                 ("ch", [m.channels for m in masks], self._ch_off)):
            keep = np.stack([np.concatenate([_np_bool(x) for x in lst]) for lst in lists])  # [K, all units]
            union = keep.any(0)  # [all units], over all samples
            counts = np.add.reduceat(keep.view(np.uint8), off[:-1], axis=1, dtype=np.int64)  # [K, L] kept per layer
            units[kind] = (keep, union, counts, off)
        plans = []
        for i in range(n):
            dev = self.source.devices[i]
            kept = np.flatnonzero(layers[:, i])
            if kept.size == 0:
                plans.append(_LayerPlan(skip=True))
                continue
            lp = _LayerPlan(n_keep=int(kept.size), comp=True)
            if kept.size < k:
                packer.put(lp, "samples", kept.astype(np.int64), dev)
            for kind, (keep, union, counts, off) in units.items():
                a, b = int(off[i]), int(off[i + 1])
                if kept.size < k:  # the union over the samples keeping this layer
                    self._unit_plan(lp, kind, keep[kept, a:b].any(0), counts[kept, i], keep[kept], a, b,
                                    multiply, dev, packer)
                else:
                    self._unit_plan(lp, kind, union[a:b], counts[:, i], keep, a, b, multiply, dev, packer)
            plans.append(lp)
        if own:
            packer.send()
        return plans

    def _unit_plan(self, lp: _LayerPlan, kind: str, union: np.ndarray, counts: np.ndarray, keep: np.ndarray,
                   a: int, b: int, multiply: bool, dev, packer) -> None:
        """Fill the computed units (gather indices) and per-sample keep factors of one module of a layer plan.
        ``union``: bool [units] kept by some sample; ``counts``: int [K'] units each sample keeps; ``keep``: bool
        [K', all units] of the samples keeping the layer, this layer's units at columns a:b."""
        total = b - a
        idx = np.arange(total) if multiply else np.flatnonzero(union)
        n_u = int(idx.size)
        if kind == "head":
            lp.n_groups = n_u
            if n_u < total:
                hd, g = self._hd, self._g
                q_rows = ((idx[:, None] * g + np.arange(g)[None, :]).reshape(-1, 1) * hd + np.arange(hd)).reshape(-1)
                kv_rows = (idx[:, None] * hd + np.arange(hd)[None, :]).reshape(-1)
                packer.put(lp, "q_rows", q_rows.astype(np.int64), dev)
                packer.put(lp, "kv_rows", kv_rows.astype(np.int64), dev)
        else:
            lp.n_ch = n_u
            if n_u < total:
                packer.put(lp, "ch_idx", idx.astype(np.int64), dev)
        if n_u and bool((counts < n_u).any()):  # some sample keeps less than the union: per-sample factors
            packer.put(lp, f"{kind}_keep", keep[:, a + idx].astype(np.float32), dev)
        removed_any = counts < total  # [K']
        if not removed_any.any():
            setattr(lp, f"{kind}_comp", False)  # nothing removed by any sample: the compensation is exactly zero
        elif not removed_any.all():
            packer.put(lp, f"{kind}_flag", removed_any.astype(np.float32), dev)
        if n_u:
            none = counts == 0
            if none.any():
                packer.put(lp, f"{kind}_none", none.astype(np.float32), dev)

    # --- attention ------------------------------------------------------------------------------------------
    def _attention(self, i: int, p: LayerParts, x, cos, sin, lp: _LayerPlan, taps: Taps | None):
        rows, t, _ = x.shape
        hd, g = self._hd, self._g
        comp = self._comp is not None and lp.comp and lp.head_comp
        if lp.n_groups == 0:
            return self._comp_term(i, "o", None, None, None, None)[0].to(x.dtype) if comp else None
        if lp.q_rows is not None:
            q_rows, kv_rows = lp.q_rows, lp.kv_rows
            wq, wk, wv = p.q_proj.weight[q_rows], p.k_proj.weight[kv_rows], p.v_proj.weight[kv_rows]
            bq = p.q_proj.bias[q_rows] if p.q_proj.bias is not None else None
            bk = p.k_proj.bias[kv_rows] if p.k_proj.bias is not None else None
            bv = p.v_proj.bias[kv_rows] if p.v_proj.bias is not None else None
            wo = p.o_proj.weight[:, q_rows]
        else:
            q_rows = None
            wq, wk, wv, wo = p.q_proj.weight, p.k_proj.weight, p.v_proj.weight, p.o_proj.weight
            bq, bk, bv = p.q_proj.bias, p.k_proj.bias, p.v_proj.bias
        q = _linear(x, wq, bq).view(rows, t, -1, hd).transpose(1, 2)  # [r, heads, t, hd]
        k = _linear(x, wk, bk).view(rows, t, -1, hd).transpose(1, 2)  # [r, kv, t, hd]
        v = _linear(x, wv, bv).view(rows, t, -1, hd).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        window, scale = self._window[i], self._scale[i]
        if window is not None and window < t:
            pos = torch.arange(t, device=x.device)
            allowed = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=g > 1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=g > 1)
        out = out.transpose(1, 2)  # [r, t, heads, hd]
        keep_cols = None
        if lp.head_keep is not None:
            kp = lp.head_keep.shape[0]
            keep = lp.head_keep.to(out.dtype)  # [K', n_groups]
            out = out.reshape(kp, rows // kp, t, lp.n_groups, g * hd) * keep[:, None, None, :, None]
            if comp:
                keep_cols = lp.head_keep.repeat_interleave(g * hd, dim=1)  # [K', n_groups*G*hd]
        out = out.reshape(rows, t, -1)
        if taps is not None:
            taps(i, "o_proj", out)
        if self._refit_cols(lp, "head"):
            cols = q_rows if q_rows is not None else torch.arange(wo.shape[1], device=wo.device)
            wr, br = self._refit.weights(i, "o_proj", cols)
            return _linear(out, wr, br)
        y = _linear(out, wo, p.o_proj.bias)
        if lp.head_none is not None and p.o_proj.bias is not None:
            y = self._add_per_sample(y, -lp.head_none[:, None] * p.o_proj.bias[None, :])
        if comp:
            y = self._add_per_sample(y, self._comp_term(i, "o", wo, q_rows, keep_cols, lp.head_flag))
        return y

    # --- MLP ------------------------------------------------------------------------------------------------
    def _mlp(self, i: int, p: LayerParts, x, lp: _LayerPlan, taps: Taps | None):
        comp = self._comp is not None and lp.comp and lp.ch_comp
        if lp.n_ch == 0:
            return self._comp_term(i, "d", None, None, None, None)[0].to(x.dtype) if comp else None
        if lp.ch_idx is not None:
            idx = lp.ch_idx
            wg, wu, wd = p.gate_proj.weight[idx], p.up_proj.weight[idx], p.down_proj.weight[:, idx]
            bg = p.gate_proj.bias[idx] if p.gate_proj.bias is not None else None
            bu = p.up_proj.bias[idx] if p.up_proj.bias is not None else None
        else:
            idx = None
            wg, wu, wd = p.gate_proj.weight, p.up_proj.weight, p.down_proj.weight
            bg, bu = p.gate_proj.bias, p.up_proj.bias
        hmid = p.act_fn(_linear(x, wg, bg)) * _linear(x, wu, bu)  # [r, t, n_ch]
        if lp.ch_keep is not None:
            kp = lp.ch_keep.shape[0]
            hmid = (hmid.view(kp, -1, *hmid.shape[1:]) * lp.ch_keep.to(hmid.dtype)[:, None, None, :]).view(hmid.shape)
        if taps is not None:
            taps(i, "down_proj", hmid)
        if self._refit_cols(lp, "ch"):
            cols = idx if idx is not None else torch.arange(wd.shape[1], device=wd.device)
            wr, br = self._refit.weights(i, "down_proj", cols)
            return _linear(hmid, wr, br)
        y = _linear(hmid, wd, p.down_proj.bias)
        if lp.ch_none is not None and p.down_proj.bias is not None:
            y = self._add_per_sample(y, -lp.ch_none[:, None] * p.down_proj.bias[None, :])
        if comp:
            y = self._add_per_sample(y, self._comp_term(i, "d", wd, idx, lp.ch_keep, lp.ch_flag))
        return y

    def _layer(self, i: int, p: LayerParts, h, cos, sin, lp: _LayerPlan, taps: Taps | None):
        a = self._attention(i, p, p.input_norm(h), cos, sin, lp, taps)
        if a is not None:
            h = h + a
        m = self._mlp(i, p, p.post_attention_norm(h), lp, taps)
        if m is not None:
            h = h + m
        return h

    # --- the layer-major executor ---------------------------------------------------------------------------
    def _rotary(self, t: int, like: torch.Tensor, cache: dict, dev: torch.device):
        key = (t, str(dev))
        if key not in cache:
            base = (t, str(self.device))
            if base not in cache:
                pos = torch.arange(t, device=self.device)[None, :]  # [1, t]
                cos, sin = self.adapter.rotary(like, pos)  # [1, t, hd]
                cache[base] = (cos.unsqueeze(1), sin.unsqueeze(1))  # [1, 1, t, hd]
            cos, sin = cache[base]
            cache[key] = (cos.to(dev), sin.to(dev))
        return cache[key]

    def _sweep(self, groups: list[_Group], taps: Taps | None = None, collect: list | None = None,
               progress: bool = False, desc: str = "layers") -> list[torch.Tensor]:
        """Run every group through every layer, layer-major; returns the final (pre-norm) hidden states."""
        n = self.layout.num_layers
        needed = [i for i in range(n) if any(not g.plans[i].skip for g in groups)]
        nxt = {a: b for a, b in zip(needed, needed[1:])}
        needed_set = set(needed)
        cache: dict = {}
        layers = range(n)
        if progress:
            from tqdm.auto import tqdm

            layers = tqdm(layers, desc=desc, unit="layer")
        try:
            for i in layers:
                if collect is not None:
                    collect.append(groups[0].h)
                if i not in needed_set:
                    continue
                dev = self.source.devices[i]
                with self.source.layer(i, nxt.get(i)) as p:
                    for g in groups:
                        lp = g.plans[i]
                        if lp.skip:
                            continue
                        h = g.h if g.h.device == dev else g.h.to(dev)
                        cos, sin = self._rotary(h.shape[1], h, cache, dev)
                        if lp.samples is None:
                            out = self._layer(i, p, h, cos, sin, lp, taps)
                        else:  # only the rows of the samples keeping this layer
                            hv = h.view(g.k, g.b, *h.shape[1:])
                            sub = hv.index_select(0, lp.samples).reshape(-1, *h.shape[1:])
                            res = self._layer(i, p, sub, cos, sin, lp, taps)
                            out = hv.index_copy(0, lp.samples, res.view(lp.n_keep, g.b, *h.shape[1:]))
                            out = out.view(h.shape)
                        if taps is not None:
                            taps(i, "layer", h, out)
                        g.h = out
        finally:
            self.source.release()
        return [g.h if g.h.device == self._head_device else g.h.to(self._head_device) for g in groups]

    def _groups(self, input_ids: torch.Tensor, masks_per_group: list, multiply: bool = False) -> list[_Group]:
        """One group per entry: None (dense), a Masks, or a list of Masks evaluated batched on the same ids."""
        ids = input_ids.to(self.device)
        h0 = self.adapter.embed(ids)  # [b, t, d]
        packer = _Packer()
        groups = []
        for m in masks_per_group:
            if m is None:
                groups.append(_Group(h0, [_FULL] * self.layout.num_layers, 1, ids.shape[0]))
            elif isinstance(m, Masks):
                groups.append(_Group(h0, self._plans([m], multiply, packer), 1, ids.shape[0]))
            else:
                k = len(m)
                h = h0 if k == 1 else h0.repeat(k, 1, 1)  # [k*b, t, d], sample-major
                groups.append(_Group(h, self._plans(list(m), multiply, packer), k, ids.shape[0]))
        packer.send()
        return groups

    def _check(self, masks, mode: str, validate: bool) -> None:
        if mode not in MODES:
            raise PgpruneError(f"mode={mode!r} is not allowed; allowed: {MODES}")
        if masks is not None and validate:
            masks.validate(self.layout)

    # --- whole model ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, masks: Masks | None = None, mode: str = "gather",
                      collect: bool = False, validate: bool = True):
        """Final (pre-norm) hidden states; with ``collect`` also the input of every layer (for layer metrics)."""
        self._check(masks, mode, validate)
        groups = self._groups(input_ids, [masks], multiply=mode == "multiply")
        inputs: list | None = [] if collect else None
        (h,) = self._sweep(groups, collect=inputs)
        return (h, inputs) if collect else h

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, masks: Masks | None = None, mode: str = "gather",
               validate: bool = True) -> torch.Tensor:
        h = self.hidden_states(input_ids, masks, mode, validate=validate)
        return self.adapter.lm_head()(self.adapter.final_norm(h))

    def _row_nll(self, h: torch.Tensor, input_ids: torch.Tensor, reps: int, chunk: int) -> torch.Tensor:
        """Sum over positions 1..T-1 of each row's next-token NLL: float64 [rows] on the head's device.
        ``h``: final hidden [reps*b, T, d]; the targets are ``input_ids`` [b, T] repeated ``reps`` times."""
        t = input_ids.shape[1]
        hn = self.adapter.final_norm(h)[:, :-1].reshape(-1, h.shape[-1])  # [rows*(T-1), d]
        target = input_ids[:, 1:].to(h.device)
        if reps > 1:
            target = target.repeat(reps, 1)
        target = target.reshape(-1)
        head = self.adapter.lm_head()
        nll = torch.empty(hn.shape[0], dtype=torch.float32, device=h.device)
        for s in range(0, hn.shape[0], chunk):
            nll[s:s + chunk] = F.cross_entropy(head(hn[s:s + chunk]).float(), target[s:s + chunk], reduction="none")
        return nll.view(-1, t - 1).double().sum(1)

    @torch.no_grad()
    def loss(self, input_ids: torch.Tensor, masks: Masks | None = None, mode: str = "gather",
             chunk: int = 256, validate: bool = True) -> float:
        """Mean next-token cross-entropy (positions 1..T-1 of every row), float32 log-softmax in chunks of rows."""
        self._check(masks, mode, validate)
        (h,) = self._sweep(self._groups(input_ids, [masks], multiply=mode == "multiply"))
        nll = self._row_nll(h, input_ids, 1, chunk)
        return float(nll.sum() / (input_ids.shape[0] * (input_ids.shape[1] - 1)))

    @torch.no_grad()
    def sample_losses(self, input_ids: torch.Tensor, masks: list[Masks], mode: str = "auto", chunk: int = 256,
                      validate: bool = False) -> torch.Tensor:
        """Mean next-token cross-entropy of every mask in ``masks`` on the batch ``input_ids`` [B, T]: float64 CPU
        tensor [K], each entry what :meth:`loss` gives for that mask. ``mode``: see the module docstring. One host
        synchronisation (the final copy of the K losses)."""
        if mode not in SAMPLE_MODES:
            raise PgpruneError(f"sample mode {mode!r} is not allowed; allowed: {SAMPLE_MODES}")
        if input_ids.dim() != 2 or input_ids.shape[1] < 2:
            raise PgpruneError(f"input_ids must be [B, T>=2]; got {tuple(input_ids.shape)}")
        k = len(masks)
        if k == 0:
            return torch.zeros(0, dtype=torch.float64)
        if validate:
            for m in masks:
                m.validate(self.layout)
        if mode == "auto":
            mode = "batched" if self.device.type == "cuda" else "separate"
        b, t = input_ids.shape
        if mode == "separate" or k == 1:
            finals = self._sweep(self._groups(input_ids, list(masks)))
            sums = torch.stack([self._row_nll(h, input_ids, 1, chunk).sum() for h in finals])  # [K]
        else:
            (h,) = self._sweep(self._groups(input_ids, [list(masks)]))
            sums = self._row_nll(h, input_ids, k, chunk).view(k, b).sum(1)  # [K]
        return (sums / (b * (t - 1))).cpu()

    @torch.no_grad()
    def block_nll(self, blocks: torch.Tensor, masks: Masks | None = None, batch_size: int = 8,
                  sweep_blocks: int | None = None, chunk: int = 256, progress: bool = False,
                  desc: str = "perplexity") -> torch.Tensor:
        """Per-block NLL sums over positions 1..T-1 (float64 CPU [n]) of the (masked) model, layer-major: the
        blocks of a sweep (default all; ``sweep_blocks`` bounds the hidden states kept) pass through each layer
        before the next one is loaded, in batches of ``batch_size`` blocks."""
        n = blocks.shape[0]
        sweep = n if not sweep_blocks else max(batch_size, sweep_blocks)
        out = []
        for s0 in range(0, n, sweep):
            part = blocks[s0:s0 + sweep].to(self.device)
            plans = self._plans([masks]) if masks is not None else [_FULL] * self.layout.num_layers
            groups = []
            for s in range(0, part.shape[0], batch_size):
                ids = part[s:s + batch_size]
                groups.append(_Group(self.adapter.embed(ids), plans, 1, ids.shape[0]))
            finals = self._sweep(groups, progress=progress, desc=desc)
            for j, h in enumerate(finals):
                ids = part[j * batch_size:(j + 1) * batch_size]
                out.append(self._row_nll(h, ids, 1, chunk))
        return torch.cat(out).cpu()

    @torch.no_grad()
    def scan(self, blocks: torch.Tensor, taps: Taps, batch_size: int = 8, sweep_blocks: int | None = None,
             progress: bool = False, desc: str = "calibration") -> int:
        """Dense layer-major pass of ``blocks`` calling ``taps(i, "o_proj", x)``, ``taps(i, "down_proj", x)`` with
        the inputs of those modules and ``taps(i, "layer", h_in, h_out)``; returns the number of tokens."""
        n = blocks.shape[0]
        sweep = n if not sweep_blocks else max(batch_size, sweep_blocks)
        for s0 in range(0, n, sweep):
            part = blocks[s0:s0 + sweep].to(self.device)
            groups = [_Group(self.adapter.embed(part[s:s + batch_size]), [_FULL] * self.layout.num_layers, 1,
                             part[s:s + batch_size].shape[0]) for s in range(0, part.shape[0], batch_size)]
            self._sweep(groups, taps=taps, progress=progress, desc=desc)
        return int(blocks.numel())

    def __call__(self, input_ids, masks: Masks | None = None, mode: str = "gather", validate: bool = True):
        return self.logits(input_ids, masks, mode, validate)
