"""The HTTP front inside the router's process and event loop (uvicorn, h11).

The listening socket is made here: a taken port is an error at start (no silent sharing), and
``serve --workers N`` shares it with SO_REUSEPORT as the gRPC port is. uvicorn's own signal handling
is left out: the router's process handles SIGTERM / SIGINT and stops the front with the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import uvicorn

from phlora_nim.core.errors import OptionError
from phlora_nim.router.config import ANY_FREE_PORT
from phlora_nim.router.core import RouterCore
from phlora_nim.router.openai.app import HttpFront, create_app
from phlora_nim.router.openai.completions import Completions
from phlora_nim.router.openai.models import ModelDirectory

log = logging.getLogger("phlora_nim.router")


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the router's process owns the signals
        yield


def _listen(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so; without it a response
    # sent as headers then body waits out the client's delayed ACK (~40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OptionError("cannot listen", where="--host / --http-port", found=f"{host}:{port}: {exc}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class OpenAIServer:
    """The OpenAI-compatible front of a router: ``await start()``, ``await stop()``."""

    def __init__(self, core: RouterCore) -> None:
        config = core.config
        directory = ModelDirectory(config.model_repository, core.catalog, served_model_name=config.served_model_name)
        self.front = HttpFront(Completions(core=core, directory=directory))
        self.config = config
        self.port = 0
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._socket: socket.socket | None = None

    async def start(self) -> None:
        config = self.config
        port = 0 if config.http_port == ANY_FREE_PORT else config.http_port
        self._socket = _listen(config.host, port, reuse_port=config.reuse_port)
        self.port = int(self._socket.getsockname()[1])
        uv = uvicorn.Config(
            create_app(self.front),
            lifespan="off",
            log_level="warning",
            access_log=False,
            http="h11",
            ws="none",
            timeout_graceful_shutdown=max(1, int(config.grace)),
        )
        self._server = _EmbeddedServer(uv)
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OptionError("the HTTP front did not start", where="--http-port")
            await asyncio.sleep(0.01)
        log.info(
            "OpenAI API on http://%s:%d/v1 (base model %r)", config.host, self.port, self.front.directory.base_model
        )

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, timeout=self.config.grace + 5)
        self._server = self._task = None
