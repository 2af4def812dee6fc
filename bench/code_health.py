"""Code-health figures of the package, from its source alone (no imports run).

Prints: files over 500 lines, functions over 60 lines, repeated blocks (runs of 6 or more
non-trivial lines that stand again elsewhere, white space folded) and the modules the ``convert``
job reaches through its imports (static, transitive), with how many of those imports climb a layer.

    python bench/code_health.py [--root DIR]      # DIR: a checkout (default: this one)

Compare two revisions by running it in two checkouts (``git worktree add /tmp/old REV``).
"""

from __future__ import annotations

import argparse
import ast
import re
from collections import defaultdict
from pathlib import Path

LAYERS = ("core", "converters", "repository", "triton", "engines", "jobs", "router", "demo", "cli", "testing")
WINDOW = 6


def _modules(package: Path) -> dict[str, Path]:
    out = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def long_functions(package: Path, limit: int = 60) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(package.parent)}:{node.name} ({lines})")
    return found


def repeated_blocks(package: Path) -> int:
    """Pairs of places sharing a run of WINDOW code lines (imports, comments, blank lines and lone
    punctuation left out), counted once per pair of files."""
    seen: dict[tuple[str, ...], set[str]] = defaultdict(set)
    for path in sorted(package.rglob("*.py")):
        lines = []
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = re.sub(r"\s+", " ", raw.strip())
            if not line or line.startswith(("#", "import ", "from ")) or re.fullmatch(r"[\[\](){},:]+", line):
                continue
            lines.append(line)
        for i in range(len(lines) - WINDOW + 1):
            seen[tuple(lines[i : i + WINDOW])].add(str(path))
    pairs = set()
    for places in seen.values():
        if len(places) > 1:
            ordered = sorted(places)
            pairs.update((a, b) for i, a in enumerate(ordered) for b in ordered[i + 1 :])
    return len(pairs)


def reached(package: Path, start: str) -> tuple[list[str], int]:
    modules = _modules(package)
    todo, done, climbs = [start], set(), 0
    while todo:
        name = todo.pop()
        if name in done or name not in modules:
            continue
        done.add(name)
        for node in ast.walk(ast.parse(modules[name].read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for target in targets:
                if target in modules:
                    here, there = name.split("."), target.split(".")
                    if len(here) > 1 and len(there) > 1 and here[1] in LAYERS and there[1] in LAYERS:
                        climbs += LAYERS.index(there[1]) > LAYERS.index(here[1])
                    todo.append(target)
    return sorted(done), climbs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    package = args.root / "phlora_nim"
    files = sorted(package.rglob("*.py"))
    big = [f"{p.relative_to(args.root)} ({n})" for p in files if (n := len(p.read_text().splitlines())) > 500]
    longs = long_functions(package)
    convert = next(m for m in ("phlora_nim.jobs.convert", "phlora_nim.repository.convert") if m in _modules(package))
    path, climbs = reached(package, convert)
    print(f"python modules:              {len(files)}")
    print(f"files over 500 lines:        {len(big)}  {', '.join(big)}")
    print(f"functions over 60 lines:     {len(longs)}  {', '.join(longs)}")
    print(f"repeated blocks (pairs):     {repeated_blocks(package)}")
    print(f"modules convert reaches:     {len(path)} (from {convert}; {climbs} imports climb a layer)")


if __name__ == "__main__":
    main()
