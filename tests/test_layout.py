"""The package boundaries: one engine that knows no task, two tasks that know nothing of each other, and
no import cycle in the library or the launchers (lazy imports inside functions count too)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _imports() -> dict[str, set[str]]:
    """module -> the advft / launch modules it imports (anywhere in the file)."""
    files = [p for d in ("advft", "launch") for p in (ROOT / d).rglob("*.py")]
    mods = {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}
    out: dict[str, set[str]] = {}
    for mod, path in mods.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        out[mod] = {m for m in found if m in mods and m != mod}
    return out


def test_the_engine_imports_no_task_and_the_tasks_not_each_other():
    graph = _imports()
    assert {"advft.engine", "advft.fare", "advft.simclr"} <= set(graph)
    for mod, deps in graph.items():
        if mod.startswith("advft.engine"):
            assert not {d for d in deps if d.startswith(("advft.fare", "advft.simclr"))}, mod
        if mod.startswith("advft.fare"):
            assert not {d for d in deps if d.startswith("advft.simclr")}, mod
        if mod.startswith("advft.simclr"):
            assert not {d for d in deps if d.startswith("advft.fare")}, mod
        if mod.startswith("advft"):
            assert not {d for d in deps if d.startswith("launch")}, mod


def test_no_import_cycles():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, "import cycle: " + " -> ".join(path[path.index(d):] + [d])
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
