"""DVC experiments as units of work: override sets, their deterministic names, grids, and `dvc exp show` records.

A *unit* is one DVC experiment: a list of ``-S key=value`` overrides of params.yaml plus optional stage targets
(``dvc exp run -S a=1 -S b=2 [targets]``). Its experiment name is derived from the sweep id and the unit itself
(sorted overrides + targets, hashed), so

* the same unit in the same sweep always gets the same name: a retried or resubmitted unit finds its result
  already in the shared git remote instead of computing (and pushing) it twice;
* two different units never share a name (the 8-hex-digit hash of their content differs), so two workers never
  write the same experiment, and nothing is pushed with ``--force``.

Names use only ``[A-Za-z0-9._-]`` (valid git ref components; DVC stores experiments as
``refs/exps/<baseline[:2]>/<baseline[2:]>/<name>``). Pure functions; no Prefect, no DVC import.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
import shlex
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

_KEY = re.compile(r"^(?:[\w./-]+:)?[A-Za-z_][\w-]*(?:\.[\w-]+)*$")  # [file:]a.b_c.d
_SWEEP_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def check_override(text: str) -> tuple[str, str]:
    """``key=value`` → (key, value); ValueError naming the text and the expected form."""
    if not isinstance(text, str) or "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value (e.g. search.steps=100, "
                         "'compare.sparsities=[0.2,0.4]')")
    key, value = text.split("=", 1)
    key = key.strip()
    if not _KEY.match(key) or ".." in key:
        raise ValueError(f"override {text!r}: {key!r} is not a params key (dotted names like search.steps, "
                         "optionally prefixed by a params file: other.yaml:train.lr)")
    return key, value.strip()


def check_sweep_id(sweep_id: str) -> str:
    if not isinstance(sweep_id, str) or not _SWEEP_ID.match(sweep_id) or ".." in sweep_id:
        raise ValueError(f"sweep id {sweep_id!r} must be 1-40 characters of letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return sweep_id


def normalise_unit(unit: Any) -> dict:
    """A unit from the CLI/UI/Python → ``{"overrides": [...], "targets": [...]}`` (validated).

    Accepted: a dict with ``overrides`` (list or one string) and optional ``targets``; a list of ``key=value``
    strings; or one string of space-separated ``key=value`` words (shell quoting allowed).
    """
    if isinstance(unit, str):
        unit = shlex.split(unit)
    if isinstance(unit, (list, tuple)):
        unit = {"overrides": list(unit)}
    if not isinstance(unit, Mapping):
        raise ValueError(f"unit {unit!r} must be a list of key=value overrides or a dict with 'overrides'")
    extra = set(unit) - {"overrides", "targets"}
    if extra:
        raise ValueError(f"unit {dict(unit)!r} has unknown field(s) {sorted(extra)}; allowed: overrides, targets")
    overrides = unit.get("overrides") or []
    if isinstance(overrides, str):
        overrides = shlex.split(overrides)
    targets = unit.get("targets") or []
    if isinstance(targets, str):
        targets = targets.split()
    keys = [check_override(o)[0] for o in overrides]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"unit {list(overrides)} sets {dup} more than once")
    return {"overrides": [o.strip() for o in overrides], "targets": [str(t) for t in targets]}


def unit_key(unit: Mapping) -> str:
    """Canonical text of a unit (order of the overrides does not matter; targets keep theirs)."""
    u = normalise_unit(unit)
    return json.dumps({"overrides": sorted(u["overrides"]), "targets": u["targets"]}, sort_keys=True)


def experiment_name(sweep_id: str, unit: Mapping) -> str:
    """``<sweep id>-<readable overrides>-<8 hex of sha256(sweep id, unit)>``, at most 80 characters.

    e.g. ``nightly-sparsities0.4-method-flap-3f2a9c01`` for ``compare.sparsities=[0.4] search.method=flap``.
    """
    check_sweep_id(sweep_id)
    u = normalise_unit(unit)
    digest = hashlib.sha256(f"{sweep_id}\n{unit_key(u)}".encode()).hexdigest()[:8]
    words = []
    for o in sorted(u["overrides"]):
        key, value = check_override(o)
        value = value.strip("[]{}() ")
        if value:  # empty lists say little
            words.append(f"{key.rsplit('.', 1)[-1]}{_UNSAFE.sub('-', value)}")
    readable = _UNSAFE.sub("-", "-".join(words)).strip("-.")
    readable = re.sub(r"\.{2,}", ".", readable)[:36].strip("-.") or "base"
    return f"{sweep_id}-{readable}-{digest}"


def parse_value(text: str) -> Any:
    """A ``-S`` value as DVC reads it (YAML): '0.4' → 0.4, '[0.2, 0.4]' → [0.2, 0.4], 'pg' → 'pg'."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def format_value(value: Any) -> str:
    """A Python value as a ``-S`` value (flow-style YAML on one line)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def grid_units(grid: Mapping[str, Sequence[Any]], targets: Sequence[str] = ()) -> list[dict]:
    """The cartesian product of ``{key: [values...]}`` → one unit per combination, keys in the given order.

    ``targets`` may contain ``{key}`` placeholders filled with the unit's values, e.g.
    ``grid={"m.method": ["a", "b"], "m.sparsity": [0.2]}, targets=["evaluate@{m.method}-{m.sparsity}"]``.
    """
    if not grid:
        raise ValueError("grid is empty: give {key: [value, ...]}")
    for key, values in grid.items():
        check_override(f"{key}=x")
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"grid[{key!r}] must be a non-empty list of values, got {values!r}")
    units = []
    for combo in itertools.product(*grid.values()):
        values = dict(zip(grid, combo))
        overrides = [f"{k}={format_value(v)}" for k, v in values.items()]
        filled = []
        for t in targets:
            for k, v in values.items():
                t = t.replace("{" + k + "}", format_value(v))
            filled.append(t)
        units.append(normalise_unit({"overrides": overrides, "targets": filled}))
    return units


def apply_overrides(params: dict, overrides: Sequence[str]) -> dict:
    """A copy of ``params`` (params.yaml's content) with ``key=value`` overrides set as DVC sets them."""
    out = yaml.safe_load(yaml.safe_dump(params or {}))
    for o in overrides:
        key, value = check_override(o)
        if ":" in key:
            continue  # another params file
        node = out
        *head, last = key.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = parse_value(value)
    return out


# stage groups of pgprune's dvc.yaml that evaluate one (method, sparsity) cell, by the method's kind
EVALUATE_STAGE = {"search": "evaluate_search", "metric": "evaluate_baseline"}


def pgprune_units(methods: Sequence[str], sparsities: Sequence[float], evaluate_only: bool = True,
                  root: "Path | None" = None) -> list[dict]:
    """One unit per (method, sparsity) of pgprune's pipeline: ``compare.*`` narrowed to that cell and ``export``
    at it, so the experiment holds that method at that sparsity only; targets: the cell's evaluation stage
    (``evaluate_search@pg-0.4``: its search/baseline and their inputs run, nothing else) or, with
    ``evaluate_only=False``, the whole pipeline (export and report too; the pruned model is pushed).

    With ``root`` (a checkout), each unit's params are validated (pgprune.config) and its targets checked against
    the stages root's dvc.yaml generates for them, so a typo fails here, not on a GPU box."""
    from pgprune.methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"methods {unknown or list(methods)} unknown or empty; allowed: {', '.join(METHODS)}")
    bad = [s for s in sparsities if not 0 < float(s) < 1]
    if bad or not sparsities:
        raise ValueError(f"sparsities {bad or list(sparsities)} must be a non-empty list of values in (0, 1)")
    units = []
    for m in methods:
        kind = METHODS[m].kind
        for s in sparsities:
            s = float(s)
            overrides = [f"compare.sparsities=[{s!r}]",
                         f"compare.searches=[{m}]" if kind == "search" else "compare.searches=[]",
                         f"compare.baselines=[{m}]" if kind == "metric" else "compare.baselines=[]",
                         f"export.method={m}", f"export.sparsity={s!r}", "recover.sparsities=[]"]
            targets = [f"{EVALUATE_STAGE[kind]}@{m}-{s!r}"] if evaluate_only else []
            units.append(normalise_unit({"overrides": overrides, "targets": targets}))
    if root is not None:
        from pathlib import Path

        from pgprune.config import parse_params
        from pipeline.dvcgraph import load_params_yaml, stage_graph

        base = load_params_yaml(Path(root))
        for u in units:
            params = apply_overrides(base, u["overrides"])
            parse_params(params, f"params.yaml with {' '.join(u['overrides'])}")  # ConfigError naming the key
            missing = [t for t in u["targets"] if t not in stage_graph(Path(root), params)]
            if missing:
                raise ValueError(f"stage(s) {missing} do not exist in {root}/dvc.yaml for {' '.join(u['overrides'])}")
    return units


# --- `dvc exp run` / `dvc exp show` output ---------------------------------------------------------------------------
def experiment_names(line: str) -> list[str]:
    """Experiment names in a line of `dvc exp run` output ("Ran experiment(s): a, b", "Queued experiment 'a' ...")."""
    m = re.search(r"Queued experiment '([^']+)'", line)
    if m:
        return [m.group(1)]
    m = re.search(r"Ran experiment\(s\):(.*)", line)
    return [n.strip() for n in m.group(1).split(",") if n.strip()] if m else []


_RAN = re.compile(r"^Running stage '([^']+)'")
_SKIPPED = re.compile(r"^Stage '([^']+)' (?:didn't change, skipping|is cached - skipping run)")


def stages_in_output(lines: Iterable[str]) -> dict[str, list[str]]:
    """Which stages a `dvc repro`/`dvc exp run` output ran, and which it restored or skipped as unchanged."""
    ran, reused = [], []
    for line in lines:
        line = line.strip()
        m = _RAN.match(line)
        if m:
            ran.append(m.group(1))
            continue
        m = _SKIPPED.match(line)
        if m:
            reused.append(m.group(1))
    return {"ran": ran, "reused": reused}


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (int, float, str, bool)) or obj is None:
        out[prefix] = obj
    return out  # lists (per-layer counts, ...) are left out


def summarise_experiments(exp_show: list[dict]) -> list[dict]:
    """`dvc exp show --json` → one record per committed baseline and experiment:
    ``{"name", "rev", "baseline", "params": {...}, "metrics": {"file:key": value}, "error"}``."""
    records = []

    def record(entry: dict, baseline: str | None) -> None:
        data = entry.get("data") or {}
        params = {}
        for _file, p in (data.get("params") or {}).items():
            params.update(_flatten((p or {}).get("data") or {}))
        metrics = {}
        for file, m in (data.get("metrics") or {}).items():
            for k, v in _flatten((m or {}).get("data") or {}).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    metrics[f"{file}:{k}"] = v
        records.append({"name": entry.get("name"), "rev": entry.get("rev"), "baseline": baseline,
                        "params": params, "metrics": metrics, "error": entry.get("error")})

    for top in exp_show or []:
        if top.get("rev") == "workspace":
            continue
        record(top, None)
        for group in top.get("experiments") or []:
            for rev in group.get("revs") or []:
                record(rev, top.get("name") or top.get("rev"))
    return records


def parse_exp_refs(ls_remote: str) -> dict[tuple[str, str], str]:
    """`git ls-remote <remote> 'refs/exps/*'` output → ``{(baseline sha, name): experiment commit sha}``."""
    out = {}
    for line in ls_remote.splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue
        sha, ref = parts
        m = re.match(r"^refs/exps/([0-9a-f]{2})/([0-9a-f]{38})/(.+)$", ref)
        if m:
            out[(m.group(1) + m.group(2), m.group(3))] = sha
    return out
