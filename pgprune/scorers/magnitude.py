"""Weight-magnitude importance (calibration-free baseline).

* heads: L2 norm of all weights of a KV group: the q_proj rows of its G query heads, its k_proj and v_proj rows and
  the matching o_proj columns;
* channels: L2 norm of the gate_proj row, the up_proj row and the down_proj column of the channel;
* layers: 0.5 * (layer's share of the model's summed head norms + layer's share of the summed channel norms), so the
  layer scores sum to 1.
"""
from __future__ import annotations

import torch

from pgprune.core.adapters import get_adapter
from pgprune.core.weights import layer_parts
from pgprune.scorers.activations import check_o_columns


def _sq(w: torch.Tensor) -> torch.Tensor:
    w = w.detach().float()
    return w * w


@torch.no_grad()
def magnitude_scores(model, calib=None, *, batch_size: int = 8, progress: bool = True) -> dict[str, torch.Tensor]:
    """``calib``, ``batch_size`` and ``progress`` are accepted for a uniform signature and unused."""
    adapter = get_adapter(model)
    layout = adapter.layout()
    hd, g = layout.head_dim, layout.group_size
    heads, chans = [], []
    for i in range(layout.num_layers):
        p = layer_parts(model, i)
        n_kv = layout.kv_heads[i]
        check_o_columns(layout, i, p.o_proj.in_features)
        q = _sq(p.q_proj.weight).sum(1).reshape(n_kv, g * hd).sum(1)
        k = _sq(p.k_proj.weight).sum(1).reshape(n_kv, hd).sum(1)
        v = _sq(p.v_proj.weight).sum(1).reshape(n_kv, hd).sum(1)
        o = _sq(p.o_proj.weight).sum(0).reshape(n_kv, g * hd).sum(1)
        heads.append((q + k + v + o).sqrt().cpu())
        c = _sq(p.gate_proj.weight).sum(1) + _sq(p.up_proj.weight).sum(1) + _sq(p.down_proj.weight).sum(0)
        chans.append(c.sqrt().cpu())
    h_tot = sum(float(h.sum()) for h in heads) or 1.0
    c_tot = sum(float(c.sum()) for c in chans) or 1.0
    layers = torch.tensor([0.5 * (float(h.sum()) / h_tot + float(c.sum()) / c_tot) for h, c in zip(heads, chans)])
    return {"heads": torch.cat(heads).float(), "channels": torch.cat(chans).float(), "layers": layers.float()}
