"""Telling a hung replica from a slow request.

A replica that stops answering (a stopped process, a wedged host) leaves calls already sent
waiting until the client's deadline, and the health loop only keeps new requests away. A
:class:`Watchdog` watches one upstream call: when no answer came for ``seconds``, it probes the
replica's readiness. A replica that fails the probe is hung: the call is cancelled and flagged, so
that the request can move to another replica. A replica that answers the probe is alive and the
request is merely slow (a long generation): the call goes on, checked again after another
``seconds``. So a client whose own requests are slow cannot get replicas taken out of rotation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol


class Cancellable(Protocol):
    def cancel(self) -> bool: ...


class Watchdog:
    """Watches one call (see the module); ``hung`` is set when it cancelled the call.

    Args:
        seconds: time without an answer before the replica is probed.
        probe: True when the replica answers its readiness check.
    """

    def __init__(self, seconds: float, probe: Callable[[], Awaitable[bool]]) -> None:
        self.seconds = seconds
        self.hung = False
        self._probe = probe
        self._call: Cancellable | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._check: asyncio.Task[None] | None = None

    def watch(self, call: Cancellable) -> None:
        """Start watching ``call`` (from now)."""
        self._call = call
        self.answered()

    def answered(self) -> None:
        """An answer came: the next one is due within ``seconds``."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.seconds, self._due)

    def _due(self) -> None:
        self._timer = None
        self._check = asyncio.ensure_future(self._probe_replica())

    async def _probe_replica(self) -> None:
        if await self._probe():
            self.answered()  # alive: the request is slow, not the replica hung
            return
        self.hung = True
        if self._call is not None:
            self._call.cancel()

    def close(self) -> None:
        """Stop watching (the call ended)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._check is not None and not self._check.done():
            self._check.cancel()
        self._check = None
