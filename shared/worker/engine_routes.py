"""Engine control over HTTP: ``POST /engine/<action>`` on the worker's system server.

Why on the system server: operators (and RL trainers swapping weights) drive a worker's
engine directly, per instance, without going through a router. Pausing generation or
releasing the engine's memory makes the worker useless to routers, so those take it out of
discovery first (``leave``), and it comes back (``rejoin``) only once it is neither paused
nor released: pause -> release -> resume keeps it out until continue. The caller's ``leave``
also suspends the health canary, which would otherwise see the paused engine fail and, worse,
put the instance back when it passes again.

Every route takes an optional JSON object body (reserved for options; none are used yet) and
answers JSON: ``{"status": "ok", "message": ..., "paused": bool, "released": bool}``. A body
that is not a JSON object is a 400, an engine failure a 500 (501 when the engine does not
support the action), each ``{"status": "error", "message": ...}`` without a traceback.

``/engine/flush_cache`` answers ``{"status", "flushed", "message"}``; while requests are in
flight it refuses with **409 Conflict** (``status`` "error", ``flushed`` false), so
``curl --fail`` and scripts notice, instead of a 200 that has to be parsed to find out.

``GET /engine/kv_cache`` (introspection, for tests and debugging) answers what the engine's
prefix cache holds, per DP rank, page by page: ``{"status": "ok", "page_size": n,
"dp_ranks": [{"dp_rank": r, "pages": [{"block_hash", "parent_block_hash", "token_ids"}]}]}``
with the block hashes its KV events carry. Only the simulated engine can list its cache;
other engines answer 501.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from shared.engine.protocol import Engine
from shared.runtime.system_server import SystemServer

__all__ = ["ENGINE_ROUTES", "register_engine_routes"]

log = logging.getLogger(__name__)

ENGINE_ROUTES = (
    "/engine/flush_cache",
    "/engine/start_profile",
    "/engine/stop_profile",
    "/engine/pause_generation",
    "/engine/continue_generation",
    "/engine/release_memory_occupation",
    "/engine/resume_memory_occupation",
)


class _BadBody(Exception):
    pass


async def _read_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadBody(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _BadBody(f"the body must be a JSON object, not {type(body).__name__}")
    return body


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"status": "error", "message": message, **extra}, status=status)


class _EngineControl:
    """The routes' shared state: one action at a time, and why the worker is out."""

    def __init__(
        self,
        engine: Engine,
        leave: Callable[[], Awaitable[None]],
        rejoin: Callable[[], Awaitable[None]],
    ) -> None:
        self.engine = engine
        self.leave = leave
        self.rejoin = rejoin
        self.paused = False
        self.released = False
        # Actions change engine state and discovery together; interleaving two would leave
        # discovery out of step with the engine.
        self.lock = asyncio.Lock()

    @property
    def out(self) -> bool:
        return self.paused or self.released

    def state(self) -> dict[str, Any]:
        return {"paused": self.paused, "released": self.released}

    async def _sync_discovery(self, was_out: bool) -> None:
        if self.out and not was_out:
            await self.leave()
        elif was_out and not self.out:
            await self.rejoin()

    # -- actions: each returns the JSON body of a 200 ------------------------------------------
    async def pause_generation(self) -> dict[str, Any]:
        # Out of discovery before pausing, so routers stop sending to an engine that
        # would only queue their requests.
        was_out, before = self.out, self.paused
        self.paused = True
        try:
            await self._sync_discovery(was_out)
            await self.engine.pause_generation()
        except BaseException:
            # The engine did not change: put discovery back as it was.
            self.paused = before
            await self._sync_discovery(True)
            raise
        return {"status": "ok", "message": "generation paused", **self.state()}

    async def continue_generation(self) -> dict[str, Any]:
        # The engine first: rejoining before it runs again would route into a paused queue.
        await self.engine.continue_generation()
        was_out = self.out
        self.paused = False
        await self._sync_discovery(was_out)
        return {"status": "ok", "message": "generation continued", **self.state()}

    async def release_memory_occupation(self) -> dict[str, Any]:
        was_out, before = self.out, self.released
        self.released = True
        try:
            await self._sync_discovery(was_out)
            await self.engine.release_memory_occupation()
        except BaseException:
            # The engine did not change: put discovery back as it was.
            self.released = before
            await self._sync_discovery(True)
            raise
        return {"status": "ok", "message": "memory released", **self.state()}

    async def resume_memory_occupation(self) -> dict[str, Any]:
        await self.engine.resume_memory_occupation()
        was_out = self.out
        self.released = False
        await self._sync_discovery(was_out)
        return {"status": "ok", "message": "memory resumed", **self.state()}

    async def start_profile(self) -> dict[str, Any]:
        await self.engine.start_profile()
        return {"status": "ok", "message": "profiling started"}

    async def stop_profile(self) -> dict[str, Any]:
        await self.engine.stop_profile()
        return {"status": "ok", "message": "profiling stopped"}


def _route(
    control: _EngineControl, action: Callable[[], Awaitable[dict[str, Any]]], name: str
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        try:
            await _read_body(request)
        except _BadBody as exc:
            return _error(400, str(exc))
        async with control.lock:
            try:
                body = await action()
            except NotImplementedError as exc:
                return _error(501, f"{name} is not supported by this engine: {exc}")
            except Exception as exc:
                log.exception("engine route failed", extra={"route": name})
                return _error(500, f"{name} failed: {type(exc).__name__}: {exc}")
        log.info("engine route", extra={"route": name, **control.state()})
        return web.json_response(body)

    return handler


def _flush_route(control: _EngineControl) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        try:
            await _read_body(request)
        except _BadBody as exc:
            return _error(400, str(exc), flushed=False)
        busy = "requests are in flight; retry when the engine is idle"
        async with control.lock:
            engine = control.engine
            try:
                active = engine.num_active_requests()
                if active:
                    return _error(409, f"{active} {busy}", flushed=False)
                # The engine checks again: a request may arrive between the two.
                flushed = await engine.flush_cache()
            except NotImplementedError as exc:
                return _error(501, f"flush_cache is not supported: {exc}", flushed=False)
            except Exception as exc:
                log.exception("engine route failed", extra={"route": "flush_cache"})
                return _error(
                    500, f"flush_cache failed: {type(exc).__name__}: {exc}", flushed=False
                )
        if not flushed:
            return _error(409, busy, flushed=False)
        return web.json_response({"status": "ok", "flushed": True, "message": "cache flushed"})

    return handler


def _kv_cache_route(engine: Engine) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        del request
        contents = getattr(engine, "kv_cache_contents", None)
        if not callable(contents):
            return _error(501, "this engine cannot list its KV cache (the simulated one can)")
        try:
            body = contents()
        except Exception as exc:
            log.exception("engine route failed", extra={"route": "kv_cache"})
            return _error(500, f"kv_cache failed: {type(exc).__name__}: {exc}")
        return web.json_response({"status": "ok", **body})

    return handler


def register_engine_routes(
    system: SystemServer,
    engine: Engine,
    *,
    leave: Callable[[], Awaitable[None]],
    rejoin: Callable[[], Awaitable[None]],
) -> list[str]:
    """Add the ``POST /engine/*`` routes (and ``GET /engine/kv_cache``); returns the POST
    routes' paths (for help text and README).

    ``leave`` runs when the worker becomes paused or released (it should unregister the
    endpoint and suspend the canary), ``rejoin`` when it is neither any more (register the
    endpoint again and resume the canary). Add the routes before the server starts.
    """
    control = _EngineControl(engine, leave, rejoin)
    actions: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
        "start_profile": control.start_profile,
        "stop_profile": control.stop_profile,
        "pause_generation": control.pause_generation,
        "continue_generation": control.continue_generation,
        "release_memory_occupation": control.release_memory_occupation,
        "resume_memory_occupation": control.resume_memory_occupation,
    }
    system.add_route("POST", "/engine/flush_cache", _flush_route(control))
    for name, action in actions.items():
        system.add_route("POST", f"/engine/{name}", _route(control, action, name))
    system.add_route("GET", "/engine/kv_cache", _kv_cache_route(engine))
    return list(ENGINE_ROUTES)
