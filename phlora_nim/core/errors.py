"""The one error hierarchy of phlora-nim.

Every error a user can cause is a :class:`PhloraError`: it says where the problem is (file,
tensor or field), what was expected, what was found and how to fix it. The CLI prints it without a
traceback and exits with code 2.
"""

from __future__ import annotations


class PhloraError(Exception):
    """A problem the user can fix. Rendered as one paragraph, never a traceback.

    Args:
        problem: one sentence saying what is wrong.
        where: the file, tensor or field concerned.
        expected: what phlora-nim needed there.
        found: what it found instead.
        fix: how to put it right.

    Example:
        >>> str(InputError("tensor missing", where="ft/model.safetensors", fix="re-export it"))
        'ft/model.safetensors: tensor missing. Fix: re-export it.'
    """

    exit_code = 2

    def __init__(
        self,
        problem: str,
        *,
        where: str | None = None,
        expected: str | None = None,
        found: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.problem = problem
        self.where = where
        self.expected = expected
        self.found = found
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        parts = [f"{self.where}: {self.problem}" if self.where else self.problem]
        if self.expected is not None:
            parts.append(f"expected {self.expected}")
        if self.found is not None:
            parts.append(f"found {self.found}")
        text = "; ".join(parts)
        if self.fix:
            text += f". Fix: {self.fix.rstrip('.')}"
        return text + "."


class InputError(PhloraError):
    """A checkpoint, adapter or data file that cannot be used as given."""


class OptionError(PhloraError):
    """A command-line option or config value outside what is allowed."""


class OutputError(PhloraError):
    """The output location cannot be written as asked."""


def raise_all(errors: list[PhloraError], *, summary: str) -> None:
    """Raise one error that lists every collected problem (nothing if the list is empty).

    Validation collects all problems first so a user fixes them in one go.
    """
    if not errors:
        return
    if len(errors) == 1:
        raise errors[0]
    first = errors[0]
    listing = "\n".join(f"  - {str(e).rstrip('.')}" for e in errors)
    raise type(first)(f"{summary} ({len(errors)} problems):\n{listing}")
