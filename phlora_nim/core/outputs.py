"""Where a command may write: never over its inputs, never over what it did not write.

``--force`` replaces a previous output of the same command, recognised by the files that command
writes (an adapter folder by ``adapter_config.json`` + ``phlora_report.json``, …). A folder holding
anything else (a checkpoint, an unrelated file) is refused whatever the options: deleting it could
not be undone. An output that is, contains or lies inside an input is refused before any work.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from phlora_nim.core.atomic import check_output_dir
from phlora_nim.core.errors import OutputError


@dataclass(frozen=True)
class OutputKind:
    """What one command writes into its output folder.

    Args:
        command: the command's name, for messages.
        markers: files every previous output holds (all of them).
        names: glob patterns every entry of a previous output matches (markers included).
        check: an extra test on a candidate folder (e.g. the report says which command wrote it).
    """

    command: str
    markers: tuple[str, ...]
    names: tuple[str, ...]
    check: Callable[[Path], bool] | None = field(default=None, compare=False)

    def wrote(self, folder: Path) -> bool:
        """True for an empty folder or one this command wrote (and nothing else)."""
        entries = list(folder.iterdir())
        if not entries:
            return True
        if not all((folder / m).exists() for m in self.markers):
            return False
        if not all(any(fnmatch.fnmatchcase(e.name, p) for p in self.names) for e in entries):
            return False
        return self.check is None or self.check(folder)


def report_kind_is(kind: str | None) -> Callable[[Path], bool]:
    """A check that ``phlora_report.json`` was written by the command of ``kind`` (None: extract,
    whose report has no ``kind``)."""

    def check(folder: Path) -> bool:
        try:
            data = json.loads((folder / "phlora_report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(data, dict) and data.get("format") == "phlora-report/1" and data.get("kind") == kind

    return check


def _resolved(path: Path | str) -> Path:
    return Path(path).expanduser().resolve(strict=False)


def overlapping_input(out: Path, inputs: Iterable[Path | str | None]) -> tuple[Path, str] | None:
    """The first existing input that ``out`` is, contains or lies inside, with how; None if none."""
    target = _resolved(out)
    for item in inputs:
        if item is None or not Path(item).exists():
            continue  # a hub id or a missing path: nothing on disk to harm
        source = _resolved(item)
        if source == target:
            return source, "is"
        if target in source.parents:
            return source, "contains"
        if source in target.parents:
            return source, "lies inside"
    return None


def guard_output(
    out: Path, *, force: bool, kind: OutputKind, inputs: Iterable[Path | str | None] = (), flag: str = "--out"
) -> None:
    """Refuse, before any work, an output that would harm an input or something the command did not write.

    Raises:
        OutputError: ``out`` is, contains or lies inside an input; exists without ``force``; exists
            with ``force`` but holds what ``kind`` does not write; or is not writable.
    """
    overlap = overlapping_input(out, inputs)
    if overlap is not None:
        source, how = overlap
        raise OutputError(
            f"the output {how} an input",
            where=f"{flag} {out}",
            expected="a folder apart from every input (not the input, not around it, not inside it)",
            found=f"input {source}",
            fix=f"choose an {flag} outside the checkpoints and adapters the command reads",
        )
    check_output_dir(Path(out), force=force)
    folder = Path(out)
    if force and folder.is_dir() and not kind.wrote(folder):
        found = sorted(p.name for p in folder.iterdir())
        raise OutputError(
            f"--force replaces only a previous output of `{kind.command}`, and this folder is not one",
            where=str(folder),
            expected=f"a folder `{kind.command}` wrote ({', '.join(kind.markers)}, and nothing else)",
            found=f"{len(found)} entries: {', '.join(found[:6])}{', …' if len(found) > 6 else ''}",
            fix=f"choose a new {flag} (it is created); nothing was deleted",
        )
