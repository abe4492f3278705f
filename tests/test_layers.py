"""Imports point one way: commands -> {train, tasks, export} -> {models, data, eval} -> moe.

Read from the source with ``ast`` (nothing is imported), so the test takes milliseconds and
also sees imports written inside functions. A module may import its own layer or any lower
one, never a higher one, and no set of modules may import each other in a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moetrain"

#: Layer of each top-level part of the package, highest first. ``moetrain`` itself holds the
#: version only; ``config`` and ``checkpoint_format`` describe files on disk, ``hf_convert``
#: maps the models' names to HF's: all three sit with the models.
LAYERS = {
    4: ("cli", "__main__", "commands", "bench"),
    3: ("train", "tasks", "export"),
    2: ("models", "data", "eval", "config", "checkpoint_format", "hf_convert"),
    1: ("moe",),
    0: ("utils", ""),
}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for layer, parts in LAYERS.items():
        if top in parts:
            return layer
    raise KeyError(f"{module} is in no layer; add its top-level name to LAYERS")


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (``from a import b`` counts module ``a.b``
    when ``b`` is a module, else ``a``)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == package.name}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                if base.split(".")[0] != package.name:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else resolve(base))
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_every_module_has_a_layer():
    for name in import_graph():
        layer_of(name)


def test_no_module_imports_a_higher_layer():
    assert upward_imports(import_graph()) == []


def test_no_import_cycles():
    assert import_cycles(import_graph()) == []


def concrete_task_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports of one task's module (``moetrain.tasks.translation``, ...) by the trainer or the
    exporter, which must work for every task through the contract in ``moetrain.tasks``."""
    generic = [m for m in graph if m.startswith("moetrain.train") or m.startswith("moetrain.export")]
    return sorted(f"{a} imports {b}" for a in generic for b in graph[a]
                  if b.startswith("moetrain.tasks.") and b != "moetrain.tasks.base")


def test_trainer_and_exporter_know_no_concrete_task():
    assert concrete_task_imports(import_graph()) == []


def test_the_checker_sees_upward_imports_and_cycles(tmp_path):
    """A package with the two faults this test exists for (the trainer importing a task that
    imports the trainer back) is caught."""
    pkg = tmp_path / "moetrain"
    for sub in ("train", "tasks"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("def run():\n    from moetrain.cli import main\n")
    (pkg / "tasks" / "a.py").write_text("from ..train import loop\n")
    (pkg / "train" / "b.py").write_text("import moetrain.tasks.a\n")
    (pkg / "tasks" / "__init__.py").write_text("from . import a\n")
    (pkg / "cli.py").write_text("from moetrain.train import b\n")
    graph = import_graph(pkg)
    assert upward_imports(graph) == ["moetrain.train.loop (layer 3) imports moetrain.cli (layer 4)"]
    assert import_cycles(graph) == [["moetrain.cli", "moetrain.tasks.a", "moetrain.train.b", "moetrain.train.loop"]]
