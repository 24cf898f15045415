"""The package's modules import one another without cycles.

The graph is read from the source with `ast` (nothing is imported, so the check is fast and sees every module,
optional extras included): one node per module of `dpslm_stream`, `dpslm_stream.server` and `dpslm_stream.client`,
one edge per `import`/`from ... import` that names another of them, wherever it stands — module level or inside a
function. A function-level import only postpones the dependency to run time; two modules that each reach into the
other are one tangled responsibility whichever line the import sits on, so it counts.

Imports under `if TYPE_CHECKING:` count too: a module that names another's class in its annotations depends on it
(a reader has to open both), and a two-way type dependency is what `typing.Protocol` interfaces are for (the
project's guide declares interfaces between layers that way).

Edges go to the module named, not to the packages above it: `from dpslm_stream.stream import worker` is an edge to
`dpslm_stream.stream.worker` (when `worker` is a submodule) and `from dpslm_stream.stream import X` otherwise to the
package `dpslm_stream.stream` (its `__init__`). The implicit import of a parent package's `__init__` is left out,
since every submodule would otherwise form a cycle with a package that re-exports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Where each installed package lives in the repository (pyproject.toml's package-dir).
PACKAGE_DIRS = {"dpslm_stream": ROOT / "dpslm_stream", "dpslm_stream.server": ROOT / "server",
                "dpslm_stream.client": ROOT / "client"}


def package_modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (source file, is a package `__init__`)."""
    modules: dict[str, tuple[Path, bool]] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            modules[".".join([package, *parts])] = (path, is_package)
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([name] if name else []))


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for module, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):  # every import, module level or nested in a function or `if TYPE_CHECKING:`
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (_resolve_relative(module, is_package, node.level, node.module) if node.level
                        else node.module or "")
                for alias in node.names:
                    submodule = f"{base}.{alias.name}"
                    targets.append(submodule if submodule in modules else base)
            for target in targets:
                # `import a.b.c` binds and needs a.b.c; an unknown tail (an attribute) falls back to its module.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None when the graph is acyclic (iterative depth-first search)."""
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    for start in sorted(graph):
        if colour[start] != WHITE:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        colour[start] = GREY
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = BLACK
                stack.pop()
            elif colour[child] == GREY:
                path = [n for n, _ in stack]
                return path[path.index(child):] + [child]
            elif colour[child] == WHITE:
                colour[child] = GREY
                stack.append((child, iter(sorted(graph[child]))))
    return None


def test_graph_sees_the_package():
    graph = import_graph()
    # The walk found the three packages and real edges (a vacuous empty graph would be trivially acyclic).
    assert {"dpslm_stream.cli", "dpslm_stream.server.app", "dpslm_stream.client.api"} <= set(graph)
    assert "dpslm_stream.models.wavlm" in graph["dpslm_stream.stream.encoder"]
    assert sum(map(len, graph.values())) > 100


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
