"""Checkpoints as users have them: every case is a correct adapter (checked against PEFT) or one clear error.

Inputs are never harmed: each command that writes is run with outputs that are, contain or lie
inside its inputs, and with ``--force`` on folders it did not write; the inputs must be
byte-identical afterwards and the command must exit 2 with one message.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path → SHA-256): what "byte-identical" compares."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def previous_outputs(model_pairs, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An adapter ``extract`` wrote and one ``prune`` wrote, to copy into each case's workspace."""
    from phlora_nim.converters.extract import ExtractOptions
    from phlora_nim.converters.rank_policy import RankPolicy
    from phlora_nim.jobs import adapter_jobs

    base, ft = model_pairs("llama")
    root = tmp_path_factory.mktemp("previous")
    adapter_jobs.extract(base, ft, root / "extracted", ExtractOptions(policy=RankPolicy(rank=2)), plot=False)
    adapter_jobs.prune(root / "extracted", root / "pruned", RankPolicy(rank=1))
    return {"extracted": root / "extracted", "pruned": root / "pruned"}


@pytest.fixture
def workspace(model_pairs, previous_outputs, tmp_path: Path) -> Path:
    """``work/``: the base, the fine-tune, an unrelated file, an adapter, and previous outputs."""
    base, ft = model_pairs("llama")
    work = tmp_path / "work"
    shutil.copytree(base, work / "base")
    shutil.copytree(ft, work / "ft")
    (work / "notes.txt").write_text("not phlora-nim's\n", encoding="utf-8")
    shutil.copytree(previous_outputs["extracted"], work / "adapter")
    shutil.copytree(previous_outputs["extracted"], tmp_path / "old-extract")
    shutil.copytree(previous_outputs["pruned"], tmp_path / "old-prune")
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "data.csv").write_text("1,2\n", encoding="utf-8")
    return work


@dataclass(frozen=True)
class Case:
    """A writing command, its output, and the one message it must refuse with."""

    name: str
    args: Callable[[Path], list[object]]  # from the workspace
    message: str


def _extract(out: str, *more: str) -> Callable[[Path], list[object]]:
    return lambda w: ["extract", "--base", w / "base", "--finetuned", w / "ft", "--out", _at(w, out), "-r", "2", *more]


def _at(work: Path, rel: str) -> Path:
    return work / rel if not rel.startswith("../") else work.parent / rel[3:]


REFUSED = [
    # The two reported: the fine-tune's folder, and the folder holding base, fine-tune and an unrelated file.
    Case("extract --force onto the fine-tune", _extract("ft", "--force"), "the output is an input"),
    Case("extract --force onto the folder of both", _extract(".", "--force"), "the output contains an input"),
    Case("extract into the fine-tune's folder", _extract("ft/adapter"), "the output lies inside an input"),
    Case("extract onto the base, no --force", _extract("base"), "the output is an input"),
    Case("extract --force onto an unrelated folder", _extract("../unrelated", "--force"), "--force replaces only"),
    Case("extract --force onto prune's output", _extract("../old-prune", "--force"), "--force replaces only"),
    Case(
        "prune --force onto its adapter",
        lambda w: ["prune", w / "adapter", "--out", w / "adapter", "-r", "1", "--force"],
        "the output is an input",
    ),
    Case(
        "prune --force onto the folder holding the adapter",
        lambda w: ["prune", w / "adapter", "--out", w, "-r", "1", "--force"],
        "the output contains an input",
    ),
    Case(
        "prune --force onto extract's output",
        lambda w: ["prune", w / "adapter", "--out", w.parent / "old-extract", "-r", "1", "--force"],
        "--force replaces only",
    ),
    Case(
        "export peft --force onto its adapter",
        lambda w: ["export", w / "adapter", "-f", "peft", "--out", w / "adapter", "--force"],
        "the output is an input",
    ),
    Case(
        "export nim into the store holding the adapter",
        lambda w: ["export", w / "adapter", "-f", "nim", "--out", w, "--force"],
        "the output is an input",
    ),
    Case(
        "export trtllm --force onto an unrelated folder",
        lambda w: ["export", w / "adapter", "-f", "trtllm", "--out", w.parent / "unrelated", "--force"],
        "--force replaces only",
    ),
    Case(
        "convert into the fine-tune's folder",
        lambda w: ["convert", "--base", w / "base", "--finetuned", w / "ft", "-m", w / "ft" / "repo", "-r", "2"],
        "the model repository lies inside an input",
    ),
    Case(
        "convert into the folder of both",
        lambda w: ["convert", "--base", w / "base", "--finetuned", w / "ft", "-m", w, "-r", "2"],
        "the model repository contains an input",
    ),
    Case("demo onto the folder of both", lambda w: ["demo", "--out", w], "--force replaces only a previous output"),
]


@pytest.mark.parametrize("case", REFUSED, ids=lambda c: c.name)
def test_writing_commands_never_harm_inputs(case: Case, workspace: Path, run_cli) -> None:
    around = workspace.parent
    before = tree_digest(around)
    code, _, err = run_cli(*case.args(workspace))
    assert code == 2, err
    assert case.message in err, err
    assert "Traceback" not in err
    assert tree_digest(around) == before  # inputs, unrelated files and other outputs untouched, byte for byte


def test_force_replaces_a_previous_extract(workspace: Path, run_cli) -> None:
    out = workspace.parent / "old-extract"
    code, _, err = run_cli(*_extract("../old-extract", "--force")(workspace))
    assert code == 0, err
    assert (out / "adapter_config.json").is_file() and (out / "phlora_report.json").is_file()
