"""The adapters the router serves: the registry file, watched for changes.

Writers replace ``phlora_registry.json`` atomically (``os.replace``), so a change shows as a new
inode, size or modification time; polling ``stat`` is cheap and needs nothing beyond the standard
library. An unreadable registry keeps the last good state (and is logged).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from phlora_nim.core.errors import PhloraError
from phlora_nim.repository.layout import REGISTRY_FILE
from phlora_nim.repository.registry import AdapterEntry, Registry

log = logging.getLogger("phlora_nim.router")


class AdapterCatalog:
    """Registered adapters by name, refreshed by :meth:`refresh`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.path = self.root / REGISTRY_FILE
        self.adapters: dict[str, AdapterEntry] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._read_once = False

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def refresh(self) -> set[int]:
        """Re-read the registry when the file changed; returns the task ids no longer served."""
        stamp = self._stat()
        if self._read_once and stamp == self._stamp:
            return set()
        try:
            state = Registry(self.root).read()
        except PhloraError as exc:
            log.error("adapter registry not reloaded, keeping %d adapters: %s", len(self.adapters), exc)
            self._stamp = stamp
            return set()
        old = self.adapters
        self.adapters = dict(state.adapters)
        self._stamp, self._read_once = stamp, True
        added = sorted(set(self.adapters) - set(old))
        removed = sorted(set(old) - set(self.adapters))
        changed = sorted(n for n in set(old) & set(self.adapters) if old[n].task_id != self.adapters[n].task_id)
        if added or removed or changed:
            log.info(
                "adapters: %d served (added %s, removed %s, replaced %s)", len(self.adapters), added, removed, changed
            )
        live = {e.task_id for e in self.adapters.values()}
        return {e.task_id for e in old.values()} - live
