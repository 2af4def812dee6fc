"""Design invariants: bounded memory, nothing half-written, stable ids of what we write."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from phlora_nim.converters.extract import ExtractOptions
from phlora_nim.converters.rank_policy import RankPolicy
from phlora_nim.jobs import adapter_jobs as jobs
from phlora_nim.jobs import pipeline
from phlora_nim.testing.synthetic import SyntheticLlama, write_synthetic_pair


def _peak_rss_mb(args: list[str]) -> float:
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read().decode() if proc.stderr else ""
    return usage.ru_maxrss / 1024


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_depth(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).with_name("phlora-nim"))
    peaks = {}
    for layers in (2, 8):
        spec = SyntheticLlama(
            hidden_size=1024,
            intermediate_size=4096,
            num_attention_heads=8,
            num_key_value_heads=2,
            num_hidden_layers=layers,
            vocab_size=4096,
            head_rank=64,
        )
        base, ft = write_synthetic_pair(tmp_path / f"l{layers}", spec)
        out = tmp_path / f"a{layers}"
        peaks[layers] = _peak_rss_mb(
            [
                exe,
                "extract",
                "--base",
                str(base),
                "--finetuned",
                str(ft),
                "--out",
                str(out),
                "--rank",
                "16",
                "--no-plot",
            ]
        )
    # 4× the layers (~350 MB more weights to read) must cost (almost) no more memory.
    assert peaks[8] < peaks[2] * 1.1 + 20, peaks


def test_failed_write_leaves_previous_output_intact(model_pairs, tmp_path: Path, monkeypatch) -> None:
    base, ft = model_pairs("llama")
    out = tmp_path / "adapter"
    jobs.extract(base, ft, out, ExtractOptions(policy=RankPolicy(rank=2)), plot=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline, "plot_energy", boom)
    with pytest.raises(OSError, match="disk full"):
        jobs.extract(base, ft, out, ExtractOptions(policy=RankPolicy(rank=4)), force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_extraction_is_deterministic(model_pairs, tmp_path: Path) -> None:
    base, ft = model_pairs("llama")
    for name in ("one", "two"):
        jobs.extract(base, ft, tmp_path / name, ExtractOptions(policy=RankPolicy(rank=4)), plot=False)
    a = (tmp_path / "one" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "two" / "adapter_model.safetensors").read_bytes()
    assert a == b
    ca = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    cb = json.loads((tmp_path / "two" / "adapter_config.json").read_text())
    assert ca == cb


def test_outputs_are_readable_by_other_users(tmp_path: Path) -> None:
    """Serving pods often run as another user than the converter: outputs get the usual modes."""
    import os
    import stat

    from phlora_nim.core.atomic import atomic_dir, atomic_write_text

    mask = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
        atomic_write_text(tmp_path / "registry.json", "{}")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "registry.json").stat().st_mode) == 0o644


def test_the_router_does_not_import_torch() -> None:
    """Every router worker would otherwise load torch (seconds and ~190 MB each) for nothing."""
    code = (
        "import sys, phlora_nim.router, phlora_nim.router.server, phlora_nim.router.cli\n"
        "torch = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not torch, torch[:5]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# Functions allowed over the limit: declarative tables only, each with why.
LONG_FUNCTION_ALLOWED = {
    # One statement per Prometheus collector, each an attribute the router updates by name.
    "phlora_nim/router/metrics.py:RouterMetrics.__init__",
}
MAX_FUNCTION_LINES = 80


def _long_functions(root: Path) -> dict[str, int]:
    """``path:Qualified.name`` → lines, for every function in ``root`` longer than the limit."""
    import ast

    found: dict[str, int] = {}

    def visit(node: ast.AST, path: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = (child.end_lineno or child.lineno) - child.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        found[f"{path}:{name}"] = lines
                visit(child, path, f"{name}.")
            else:
                visit(child, path, prefix)

    for file in sorted(root.rglob("*.py")):
        path = file.relative_to(root.parent).as_posix()
        visit(ast.parse(file.read_text(encoding="utf-8"), filename=str(file)), path, "")
    return found


def test_no_function_is_over_80_lines() -> None:
    root = Path(__file__).resolve().parents[1] / "phlora_nim"
    found = _long_functions(root)
    too_long = {name: lines for name, lines in found.items() if name not in LONG_FUNCTION_ALLOWED}
    assert not too_long, f"split these into named steps (limit {MAX_FUNCTION_LINES} lines): {too_long}"
    assert set(found) >= LONG_FUNCTION_ALLOWED, "an allowed function is short now: drop it from the list"


def test_the_long_function_check_sees_methods_and_async_functions(tmp_path: Path) -> None:
    package = tmp_path / "pkg"
    package.mkdir()

    def function(header: str, statements: int, indent: str = "") -> str:
        body = "".join(f"{indent}    x{i} = {i}\n" for i in range(statements))
        return f"{indent}{header}\n{body}"

    source = "class C:\n" + function("async def long(self):", MAX_FUNCTION_LINES, "    ")
    source += function("def at_the_limit():", MAX_FUNCTION_LINES - 1) + function("def short():", 1)
    (package / "m.py").write_text(source)
    assert _long_functions(package) == {"pkg/m.py:C.long": MAX_FUNCTION_LINES + 1}


def test_tests_share_helpers_through_fixtures_or_modules_not_conftest_imports() -> None:
    """``from conftest import`` works only when pytest put tests/ on sys.path first; shared helpers
    live in ``phlora_nim.testing`` or are fixtures."""
    tests = Path(__file__).parent
    offenders = [
        f"{path.name}:{number}"
        for path in sorted(tests.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if line.strip().startswith(("from conftest import", "import conftest"))
    ]
    assert not offenders, f"import helpers from phlora_nim.testing instead: {offenders}"
