"""Reading the JSON files users hand us (model and engine configs), with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from phlora_nim.core.errors import InputError


def read_json(path: Path, *, what: str, fix: str | None = None) -> dict[str, Any]:
    """The JSON object in ``path``.

    Args:
        path: the file.
        what: what the file is, for the error message (``"engine config"``).
        fix: what to do about an unreadable file (default: check the path / say what it must hold).

    Raises:
        InputError: the file is missing, unreadable, not JSON or not an object.

    Example:
        >>> read_json(Path("engine/config.json"), what="engine config")  # doctest: +SKIP
        {'pretrained_config': {...}, 'build_config': {...}}
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what} not found", where=str(path), fix=fix or "check the path") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"unreadable {what} ({exc})", where=str(path), expected="a JSON object", fix=fix) from None
    if not isinstance(data, dict):
        raise InputError(f"{what} must be a JSON object", where=str(path), found=type(data).__name__, fix=fix)
    return data
