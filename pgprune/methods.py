"""The one registry of pruning methods: name, label, kind, scorer, allocation, layout.

Everything that needs to know about a method (the params schema, the stages, the CLI, the report and its plots)
reads this table; adding a method means adding one entry here (and, for a metric, its scorer).

* ``kind="search"``: the policy-gradient search, initialised from ``search.init``'s metric; ``layout`` says which
  per-layer widths its masks may have: ``heterogeneous`` (any width per layer, the paper's global budget) or
  ``uniform`` (every kept layer keeps the same number of KV groups and MLP channels, so the pruned model is a stock
  LlamaForCausalLM/MistralForCausalLM/Qwen2ForCausalLM).
* ``kind="metric"``: a one-shot baseline that keeps the top units of ``scorer``'s importance with ``allocation``
  ``uniform`` (the same fraction in every layer, exact total budget: FLAP's UL-UM, Wanda-sp, LLM-Pruner) or
  ``global``; ``granularity`` says which unit groups it removes (``layer_drop`` removes whole layers). A metric
  method with a ``selector`` instead of a scorer chooses its units itself, layer by layer on the calibration blocks
  (``slimgpt``: structured OBS with the Incremental Pruning Ratio, ``allocation="ipr"``,
  :mod:`pgprune.pruning.slimgpt`); it needs no init scores.

``compensation`` is what the kept weights get (:mod:`pgprune.core.compensation`): ``none`` (frozen), ``bias`` (the
removed inputs' calibration means folded into the output biases, FLAP's) or ``refit`` (the least-squares refit of
the kept o_proj/down_proj columns and biases, :mod:`pgprune.core.refit`). Metric baselines carry their own (FLAP
``bias``; ``<metric>_refit`` is the same masks with ``refit``, so the report separates what the mask brings from
what the refit brings); the search methods take ``search.compensation``. `pgprune prune --compensation` and
``pgprune.prune(compensation=...)`` override either.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgprune.errors import ConfigError

Kind = Literal["search", "metric"]
Layout = Literal["heterogeneous", "uniform"]
LAYOUTS: tuple[str, ...] = ("heterogeneous", "uniform")
Compensation = Literal["none", "bias", "refit"]
COMPENSATIONS: tuple[str, ...] = ("none", "bias", "refit")


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    kind: Kind
    scorer: str | None = None  # metric methods: the scorer whose importances rank the units
    allocation: Literal["uniform", "global", "ipr"] = "uniform"
    granularity: tuple[str, ...] = ("heads", "channels")
    layout: Layout = "heterogeneous"
    compensation: Compensation | None = None  # metric methods: theirs (none/bias/refit); search: search.compensation
    description: str = ""
    selector: str | None = None  # a one-shot method that chooses its own units on calibration blocks (no scorer)


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("pg", "PG search", "search", layout="heterogeneous",
           description="policy-gradient search, per-layer widths free (global budget)"),
    Method("pg_uniform", "PG search (uniform layout)", "search", layout="uniform",
           description="policy-gradient search, the same width in every layer (stock architecture)"),
    Method("wanda_sp", "Wanda-sp", "metric", scorer="wanda_sp", compensation="none",
           description="Wanda structured (|W| x input norm), same fraction per layer"),
    Method("wanda_sp_refit", "Wanda-sp + refit", "metric", scorer="wanda_sp", compensation="refit",
           description="Wanda-sp's masks, kept o_proj/down_proj weights refit by least squares"),
    Method("flap", "FLAP", "metric", scorer="flap", compensation="bias",
           description="FLAP fluctuation metric with bias compensation, same fraction per layer (UL-UM)"),
    Method("flap_refit", "FLAP + refit", "metric", scorer="flap", compensation="refit",
           description="FLAP's masks, kept o_proj/down_proj weights refit by least squares (instead of its bias)"),
    Method("slimgpt", "SlimGPT", "metric", selector="slimgpt", allocation="ipr", compensation="refit",
           description="structured OBS layer by layer (batched greedy KV groups, dynamic group size channels, "
                       "log-increasing per-layer ratio), kept o_proj/down_proj weights refit by least squares"),
    Method("magnitude", "magnitude", "metric", scorer="magnitude", compensation="none",
           description="weight magnitude"),
    Method("taylor", "Taylor", "metric", scorer="taylor", compensation="none",
           description="LLM-Pruner first-order Taylor |w * grad| (back-propagates)"),
    Method("random", "random", "metric", scorer="random", compensation="none",
           description="random units, same fraction per layer"),
    Method("layer_drop", "layer drop (ShortGPT)", "metric", scorer="shortgpt", granularity=("layers",),
           compensation="none", description="drop whole layers by ShortGPT block influence"),
)}

SEARCH_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.kind == "search")
METRIC_METHODS: tuple[str, ...] = tuple(n for n, m in METHODS.items() if m.kind == "metric")
METHOD_ORDER: tuple[str, ...] = tuple(METHODS)


def get_method(name: str) -> Method:
    key = str(name).strip().lower().replace("-", "_")
    if key not in METHODS:
        raise ConfigError(f"unknown method {name!r}; allowed: {', '.join(METHODS)}")
    return METHODS[key]


def search_method(layout: str) -> str:
    """The search method of a layout ('heterogeneous' -> 'pg', 'uniform' -> 'pg_uniform')."""
    for n in SEARCH_METHODS:
        if METHODS[n].layout == layout:
            return n
    raise ConfigError(f"unknown layout {layout!r}; allowed: {', '.join(LAYOUTS)}")


def check_compensation(value) -> str:
    """``value`` if it is a compensation kind, else the one-line error naming the allowed ones."""
    if value not in COMPENSATIONS:
        raise ConfigError(f"compensation={value!r}; allowed: {', '.join(COMPENSATIONS)}")
    return value


def method_label(name: str) -> str:
    return METHODS[name].label if name in METHODS else name
