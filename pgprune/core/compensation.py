"""What the kept weights of a pruned model get: ``none``, ``bias`` or ``refit`` (one recipe for every consumer).

* ``none``: the kept weights as they are.
* ``bias``: FLAP's mean compensation. A removed input j of o_proj/down_proj is replaced by its calibration mean
  mu_j, i.e. the module's bias gains W[:, S] mu_S (``extra_bias``, computed by the masks' step from the flap
  scorer's means and stored with the masks).
* ``refit``: the least-squares refit of the kept o_proj/down_proj columns and their biases on sequential calibration
  activations (:mod:`pgprune.core.refit`; bias-only compensation is its special case W' = W_K, so its calibration
  error is never larger).

The refit is *not* stored with the masks: the hand-off keeps only the recipe (``compensation.json``: kind, damping,
calibration blocks), and whoever slices (evaluation, export, `pgprune prune`) recomputes it with
:func:`compensated_source` from the same base model and calibration blocks. The refit is deterministic, so every
consumer gets the same bytes, and a masks folder stays a few kilobytes (the refit weights of a 7B model at 20% are
gigabytes).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from pgprune.core.masks import Masks
from pgprune.errors import PgpruneError
from pgprune.methods import COMPENSATIONS, check_compensation


@dataclass(frozen=True)
class Recipe:
    """How a masks result is compensated: ``kind`` (none | bias | refit) and, for the refit, its damping (a
    fraction of the mean diagonal of the kept inputs' Gram matrix), the number of calibration blocks it uses (the
    first ones of the calibration set) and the batch size that propagates them."""

    kind: str = "bias"
    damp: float = 0.01
    blocks: int = 64
    batch_size: int = 8

    def __post_init__(self):
        check_compensation(self.kind)

    def to_json(self) -> dict:
        return asdict(self) if self.kind == "refit" else {"kind": self.kind}

    @classmethod
    def from_json(cls, d: dict, source: str = "compensation.json") -> Recipe:
        if not isinstance(d, dict) or d.get("kind") not in COMPENSATIONS:
            raise PgpruneError(f"{source}: 'kind' must be one of {', '.join(COMPENSATIONS)}; got {d!r}")
        try:
            return cls(**d)
        except TypeError as e:
            raise PgpruneError(f"{source}: {e}; allowed keys: kind, damp, blocks, batch_size") from None


def compensated_source(model, masks: Masks, extra_bias: dict | None, recipe: Recipe | None,
                       calib: torch.Tensor | None, *, progress: bool = False, refit: dict | None = None):
    """(source model, extra_bias) to slice ``masks`` from (``slice_model(source, masks, extra_bias)``): the model
    and the stored biases for ``none``/``bias``; for ``refit`` a copy of ``model`` holding the refit kept columns
    and the refit biases, from ``calib`` [n, T] (its first ``recipe.blocks`` blocks), or from ``refit`` when the
    method already computed the refit weights of ``masks`` (:attr:`pgprune.core.handoff.MethodResult.refit`)."""
    if recipe is None or recipe.kind != "refit":
        return model, extra_bias
    from pgprune.core.refit import apply_refit, refit_model

    if refit is not None:
        return apply_refit(model, masks, refit)

    if calib is None:
        raise PgpruneError("these masks are compensated by refit, which needs the calibration blocks they were made "
                           "with (data/prepared/calib.safetensors, or pgprune prune's calibration)")
    blocks = calib[:recipe.blocks]  # [n, T]
    if blocks.shape[0] < recipe.blocks:
        import warnings

        warnings.warn(f"refit: {blocks.shape[0]} calibration blocks available, the recipe asks for {recipe.blocks}",
                      stacklevel=2)
    return refit_model(model, masks, blocks, damp=recipe.damp, batch_size=recipe.batch_size, progress=progress)


__all__ = ["Recipe", "compensated_source"]
