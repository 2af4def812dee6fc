"""API keys, tenants and what each tenant may use (``--tenants FILE``).

The file is YAML::

    tenants:
      - name: support-team                 # unique, shown in logs and metrics
        keys:                              # at least one; prefer digests
          - "sha256:5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8"
          - "a-plain-text-key"             # anything without the prefix is a plain key
        adapters: ["support-*", "faq"]     # glob patterns of adapter names (default: none)
        base_models: ["ensemble"]          # glob patterns of base models (default: ["*"])
        max_in_flight: 8                   # requests at once (default: no limit)

A client sends ``authorization: Bearer <key>`` as gRPC metadata. Keys are kept only as SHA-256
digests (``printf %s KEY | sha256sum`` gives the digest for the file). With a tenants file, an
inference or model RPC without a known key fails with ``UNAUTHENTICATED``; an adapter or base model
outside the tenant's patterns gets the answer of a name that does not exist (``NOT_FOUND``, same
words; ``ModelReady`` false) and is left out of ``RepositoryIndex``, so names cannot be enumerated.
Liveness, readiness and the health service stay open (probes carry no keys).

Example:
    >>> table = parse_tenants({"tenants": [{"name": "a", "keys": ["k"], "adapters": ["s-*"]}]}, where="t.yaml")
    >>> table.authenticate("Bearer k").allows_adapter("s-1")
    True
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from phlora_nim.core.errors import InputError, PhloraError, raise_all

log = logging.getLogger("phlora_nim.router")

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def key_digest(key: str) -> str:
    """SHA-256 hex digest of an API key, as written after ``sha256:`` in the tenants file."""
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    """One tenant: what it may call and how much at once."""

    name: str
    adapters: tuple[str, ...] = ()
    base_models: tuple[str, ...] = ("*",)
    max_in_flight: int | None = None

    def allows_adapter(self, adapter: str) -> bool:
        return any(fnmatch.fnmatchcase(adapter, p) for p in self.adapters)

    def allows_base_model(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, p) for p in self.base_models)


@dataclass(frozen=True)
class TenantTable:
    """Digest of every key → its tenant."""

    by_digest: dict[str, Tenant]

    @property
    def tenants(self) -> list[Tenant]:
        return list({t.name: t for t in self.by_digest.values()}.values())

    def authenticate(self, authorization: str | None) -> Tenant | None:
        """The tenant of an ``authorization`` header value (``Bearer <key>``), or None."""
        if not authorization:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        return self.by_digest.get(key_digest(key.strip()))


def _check_key(key: str) -> str:
    if key.startswith("sha256:") and not _DIGEST.match(key[len("sha256:") :].strip().lower()):
        raise ValueError("sha256: followed by 64 hex digits")
    return key


def _digest(key: str) -> str:
    return key[len("sha256:") :].strip().lower() if key.startswith("sha256:") else key_digest(key)


_Patterns = Annotated[list[str], Field(description="a list of glob patterns (strings)")]


class _TenantEntry(BaseModel):
    """One entry of ``tenants:``; each field's description is what an error says was expected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: Annotated[str, StringConstraints(min_length=1), Field(description="a non-empty string")]
    keys: Annotated[
        list[Annotated[str, StringConstraints(min_length=1), AfterValidator(_check_key)]],
        Field(min_length=1, description="a non-empty list of keys (strings)"),
    ]
    adapters: _Patterns = []
    base_models: _Patterns = ["*"]
    max_in_flight: Annotated[int | None, Field(ge=1, description="a positive integer")] = None


class _TenantsFile(BaseModel):
    """The document: other top-level keys are left for other readers of a shared file."""

    model_config = ConfigDict(strict=True)

    tenants: Annotated[list[Any], Field(min_length=1)]


_TOP = "a top-level mapping with a non-empty list `tenants:`"
_FIX = "see the format in the docstring of phlora_nim.router.tenants"


def _problems(exc: ValidationError, *, where: str, label: str, item: Any) -> list[PhloraError]:
    """One InputError per schema violation of a tenant entry: field path, expected, found, fix."""
    problems: list[PhloraError] = []
    for error in exc.errors(include_url=False):
        loc, kind = error["loc"], error["type"]
        path = label + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
        if kind == "extra_forbidden":
            fields = sorted(_TenantEntry.model_fields)
            at, expected, found = label, f"only the fields {fields}", f"unknown [{loc[0]!r}]"
            fix = "remove it or correct its spelling"
        elif kind in ("model_type", "model_attributes_type"):  # not a mapping at all
            at, expected, found, fix = label, "a mapping with name, keys, adapters", type(item).__name__, _FIX
        else:
            spec = _TenantEntry.model_fields[str(loc[0])]
            # A key's own check says what it expects; otherwise the field's description does.
            expected = str(error["ctx"]["error"]) if kind == "value_error" else spec.description or error["msg"]
            at, found, fix = path, "nothing" if kind == "missing" else repr(error["input"]), _FIX
        problems.append(
            InputError("invalid tenants file", where=f"{where}: {at}", expected=expected, found=found, fix=fix)
        )
    return problems


def parse_tenants(data: Any, *, where: str) -> TenantTable:
    """Check a parsed tenants document against its schema; every problem is collected into one error.

    Raises:
        InputError: naming each bad tenant and field, with what was expected and found.
    """
    summary = f"{where} is not a valid tenants file"
    try:
        document = _TenantsFile.model_validate(data)
    except ValidationError:
        found = f"keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
        raise InputError(
            "invalid tenants file", where=f"{where}: tenants", expected=_TOP, found=found, fix=_FIX
        ) from None
    problems: list[PhloraError] = []
    by_digest: dict[str, Tenant] = {}
    names: set[str] = set()
    plain = 0
    for i, item in enumerate(document.tenants):
        name = item.get("name") if isinstance(item, dict) else None
        label = f"tenant {name!r}" if isinstance(name, str) and name else f"tenants[{i}]"
        try:
            entry = _TenantEntry.model_validate(item)
        except ValidationError as exc:
            problems += _problems(exc, where=where, label=label, item=item)
            continue
        if entry.name in names:
            problems.append(
                InputError(
                    "invalid tenants file",
                    where=f"{where}: {label}.name",
                    expected="a name used once",
                    found="it twice",
                    fix="give each tenant its own name",
                )
            )
        names.add(entry.name)
        tenant = Tenant(entry.name, tuple(entry.adapters), tuple(entry.base_models), entry.max_in_flight)
        for key in entry.keys:
            digest = _digest(key)
            if digest in by_digest:
                held = f"a key also held by tenant {by_digest[digest].name!r}"
                problems.append(
                    InputError(
                        "invalid tenants file",
                        where=f"{where}: {label}.keys",
                        expected="each key given to one tenant",
                        found=held,
                        fix="give the tenant a key of its own",
                    )
                )
                continue
            by_digest[digest] = tenant
            plain += not key.startswith("sha256:")
    raise_all(problems, summary=summary)
    if plain:
        log.warning("%s holds %d plain-text key(s); prefer `sha256:<digest>` entries", where, plain)
    return TenantTable(by_digest=by_digest)


def load_tenants(path: Path) -> TenantTable:
    """Read and check a tenants YAML file.

    Raises:
        InputError: the file is missing, is not YAML, or any tenant is malformed.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise InputError(
            "cannot read the tenants file",
            where=str(path),
            found=exc.strerror or str(exc),
            fix="pass an existing YAML file to --tenants",
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(
            "the tenants file is not valid YAML",
            where=f"{path}{at}",
            found=str(getattr(exc, "problem", None) or exc),
            fix="see the format in `phlora_nim.router.tenants`",
        ) from None
    return parse_tenants(data, where=str(path))


def visible(adapters: Sequence[str], tenant: Tenant | None) -> list[str]:
    """The adapters a tenant may see (all of them without tenancy)."""
    return [a for a in adapters if tenant is None or tenant.allows_adapter(a)]
