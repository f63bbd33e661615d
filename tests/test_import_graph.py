"""The package's layering, read from the source: no import cycles, and ``quire.core`` without torch.

Imports inside functions are deliberate late imports (optional dependencies, start-up time) and
are part of the graph too: a cycle through them still means two modules that need each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "quire"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The quire modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod`` when that is a module)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    # A module importing its own package's __init__ is not an edge worth a cycle.
    return {m for m in found if m in modules and m != name and not name.startswith(m + ".")}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    return {name: _imports(path, name, modules) for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_is_read_from_the_source():
    graph = _graph()
    assert "quire.engine.llm_engine" in graph["quire.llm"], "the reader misses a plain module import"
    assert "quire.core.scheduler" in graph["quire.engine.llm_engine"]


def test_no_module_imports_itself_back():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_planted_cycle_is_found():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def _imports_torch(name: str) -> bool:
    path = ROOT.parent / (name.replace(".", "/") + ".py")
    if not path.exists():
        path = ROOT.parent / name.replace(".", "/") / "__init__.py"
    tree = ast.parse(path.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    return any(m == "torch" or m.startswith("torch.") for m in names)


@pytest.mark.parametrize("name", sorted(n for n in _graph() if n.startswith("quire.core")))
def test_core_does_not_need_torch(name):
    """The scheduler and KV manager run (and are property-tested) without tensors: nothing they
    import, directly or through other quire modules, imports torch."""
    graph, seen, todo = _graph(), set(), [name]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph[module])
    assert not [m for m in sorted(seen) if _imports_torch(m)], f"{name} reaches torch"


def test_a_module_importing_torch_is_seen():
    assert _imports_torch("quire.models.linear")
