"""Options as typed data: an options object is a frozen dataclass whose fields are its flag table.

Each field is one row: its name, type and default are the field's; :func:`option` adds the flag's
spelling, help, help panel and the bound (``phlora_nim.core.bounds``) its value must keep. From the
rows, :func:`command` writes a typer command's signature and, on each call, builds the options objects
from the parsed values, checking every bound with the row's own error text (exit 2, no traceback).

Adding an option to a command is adding one field, e.g.::

    layout: str = option("--layout", "How ranks are stored: padded or mixed.", default="padded",
                         bound=LAYOUT)
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import MISSING, dataclass
from typing import Annotated, Any, Protocol, TypeVar

import typer

_ROW = "phlora_flag"
T = TypeVar("T")


class Check(Protocol):
    """What a value must be (a :class:`~phlora_nim.core.bounds.Bound` or ``OneOf``)."""

    def check(self, value: Any, where: str) -> None: ...


@dataclass(frozen=True)
class Flag:
    """One option's spelling and text (its name, type and default are its field's).

    Args:
        decls: ``--name`` (or ``--name/--no-name`` for an on/off pair; None: a positional argument).
        help: what it does, shown in ``--help``.
        short: an extra short spelling (``-r``).
        panel: the ``--help`` panel it is listed in (None: the command's main panel).
        bound: the values it allows, checked when the options object is built.
        hidden: accepted but not listed (old spellings).
        show_default: show typer's ``[default: …]`` (off where the help says it in words).
    """

    decls: str | None
    help: str
    short: str | None = None
    panel: str | None = None
    bound: Check | None = None
    hidden: bool = False
    show_default: bool = True

    @property
    def name(self) -> str:
        """The flag as errors name it (``--rank``)."""
        return (self.decls or "").split("/")[0]

    def typer_info(self) -> Any:
        if self.decls is None:
            return typer.Argument(help=self.help, show_default=self.show_default)
        return typer.Option(
            self.decls,
            *((self.short,) if self.short else ()),
            help=self.help,
            rich_help_panel=self.panel,
            hidden=self.hidden,
            show_default=self.show_default,
        )


def option(
    decls: str,
    help: str,
    *,
    default: Any = MISSING,
    short: str | None = None,
    panel: str | None = None,
    bound: Check | None = None,
    hidden: bool = False,
    show_default: bool = True,
) -> Any:
    """A dataclass field that is also a flag row (no ``default``: a required option)."""
    row = Flag(decls, help, short=short, panel=panel, bound=bound, hidden=hidden, show_default=show_default)
    return dataclasses.field(default=default, metadata={_ROW: row})


def argument(help: str) -> Any:
    """A dataclass field that is a required positional argument."""
    return dataclasses.field(metadata={_ROW: Flag(None, help)})


def rows(cls: type) -> list[tuple[dataclasses.Field[Any], Flag, Any]]:
    """The flag table of options class ``cls``: (field, row, resolved type) in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if _ROW not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is not a flag row (declare it with option())")
        out.append((f, f.metadata[_ROW], hints[f.name]))
    return out


def _cli_type(kind: Any) -> Any:
    """The type typer parses: a repeatable option's tuple field is parsed as a list."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) is tuple:
        return list[args[0]]  # type: ignore[valid-type]
    if isinstance(kind, types.UnionType) and any(typing.get_origin(a) is tuple for a in args):
        return _cli_type(next(a for a in args if a is not type(None))) | None
    return kind


def parameters(cls: type) -> list[inspect.Parameter]:
    """Typer parameters for every row of ``cls``."""
    params = []
    for f, row, kind in rows(cls):
        default = inspect.Parameter.empty if f.default is MISSING else f.default
        annotation = Annotated[_cli_type(kind), row.typer_info()]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
    return params


def build(cls: type[T], values: dict[str, Any]) -> T:
    """The options object ``cls`` of the parsed ``values`` (by field name; missing ones take the
    field's default), each checked against its row's bound.

    Raises:
        OptionError: a value outside its row's bound.
    """
    given: dict[str, Any] = {}
    for f, row, _ in rows(cls):
        if f.name not in values:
            continue
        value = values[f.name]
        if isinstance(value, list):
            value = tuple(value)
        if row.bound is not None:
            row.bound.check(value, row.name)
        given[f.name] = value
    return cls(**given)


def _groups(cls: type) -> list[tuple[str, type]]:
    """The option groups of a composite options class (every field an options class), else []."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)
    if any(_ROW in f.metadata or not dataclasses.is_dataclass(hints[f.name]) for f in fields):
        return []
    return [(f.name, hints[f.name]) for f in fields]


def _parameters_of(cls: type) -> list[inspect.Parameter]:
    groups = _groups(cls)
    return [p for _, sub in groups for p in parameters(sub)] if groups else parameters(cls)


def _build_any(cls: type[T], values: dict[str, Any]) -> T:
    groups = _groups(cls)
    if not groups:
        return build(cls, values)
    return cls(**{name: build(sub, values) for name, sub in groups})


def command(*groups: type) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Make ``func(*options)``, taking one options object per class in ``groups``, a typer command whose
    options are the groups' rows in order (``func``'s docstring is the command's help). A group may be
    composite: a dataclass whose fields are options classes, built from their rows alike."""

    def decorate(func: Callable[..., None]) -> Callable[..., None]:
        tables = [(cls, _parameters_of(cls)) for cls in groups]
        names = [p.name for _, params in tables for p in params]
        repeated = {n for n in names if names.count(n) > 1}
        if repeated:
            raise TypeError(f"{func.__name__}: options in two groups: {sorted(repeated)}")

        def run(**values: Any) -> None:
            func(*(_build_any(cls, {p.name: values[p.name] for p in params}) for cls, params in tables))

        run.__name__, run.__qualname__, run.__module__ = func.__name__, func.__qualname__, func.__module__
        run.__doc__ = func.__doc__
        params = [p for _, group in tables for p in group]  # keyword-only: typer lists them in this order
        run.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        return run

    return decorate
