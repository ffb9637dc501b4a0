"""ShortGPT Block Influence (Men et al., 2024), layers only.

BI_l = 1 - mean over calibration tokens of cos(h_in_l, h_out_l), with h_in/h_out the residual stream before and
after decoder layer l (dense model). A layer that barely changes the residual stream has BI near 0 and is removed
first; the returned importance is BI itself (higher = keep).
"""
from __future__ import annotations

import torch

from pgprune.scorers.activations import ActivationStats, collect_activation_stats


def shortgpt_scores(model, calib, *, batch_size: int = 8, stats: ActivationStats | None = None,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    if stats is None:
        stats = collect_activation_stats(model, calib, batch_size=batch_size, progress=progress, desc="shortgpt")
    return {"layers": stats.block_influence().float()}
