"""The adapter registry: one JSON file listing every adapter a model repository serves.

Each entry: name, ``lora_task_id``, ranks, modules, dtype, digest of the tensors, source
checkpoints, time. Task ids are derived from the digest (stable across runs and machines), kept
below 2^31 because TensorRT-LLM parses prefetch folder names as a signed 32-bit int, and never
given to other weights: a collision is detected at registration and resolved by probing.

Writers take an exclusive lock and replace the file atomically, so concurrent runs never corrupt
it and a failed run leaves it as it was.

Files of removed and replaced adapters outlive their registry entry by a grace period: a router
polling the registry may still route a request to them for a few seconds. The registry lists them
with a deadline; each later write deletes those past it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from phlora_nim.core.atomic import atomic_write_text
from phlora_nim.core.errors import InputError
from phlora_nim.core.names import validate_adapter_name
from phlora_nim.repository.layout import REGISTRY_FILE, adapter_store_dir, prefetch_dir

log = logging.getLogger("phlora_nim")

_FORMAT = "phlora-registry/1"
TASK_ID_LIMIT = 2**31


def utc_now() -> dt.datetime:
    """The registry's default clock."""
    return dt.datetime.now(dt.timezone.utc)


def task_id_for(digest: str, taken: dict[int, str]) -> int:
    """The first probe ``h(digest, k)`` in [1, 2^31) not held by *other* weights."""
    for k in range(1_000):
        probe = hashlib.sha256(f"{digest}:{k}".encode()).digest()
        task_id = int.from_bytes(probe[:4], "big") % (TASK_ID_LIMIT - 1) + 1
        owner = taken.get(task_id)
        if owner is None or owner == digest:
            return task_id
    raise RuntimeError("no free task id after 1000 probes")  # 2^31 ids: unreachable in practice


@dataclass(frozen=True)
class AdapterEntry:
    """One registered adapter.

    ``trtllm_layout`` holds what laying it out for TensorRT-LLM gave: ``trtllm_modules``,
    ``bytes`` (of the npy pair), ``rows`` and ``tp``.
    """

    name: str
    task_id: int
    digest: str
    ranks: dict[str, int]
    modules: list[str]
    dtype: str
    sources: dict[str, str]
    created: str
    trtllm_layout: dict[str, Any] = field(default_factory=dict)
    # The adapter's PEFT folder as the serving replicas see it, for engines that read adapters by path
    # (TensorRT-LLM's llmapi model: lora_path); "" for the others.
    lora_path: str = ""

    @property
    def max_rank(self) -> int:
        return max(self.ranks.values(), default=0)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AdapterEntry:
        """An entry as stored; registries written by older versions name ``trtllm_layout`` ``extra``."""
        data = dict(data)
        if "extra" in data:
            data.setdefault("trtllm_layout", data.pop("extra"))
        return cls(**data)


@dataclass(frozen=True)
class PendingDeletion:
    """A folder of a removed or replaced adapter, deleted by the first registry write after ``delete_after``."""

    path: str  # relative to the repository root
    delete_after: str  # ISO 8601, UTC
    adapter: str

    def due(self, now: dt.datetime) -> bool:
        return dt.datetime.fromisoformat(self.delete_after) <= now


@dataclass
class RegistryState:
    """What the registry file holds: live adapters, every task id ever retired with its digest, and
    the folders waiting out their grace period.

    Retired ids stay reserved: a serving cache may still hold their old weights.
    """

    adapters: dict[str, AdapterEntry] = field(default_factory=dict)
    retired: dict[int, str] = field(default_factory=dict)
    pending_deletions: list[PendingDeletion] = field(default_factory=list)
    # Not stored: work to do once the new registry is in place, still under the lock (deleting the
    # files of removed adapters only after no reader can find them in the registry any more).
    after_commit: list[Callable[[], None]] = field(default_factory=list, compare=False, repr=False)
    # Not stored: the clock grace deadlines are set and checked by (tests drive their own).
    now: Callable[[], dt.datetime] = field(default=utc_now, compare=False, repr=False)

    def delete_later(self, root: Path, folder: Path, *, grace: float, adapter: str) -> None:
        """Delete ``folder`` (inside ``root``) at the first registry write ``grace`` seconds from now or later."""
        if grace < 0:
            raise ValueError(f"grace must be ≥ 0, not {grace}")
        deadline = self.now() + dt.timedelta(seconds=grace)
        relative = Path(folder).relative_to(root).as_posix()
        self.pending_deletions = [p for p in self.pending_deletions if p.path != relative]
        self.pending_deletions.append(
            PendingDeletion(path=relative, delete_after=deadline.isoformat(timespec="milliseconds"), adapter=adapter)
        )

    def take_due(self, root: Path) -> list[Path]:
        """Drop the pending deletions that are due (or whose folder is in use again); returns the due folders."""
        live = {prefetch_dir(".", e.task_id).as_posix() for e in self.adapters.values()}
        live |= {adapter_store_dir(".", name).as_posix() for name in self.adapters}
        now = self.now()
        due = [p for p in self.pending_deletions if p.path not in live and p.due(now)]
        self.pending_deletions = [p for p in self.pending_deletions if p.path not in live and not p.due(now)]
        return [_inside(root, p.path) for p in due]

    def add(
        self,
        name: str,
        digest: str,
        ranks: dict[str, int],
        *,
        dtype: str,
        sources: dict[str, str],
        replace: bool = False,
        trtllm_layout: dict[str, Any] | None = None,
        lora_path: str | None = None,
    ) -> AdapterEntry:
        """Register the weights with ``digest`` (``adapter_digest``) and per-module ``ranks`` as
        ``name`` (on the state :meth:`Registry.locked` yields).

        Re-registering identical weights under the same name is a no-op; different weights under an
        existing name need ``replace``.

        Raises:
            InputError: a bad name, or a name already bound to other weights without ``replace``.
        """
        validate_adapter_name(name)
        entries = self.adapters
        old = entries.get(name)
        if old is not None and old.digest == digest:
            if lora_path is not None and old.lora_path != lora_path:
                entries[name] = old = dataclasses.replace(old, lora_path=lora_path)
            return old
        if old is not None and not replace:
            raise InputError(
                f"adapter {name!r} is already registered with different weights",
                where=f"registry {name}",
                expected="a new name",
                found=f"task id {old.task_id}, digest {old.digest[:12]}…",
                fix="pass --replace to swap the weights (they get a new task id), or choose another name",
            )
        taken = dict(self.retired)
        taken.update({e.task_id: e.digest for n, e in entries.items() if n != name})
        if old is not None:
            self.retired[old.task_id] = old.digest
        entry = AdapterEntry(
            name=name,
            task_id=task_id_for(digest, taken),
            digest=digest,
            ranks=dict(ranks),
            modules=sorted(ranks),
            dtype=dtype,
            sources=dict(sources),
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            trtllm_layout=dict(trtllm_layout or {}),
            lora_path=lora_path or "",
        )
        entries[name] = entry
        return entry

    def remove(self, name: str) -> AdapterEntry:
        """Drop ``name``; its task id stays reserved for its weights."""
        try:
            entry = self.adapters.pop(name)
        except KeyError:
            known = ", ".join(sorted(self.adapters)[:10]) or "none"
            raise InputError(
                f"no adapter named {name!r}",
                where="registry",
                found=f"registered: {known}",
                fix="list them with `phlora-nim adapters`",
            ) from None
        self.retired[entry.task_id] = entry.digest
        return entry


def _inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing paths that leave ``root`` (the registry file is data, not trusted)."""
    path = (Path(root) / relative).resolve()
    if not path.is_relative_to(Path(root).resolve()) or path == Path(root).resolve():
        raise ValueError(f"pending deletion {relative!r} is not a folder inside the repository")
    return path


class Registry:
    """The registry file of one model repository.

    Example:
        >>> reg = Registry(Path("model_repository"))  # doctest: +SKIP
        >>> with reg.locked() as state:  # doctest: +SKIP
        ...     state.add("support", digest, ranks, dtype="float16", sources={"finetuned": "ckpt/support"})
    """

    def __init__(self, root: Path, *, now: Callable[[], dt.datetime] = utc_now) -> None:
        self.root = Path(root)
        self.now = now
        self.path = self.root / REGISTRY_FILE
        self.lock_path = self.root / f".{REGISTRY_FILE}.lock"

    def read(self) -> RegistryState:
        """The registry's content (empty when there is no registry yet)."""
        if not self.path.exists():
            return RegistryState()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("format") != _FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            return RegistryState(
                adapters={name: AdapterEntry.from_json(entry) for name, entry in data["adapters"].items()},
                retired={int(k): v for k, v in data.get("retired", {}).items()},
                pending_deletions=[PendingDeletion(**p) for p in data.get("pending_deletions", [])],
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(
                f"unreadable adapter registry ({exc})",
                where=str(self.path),
                expected=f'a JSON object with "format": "{_FORMAT}"',
                fix="restore it from backup, or remove it and convert the adapters again",
            ) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[RegistryState]:
        """Hold the registry lock; yields the state, written back atomically if no exception.

        The write also deletes the folders whose grace period is over.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.read()
            state.now = self.now
            yield state
            try:
                due = state.take_due(self.root)
            except ValueError as exc:
                raise InputError(
                    str(exc), where=str(self.path), fix="remove that entry from pending_deletions"
                ) from None
            payload = {
                "format": _FORMAT,
                "adapters": {n: asdict(e) for n, e in sorted(state.adapters.items())},
                "retired": {str(k): v for k, v in sorted(state.retired.items())},
                "pending_deletions": [asdict(p) for p in state.pending_deletions],
            }
            atomic_write_text(self.path, json.dumps(payload, indent=1) + "\n")
            for action in state.after_commit:
                action()
            for folder in due:
                shutil.rmtree(folder, ignore_errors=True)
                log.debug("deleted %s (grace period over)", folder)
