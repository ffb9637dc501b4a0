"""Binary keep-masks over a model's prunable units, with flat views for the search and JSON round-trips."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pgprune.adapters.base import Layout
from pgprune.errors import BudgetError, PgpruneError

GROUPS = ("heads", "channels", "layers")


@dataclass
class Masks:
    heads: list[torch.Tensor]  # per layer, bool [kv_heads_i]
    channels: list[torch.Tensor]  # per layer, bool [intermediate_i]
    layers: torch.Tensor  # bool [num_layers]

    # --- construction ---------------------------------------------------------------------------------------
    @classmethod
    def full(cls, layout: Layout) -> "Masks":
        return cls([torch.ones(n, dtype=torch.bool) for n in layout.kv_heads],
                   [torch.ones(n, dtype=torch.bool) for n in layout.intermediate],
                   torch.ones(layout.num_layers, dtype=torch.bool))

    @classmethod
    def from_flat(cls, layout: Layout, flat: dict[str, torch.Tensor]) -> "Masks":
        """Build from flat vectors (any subset of 'heads', 'channels', 'layers'; missing groups are all kept)."""
        full = cls.full(layout)
        heads = list(torch.split(flat["heads"].bool().cpu(), list(layout.kv_heads))) if "heads" in flat else full.heads
        chans = (list(torch.split(flat["channels"].bool().cpu(), list(layout.intermediate)))
                 if "channels" in flat else full.channels)
        layers = flat["layers"].bool().cpu() if "layers" in flat else full.layers
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
        """Check shapes and that no kept layer lost all its KV groups (the reference code allowed that)."""
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
    def from_json(cls, obj: dict) -> "Masks":
        def build(idx_lists, sizes):
            out = []
            for idx, n in zip(idx_lists, sizes):
                m = torch.zeros(n, dtype=torch.bool)
                m[torch.as_tensor(idx, dtype=torch.long)] = True
                out.append(m)
            return out

        sizes = obj["sizes"]
        layers = torch.zeros(len(sizes["heads"]), dtype=torch.bool)
        layers[torch.as_tensor(obj["layers"], dtype=torch.long)] = True
        return cls(build(obj["heads"], sizes["heads"]), build(obj["channels"], sizes["channels"]), layers)


def segments(layout: Layout, group: str) -> torch.Tensor:
    """Layer index of every unit of a group, in flat order."""
    if group == "heads":
        return torch.repeat_interleave(torch.arange(layout.num_layers), torch.tensor(layout.kv_heads))
    if group == "channels":
        return torch.repeat_interleave(torch.arange(layout.num_layers), torch.tensor(layout.intermediate))
    if group == "layers":
        return torch.arange(layout.num_layers)
    raise PgpruneError(f"unknown unit group {group!r}; allowed: {GROUPS}")


def sparsity_report(layout: Layout, masks: Masks) -> dict:
    """Kept/removed parameter counts in both conventions (decoder linear weights, and total)."""
    dense_p, kept_p = layout.prunable_params(), layout.prunable_params(masks)
    dense_t, kept_t = layout.total_params(), layout.total_params(masks)
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
