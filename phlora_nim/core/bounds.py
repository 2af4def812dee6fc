"""What values an option allows, as data: one object both checks a value and says what it expected.

An options table's row carries one (see ``phlora_nim.cli.flags``) and the domain object that owns the
value checks it with the same object, so the rule and its error text live in one place.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from phlora_nim.core.errors import OptionError


@dataclass(frozen=True)
class Bound:
    """An interval of numbers: ``low`` < (or ≤) value < (or ≤) ``high``.

    Example:
        >>> SHARE = Bound("share must be a share", "a number in (0, 1]", low=0.0, high=1.0, low_open=True)
        >>> SHARE.allows(1.0), SHARE.allows(0.0)
        (True, False)
    """

    problem: str  # what is wrong, in the user's words: "rank must be positive"
    expected: str  # what is allowed, in the user's words: "an integer ≥ 1"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    fix: str | None = None

    def allows(self, value: float) -> bool:
        """Whether ``value`` lies inside (NaN never does: every comparison with it is false)."""
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def check(self, value: float | None, where: str) -> None:
        """Refuse ``value`` (named ``where``: the flag or field) outside the interval; None passes.

        Raises:
            OptionError: naming ``where``, what was expected and what was found.
        """
        if value is not None and not self.allows(value):
            raise OptionError(self.problem, where=where, expected=self.expected, found=str(value), fix=self.fix)


@dataclass(frozen=True)
class OneOf:
    """A value from a fixed set of names."""

    problem: str
    choices: Collection[str]
    fix: str | None = None

    def check(self, value: str | None, where: str) -> None:
        """Refuse ``value`` outside :attr:`choices`; None passes.

        Raises:
            OptionError: naming ``where``, the choices and what was found.
        """
        if value is not None and value not in self.choices:
            raise OptionError(
                self.problem, where=where, expected=" or ".join(self.choices), found=repr(value), fix=self.fix
            )


def at_least_one(problem: str) -> Bound:
    """A positive integer."""
    return Bound(problem, "an integer ≥ 1", low=1)


def share(problem: str, example: str) -> Bound:
    """A share in (0, 1]."""
    return Bound(problem, f"a number in (0, 1], e.g. {example}", low=0.0, high=1.0, low_open=True)
