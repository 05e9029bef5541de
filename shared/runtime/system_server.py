"""The per-process system server: ``/health``, ``/live``, ``/metrics`` (and routes services add).

Off unless ``--system-port`` is given, like the reference's ``DYN_SYSTEM_PORT``. ``/health`` is
ready only when every served endpoint is subscribed and registered and both NATS and etcd are
reachable; ``/live`` fails only once the process is shutting down, so an orchestrator restarts
a wedged process but not one that is merely waiting for etcd.

``/health``, ``/live`` and ``/metrics`` are open (probes and scrapers); every route a service
adds (``/engine/*``: control, and cache contents, which are other users' prompt tokens) needs
``Authorization: Bearer <--admin-token>``, and is refused outright while no token is set. The
server binds 127.0.0.1 unless ``--system-host`` says otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from shared.http_auth import bearer_token, token_matches
from shared.runtime.runtime import DistributedRuntime

RouteHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SystemServer:
    def __init__(self, runtime: DistributedRuntime, host: str, port: int) -> None:
        self.runtime = runtime
        self.host = host
        self.port = port
        self.app = web.Application()
        self.app.router.add_get("/health", self._health)
        self.app.router.add_get("/live", self._live)
        self.app.router.add_get("/metrics", self._metrics)
        # aiohttp freezes its router once serving, but services add routes (engine control)
        # after they start: those live in this table behind one catch-all resource.
        self._routes: dict[tuple[str, str], RouteHandler] = {}
        self.app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner: web.AppRunner | None = None

    def add_route(self, method: str, path: str, handler: RouteHandler) -> None:
        self._routes[(method.upper(), path)] = handler

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        handler = self._routes.get((request.method, request.path))
        if handler is not None:
            token = self.runtime.config.admin_token
            if token is None:
                return web.json_response(
                    {"status": "error", "message": f"{request.path} is disabled: no --admin-token"},
                    status=403,
                )
            if not token_matches(bearer_token(request.headers.get("Authorization")), [token]):
                return web.json_response(
                    {"status": "error", "message": "missing or wrong admin token"},
                    status=401,
                    headers={"WWW-Authenticate": "Bearer"},
                )
            return await handler(request)
        if any(path == request.path for _, path in self._routes):
            return web.json_response(
                {"status": "error", "message": f"{request.method} not allowed"}, status=405
            )
        return web.json_response(
            {"status": "error", "message": f"no route {request.path}"}, status=404
        )

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            server = site._server
            if server is not None and server.sockets:  # type: ignore[attr-defined]
                self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        ready, body = self.runtime.health()
        return web.json_response(body, status=200 if ready else 503)

    async def _live(self, request: web.Request) -> web.Response:
        if self.runtime.shutting_down:
            return web.json_response({"status": "shutting_down"}, status=503)
        uptime = round(time.time() - self.runtime.started_at, 3)
        return web.json_response({"status": "live", "uptime": uptime})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )
