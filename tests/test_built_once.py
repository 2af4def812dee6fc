"""``built_once``: what several test processes ask for is built by one of them, once."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from pathlib import Path

import pytest

from phlora_nim.testing.finetunes import built_once


def _build(folder: Path) -> tuple[Path, int]:
    """Leaves a trace of every build beside the folder (slowly, so that callers overlap)."""
    with (folder.parent / "builds.log").open("a") as log:
        log.write(f"{folder.name}\n")
    time.sleep(0.5)
    (folder / "weights").write_text("w")
    return folder / "weights", 7


def _ask(root: str, steps: int, out: multiprocessing.Queue) -> None:
    out.put(built_once(Path(root), "toy", _build, steps=steps))


def test_processes_asking_at_once_share_one_build(tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    workers = [context.Process(target=_ask, args=(str(tmp_path), 3, out)) for _ in range(3)]
    workers.append(context.Process(target=_ask, args=(str(tmp_path), 4, out)))  # other parameters
    for worker in workers:
        worker.start()
    results = [out.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    builds = (tmp_path / "builds.log").read_text().split()
    assert len(builds) == 2 and len(set(builds)) == 2  # one per set of parameters
    assert sorted(Counter(path.parent.name for path, _ in results).values()) == [1, 3]
    assert {path.parent.name for path, _ in results} == set(builds)
    assert all(path.read_text() == "w" and value == 7 for path, value in results)


def test_a_failed_build_is_built_again(tmp_path: Path) -> None:
    def fail(folder: Path) -> None:
        (folder / "half").write_text("")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        built_once(tmp_path, "toy", fail, steps=1)
    path, _ = built_once(tmp_path, "toy", _build, steps=1)
    assert sorted(p.name for p in path.parent.iterdir()) == ["weights"]  # the half-built folder was cleared
    assert built_once(tmp_path, "toy", fail, steps=1) == (path, 7)  # built: not run again
