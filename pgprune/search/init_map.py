"""Map an importance metric (higher = keep) to initial keep-probabilities with mean about r."""
from __future__ import annotations

import torch

from pgprune.errors import ConfigError, PgpruneError
from pgprune.search.projection import select_top_k

INIT_METHODS = ("sigmap", "norm", "const", "uniform")
CLIP_EPS = 0.01  # no unit starts frozen at exactly 0 or 1


def _map_one(x: torch.Tensor, r: float, method: str, const: float) -> torch.Tensor:
    if method == "uniform":
        return torch.full_like(x, r)
    if method == "sigmap":
        z = torch.sigmoid((x - x.mean()) / ((x.std() if x.numel() > 1 else 0.0) + 1e-8))
        return (z + (r - z.mean())).clamp(0.0, 1.0)
    if method == "norm":
        span = x.max() - x.min()
        z = (x - x.min()) / span if span > 0 else torch.zeros_like(x)
        return (z + (r - z.mean())).clamp(0.0, 1.0)
    keep = select_top_k(x, int(round(r * x.numel())))
    return torch.where(keep, torch.full_like(x, const), torch.full_like(x, 1.0 - const))


def init_probs(metric: torch.Tensor, keep_ratio: float, *, method: str = "sigmap",
               segments: torch.Tensor | None = None, const: float = 1.0, clip_eps: float = CLIP_EPS) -> torch.Tensor:
    """Initial keep-probabilities (float32, shape of ``metric``), mapped per segment when ``segments`` is given.

    sigmap: z-score -> sigmoid -> shift to mean r -> clamp [0,1]; norm: min-max -> shift -> clamp;
    const: ``const`` for the top round(r*n) units, 1 - const for the others; uniform: all r.
    Finally clamped to [clip_eps, 1 - clip_eps] so that no unit starts frozen at exactly 0 or 1
    (clip_eps=0 reproduces the reference).
    """
    if method not in INIT_METHODS:
        raise ConfigError(f"unknown init method '{method}'; allowed: {', '.join(INIT_METHODS)}.")
    if not 0.0 < keep_ratio <= 1.0:
        raise ConfigError(f"keep_ratio must be in (0, 1], got {keep_ratio}.")
    if not 0.0 <= clip_eps < 0.5:
        raise ConfigError(f"clip_eps must be in [0, 0.5), got {clip_eps}.")
    if not 0.0 <= const <= 1.0:
        raise ConfigError(f"const must be in [0, 1], got {const}.")
    x = metric.detach().to(torch.float64).reshape(-1).cpu()
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise PgpruneError("the importance metric contains NaN or inf values.")
    out = torch.empty_like(x)
    if segments is None:
        out = _map_one(x, keep_ratio, method, const) if x.numel() else out
    else:
        seg = segments.reshape(-1).to(torch.long).cpu()
        if seg.numel() != x.numel():
            raise ConfigError(f"segments has {seg.numel()} entries but the metric has {x.numel()}.")
        for sid in torch.unique(seg):
            idx = (seg == sid).nonzero().reshape(-1)
            out[idx] = _map_one(x[idx], keep_ratio, method, const)
    return out.clamp(clip_eps, 1.0 - clip_eps).to(torch.float32).reshape(metric.shape)
