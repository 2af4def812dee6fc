"""Adapter names: they become folder names, Triton/NIM model names and OpenAI ``model`` values."""

from __future__ import annotations

import re

from phlora_nim.core.errors import InputError

MAX_NAME_LENGTH = 64
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def validate_adapter_name(name: str, *, where: str = "--name") -> str:
    """Return ``name`` if it is safe as a folder and model name, else raise one clear error.

    Allowed: letters, digits, ``.``, ``_``, ``-``; starting with a letter or digit; no ``..``;
    at most 64 characters.

    Example:
        >>> validate_adapter_name("support-bot.v2")
        'support-bot.v2'
    """
    problem = None
    if not name:
        problem = "is empty"
    elif len(name) > MAX_NAME_LENGTH:
        problem = f"is {len(name)} characters long"
    elif "/" in name or "\\" in name:
        problem = "contains a path separator"
    elif ".." in name:
        problem = "contains '..'"
    elif not _NAME.fullmatch(name):
        problem = "contains characters outside [A-Za-z0-9._-] or starts with one of ._-"
    if problem:
        raise InputError(
            f"adapter name {name!r} {problem}",
            where=where,
            expected=f"1–{MAX_NAME_LENGTH} characters from [A-Za-z0-9._-], starting with a letter or digit, no '..'",
            found=repr(name),
            fix="choose another name, e.g. 'support-bot-v2'",
        )
    return name
