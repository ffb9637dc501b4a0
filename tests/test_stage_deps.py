"""Each DVC stage's `deps` lists the code it really runs, so that an edit reruns exactly the stages it can change:
the static import closure of `stages/<name>.py` within pgprune/ and stages/ (every `import`/`from ... import`,
also inside functions, but not under `if TYPE_CHECKING:` nor in a module's PEP 562 `__getattr__`; a package counts as
its __init__.py, and importing a module runs its parents' __init__.py; ``from pkg import name`` where pkg's
__init__.py serves ``name`` lazily from its ``_LAZY`` table counts as importing that table's module)
must be covered by the stage's deps (the file, or a folder holding it), and every listed code dep must exist.

`python tests/test_stage_deps.py` prints each stage's closure (what to list in dvc.yaml)."""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pgprune", "stages")
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))
STAGES = DVC_YAML["stages"]


def module_file(name: str) -> Path | None:
    """The file a dotted module name runs from, if it is in PACKAGES (a package: its __init__.py)."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _module_name(f: Path) -> str:
    parts = list(f.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _executed_nodes(tree: ast.Module):
    """Every node, but not ``if TYPE_CHECKING:`` blocks (never run) nor a module-level ``__getattr__`` (PEP 562 lazy
    attributes such as ``pgprune.prune``: they run only for code that names the attribute, which then imports it)."""
    skip = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            skip.add(node)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(node.body)
    todo = [n for n in tree.body if n not in skip]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(c for c in ast.iter_child_nodes(node) if c not in skip)


def imported_modules(f: Path) -> set[str]:
    """Dotted names a file imports (anywhere in it), with each imported module's parent packages, and for
    ``from pkg import name`` also ``pkg.name`` (it is a submodule when such a file exists)."""
    tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
    own = _module_name(f)
    package = own if f.name == "__init__.py" else own.rpartition(".")[0]
    names: set[str] = set()
    for node in _executed_nodes(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(anchor + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names.add(mod)
            names.update(f"{mod}.{a.name}" for a in node.names if a.name != "*")
    for n in list(names):
        pkg, _, attr = n.rpartition(".")
        if attr in lazy_table(pkg):
            names.add(f"{pkg}.{lazy_table(pkg)[attr]}")
    out = set()
    for n in names:
        parts = n.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


@functools.lru_cache(maxsize=None)
def lazy_table(package: str) -> dict[str, str]:
    """{name: submodule} of a package whose __init__.py serves names lazily (a literal ``_LAZY = {...}``), else {}."""
    f = module_file(package) if package else None
    if f is None or f.name != "__init__.py":
        return {}
    for node in ast.parse(f.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(x, "id", None) == "_LAZY" for x in node.targets):
            return ast.literal_eval(node.value)
    return {}


@functools.lru_cache(maxsize=None)
def closure(entry: Path) -> list[str]:
    """Repository-relative paths of every file of PACKAGES that running ``entry`` can import."""
    seen: set[Path] = set()
    todo = [entry]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        todo.extend(m for m in map(module_file, imported_modules(f)) if m is not None and m not in seen)
    return sorted(p.relative_to(ROOT).as_posix() for p in seen)


def stage_entry(body: dict) -> Path:
    m = re.search(r"python -m (stages\.\w+)", body["cmd"])
    assert m, f"not a `python -m stages.<name>` command: {body['cmd']}"
    return module_file(m.group(1))


def code_deps(body: dict) -> list[str]:
    """The stage's deps that are not artifacts (no ``${...}``)."""
    return [d for d in body.get("deps") or [] if "${" not in str(d)]


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d.rstrip("/") or path.startswith(d.rstrip("/") + "/") for d in deps)


@pytest.mark.parametrize("stage", list(STAGES))
def test_deps_cover_the_import_closure(stage):
    body = STAGES[stage]
    deps = code_deps(body)
    missing = [f for f in closure(stage_entry(body)) if not covered(f, deps)]
    assert not missing, f"dvc.yaml stage {stage!r} runs code its deps do not list: {missing}"


@pytest.mark.parametrize("stage", list(STAGES))
def test_listed_code_deps_exist_and_are_used(stage):
    body = STAGES[stage]
    deps = code_deps(body)
    absent = [d for d in deps if not (ROOT / d).exists()]
    assert not absent, f"dvc.yaml stage {stage!r} lists deps that do not exist: {absent}"
    files = closure(stage_entry(body))
    unused = [d for d in deps if not any(covered(f, [d]) for f in files)]
    assert not unused, f"dvc.yaml stage {stage!r} lists code it never imports (edits rerun it for nothing): {unused}"
    # a folder is listed only when the stage imports every module in it (else list the files: a new module in the
    # folder must not rerun the stage)
    broad = {d: sorted(f.relative_to(ROOT).as_posix() for f in (ROOT / d).rglob("*.py")
                       if f.relative_to(ROOT).as_posix() not in files)
             for d in deps if (ROOT / d).is_dir()}
    broad = {d: rest for d, rest in broad.items() if rest}
    assert not broad, f"dvc.yaml stage {stage!r} lists folders holding modules it never imports: {broad}"


def test_the_closure_follows_imports_inside_functions_and_packages():
    files = closure(ROOT / "stages" / "evaluate.py")
    # imported inside main() (only with --masks), and the __init__.py of every package on the way
    assert "pgprune/core/handoff.py" in files and "pgprune/core/adapters/__init__.py" in files
    assert "pgprune/__init__.py" in files and "stages/_common.py" in files
    # `from pgprune.scorers import compute_scores` (a lazy name of the package) runs scorers/compute.py and its imports
    init = closure(ROOT / "stages" / "init.py")
    assert "pgprune/scorers/compute.py" in init and "pgprune/scorers/taylor.py" in init


if __name__ == "__main__":
    for name, body in STAGES.items():
        print(f"{name}:")
        for f in closure(stage_entry(body)):
            print(f"  - {f}{'' if covered(f, code_deps(body)) else '    # missing from dvc.yaml'}")
