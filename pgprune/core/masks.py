"""Binary keep-masks over a model's prunable units, with flat views for the search and JSON round-trips."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pgprune.core.adapters.base import Layout
from pgprune.errors import BudgetError, PgpruneError

GROUPS = ("heads", "channels", "layers")


def _check_mask(m, where: str) -> None:
    if not isinstance(m, torch.Tensor):
        raise PgpruneError(f"{where} is a {type(m).__name__}; allowed: a 1-D bool tensor (True = keep)")
    if m.dtype != torch.bool or m.dim() != 1:
        raise PgpruneError(f"{where} has dtype {str(m.dtype).replace('torch.', '')} and shape {tuple(m.shape)}; "
                           "allowed: a 1-D bool tensor (True = keep; Masks.from_flat converts 0/1 values)")


@dataclass
class Masks:
    heads: list[torch.Tensor]  # per layer, bool [kv_heads_i]
    channels: list[torch.Tensor]  # per layer, bool [intermediate_i]
    layers: torch.Tensor  # bool [num_layers]

    def __post_init__(self) -> None:
        self.check_tensors()

    def check_tensors(self) -> None:
        """Every mask must be a 1-D bool tensor (True = keep), one per layer; raise naming the layer, the group and
        what was given (int/float 0/1 masks go through :meth:`from_flat`, which converts them)."""
        for group in ("heads", "channels"):
            per_layer = getattr(self, group)
            if not isinstance(per_layer, (list, tuple)):
                raise PgpruneError(f"Masks.{group} is a {type(per_layer).__name__}; allowed: a list with one 1-D bool "
                                   "tensor per layer")
            for i, m in enumerate(per_layer):
                _check_mask(m, f"layer {i}: {group} mask")
        _check_mask(self.layers, "layers mask")
        if not len(self.heads) == len(self.channels) == self.layers.numel():
            raise PgpruneError(f"masks cover {len(self.heads)} layers (heads), {len(self.channels)} (channels) and "
                               f"{self.layers.numel()} (layers); allowed: one entry per layer in each")

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def full(cls, layout: Layout) -> "Masks":
        return cls([torch.ones(n, dtype=torch.bool) for n in layout.kv_heads],
                   [torch.ones(n, dtype=torch.bool) for n in layout.intermediate],
                   torch.ones(layout.num_layers, dtype=torch.bool))

    @classmethod
    def from_flat(cls, layout: Layout, flat: dict[str, torch.Tensor]) -> "Masks":
        """Build from flat vectors (any subset of 'heads', 'channels', 'layers'; missing groups are all kept).

        Each vector must have one entry per unit of the model (``layout.n_units``) and hold only 0/1 or bool."""
        unknown = sorted(set(flat) - set(GROUPS))
        if unknown:
            raise PgpruneError(f"unknown mask group(s) {unknown}; allowed: {', '.join(GROUPS)}")
        n = layout.n_units
        vec = {}
        for g, v in flat.items():
            v = torch.as_tensor(v).detach().reshape(-1).cpu()
            if v.numel() != n[g]:
                raise PgpruneError(f"{g} mask has {v.numel()} entries, the model has {n[g]} {g} units")
            if v.dtype != torch.bool:
                if v.is_floating_point() and not bool(torch.isfinite(v).all()):
                    raise PgpruneError(f"{g} mask holds NaN/inf; allowed values: 0/1 or True/False")
                if not bool(((v == 0) | (v == 1)).all()):
                    bad = v[(v != 0) & (v != 1)][:5].tolist()
                    raise PgpruneError(f"{g} mask holds values {bad}; allowed values: 0/1 or True/False")
                v = v.bool()
            vec[g] = v
        full = cls.full(layout)
        heads = list(torch.split(vec["heads"], list(layout.kv_heads))) if "heads" in vec else full.heads
        chans = list(torch.split(vec["channels"], list(layout.intermediate))) if "channels" in vec else full.channels
        layers = vec["layers"] if "layers" in vec else full.layers
        return cls(heads, chans, layers)

    def flat(self) -> dict[str, torch.Tensor]:
        return {"heads": torch.cat(self.heads), "channels": torch.cat(self.channels), "layers": self.layers.clone()}

    # --- queries --------------------------------------------------------------------------------------------
    def layer_kept(self, i: int) -> bool:
        return bool(self.layers[i])

    def kept_layer_indices(self) -> list[int]:
        return [i for i in range(len(self.layers)) if self.layers[i]]

    def kept_counts(self) -> dict[str, list[int]]:
        return {"heads": [int(h.sum()) if self.layers[i] else 0 for i, h in enumerate(self.heads)],
                "channels": [int(c.sum()) if self.layers[i] else 0 for i, c in enumerate(self.channels)],
                "layers": [int(x) for x in self.layers]}

    def validate(self, layout: Layout) -> None:
        """Check dtypes, shapes and that no kept layer lost all its KV groups (the reference code allowed that)."""
        self.check_tensors()
        if len(self.heads) != layout.num_layers or len(self.channels) != layout.num_layers:
            raise PgpruneError(f"masks cover {len(self.heads)} layers, the model has {layout.num_layers}")
        if self.layers.numel() != layout.num_layers:
            raise PgpruneError(f"layer mask has {self.layers.numel()} entries, the model has {layout.num_layers}")
        for i in range(layout.num_layers):
            if self.heads[i].numel() != layout.kv_heads[i] or self.channels[i].numel() != layout.intermediate[i]:
                raise PgpruneError(f"layer {i}: mask sizes ({self.heads[i].numel()}, {self.channels[i].numel()}) "
                                   f"do not match the model ({layout.kv_heads[i]}, {layout.intermediate[i]})")
            if self.layers[i] and not bool(self.heads[i].any()):
                raise BudgetError(f"layer {i} keeps 0 of {layout.kv_heads[i]} KV groups but is not dropped; "
                                  "a kept layer must keep at least one KV group (drop the layer instead)")
            if self.layers[i] and not bool(self.channels[i].any()):
                raise BudgetError(f"layer {i} keeps 0 of {layout.intermediate[i]} MLP channels but is not dropped; "
                                  "a kept layer must keep at least one channel")
        if not bool(self.layers.any()):
            raise BudgetError("all layers are dropped; at least one decoder layer must be kept")

    # --- serialisation --------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"heads": [torch.nonzero(h).flatten().tolist() for h in self.heads],
                "channels": [torch.nonzero(c).flatten().tolist() for c in self.channels],
                "layers": torch.nonzero(self.layers).flatten().tolist(),
                "sizes": {"heads": [h.numel() for h in self.heads], "channels": [c.numel() for c in self.channels]}}

    @classmethod
    def from_json(cls, obj: dict, layout: Layout | None = None, source: str = "masks") -> "Masks":
        """Inverse of :meth:`to_json`; every index is checked (integer, in range, not repeated) and, with
        ``layout``, the sizes must be the model's. Errors name ``source``, the layer and the bad value."""
        if not isinstance(obj, dict) or not {"heads", "channels", "layers", "sizes"} <= set(obj):
            got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise PgpruneError(f"{source}: expected keys heads, channels, layers, sizes (pgprune masks.json); got {got}")
        sizes = obj["sizes"]
        if not isinstance(sizes, dict) or not {"heads", "channels"} <= set(sizes):
            raise PgpruneError(f"{source}: 'sizes' must hold per-layer 'heads' and 'channels' counts")
        n_layers = len(sizes["heads"])
        if len(sizes["channels"]) != n_layers or len(obj["heads"]) != n_layers or len(obj["channels"]) != n_layers:
            raise PgpruneError(f"{source}: per-layer lists differ in length (sizes.heads {n_layers}, sizes.channels "
                               f"{len(sizes['channels'])}, heads {len(obj['heads'])}, channels {len(obj['channels'])})")
        if layout is not None and (tuple(sizes["heads"]) != tuple(layout.kv_heads)
                                   or tuple(sizes["channels"]) != tuple(layout.intermediate)):
            raise PgpruneError(f"{source}: masks are for a model with KV groups {sizes['heads']} and channels "
                               f"{sizes['channels']} per layer; this model has {list(layout.kv_heads)} and "
                               f"{list(layout.intermediate)}")

        def build(what, idx, n, layer=None):
            where = f"{what}" + ("" if layer is None else f" of layer {layer}")
            if not isinstance(n, int) or n < 0:
                raise PgpruneError(f"{source}: size of {where} must be a non-negative integer, got {n!r}")
            if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
                raise PgpruneError(f"{source}: {where} must be a list of integer indices, got {idx!r:.80}")
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise PgpruneError(f"{source}: {where} has indices {bad[:5]} outside the allowed range [0, {n})")
            if len(set(idx)) != len(idx):
                raise PgpruneError(f"{source}: {where} repeats indices")
            m = torch.zeros(n, dtype=torch.bool)
            m[torch.as_tensor(idx, dtype=torch.long)] = True
            return m

        heads = [build("heads", h, n, i) for i, (h, n) in enumerate(zip(obj["heads"], sizes["heads"]))]
        chans = [build("channels", c, n, i) for i, (c, n) in enumerate(zip(obj["channels"], sizes["channels"]))]
        layers = build("layers", obj["layers"], n_layers)
        masks = cls(heads, chans, layers)
        if layout is not None:
            masks.validate(layout)
        return masks

    @classmethod
    def load(cls, path, layout: Layout | None = None) -> "Masks":
        """Read a masks.json; a missing, damaged or mismatched file raises an error naming it."""
        import json
        from pathlib import Path

        from pgprune.errors import require_file

        p = require_file(path, "masks")
        try:
            obj = json.loads(Path(p).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PgpruneError(f"masks file '{p}' is not valid JSON ({e}); rerun the stage that writes it") from None
        return cls.from_json(obj, layout, source=str(p))

    def is_uniform(self) -> bool:
        """Whether every kept layer keeps the same number of KV groups and of channels (a stock architecture)."""
        kept = self.kept_layer_indices()
        return (len({int(self.heads[i].sum()) for i in kept}) <= 1
                and len({int(self.channels[i].sum()) for i in kept}) <= 1)


def segments(layout: Layout, group: str) -> torch.Tensor:
    """Layer index of every unit of a group, in flat order."""
    if group == "heads":
        return torch.repeat_interleave(torch.arange(layout.num_layers), torch.tensor(layout.kv_heads))
    if group == "channels":
        return torch.repeat_interleave(torch.arange(layout.num_layers), torch.tensor(layout.intermediate))
    if group == "layers":
        return torch.arange(layout.num_layers)
    raise PgpruneError(f"unknown unit group {group!r}; allowed: {GROUPS}")


def sparsity_report(layout: Layout, masks: Masks, out_bias: bool = False) -> dict:
    """Kept/removed parameter counts in both conventions (decoder linear weights, and total). ``out_bias``: the
    pruned model gets o_proj/down_proj output biases (mean compensation), which count as kept parameters."""
    dense_p, kept_p = layout.prunable_params(), layout.prunable_params(masks, out_bias=out_bias)
    dense_t, kept_t = layout.total_params(), layout.total_params(masks, out_bias=out_bias)
    counts = masks.kept_counts()
    return {
        "prunable_params_dense": dense_p, "prunable_params_kept": kept_p,
        "prunable_sparsity": 1 - kept_p / dense_p,
        "total_params_dense": dense_t, "total_params_kept": kept_t, "total_sparsity": 1 - kept_t / dense_t,
        "kv_groups_kept": sum(counts["heads"]), "kv_groups_total": sum(layout.kv_heads),
        "channels_kept": sum(counts["channels"]), "channels_total": sum(layout.intermediate),
        "layers_kept": sum(counts["layers"]), "layers_total": layout.num_layers,
        "per_layer": counts,
    }


EXTRA_BIAS_MODULES = ("o_proj", "down_proj")


def check_extra_bias(layout: Layout, extra_bias: dict | None) -> None:
    """``extra_bias`` must be {layer index: {"o_proj"|"down_proj": float tensor [hidden_size]}} (None values
    allowed); raise naming the layer, the module and the shape expected vs given."""
    if extra_bias is None:
        return
    if not isinstance(extra_bias, dict):
        raise PgpruneError(f"extra_bias is a {type(extra_bias).__name__}; allowed: {{layer index: {{'o_proj'|"
                           f"'down_proj': tensor [{layout.hidden_size}]}}}}")
    for i, per in extra_bias.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < layout.num_layers:
            raise PgpruneError(f"extra_bias has layer {i!r}; allowed: layer indices 0..{layout.num_layers - 1}")
        if not isinstance(per, dict):
            raise PgpruneError(f"extra_bias layer {i} is a {type(per).__name__}; allowed: {{'o_proj'|'down_proj': "
                               f"tensor [{layout.hidden_size}]}}")
        for name, b in per.items():
            if name not in EXTRA_BIAS_MODULES:
                raise PgpruneError(f"extra_bias layer {i} has module {name!r}; allowed: "
                                   f"{', '.join(EXTRA_BIAS_MODULES)}")
            if b is None:
                continue
            if not isinstance(b, torch.Tensor) or not (b.is_floating_point()):
                what = f"a {str(b.dtype).replace('torch.', '')} tensor" if isinstance(b, torch.Tensor) else \
                    f"a {type(b).__name__}"
                raise PgpruneError(f"extra_bias layer {i} {name} is {what}; allowed: a float tensor of shape "
                                   f"({layout.hidden_size},)")
            if tuple(b.shape) != (layout.hidden_size,):
                raise PgpruneError(f"extra_bias layer {i} {name} has shape {tuple(b.shape)}; expected "
                                   f"({layout.hidden_size},) (the model's hidden size)")
