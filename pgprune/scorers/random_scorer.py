"""Seeded uniform random scores for every group (a sanity baseline)."""
from __future__ import annotations

import torch

from pgprune.core.adapters import get_adapter


def random_scores(model, calib=None, *, batch_size: int = 8, seed: int = 0,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """U[0, 1) scores from a private generator seeded with ``seed`` (calib/batch_size unused)."""
    layout = get_adapter(model).layout()
    gen = torch.Generator().manual_seed(int(seed))
    return {grp: torch.rand(n, generator=gen, dtype=torch.float32) for grp, n in layout.n_units.items()}
