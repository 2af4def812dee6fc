"""A child process's output, read as it comes: tests wait for the line a server prints once it listens.

Servers in tests bind port 0 and print the port they got; waiting for that line replaces picking a
"free" port first, which another process may take before the server binds it.
"""

from __future__ import annotations

import re
import threading
from typing import IO


class OutputLines:
    """Every line of a text stream, read on a thread of its own (so the pipe never fills up).

    Args:
        stream: a text-mode pipe, e.g. ``Popen(..., stdout=PIPE, text=True).stdout``.
    """

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._done = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(stream,), name="output-lines", daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in a line, waiting up to ``timeout`` seconds for it.

        Raises:
            AssertionError: the stream ended, or the time ran out, first (with what was read).
        """
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            return next((m for m in map(regex.search, self.lines) if m), None)

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self._done, timeout=timeout)
            match = found()
        assert match is not None, f"no line matching {pattern!r} in time; output:\n{self.text[-3000:]}"
        return match

    @property
    def text(self) -> str:
        """What was read so far (all of it, once the stream ended: see :meth:`close`)."""
        with self._changed:
            return "".join(self.lines)

    def close(self, timeout: float = 10.0) -> str:
        """Wait for the stream to end (the process exited); returns all of it."""
        self._thread.join(timeout=timeout)
        return self.text
