"""The layout is a map of the architecture, and it stays one: dependencies point one way.

`collab` wires everything; `api` and `persistence` use `realtime`'s interfaces; `realtime`
imports none of them, and inside it no two modules import each other, not even for type
hints. Read from the source (every import statement, `TYPE_CHECKING` ones and function-level
ones included), so a change that breaks the rule fails here, not in a review.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("collab", "api", "persistence", "realtime", "workers")
# What each package may import of the others (itself always).
ALLOWED = {
    "realtime": set(),
    "persistence": {"realtime"},
    "api": {"realtime", "persistence"},
    # Workers store and publish through persistence and realtime; their entry point reads
    # the one Settings class.
    "workers": {"realtime", "persistence", "collab"},
    "collab": {"api", "persistence", "realtime", "workers"},
}


def modules(package: str) -> dict[str, Path]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, name: str) -> set[str]:
    """Every module `path` imports, absolute, wherever the statement stands."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # `from realtime import protocol` imports the module realtime.protocol.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_packages_import_only_what_they_may() -> None:
    wrong = []
    for package in PACKAGES:
        for name, path in modules(package).items():
            for target in imports(path, name):
                top = target.split(".")[0]
                if top in PACKAGES and top != package and top not in ALLOWED[package]:
                    wrong.append(f"{name} imports {target}")
    assert wrong == []


def test_realtime_has_no_import_cycle() -> None:
    known = modules("realtime")
    graph = {
        name: {t for t in imports(path, name) if t in known and t != name}
        for name, path in known.items()
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # The package's __init__ re-exports its modules; only cycles between modules count.
    cycles = [c for c in cycles if "realtime" not in c]
    assert cycles == []


def test_the_rule_catches_a_cycle() -> None:
    """The walker itself: the cycle issue 16 found (transport importing connection back,
    under TYPE_CHECKING) would be seen."""
    source = ROOT / "realtime" / "transport.py"
    name = "realtime.transport"
    assert "realtime.connection" not in imports(source, name)
    sample = ast.parse("if TYPE_CHECKING:\n    from realtime.connection import Connection\n")
    found = {n.module for n in ast.walk(sample) if isinstance(n, ast.ImportFrom)}
    assert found == {"realtime.connection"}
