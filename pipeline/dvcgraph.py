"""dvc.yaml's stages and their graph, as DVC itself builds them (``dvc.repo.Repo(root).index``): DVC expands the
``foreach``/``matrix`` groups (``search@pg-0.3``), resolves ``${...}`` and draws the edges from outs to deps. What is
added here is only what the Prefect flows need on top: a deterministic order (DAG order, ties in dvc.yaml's order),
resolving the names a user selects (a stage or a group, by DVC's own lookup) and the edges among selected stages.

``params``: a params.yaml content to use instead of the file in ``root`` (an experiment's overrides); DVC then reads a
temporary copy of dvc.yaml (and its ``vars`` files) next to those params.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import yaml


def load_dvc_yaml(root: Path) -> dict:
    return yaml.safe_load((Path(root) / "dvc.yaml").read_text(encoding="utf-8")) or {}


def load_params_yaml(root: Path, name: str = "params.yaml") -> dict:
    p = Path(root) / name
    return (yaml.safe_load(p.read_text(encoding="utf-8")) or {}) if p.exists() else {}


@contextlib.contextmanager
def dvc_repo(root: Path, params: dict | None = None) -> Iterator:
    """DVC's Repo of ``root`` (no ``.dvc`` needed), or of a temporary copy of its dvc.yaml with ``params``."""
    from dvc.repo import Repo

    with contextlib.ExitStack() as stack:
        where = Path(root)
        if params is not None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgprune-dvcgraph-")))
            shutil.copy(where / "dvc.yaml", tmp / "dvc.yaml")
            for v in load_dvc_yaml(where).get("vars") or []:  # vars files (``file.yaml`` or ``file.yaml:keys``)
                if isinstance(v, str) and (where / v.split(":", 1)[0]).is_file():
                    shutil.copy(where / v.split(":", 1)[0], tmp / v.split(":", 1)[0])
            (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
            where = tmp
        repo = stack.enter_context(Repo(str(where), uninitialized=True))
        yield repo


def _name(repo, stage) -> str:
    """The stage's name as `dvc repro` takes it from the repository root: ``name`` in the root dvc.yaml,
    ``path/dvc.yaml:name`` elsewhere (``stage.addressing`` is relative to the current directory)."""
    rel = os.path.relpath(stage.path, repo.root_dir)
    return stage.name if rel == "dvc.yaml" else f"{rel}:{stage.name}"


def _graph(repo) -> dict[str, list[str]]:
    """stage → the stages whose outputs it depends on, both in dvc.yaml order (DVC's index graph)."""
    from dvc.exceptions import CyclicGraphError

    stages = list(repo.index.stages)
    try:
        edges = list(repo.index.graph.edges())  # edge: stage -> the stage it depends on
    except CyclicGraphError as e:
        raise ValueError(f"dvc.yaml has a dependency cycle: {e}") from None
    position = {_name(repo, s): i for i, s in enumerate(stages)}
    graph: dict[str, list[str]] = {_name(repo, s): [] for s in stages}
    for a, b in edges:
        graph[_name(repo, a)].append(_name(repo, b))
    return {n: sorted(ups, key=position.get) for n, ups in graph.items()}


def stage_graph(root: Path, params: dict | None = None) -> dict[str, list[str]]:
    """stage → the stages whose outputs it depends on, as DVC builds them (both in dvc.yaml order)."""
    with dvc_repo(root, params) as repo:
        return _graph(repo)


def stage_outs(root: Path, params: dict | None = None) -> dict[str, list[str]]:
    """stage → its outputs (outs, metrics and plots) as written in dvc.yaml, resolved by DVC."""
    with dvc_repo(root, params) as repo:
        return {_name(repo, s): [o.def_path for o in s.outs] for s in repo.index.stages}


def topological(graph: dict[str, list[str]]) -> list[str]:
    """DAG order; ties keep the graph's (dvc.yaml's) order."""
    import networkx as nx

    position = {n: i for i, n in enumerate(graph)}
    g = nx.DiGraph()
    g.add_nodes_from(graph)
    g.add_edges_from((u, n) for n, ups in graph.items() for u in ups)
    return list(nx.lexicographical_topological_sort(g, key=position.get))


def plan(root: Path, selected: Iterable[str] | None = None, params: dict | None = None
         ) -> tuple[list[str], dict[str, list[str]]]:
    """(the stages named by ``selected`` (a stage or a group: DVC's own lookup, as ``dvc repro <name>``), all when
    None, in DAG order; {stage: its nearest selected upstream stages}). ValueError naming the valid names."""
    from dvc.stage.exceptions import StageNotFound

    with dvc_repo(root, params) as repo:
        graph = _graph(repo)
        order = topological(graph)
        if selected is None:
            return order, selected_upstream(graph, order)
        chosen: set[str] = set()
        unknown = []
        for s in dict.fromkeys(selected):
            try:
                target = s if ":" in s else os.path.join(repo.root_dir, "dvc.yaml") + ":" + s  # not cwd-relative
                chosen.update(_name(repo, st) for st in repo.stage.collect(target))
            except StageNotFound:
                unknown.append(s)
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has: {', '.join(order)} "
                         "(a group's single stage is written group@key, e.g. search@pg-0.3)")
    picked = [s for s in order if s in chosen]
    return picked, selected_upstream(graph, picked)


def stage_order(root: Path, selected: Iterable[str] | None = None, params: dict | None = None) -> list[str]:
    """Stages in DAG order (ties: dvc.yaml's order), optionally only ``selected`` ones (see plan)."""
    return plan(root, selected, params)[0]


def selected_upstream(graph: dict[str, list[str]], chosen: list[str]) -> dict[str, list[str]]:
    """For each chosen stage, its nearest chosen ancestors (through stages that are not chosen): the edges to
    draw when only some stages run (Prefect's ``wait_for``)."""
    keep = set(chosen)
    out: dict[str, list[str]] = {}
    for s in chosen:
        found: set[str] = set()
        seen: set[str] = set()
        stack = list(graph.get(s, []))
        while stack:
            u = stack.pop(0)
            if u in seen:
                continue
            seen.add(u)
            if u in keep:
                found.add(u)
            else:
                stack.extend(graph.get(u, []))
        out[s] = [u for u in chosen if u in found]
    return out
