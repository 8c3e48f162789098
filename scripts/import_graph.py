"""Count kvxfer's modules, its largest module and the import cycles among its modules.

Reads the source with ``ast`` (nothing is imported). An edge A -> B is an import of B (or of a name from B) in A;
module-level imports are "runtime" edges, imports inside functions or ``if TYPE_CHECKING:`` blocks are "lazy".
A cycle is a strongly connected component of more than one module. Importing ``a.b.c`` also runs the package
``a.b`` (not the root package ``kvxfer``, whose ``__init__`` only re-exports, and not a package the importing module
sits in: that one is already running).

    python scripts/import_graph.py [--json] [--lazy]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "kvxfer"


def module_name(path: Path) -> str:
    """Dotted name of a source file under ROOT."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    base = current.split(".") if is_package else current.split(".")[:-1]
    if level > 1:
        base = base[: -(level - 1)]
    return ".".join(base + ([target] if target else []))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """(runtime, lazy) kvxfer modules imported by the file at ``path``."""
    name = module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    runtime: set[str] = set()
    lazy: set[str] = set()

    def targets(node: ast.Import | ast.ImportFrom) -> set[str]:
        found: set[str] = set()
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            base = _resolve(name, is_package, node.level, node.module) if node.level else (node.module or "")
            candidates = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate.startswith(PACKAGE):
                found.add(candidate)
                parent = candidate.rpartition(".")[0]
                while parent and parent != PACKAGE:  # importing a.b.c runs a.b's __init__ (unless a.b is ours)
                    if not (name == parent or name.startswith(parent + ".")):
                        found.add(parent)
                    parent = parent.rpartition(".")[0]
        return found

    def visit(node: ast.AST, deferred: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (lazy if deferred else runtime).update(targets(child))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, True)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                visit(child, True)
            else:
                visit(child, deferred)

    visit(tree, False)
    runtime.discard(name)
    lazy.discard(name)
    return runtime, lazy - runtime


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one node, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, ()):
            if other not in index:
                connect(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, int]]:
    """(runtime edges, every edge, lines) by module."""
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(f) for f in files}
    runtime: dict[str, set[str]] = {}
    every: dict[str, set[str]] = {}
    sizes: dict[str, int] = {}
    for path in files:
        name = module_name(path)
        now, later = imports(path, modules)
        runtime[name], every[name] = now, now | later
        sizes[name] = len(path.read_text().splitlines())
    return runtime, every, sizes


def reaches() -> dict[str, set[str]]:
    """Modules each module imports directly or through others (lazy imports included); a package's
    ``kvxfer.kernels.*`` modules count as ``kvxfer.kernels``."""
    _, every, _ = graphs()

    def fold(name: str) -> str:
        return "kvxfer.kernels" if name.startswith("kvxfer.kernels") else name

    folded: dict[str, set[str]] = {}
    for name, targets in every.items():
        folded.setdefault(fold(name), set()).update(fold(t) for t in targets)
    closure: dict[str, set[str]] = {}
    for start in folded:
        seen, todo = set(), [start]
        while todo:
            for other in folded.get(todo.pop(), ()):
                if other not in seen:
                    seen.add(other)
                    todo.append(other)
        closure[start] = seen
    return closure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument("--lazy", action="store_true", help="also follow lazy imports when looking for cycles")
    args = parser.parse_args()
    runtime, every, sizes = graphs()
    largest = max(sizes, key=lambda n: sizes[n])
    result = {
        "modules": len(sizes),
        "largest": [largest, sizes[largest]],
        "over_300_lines": sorted(n for n, s in sizes.items() if s > 300),
        "runtime_cycles": strongly_connected(runtime),
        "cycles_with_lazy_imports": strongly_connected(every),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"modules: {result['modules']}")
    print(f"largest: {largest} ({sizes[largest]} lines)")
    print(f"over 300 lines: {', '.join(result['over_300_lines']) or 'none'}")
    for key in ("runtime_cycles", "cycles_with_lazy_imports"):
        print(f"{key.replace('_', ' ')}: {len(result[key])}")
        for component in result[key]:
            print(f"  {len(component)}: {' '.join(component)}")


if __name__ == "__main__":
    main()
