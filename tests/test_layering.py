"""The house's layers: networks know nothing of data or training; data knows nothing of networks or
training; only the ground-level ``cvlab`` package (errors) is imported by every layer. The modules of
``experiments/`` (the commands) import one another one way, lazy imports inside functions included."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module a file imports (top level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def _offenders(folder: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for f in sorted((REPO / folder).rglob("*.py")):
        hits = sorted(m for m in _imports(f) if m.split(".")[0] in forbidden or m.startswith(forbidden))
        if hits:
            bad[str(f.relative_to(REPO))] = hits
    return bad


def test_networks_import_neither_data_nor_training_systems() -> None:
    bad = {f: [m for m in ms if not m.startswith("lit_modules.nets")]
           for f, ms in _offenders("lit_modules/nets",
                                   ("datamodules", "lit_modules", "experiments", "callbacks")).items()}
    assert not {f: m for f, m in bad.items() if m}, bad


def test_datamodules_import_no_training_system_or_network() -> None:
    assert not _offenders("datamodules", ("lit_modules", "experiments", "callbacks")), (
        "datamodules must stay below lit_modules")


def test_lit_modules_never_import_experiments() -> None:
    assert not _offenders("lit_modules", ("experiments",))


def test_the_ground_floor_imports_nothing_of_cvlab() -> None:
    assert not _offenders("cvlab", ("datamodules", "lit_modules", "experiments", "callbacks"))


def test_the_layering_check_can_fail(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from datamodules.base import TensorImageDataModule\n")
    assert "datamodules.base" in _imports(f)


FAMILIES = ("distillation", "condensation", "leakage", "robustness", "generation", "explanation")


def test_no_family_imports_another_family() -> None:
    """A family's methods share through the top of lit_modules or the ground floor, never sideways."""
    bad = {}
    for family in FAMILIES:
        for f, ms in _offenders(f"lit_modules/{family}",
                                tuple(f"lit_modules.{o}" for o in FAMILIES if o != family)).items():
            bad[f] = ms
    assert not bad, bad


def test_no_method_imports_callbacks() -> None:
    """Callbacks are wired by config; what methods need from them lives on the ground floor (cvlab/)."""
    assert not _offenders("lit_modules", ("callbacks",))


def test_callbacks_import_no_method() -> None:
    assert not _offenders("callbacks", ("lit_modules", "experiments"))


def _experiments_edges(path: Path) -> set[str]:
    """The ``experiments`` modules a file imports (top level or inside functions; ``from experiments import x``
    counts as ``experiments.x``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("experiments."))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "experiments":
            out.update(f"experiments.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("experiments."):
            out.add(node.module)
    return out


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of ``graph`` (module -> the modules it imports) as ``[a, b, ..., a]``, or ``[]`` if it has none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done (no cycle through it)
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return []


def test_the_commands_import_one_another_one_way() -> None:
    """cli -> sweep -> pipeline -> lightning_cli -> run_folder, all on experiments.command_line: no module of
    experiments/ imports, even lazily inside a function, one that imports it back."""
    files = sorted((REPO / "experiments").rglob("*.py"))
    names = {_module_name(f) for f in files}
    graph = {_module_name(f): {m for m in _experiments_edges(f) if m in names} - {_module_name(f)} for f in files}
    assert graph["experiments.cli"] >= {"experiments.pipeline", "experiments.sweep", "experiments.lightning_cli"}
    assert not import_cycle(graph), " -> ".join(import_cycle(graph))
    assert not graph["experiments.command_line"], "the command layer's ground imports no command"


def test_the_cycle_check_can_fail(tmp_path: Path) -> None:
    f = tmp_path / "pipeline.py"
    f.write_text("import yaml\n\ndef main():\n    from experiments import cli\n")
    graph = {"experiments.cli": {"experiments.sweep"}, "experiments.sweep": {"experiments.pipeline"},
             "experiments.pipeline": _experiments_edges(f)}
    assert import_cycle(graph) == ["experiments.cli", "experiments.sweep", "experiments.pipeline", "experiments.cli"]
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
