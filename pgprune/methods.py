"""The one registry of pruning methods: name, label, kind, scorer, allocation, layout.

Everything that needs to know about a method (the params schema, the stages, the CLI, the report and its plots)
reads this table; adding a method means adding one entry here (and, for a metric, its scorer).

* ``kind="search"``: the policy-gradient search, initialised from ``search.init``'s metric; ``layout`` says which
  per-layer widths its masks may have: ``heterogeneous`` (any width per layer, the paper's global budget) or
  ``uniform`` (every kept layer keeps the same number of KV groups and MLP channels, so the pruned model is a stock
  LlamaForCausalLM/MistralForCausalLM/Qwen2ForCausalLM).
* ``kind="metric"``: a one-shot baseline that keeps the top units of ``scorer``'s importance with ``allocation``
  ``uniform`` (the same fraction in every layer, exact total budget: FLAP's UL-UM, Wanda-sp, LLM-Pruner) or
  ``global``; ``granularity`` says which unit groups it removes (``layer_drop`` removes whole layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pgprune.errors import ConfigError

Kind = Literal["search", "metric"]
Layout = Literal["heterogeneous", "uniform"]
LAYOUTS: tuple[str, ...] = ("heterogeneous", "uniform")


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    kind: Kind
    scorer: str | None = None  # metric methods: the scorer whose importances rank the units
    allocation: Literal["uniform", "global"] = "uniform"
    granularity: tuple[str, ...] = ("heads", "channels")
    layout: Layout = "heterogeneous"
    compensated: bool = False  # metric methods: mean (bias) compensation of the removed units
    description: str = ""


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("pg", "PG search", "search", layout="heterogeneous",
           description="policy-gradient search, per-layer widths free (global budget)"),
    Method("pg_uniform", "PG search (uniform layout)", "search", layout="uniform",
           description="policy-gradient search, the same width in every layer (stock architecture)"),
    Method("wanda_sp", "Wanda-sp", "metric", scorer="wanda_sp",
           description="Wanda structured (|W| x input norm), same fraction per layer"),
    Method("flap", "FLAP", "metric", scorer="flap", compensated=True,
           description="FLAP fluctuation metric with bias compensation, same fraction per layer (UL-UM)"),
    Method("magnitude", "magnitude", "metric", scorer="magnitude", description="weight magnitude"),
    Method("taylor", "Taylor", "metric", scorer="taylor",
           description="LLM-Pruner first-order Taylor |w * grad| (back-propagates)"),
    Method("random", "random", "metric", scorer="random", description="random units, same fraction per layer"),
    Method("layer_drop", "layer drop (ShortGPT)", "metric", scorer="shortgpt", granularity=("layers",),
           description="drop whole layers by ShortGPT block influence"),
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


def method_label(name: str) -> str:
    return METHODS[name].label if name in METHODS else name
