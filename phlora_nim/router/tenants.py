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
from typing import Any

import yaml

from phlora_nim.core.errors import InputError, PhloraError, raise_all

log = logging.getLogger("phlora_nim.router")

_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_FIELDS = {"name", "keys", "adapters", "base_models", "max_in_flight"}


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


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def parse_tenants(data: Any, *, where: str) -> TenantTable:
    """Check a parsed tenants document; every problem is collected into one error.

    Raises:
        InputError: naming each bad tenant and field, with what was expected and found.
    """
    problems: list[PhloraError] = []

    def bad(field: str, expected: str, found: Any) -> None:
        problems.append(InputError("invalid tenants file", where=f"{where}: {field}", expected=expected, found=found))

    if not isinstance(data, dict) or not isinstance(data.get("tenants"), list) or not data["tenants"]:
        found = type(data).__name__ if not isinstance(data, dict) else f"keys {sorted(data)}"
        bad("tenants", "a top-level mapping with a non-empty list `tenants:`", found)
        raise_all(problems, summary=f"{where} is not a valid tenants file")
    by_digest: dict[str, Tenant] = {}
    owner: dict[str, str] = {}
    names: set[str] = set()
    for i, item in enumerate(data["tenants"]):
        label = f"tenants[{i}]"
        if not isinstance(item, dict):
            bad(label, "a mapping with name, keys, adapters", type(item).__name__)
            continue
        name = item.get("name")
        if isinstance(name, str) and name:
            label = f"tenant {name!r}"
            if name in names:
                bad(f"{label}.name", "a name used once", "it twice")
            names.add(name)
        else:
            bad(f"{label}.name", "a non-empty string", repr(name))
        unknown = sorted(set(item) - _FIELDS)
        if unknown:
            bad(label, f"only the fields {sorted(_FIELDS)}", f"unknown {unknown}")
        keys = item.get("keys")
        digests: list[str] = []
        if not _strings(keys) or not keys:
            bad(f"{label}.keys", "a non-empty list of keys (strings)", repr(keys))
        else:
            for key in keys:
                if key.startswith("sha256:"):
                    digest = key[len("sha256:") :].strip().lower()
                    if not _DIGEST.match(digest):
                        bad(f"{label}.keys", "sha256: followed by 64 hex digits", repr(key))
                        continue
                else:
                    digest = key_digest(key)
                digests.append(digest)
        adapters = item.get("adapters", [])
        if not isinstance(adapters, list) or not all(isinstance(p, str) for p in adapters):
            bad(f"{label}.adapters", "a list of glob patterns (strings)", repr(adapters))
            adapters = []
        base_models = item.get("base_models", ["*"])
        if not isinstance(base_models, list) or not all(isinstance(p, str) for p in base_models):
            bad(f"{label}.base_models", "a list of glob patterns (strings)", repr(base_models))
            base_models = []
        limit = item.get("max_in_flight")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            bad(f"{label}.max_in_flight", "a positive integer", repr(limit))
            limit = None
        tenant = Tenant(name=str(name), adapters=tuple(adapters), base_models=tuple(base_models), max_in_flight=limit)
        for digest in digests:
            if digest in owner:
                bad(f"{label}.keys", "each key given to one tenant", f"a key also held by tenant {owner[digest]!r}")
                continue
            owner[digest] = str(name)
            by_digest[digest] = tenant
    raise_all(problems, summary=f"{where} is not a valid tenants file")
    plain = sum(1 for item in data["tenants"] for k in item.get("keys", []) if not k.startswith("sha256:"))
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
