"""Write-then-rename: outputs appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from phlora_nim.core.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _usual_mode(path: Path, *, folder: bool) -> None:
    """Give a temp file/folder the mode a plain open()/mkdir() would (mkstemp/mkdtemp make them private).

    Serving processes often run as another user than the converter: they must be able to read.
    """
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def check_output_dir(out: Path, *, force: bool) -> None:
    """Fail early (before any work) if ``out`` exists without ``force`` or cannot be written."""
    if out.exists() and not force:
        raise OutputError(
            "output already exists",
            where=str(out),
            expected="a new folder",
            found="an existing path",
            fix="choose another --out, or pass --force to replace it",
        )
    if out.exists() and not out.is_dir():
        raise OutputError("output exists and is not a folder", where=str(out), fix="remove it or choose another --out")
    parent = out.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise OutputError(
            "output location is not writable",
            where=str(probe),
            expected="a folder you may write to",
            found="a file" if not probe.is_dir() else "no write permission",
            fix="choose another --out or fix the permissions",
        )


@contextlib.contextmanager
def atomic_dir(out: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``out`` in one rename.

    On any exception the temporary folder is removed and ``out`` is left exactly as it was.
    """
    out = Path(out)
    check_output_dir(out, force=force)
    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.absolute().parent))
    _usual_mode(tmp, folder=True)
    try:
        yield tmp
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.absolute().parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.absolute().parent)
    _usual_mode(Path(tmp), folder=False)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def replace_dir(source: Path, target: Path) -> None:
    """Move the folder ``source`` onto ``target`` (replacing it) with renames only: a reader sees the
    old folder or the new one, never a mix. Both must be on one filesystem."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, trash / "old")
        os.replace(source, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(source, target)
