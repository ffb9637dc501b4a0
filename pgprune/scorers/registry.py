"""The scorer registry's names: every importance metric's name and the unit groups it scores.

Importing this module imports no scorer (and no torch), so the params schema (:mod:`pgprune.config`) can validate
scorer names without loading the scorers. The functions are :data:`pgprune.scorers.compute.SCORERS` (same names,
same order: tested).
"""
from __future__ import annotations

from pgprune.errors import PgpruneError

SCORER_NAMES: tuple[str, ...] = ("magnitude", "wanda_sp", "flap", "taylor", "shortgpt", "random")

SCORER_GROUPS: dict[str, tuple[str, ...]] = {
    "magnitude": ("heads", "channels", "layers"),
    "wanda_sp": ("heads", "channels", "layers"),
    "flap": ("heads", "channels"),
    "taylor": ("heads", "channels", "layers"),
    "shortgpt": ("layers",),
    "random": ("heads", "channels", "layers"),
}

NEEDS_CALIB = {"wanda_sp", "flap", "taylor", "shortgpt"}


def canonical_name(name: str) -> str:
    """'wanda-sp' / 'Wanda_SP' -> 'wanda_sp'; unknown names raise PgpruneError listing the allowed ones."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in SCORER_NAMES:
        raise PgpruneError(f"unknown scorer {name!r}; allowed: {sorted(SCORER_NAMES)}")
    return key

