"""Run a scorer by name: ``compute_scores(name, model, calib_blocks, **opts)`` (options checked against the
scorer's keyword-only parameters)."""
from __future__ import annotations

import inspect
import logging
import time
from typing import TYPE_CHECKING, Callable

import torch

from pgprune.errors import PgpruneError
from pgprune.scorers.flap import flap_scores
from pgprune.scorers.magnitude import magnitude_scores
from pgprune.scorers.random_scorer import random_scores
from pgprune.scorers.registry import NEEDS_CALIB, canonical_name
from pgprune.scorers.shortgpt import shortgpt_scores
from pgprune.scorers.taylor import taylor_scores
from pgprune.scorers.wanda_sp import wanda_sp_scores

if TYPE_CHECKING:
    from pgprune.config import InitParams

log = logging.getLogger("pgprune")

# {name: scoring function}: the registry's names (pgprune.scorers.registry.SCORER_NAMES), in its order
SCORERS: dict[str, Callable[..., dict]] = {
    "magnitude": magnitude_scores,
    "wanda_sp": wanda_sp_scores,
    "flap": flap_scores,
    "taylor": taylor_scores,
    "shortgpt": shortgpt_scores,
    "random": random_scores,
}


def compute_scores(name: str, model, calib_blocks: torch.Tensor | None = None, **opts) -> dict:
    key = canonical_name(name)
    fn = SCORERS[key]
    allowed = [p for p, v in inspect.signature(fn).parameters.items() if v.kind == inspect.Parameter.KEYWORD_ONLY]
    bad = sorted(set(opts) - set(allowed))
    if bad:
        raise PgpruneError(f"scorer {key!r} does not take option(s) {bad}; allowed: {allowed}")
    if key in NEEDS_CALIB and calib_blocks is None and opts.get("stats") is None:
        raise PgpruneError(f"scorer {key!r} needs calibration blocks (LongTensor [n_blocks, seq_len])")
    return fn(model, calib_blocks, **opts)


def compute_all_scores(init: InitParams, model, calib: torch.Tensor, scorers=None, progress: bool = True
                       ) -> tuple[dict, dict]:
    """{scorer: its importance scores} for ``scorers`` (default init.scorers), and the seconds each took; ``init``
    is the params' ``init`` section (nsamples, seed, batch_size, flap_bias_compensation)."""
    n = min(init.nsamples, calib.shape[0])
    scores, timing = {}, {}
    for name in init.scorers if scorers is None else scorers:
        t0 = time.perf_counter()
        opts = {"seed": init.seed} if name == "random" else {}
        if name == "flap":
            opts["bias_compensation"] = init.flap_bias_compensation
        opts["progress"] = progress
        scores[name] = compute_scores(name, model, calib[:n], batch_size=init.batch_size, **opts)
        timing[name] = time.perf_counter() - t0
        log.info("scorer %s: %.1fs", name, timing[name])
    return scores, timing
