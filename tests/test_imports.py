"""The package's import graph has no cycle, and no module imports another of jaxft's inside a
function to dodge one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "jaxft"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> tuple[set[str], list[int]]:
    """(jaxft modules imported at module level, line numbers of jaxft imports inside functions)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    top: set[str] = set()
    late: list[int] = []

    def targets(node: ast.AST) -> set[str]:
        found = set()
        if isinstance(node, ast.Import):
            found = {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found = {base} | {f"{base}.{alias.name}" for alias in node.names}
        return {m for m in found if m in modules}

    type_checking = {  # `if TYPE_CHECKING:` imports exist for annotations only, never at run time
        id(inner)
        for node in tree.body
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in type_checking:
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)) and targets(node):
            if node.col_offset == 0:
                top |= targets(node)
            else:
                late.append(node.lineno)
    return top, late


def _graph() -> tuple[dict[str, set[str]], dict[str, list[int]]]:
    graph, late = {}, {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        graph[name], late[name] = _imports(path)
    # Importing a submodule imports its parent packages first.
    for name in list(graph):
        graph[name] = {m for m in graph[name] if m != name}
    return graph, late


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            # `from . import x` inside package p names p itself: not an edge back to p's __init__.
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_cycle():
    graph, _ = _graph()
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".") and not name.startswith(m + ".")}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_late_imports_of_jaxft_modules():
    _, late = _graph()
    offenders = {name: lines for name, lines in late.items() if lines}
    assert not offenders, f"jaxft imports inside functions: {offenders}"
