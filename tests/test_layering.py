"""The house's layers: networks know nothing of data or training; data knows nothing of networks or
training; only the ground-level ``cvlab`` package (errors) is imported by every layer."""

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
