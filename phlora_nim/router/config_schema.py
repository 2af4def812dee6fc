"""The router's settings as a schema: each field's type, bounds and what an error says was expected.

:class:`~phlora_nim.router.config.RouterConfig` declares its fields with the types below; pydantic
checks them twice over: the options given in Python or on the command line (an ``OptionError``
naming the flag) and a ``--config`` file (an ``InputError`` naming the file and the field's path).
:func:`schema_problems` turns what pydantic reports into the project's errors.

Example:
    >>> split_host_port("[::1]:8001", flag="--upstream")
    ('::1', 8001)
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn

from pydantic import AfterValidator, BeforeValidator, Field, StringConstraints, ValidationError, ValidationInfo
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from phlora_nim.core.errors import OptionError, PhloraError
from phlora_nim.engines.registry import engine, engine_names

ROUTING_POLICIES = ("adapter-aware", "round-robin")

# http_port / metrics_port: on, at a port the OS picks as it is bound (0 means off there). Picking
# a "free" port first and passing it would race with any other process binding one meanwhile.
ANY_FREE_PORT = -1

_OWN = "router_setting"  # the error type of the checks below; its context carries expected and fix


def refuse(problem: str, *, expected: str | None = None, fix: str | None = None) -> NoReturn:
    """Fail a field with the project's words (read back by :func:`schema_problems`)."""
    raise PydanticCustomError(_OWN, problem, {"expected": expected, "fix": fix})


def split_host_port(text: str, *, flag: str) -> tuple[str, int]:
    """``host:port`` (IPv6 as ``[addr]:port``) → (host, port).

    Raises:
        OptionError: no port, or a port outside 1–65535.
    """
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise OptionError(
            "not a host:port address", where=flag, expected="HOST:PORT, e.g. triton-0:8001", found=repr(text)
        )
    return host, int(port)


ADDRESS = "HOST:PORT, e.g. triton-0:8001 (an OpenAI-speaking replica also as http://HOST:PORT)"


def _address(text: str) -> str:
    scheme, sep, rest = text.partition("://")
    if sep and scheme.lower() not in ("http", "https"):
        refuse("not an http:// or https:// URL", expected=ADDRESS)
    try:
        split_host_port(rest.rstrip("/") if sep else text, flag="")
    except OptionError:
        refuse("not a host:port address", expected=ADDRESS)
    return text


def _each_once(items: tuple[str, ...]) -> tuple[str, ...]:
    twice = sorted({x for x in items if items.count(x) > 1})
    if twice:
        refuse(f"{twice[0]!r} is listed twice", expected="each replica once", fix="remove the repeated address")
    return items


def _one_or_many(value: Any) -> Any:
    """A single string is a list of one; a YAML list becomes the tuple the config holds."""
    return (value,) if isinstance(value, str) else tuple(value) if isinstance(value, list) else value


def _relative_to_file(value: Any, info: ValidationInfo) -> Any:
    """A relative path in a ``--config`` file is taken from the file's folder."""
    folder = (info.context or {}).get("folder")
    if isinstance(value, str) and folder is not None:
        return Path(folder) / value  # an absolute value stays as it is
    return value


def _port(allow_any: bool) -> Callable[[int], int]:
    def check(value: int) -> int:
        if not 0 <= value < 65536 and not (allow_any and value == ANY_FREE_PORT):
            refuse("not a port number")
        return value

    return check


def _known_engine(name: str) -> str:
    try:
        engine(name, flag="--engine")
    except OptionError as exc:
        refuse(exc.problem, expected=exc.expected, fix=exc.fix)
    return name


def _routing_policy(name: str) -> str:
    if name not in ROUTING_POLICIES:
        refuse("unknown routing policy")
    return name


_PATH = "a path (a relative one is taken from the config file's folder)"

# The field types RouterConfig declares; each description is what an error says was expected.
FilePath = Annotated[Path, BeforeValidator(_relative_to_file), Field(description=_PATH)]
Seconds = Annotated[float, Field(gt=0, description="a positive number of seconds")]
Megabytes = Annotated[int, Field(gt=0, description="a positive whole number of MiB")]
Count = Annotated[int, Field(ge=1, description="a whole number ≥ 1")]
Port = Annotated[int, AfterValidator(_port(False)), Field(description="a port number 0–65535")]
FrontPort = Annotated[
    int, AfterValidator(_port(True)), Field(description=f"a port number 0–65535 (0: off; {ANY_FREE_PORT}: any free)")
]
Name = Annotated[str, StringConstraints(min_length=1), Field(description="a non-empty name")]
Addresses = Annotated[
    tuple[Annotated[str, AfterValidator(_address)], ...],
    BeforeValidator(_one_or_many),
    AfterValidator(_each_once),
    Field(description=f"an address or a list of them: {ADDRESS}"),
]
ModelNames = Annotated[
    tuple[Annotated[str, StringConstraints(min_length=1)], ...],
    BeforeValidator(_one_or_many),
    Field(description="a model name or a list of them (names or glob patterns, non-empty)"),
]
DnsName = Annotated[str, AfterValidator(_address), Field(description=ADDRESS)]
EngineName = Annotated[
    str, AfterValidator(_known_engine), Field(description="an engine: " + " or ".join(engine_names()))
]
RoutingPolicy = Annotated[str, AfterValidator(_routing_policy), Field(description=" or ".join(ROUTING_POLICIES))]


def _description(spec: FieldInfo | None) -> str | None:
    """A field's description, or that of the type it makes optional (``FilePath | None``)."""
    if spec is None or spec.description:
        return None if spec is None else spec.description
    for arg in typing.get_args(spec.annotation):
        for meta in getattr(arg, "__metadata__", ()):
            if isinstance(meta, FieldInfo) and meta.description:
                return meta.description
    return None


def schema_problems(
    exc: ValidationError,
    *,
    fields: Mapping[str, FieldInfo],
    where: Callable[[tuple[str | int, ...]], str],
    error: type[PhloraError],
    fix: str,
) -> list[PhloraError]:
    """One project error per schema violation: where (``where`` of the field's path), expected, found, fix.

    Args:
        exc: what pydantic raised.
        fields: the schema's fields (their descriptions say what each expects).
        where: the field's path (name, then list indices) → where the error says it is.
        error: the error class (``OptionError`` for options, ``InputError`` for a file).
        fix: the fix named where a check gives none.
    """
    problems: list[PhloraError] = []
    for item in exc.errors(include_url=False):
        # Keep the field and its list indices; pydantic's own steps (function-after[...]) are no path.
        loc = tuple(p for i, p in enumerate(item["loc"]) if i == 0 or isinstance(p, int))
        kind, ctx, value = item["type"], item.get("ctx") or {}, item.get("input")
        expected = _description(fields.get(str(loc[0])))
        found: str | None = repr(value)
        hint = fix
        if kind == "extra_forbidden":
            problem, expected, found = "unknown router setting", ", ".join(sorted(fields)), None
            hint = "remove it or correct its spelling (dashes or underscores)"
        elif kind == _OWN:
            problem, expected, hint = item["msg"], ctx.get("expected") or expected, ctx.get("fix") or fix
        elif kind == "greater_than":
            problem = "must be positive" if ctx["gt"] == 0 else f"must be > {ctx['gt']:g}"
        elif kind == "greater_than_equal":
            problem = f"must be ≥ {ctx['ge']:g}"
        elif kind == "less_than_equal":
            problem = f"must be ≤ {ctx['le']:g}"
        elif kind in ("string_too_short", "too_short"):
            problem = "must not be empty"
        elif kind == "missing":
            problem, found = "missing", "nothing"
        else:  # a type pydantic refused
            problem, found = "wrong type", f"{type(value).__name__} {value!r}"
        problems.append(error(problem, where=where(loc), expected=expected, found=found, fix=hint))
    return problems
