"""Import cycles between the modules of a package, found by reading the source with `ast`.

Nothing is imported: every `.py` file under the package folder is parsed, and each `import` /
`from ... import` naming a module of the package becomes an edge. `from studio.x import y` points
at `studio.x.y` when that is a module of its own, else at `studio.x`; relative imports are resolved
against the importing module's package. Imports under `if TYPE_CHECKING:` never run and are left out.

Cycles are the strongly connected components of more than one module, each printed with one
concrete path through it (file:line for every edge). Two passes: imports at module level only
(these run when the module is first imported, so a cycle among them can fail with a partially
initialised module), then every import including those inside functions (these run later, but
still tie the modules together).

    python scripts/import_cycles.py                 # studio/, both passes
    python scripts/import_cycles.py --collapse 2    # the same, with modules merged into studio.<pkg>
    python scripts/import_cycles.py --check         # exit status 1 when any cycle is found
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Edge:
    """One import statement from `source` naming module `target`, at `path:line`."""

    source: str
    target: str
    path: str
    line: int
    in_function: bool


def module_names(root: Path) -> dict[str, Path]:
    """Every module under the package folder `root`, by dotted name (a package's is its `__init__`'s)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(node, inside a function?) for every import statement that can run."""
    stack = [(tree, False)]
    while stack:
        node, in_function = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend((child, in_function) for child in node.orelse)
            continue
        inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The known modules that one import statement in `module` names."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name in known]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[:len(package) - (node.level - 1)] if node.level > 1 else package
        base = ".".join(anchor + ([base] if base else []))
    found = []
    for alias in node.names:
        sub = f"{base}.{alias.name}" if base else alias.name
        if sub in known:
            found.append(sub)
        elif base in known:
            found.append(base)
    return list(dict.fromkeys(found))


def collect_edges(root: Path) -> list[Edge]:
    """Every import between modules of the package folder `root`."""
    names = module_names(root)
    known = set(names)
    edges = []
    for module, path in names.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, in_function in _imports(tree):
            for target in _targets(node, module, path.name == "__init__.py", known):
                if target != module:
                    shown = path.relative_to(root.parent).as_posix()
                    edges.append(Edge(module, target, shown, node.lineno, in_function))
    return sorted(edges, key=lambda e: (e.source, e.path, e.line, e.target))


def collapse(edges: list[Edge], depth: int) -> list[Edge]:
    """The same edges between modules cut to their first `depth` name parts (studio.data.x -> studio.data)."""
    cut = lambda name: ".".join(name.split(".")[:depth])  # noqa: E731
    return [Edge(cut(e.source), cut(e.target), e.path, e.line, e.in_function)
            for e in edges if cut(e.source) != cut(e.target)]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's components of `graph`, iterative so deep graphs do not hit the recursion limit."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def cycle_path(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One shortest cycle through the component's first module, as [a, b, ..., a]."""
    members, start = set(component), component[0]
    previous, queue = {}, deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph.get(node, ())):
            if child not in members:
                continue
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return path[::-1] + [start]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    raise ValueError(f"{component} is not a cycle")


@dataclass(frozen=True)
class Cycle:
    """A strongly connected component of more than one module and one path around it."""

    modules: list[str]
    path: list[Edge]


def find_cycles(edges: list[Edge], include_functions: bool) -> list[Cycle]:
    """The import cycles among `edges`, counting imports inside functions only when asked."""
    used = [e for e in edges if include_functions or not e.in_function]
    graph: dict[str, set[str]] = {}
    for e in used:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    cycles = []
    for component in strongly_connected(graph):
        if len(component) < 2:
            continue
        nodes = cycle_path(component, graph)
        # The edge shown for each step: a module-level one where there is one (it runs first).
        steps = [min((e for e in used if e.source == a and e.target == b), key=lambda e: (e.in_function, e.line))
                 for a, b in zip(nodes, nodes[1:])]
        cycles.append(Cycle(component, steps))
    return sorted(cycles, key=lambda c: c.modules)


def format_cycles(title: str, cycles: list[Cycle]) -> str:
    lines = [f"== {title}: {len(cycles)} cycle(s) =="]
    for cycle in cycles:
        lines.append(f"- {len(cycle.modules)} modules: {', '.join(cycle.modules)}")
        for e in cycle.path:
            where = "in a function" if e.in_function else "module level"
            lines.append(f"    {e.source} -> {e.target}   ({e.path}:{e.line}, {where})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("package", nargs="?", default=str(Path(__file__).resolve().parent.parent / "studio"),
                        help="the package folder to read (default: studio/ next to this script)")
    parser.add_argument("--collapse", type=int, default=0, metavar="N",
                        help="merge modules into their first N name parts before looking for cycles")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a cycle is found")
    args = parser.parse_args(argv)
    root = Path(args.package).resolve()
    edges = collect_edges(root)
    if args.collapse:
        edges = collapse(edges, args.collapse)
    found = 0
    for title, include in (("module-level imports only", False),
                           ("all imports (module level and inside functions)", True)):
        cycles = find_cycles(edges, include)
        found += len(cycles)
        print(format_cycles(f"{root.name}/, {title}", cycles))
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
