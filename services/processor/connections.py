"""The processor's listening socket with the timeouts aiohttp lacks, and optional TLS.

aiohttp times out idle keep-alive connections, but a connection that never finishes sending
its request headers (slowloris) is held forever, and so is a body sent one byte at a time.
Headers: every connection gets ``header_timeout`` to deliver a complete request head, and
again after each response; a connection still without one is closed. Bodies: the handler
reads with its own deadline (``body_timeout``, see ``app.py``). Idle keep-alive connections
close after ``idle_timeout`` (aiohttp's ``keepalive_timeout``).

The handler subclass relies on aiohttp's ``RequestHandler`` keeping a request counter
(``_request_count``) that grows when a request head is parsed; ``tests/integration``'s
slowloris test fails loudly if a new aiohttp changes that.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

__all__ = ["GuardedSite", "server_ssl_context"]


class _HeaderDeadlineHandler(RequestHandler):
    """Closes a connection that does not deliver a request head within the deadline."""

    header_timeout = 10.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._seen_requests = 0
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.header_timeout, self._expire, self._request_count)

    def _expire(self, count_then: int) -> None:
        self._deadline = None
        if self._request_count == count_then and self.transport is not None:
            # Nothing parsed since the deadline was set: the head never came. (force_close
            # closes the transport and forgets it.)
            self.force_close()

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    async def finish_response(self, *args: Any, **kwargs: Any) -> Any:
        result = await super().finish_response(*args, **kwargs)
        # A response went out: the next request's head gets a fresh deadline.
        if self.transport is not None and not self._force_close:
            self._arm()
        return result


class GuardedSite(web.TCPSite):
    """A ``TCPSite`` whose connections get a request-head deadline."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, *, header_timeout: float,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(runner, host, port, **kwargs)
        self._header_timeout = header_timeout

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        timeout = self._header_timeout
        handler_kwargs = dict(server._kwargs)

        def factory() -> RequestHandler:
            handler = _HeaderDeadlineHandler(server, loop=loop, **handler_kwargs)
            handler.header_timeout = timeout
            return handler

        self._server = await loop.create_server(
            factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


def server_ssl_context(cert: str, key: str) -> ssl.SSLContext:
    """TLS 1.2+ server context from PEM files; a bad file is an ``ssl.SSLError``/``OSError``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context
