"""Import circles in spotrun: `python scripts/check_imports.py [spotrun/]` prints each, exits 1 if any.

The graph has one edge per module-level `import`/`from … import` of a spotrun module (imports
inside functions, which load lazily, and under `if TYPE_CHECKING:` are not edges). Importing a
submodule runs its package's `__init__`, but that is not counted as an edge: a package that
re-exports its submodules is the usual shape, not a circle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_name(path: Path, package: Path) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = {module_name(f, package): f for f in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(package: Path) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = import_graph(package)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


if __name__ == "__main__":
    root = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "spotrun")
    circles = cycles(root.resolve())
    for c in circles:
        print("circle:", " -> ".join(c))
    print(f"{len(circles)} import circle(s)")
    sys.exit(1 if circles else 0)
