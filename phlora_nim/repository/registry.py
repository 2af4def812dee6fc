"""The adapter registry: one JSON file listing every adapter a model repository serves.

Each entry: name, ``lora_task_id``, ranks, modules, dtype, digest of the tensors, source
checkpoints, time. Task ids are derived from the digest (stable across runs and machines), kept
below 2^31 because TensorRT-LLM parses prefetch folder names as a signed 32-bit int, and never
given to other weights: a collision is detected at registration and resolved by probing.

Writers take an exclusive lock (POSIX ``fcntl`` record lock on a lock file beside it, which shared volumes
such as NFS enforce between machines), read the registry, change it and replace the file atomically, so
concurrent runs (one conversion pod per fine-tune) never corrupt it or lose each other's adapters, and a
failed run leaves it as it was. The lock file counts commits: a writer whose filesystem still shows an
older registry waits for the current one instead of merging into a stale copy.

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
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

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
        with _THREADS, open(self.lock_path, "a+") as lock:
            # A POSIX record lock: the kind every NFS version (and CephFS, Lustre…) enforces between machines,
            # and on whose acquisition NFS clients drop their cached pages of the files it guards.
            fcntl.lockf(lock, fcntl.LOCK_EX)
            try:
                generation = _read_generation(lock)
                state = self._read_at_least(generation)
                state.now = self.now
                stored = self._stored()
                yield state
                try:
                    due = state.take_due(self.root)
                except ValueError as exc:
                    raise InputError(
                        str(exc), where=str(self.path), fix="remove that entry from pending_deletions"
                    ) from None
                payload = _payload(state)
                if payload != stored:  # a no-op leaves the file (and its readers) alone
                    payload["generation"] = generation + 1
                    atomic_write_text(self.path, json.dumps(payload, indent=1) + "\n")
                    _write_generation(lock, generation + 1)
                for action in state.after_commit:
                    action()
                for folder in due:
                    shutil.rmtree(folder, ignore_errors=True)
                    log.debug("deleted %s (grace period over)", folder)
            finally:
                fcntl.lockf(lock, fcntl.LOCK_UN)

    def _read_at_least(self, generation: int) -> RegistryState:
        """The registry once it shows ``generation`` (the lock file's count of commits) or later.

        The lock file is written in place, under the lock; the registry is replaced by a rename, which a
        client of a shared filesystem may see late (a cached name → old file). Waiting for the count to
        match keeps a writer from merging into a stale copy and losing another pod's adapter.
        """
        deadline = time.monotonic() + _STALE_WAIT_S
        while True:
            state, found = self._read_with_generation()
            if found >= generation:
                return state
            if time.monotonic() > deadline:
                raise InputError(
                    "the adapter registry is older than its lock file says",
                    where=str(self.path),
                    expected=f"generation {generation} (written by the last convert)",
                    found=f"generation {found} after {_STALE_WAIT_S:.0f} s",
                    fix="check that every writer mounts the repository from the same shared volume and retry; "
                    f"if {REGISTRY_FILE} was removed on purpose, remove {self.lock_path.name} with it",
                )
            time.sleep(0.2)

    def _stored(self) -> dict[str, Any] | None:
        """The registry file as stored, without its commit count (None: no file, or not JSON)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(data, dict):
            data.pop("generation", None)
        return data

    def _read_with_generation(self) -> tuple[RegistryState, int]:
        if not self.path.exists():
            return RegistryState(), 0
        state = self.read()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return state, 0
        return state, int(data.get("generation", 0))


def _payload(state: RegistryState) -> dict[str, Any]:
    """What the registry file stores of ``state`` (without its commit count)."""
    return {
        "format": _FORMAT,
        "adapters": {n: asdict(e) for n, e in sorted(state.adapters.items())},
        "retired": {str(k): v for k, v in sorted(state.retired.items())},
        "pending_deletions": [asdict(p) for p in state.pending_deletions],
    }


# How long a writer waits for a shared filesystem to show the registry its lock file announces.
_STALE_WAIT_S = 30.0
# POSIX locks belong to a process: threads of one process are kept apart by this lock as well.
_THREADS = threading.Lock()


def _read_generation(lock: IO[str]) -> int:
    """The commit count kept in the lock file (0 for a new or pre-existing empty lock file)."""
    lock.seek(0)
    text = lock.read().strip()
    return int(text) if text.isdigit() else 0


def _write_generation(lock: IO[str], generation: int) -> None:
    lock.seek(0)
    lock.truncate()
    lock.write(f"{generation}\n")
    lock.flush()
    os.fsync(lock.fileno())
