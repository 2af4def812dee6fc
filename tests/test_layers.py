"""The package's layers import one way only (design: core < converters < repository < triton <
engines < jobs < router / demo < cli), and no engine is named as a string outside ``engines/``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "phlora_nim"
# Lowest first; a module may import its own layer and the layers before it.
LAYERS = ("core", "converters", "repository", "triton", "engines", "jobs", "router", "demo", "cli", "testing")
# The engine table is data over core alone: every layer may ask it which engine a name is.
EVERYWHERE = ("phlora_nim.engines.registry",)
# Data files Triton copies into a repository, not modules of the layer they sit in.
NOT_MODULES = ("templates",)


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
    return found


def upward_imports(package: Path) -> list[str]:
    """``file:line: layer -> module`` for every import of a higher layer."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).parts
        if len(parts) < 2 or parts[0] not in LAYERS or any(p in NOT_MODULES for p in parts):
            continue
        mine = LAYERS.index(parts[0])
        for line, module in _imports(path):
            names = module.split(".")
            if names[0] != package.name or len(names) < 2 or names[1] not in LAYERS:
                continue
            if module.startswith(EVERYWHERE):
                continue
            if LAYERS.index(names[1]) > mine:
                bad.append(f"{path.relative_to(package)}:{line}: {parts[0]} -> {module}")
    return bad


def test_every_import_points_down_the_layers() -> None:
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")} <= set(LAYERS)
    assert upward_imports(PACKAGE) == []


@pytest.mark.parametrize(
    ("layer", "imported", "caught"),
    [
        ("converters", "phlora_nim.engines.trtllm_legacy.tensors", True),
        ("core", "phlora_nim.converters.extract", True),
        ("router", "phlora_nim.repository.registry", False),
        ("repository", "phlora_nim.engines.registry", False),
        ("repository", "phlora_nim.engines.trtllm_legacy.deploy", True),
    ],
)
def test_the_layer_check_catches_an_upward_import(tmp_path: Path, layer: str, imported: str, caught: bool) -> None:
    package = tmp_path / "phlora_nim"
    (package / layer).mkdir(parents=True)
    (package / layer / "m.py").write_text(f"from {imported} import x\n")
    assert bool(upward_imports(package)) is caught


def _engine_names() -> set[str]:
    from phlora_nim.engines.registry import ENGINES

    return {name for row in ENGINES for name in (row.name, *row.aliases)}


def string_comparisons_of_engines(package: Path, names: set[str]) -> list[str]:
    """``file:line`` of every ``==`` / ``!=`` / ``in`` test against an engine name outside ``engines/``."""
    bad = []
    for path in sorted(package.rglob("*.py")):
        if path.relative_to(package).parts[0] == "engines":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            for operand in operands:
                values = operand.elts if isinstance(operand, ast.Tuple | ast.List | ast.Set) else [operand]
                if any(isinstance(v, ast.Constant) and v.value in names for v in values):
                    bad.append(f"{path.relative_to(package)}:{node.lineno}")
    return bad


def test_no_engine_name_is_compared_as_a_string_outside_engines() -> None:
    assert string_comparisons_of_engines(PACKAGE, _engine_names()) == []


def test_the_engine_name_check_catches_a_comparison(tmp_path: Path) -> None:
    package = tmp_path / "phlora_nim"
    (package / "jobs").mkdir(parents=True)
    (package / "jobs" / "m.py").write_text('if settings.backend == "trtllm-legacy":\n    pass\n')
    (package / "jobs" / "ok.py").write_text('name = "trtllm-legacy"\n')
    assert string_comparisons_of_engines(package, _engine_names()) == ["jobs/m.py:1"]
