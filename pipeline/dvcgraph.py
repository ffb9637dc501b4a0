"""The stage graph of a dvc.yaml, with `foreach` and `matrix` groups expanded into the stages DVC runs.

DVC names generated stages ``group@key``: for ``foreach`` over a list of scalars the key is the value
(``compare@0.3``), over a dict the dict's key, over a list of lists/dicts the index; for ``matrix`` the keys of
every dimension joined by ``-`` in the order the matrix lists them (``search@pg-0.3``; a list/dict value gives
``<dimension><index>``). ``${...}`` is looked up in params.yaml (and inline ``vars`` dicts), ``${item}``,
``${item.<dim>}`` and ``${key}`` in the generated stage's own values, as DVC's resolver does (a value that is the
whole string keeps its type; inside a string, booleans print as ``true``/``false``).

Edges come from the data flow: stage B depends on stage A when one of B's ``deps`` is, contains or lies inside
one of A's ``outs``/``metrics``/``plots``. When the groups cannot be expanded (no params given), groups stay single
nodes and a path component holding ``${...}`` matches any component. ``tests/test_flows.py`` checks the names
against DVC's own ``dvc stage list``.
"""
from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

_INTERP = re.compile(r"\$\{\s*([^}]+?)\s*\}")


class Unresolved(KeyError):
    """A ``${...}`` name is not in the context (no params given, or a typo)."""


def load_dvc_yaml(root: Path) -> dict:
    return yaml.safe_load((Path(root) / "dvc.yaml").read_text(encoding="utf-8")) or {}


def load_params_yaml(root: Path, name: str = "params.yaml") -> dict:
    p = Path(root) / name
    return (yaml.safe_load(p.read_text(encoding="utf-8")) or {}) if p.exists() else {}


def _to_str(v: Any) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _lookup(ctx: dict, expr: str) -> Any:
    cur: Any = ctx
    for part in re.findall(r"\[\d+\]|[^.\[\]]+", expr):
        try:
            cur = cur[int(part[1:-1])] if part.startswith("[") else cur[part]
        except (KeyError, IndexError, TypeError):
            raise Unresolved(expr) from None
    return cur


def interpolate(value: Any, ctx: dict, partial: bool = False) -> Any:
    """Resolve ``${a.b}`` / ``${item}`` / ``${key}`` in strings, lists and dict keys/values (raises Unresolved;
    ``partial``: leave what cannot be resolved as it is)."""
    if isinstance(value, str):
        whole = _INTERP.fullmatch(value)
        try:
            if whole:
                return _lookup(ctx, whole.group(1))
        except Unresolved:
            if not partial:
                raise
            return value

        def sub(m: re.Match) -> str:
            try:
                return _to_str(_lookup(ctx, m.group(1)))
            except Unresolved:
                if not partial:
                    raise
                return m.group(0)

        return _INTERP.sub(sub, value)
    if isinstance(value, list):
        return [interpolate(v, ctx, partial) for v in value]
    if isinstance(value, dict):
        return {(interpolate(k, ctx, partial) if isinstance(k, str) else k): interpolate(v, ctx, partial)
                for k, v in value.items()}
    return value


def _composite(v: Any) -> bool:
    return isinstance(v, (list, tuple, dict))


def _foreach_items(iterable: Any, group: str) -> list[tuple[str, Any, Any]]:
    """(name key, ``key`` value, ``item`` value) of a foreach, as dvc/parsing ForeachDefinition names them."""
    if isinstance(iterable, dict):
        return [(_to_str(k), k, v) for k, v in iterable.items()]
    if not isinstance(iterable, list):
        raise ValueError(f"dvc.yaml stage {group!r}: foreach must give a list or a dict, got {iterable!r}")
    if any(map(_composite, iterable)):
        return [(str(i), i, v) for i, v in enumerate(iterable)]
    return [(_to_str(v), v, v) for v in iterable]


def _matrix_items(matrix: dict, group: str) -> list[tuple[str, str, dict]]:
    """(name key, ``key`` value, ``item`` dict) of a matrix, as dvc/parsing MatrixDefinition names them."""
    for dim, values in matrix.items():
        if not isinstance(values, list):
            raise ValueError(f"dvc.yaml stage {group!r}: matrix.{dim} must be a list, got {values!r}")
    out = []
    dims = list(matrix)
    for combo in itertools.product(*(list(enumerate(matrix[d])) for d in dims)):
        fragments = [f"{d}{i}" if _composite(v) else _to_str(v) for d, (i, v) in zip(dims, combo)]
        key = "-".join(fragments)
        out.append((key, key, {d: v for d, (_, v) in zip(dims, combo)}))
    return out


def _paths(entries: Iterable[Any] | None, wdir: str | None = None) -> list[str]:
    paths = [next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or []]
    if wdir and wdir not in (".", ""):
        paths = [os.path.normpath(os.path.join(wdir, p)) for p in paths]
    return paths


def _node(group: str, body: dict) -> dict:
    wdir = body.get("wdir")
    return {"group": group, "deps": _paths(body.get("deps"), wdir),
            "outs": _paths(body.get("outs"), wdir) + _paths(body.get("metrics"), wdir)
            + _paths(body.get("plots"), wdir)}


def expand_stages(dvc_yaml: dict, params: dict | None = None) -> dict[str, dict]:
    """Every stage DVC would run, in dvc.yaml order: ``{name: {"group", "deps", "outs"}}``.

    With ``params`` (params.yaml's content) foreach/matrix groups are expanded into ``group@key`` stages;
    without (or when a ``${...}`` cannot be resolved from them) a group stays one node named by the group.
    """
    ctx: dict = {}
    for v in dvc_yaml.get("vars") or []:
        if isinstance(v, dict):
            ctx.update(v)
    ctx.update(params or {})
    out: dict[str, dict] = {}
    for group, st in (dvc_yaml.get("stages") or {}).items():
        st = st or {}
        try:
            if "foreach" in st:
                body = st.get("do") or {}
                for key, k, item in _foreach_items(interpolate(st["foreach"], ctx), group):
                    out[f"{group}@{key}"] = _node(group, interpolate(body, {**ctx, "key": k, "item": item}))
                continue
            if "matrix" in st:
                body = {k: v for k, v in st.items() if k != "matrix"}
                for key, k, item in _matrix_items(interpolate(st["matrix"], ctx), group):
                    out[f"{group}@{key}"] = _node(group, interpolate(body, {**ctx, "key": k, "item": item}))
                continue
            out[group] = _node(group, interpolate(st, ctx))
        except Unresolved:  # not expandable here: the group as one node, its paths resolved where possible
            out[group] = _node(group, interpolate(st.get("do", st), ctx, partial=True))
    return out


def _parts(path: str) -> list[str]:
    return [p for p in path.strip().strip("/").split("/") if p not in ("", ".")]


def _overlaps(a: str, b: str) -> bool:
    """Whether two dvc.yaml paths are the same or one contains the other (a component with ${...} matches any)."""
    pa, pb = _parts(a), _parts(b)
    n = min(len(pa), len(pb))
    return all(x == y or "${" in x or "${" in y for x, y in zip(pa[:n], pb[:n]))


def stage_graph(dvc_yaml: dict, params: dict | None = None) -> dict[str, list[str]]:
    """stage → the stages whose outputs it depends on (both in dvc.yaml order); see expand_stages."""
    nodes = expand_stages(dvc_yaml, params)
    return {name: [o for o in nodes if o != name and any(_overlaps(d, p) for d in node["deps"]
                                                           for p in nodes[o]["outs"])]
            for name, node in nodes.items()}


def topological(graph: dict[str, list[str]]) -> list[str]:
    """Kahn's order; ties keep the graph's (dvc.yaml's) order. ValueError on a cycle."""
    position = {n: i for i, n in enumerate(graph)}
    indegree = {n: len(d) for n, d in graph.items()}
    users: dict[str, list[str]] = {n: [] for n in graph}
    for n, ups in graph.items():
        for u in ups:
            users[u].append(n)
    ready = sorted((n for n, k in indegree.items() if k == 0), key=position.get)
    order: list[str] = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for m in users[n]:
            indegree[m] -= 1
            if indegree[m] == 0:
                ready.append(m)
        ready.sort(key=position.get)
    if len(order) != len(graph):
        raise ValueError(f"dvc.yaml has a dependency cycle among {sorted(set(graph) - set(order))}")
    return order


def select(graph: dict[str, list[str]], selected: Iterable[str] | None) -> list[str]:
    """The stages named by ``selected`` (a stage, or a group name for all of its ``group@key`` stages), in
    dependency order; all stages when ``selected`` is None. ValueError naming the valid names otherwise."""
    order = topological(graph)
    if selected is None:
        return order
    groups: dict[str, list[str]] = {}
    for n in order:
        groups.setdefault(n.split("@", 1)[0], []).append(n)
    chosen: list[str] = []
    unknown = []
    for s in dict.fromkeys(selected):
        if s in graph:
            chosen.append(s)
        elif s in groups:
            chosen.extend(groups[s])
        elif "@" in s and s.split("@", 1)[0] in graph:  # an item of a group left unexpanded
            chosen.append(s)
        else:
            unknown.append(s)
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has: {', '.join(order)} "
                         "(a group's single stage is written group@key, e.g. search@pg-0.3)")
    rank = {n: i for i, n in enumerate(order)}
    chosen = list(dict.fromkeys(chosen))
    return sorted(chosen, key=lambda s: (rank.get(s, rank.get(s.split("@", 1)[0], 0)), chosen.index(s)))


def selected_upstream(graph: dict[str, list[str]], chosen: list[str]) -> dict[str, list[str]]:
    """For each chosen stage, its nearest chosen ancestors (through stages that are not chosen): the edges to
    draw when only some stages run."""
    keep = set(chosen)

    def base(s: str) -> str:
        return s if s in graph else s.split("@", 1)[0]

    out: dict[str, list[str]] = {}
    for s in chosen:
        found: list[str] = []
        seen: set[str] = set()
        stack = list(graph.get(base(s), []))
        while stack:
            u = stack.pop(0)
            if u in seen:
                continue
            seen.add(u)
            if u in keep:
                found.append(u)
            else:
                stack.extend(graph.get(u, []))
        out[s] = [u for u in chosen if u in found]
    return out


def stage_order(dvc_yaml: dict, selected: Iterable[str] | None = None, params: dict | None = None) -> list[str]:
    """Stages in dependency order (ties: the order of dvc.yaml), optionally only ``selected`` ones; with
    ``params``, foreach/matrix groups are expanded (see expand_stages)."""
    return select(stage_graph(dvc_yaml, params), selected)
