"""The library's architecture, checked: imports go one way, from the front door down to the base, and no module
imports another that (directly or through others) imports it back.

Layers, lowest first (a module may import its own layer and the ones below, never one above):

0. base: ``pgprune`` (the version; its lazy ``prune``/``PruneResult`` re-export is the one exemption), ``errors``,
   ``io``, ``methods`` (the method registry)
1. parts that know no pruned model: ``search`` (the policy-gradient search: probabilities, estimators, projection),
   ``core.adapters`` (what a LLaMA/Mistral/Qwen2 layer looks like), ``data`` (texts, blocks, tasks), ``report``
2. ``core``: masks, allocation, weights and placement, the masked executor, the masks hand-off
3. ``scorers`` (importance metrics) and ``hf`` (transformers models: loading, slicing, export, cards)
4. ``eval``: perplexity, zero-shot, speed, evaluation of a masks cell
5. ``config`` (the params schema), ``pruning`` (a method at a sparsity: scores, masks, the search driver) and
   ``recovery`` (the LoRA tune after pruning)
6. the front door: ``api``, ``cli`` and ``options`` (the table of their options)

Every import counts, including those inside functions (lazy imports hide a cycle, they don't remove it); imports
under ``if TYPE_CHECKING:`` are annotations only and are skipped.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pgprune"
LAYERS = [
    ("pgprune", "pgprune.errors", "pgprune.io", "pgprune.methods"),
    ("pgprune.search", "pgprune.core.adapters", "pgprune.data", "pgprune.report"),
    ("pgprune.core",),
    ("pgprune.scorers", "pgprune.hf"),
    ("pgprune.eval",),
    ("pgprune.config", "pgprune.pruning", "pgprune.recovery"),
    ("pgprune.api", "pgprune.cli", "pgprune.options"),
]
EXEMPT = {("pgprune", "pgprune.api")}  # pgprune.prune / pgprune.PruneResult, imported on first use


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py")) if "modeling" not in p.parts}


def layer(mod: str) -> int:
    """The layer of ``mod``: the longest prefix in LAYERS wins."""
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (mod == p or mod.startswith(p + ".")) and p.count(".") > depth:
                best, depth = i, p.count(".")
    assert best is not None, f"{mod} is in no layer; add it to LAYERS"
    return best


def _type_checking_lines(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(range(sub.lineno, sub.end_lineno + 1))
    return skip


def lazy_table(package: str) -> dict[str, str]:
    """{name: submodule} of a package serving names lazily (a literal ``_LAZY = {...}`` in its __init__.py)."""
    path = MODULES.get(package)
    if path is None or path.name != "__init__.py":
        return {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(x, "id", None) == "_LAZY" for x in node.targets):
            return ast.literal_eval(node.value)
    return {}


def imports_of(mod: str) -> set[str]:
    """The pgprune modules ``mod`` imports (resolved to modules that exist: ``from a import b`` is ``a.b`` when
    that is a module, else ``a``)."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES or a.name in lazy_table(base) else base
                     for a in node.names]
        else:
            continue
        for n in list(names):  # a name a package serves lazily (its _LAZY table) imports that module
            pkg, _, attr = n.rpartition(".")
            names.append(f"{pkg}.{lazy_table(pkg)[attr]}" if attr in lazy_table(pkg) else n)
        for n in names:
            while n and n not in MODULES:
                n = n.rpartition(".")[0]
            if n and n != mod:
                out.add(n)
    return out


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_import_from_a_higher_layer(mod):
    up = [t for t in sorted(GRAPH[mod]) if layer(t) > layer(mod) and (mod, t) not in EXEMPT
          and not (t == "pgprune" and mod != "pgprune")]
    assert not up, f"{mod} (layer {layer(mod)}) imports {', '.join(f'{t} (layer {layer(t)})' for t in up)}"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = {m: {t for t in ts if (m, t) not in EXEMPT and t != "pgprune"} for m, ts in GRAPH.items()}
    # a package's __init__ re-exporting its own modules is not a cycle with them
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    assert _cycles(graph) == []


def test_the_checker_sees_cycles_and_upward_imports():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("pgprune.core.masks") == 2 and layer("pgprune.core.adapters.base") == 1
    assert "pgprune.core.masked_forward" in GRAPH["pgprune.eval.perplexity"]
    assert "pgprune.scorers.compute" in GRAPH["pgprune.api"]  # through the package's lazy _LAZY table


def test_the_params_schema_loads_no_search_or_scorer_code():
    """Reading params (every stage, the CLI) imports the scorer names and the search settings, not torch code."""
    import subprocess
    import sys

    code = "import sys, pgprune.config; print(sorted(m for m in sys.modules if m.startswith('pgprune')), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PKG.parent, check=True).stdout
    assert "pgprune.scorers.compute" not in out and "pgprune.search.policy" not in out and out.strip().endswith("False")


def test_search_knows_no_model():
    """The search is model-agnostic: it imports no torch.nn model code, no adapters, no transformers."""
    for m in (x for x in MODULES if x.startswith("pgprune.search")):
        assert all(layer(t) == 0 or t.startswith("pgprune.search") for t in GRAPH[m]), (m, GRAPH[m])
        assert "transformers" not in MODULES[m].read_text(), m
