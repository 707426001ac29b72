"""The genadapter modules import each other one way: no cycle, counting imports inside functions
(lazy imports) and under `if TYPE_CHECKING:` (where genadapter/__init__.py names what its lazy
`__getattr__` imports) as well as those at the top of a module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "genadapter"
# Compiled modules with no Python source (setup.py builds genadapter._cuda_ext from cuda_ext/).
EXTENSIONS = {"genadapter._cuda_ext"}


def module_names() -> dict[str, Path | None]:
    """Dotted name -> file of every module of the package (a package's __init__.py is its name);
    compiled extensions have no file."""
    names: dict[str, Path | None] = dict.fromkeys(EXTENSIONS)
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = list(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = file
    return names


def _known(name: str, modules: dict) -> str | None:
    """The module `name` refers to: itself, or its longest prefix that is a module."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, file: Path, modules: dict) -> set[str]:
    """Every genadapter module that `name` imports anywhere in its source."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            if node.level == 0:
                base = node.module or ""
            elif node.module:
                base = f"{base}.{node.module}"
            # `from pkg import sub` imports the submodule when there is one, else takes a name
            # from pkg itself.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            module = _known(target, modules)
            if module is not None and module != name:
                found.add(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {
        name: imports_of(name, file, modules) if file else set() for name, file in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None when it is acyclic."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after

    def visit(path: list[str]) -> list[str] | None:
        node = path[-1]
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit([node])):
            return cycle
    return None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "genadapter.options" in graph["genadapter.cli"]  # at the top, relative
    assert "genadapter.bench.run" in graph["genadapter.cli.measure"]  # inside a function
    assert "genadapter.eval.metrics" in graph["genadapter.eval.runner"]  # `from . import metrics`
    assert "genadapter.model" in graph["genadapter"]  # under TYPE_CHECKING
    assert graph["genadapter.kernels"] >= {"genadapter._cuda_ext"}  # compiled, from a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def in_cli(name: str) -> bool:
    return name == "genadapter.cli" or name.startswith("genadapter.cli.")


def test_nothing_imports_the_command_line():
    graph = import_graph()
    outside = [n for n, targets in graph.items() if not in_cli(n) and any(map(in_cli, targets))]
    assert outside == []
    # Within it, imports go one way: the package (parser and dispatch) -> the command modules.
    commands = [
        n for n in graph if in_cli(n) and n not in ("genadapter.cli", "genadapter.cli.__main__")
    ]
    assert commands and all("genadapter.cli" not in graph[n] for n in commands)
    # The shared options sit below every command and import no command module.
    assert graph["genadapter.options"] <= {"genadapter"}


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
