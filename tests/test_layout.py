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


def _advft_aliases(tree: ast.AST) -> set[str]:
    """Names a file binds to advft modules: ``import advft.x as A``, ``from advft import config as C``,
    ``from advft.fare import step as S``, and ``advft`` itself for ``import advft.x``."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "advft":
                    names.add(a.asname or "advft")
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "advft":
            for a in node.names:
                if _is_module(f"{node.module}.{a.name}"):
                    names.add(a.asname or a.name)
    return names


def _is_module(dotted: str) -> bool:
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _root(node: ast.expr) -> str | None:
    while isinstance(node, ast.Attribute):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def advft_patches_and_private_uses(source: str) -> list[str]:
    """Where ``source`` rebinds an attribute of an advft module (``S.fn = ...``, ``setattr(S, ...)``) or
    touches a private advft name (``A._f``, ``from advft.x import _f``): each as 'line N: what'."""
    tree = ast.parse(source)
    mods = _advft_aliases(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for t in targets:
            for e in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t]):
                if isinstance(e, ast.Attribute) and _root(e) in mods:
                    found.append((e.lineno, f"assigns {ast.unparse(e)}"))
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("setattr") and node.args \
                and _root(node.args[0]) in mods:
            found.append((node.lineno, f"{ast.unparse(node.func)} on {ast.unparse(node.args[0])}"))
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and _root(node.value) in mods:
            found.append((node.lineno, f"uses private {ast.unparse(node)}"))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "advft":
            found += [(node.lineno, f"imports private {node.module}.{a.name}") for a in node.names
                      if a.name.startswith("_")]
    return [f"line {n}: {what}" for n, what in sorted(found)]


def test_benchmarks_use_advft_through_public_names_without_patching_it():
    """An ablation flips a documented switch of the public step or attack; a benchmark that rebinds an advft
    function would time code that no run executes (and break silently when the function is renamed)."""
    files = sorted((ROOT / "benchmarks").rglob("*.py"))
    assert files
    found = {str(p.relative_to(ROOT)): advft_patches_and_private_uses(p.read_text()) for p in files}
    assert not {k: v for k, v in found.items() if v}


def test_the_benchmark_check_sees_patches_and_private_names():
    patched = ("import advft.attacks as A\nimport advft.fare.step as S\nfrom advft import config as C\n"
               "from advft.fare import step\nimport advft.losses\nfrom advft.attacks import _loss_and_grad\n"
               "A._loss_and_grad = f\nS.frozen, S.training_loss = g, h\nsetattr(C, 'x', 1)\n"
               "advft.losses.training_loss = f\nstep.frozen += 1\ny = A._work_dtype(x)\n")
    assert advft_patches_and_private_uses(patched) == [
        "line 6: imports private advft.attacks._loss_and_grad", "line 7: assigns A._loss_and_grad",
        "line 7: uses private A._loss_and_grad", "line 8: assigns S.frozen", "line 8: assigns S.training_loss",
        "line 9: setattr on C", "line 10: assigns advft.losses.training_loss", "line 11: assigns step.frozen",
        "line 12: uses private A._work_dtype"]
    public = ("import advft.fare.step as S\nfrom advft.fare import StepModels\nimport torch\n"
              "m = S.StepModels(1, 2, 3, 4)\nm.phi_ddp = 5\ntorch._dynamo.config.recompile_limit = 64\n"
              "spec = S.FareSpec.of(cfg)\n")
    assert advft_patches_and_private_uses(public) == []
