"""What every LLM worker's request handler shares: one engine request's abort/drain/close
discipline, the metrics hooks, error kinds, and ``clear_kv_blocks``.

The handlers themselves live with their services (``services/decode/handler.py``,
``services/prefill/handler.py``); the request and stream mapping lives in
``shared.engine.mapping`` (one implementation for every engine). What is left here is the part
every worker needs: one fresh engine request id per mesh request, and making sure a request the
caller no longer wants stops costing engine capacity.

Cancellation. The runtime cancels the handler's task when the caller cancels or goes away
and, after the shutdown grace period, on shutdown; a handler may also find
``ctx.is_stopped()`` between two engine items, or be closed at a ``yield`` (the runtime
``aclose()``-s the generator). In every case the handler aborts the engine request by its
rid at once -- even before the first token, when the engine may have produced nothing yet --
then drains the engine stream for at most :data:`ABORT_DRAIN_SECONDS` so the engine delivers
its abort and frees the request's KV, and finally re-raises (``CancelledError``, or
``GeneratorExit`` when closed). Items that arrive after the stop are dropped. The runtime
turns the cancellation into the caller-visible outcome (nothing for a caller cancel, the
retryable ``shutting_down`` error on shutdown), so the handlers never send that themselves.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from shared.engine.mapping import EngineError
from shared.engine.protocol import Engine
from shared.runtime.endpoint import Context, StopReason
from shared.runtime.errors import (
    InvalidRequestError,
    MeshError,
    OverloadedError,
    ShuttingDownError,
)

__all__ = [
    "ABORT_DRAIN_SECONDS",
    "AGGREGATED",
    "DECODE",
    "PREFILL",
    "ClearKvBlocksHandler",
    "EngineCall",
    "WorkerMetricsHooks",
    "abort_message",
    "cancel_kind",
    "error_kind_of",
]

log = logging.getLogger(__name__)

# After an abort the engine normally ends the stream within a scheduler step; the bound keeps
# a wedged engine from holding a cancelled handler (and a shutting-down worker) forever.
ABORT_DRAIN_SECONDS = 1.0
# Metric roles; the same names as the worker roles in ``shared.worker.args`` (not imported:
# the handlers need none of the command-line machinery).
AGGREGATED = "aggregated"
DECODE = "decode"
PREFILL = "prefill"


class WorkerMetricsHooks(Protocol):
    """What the handlers report; ``shared.worker.metrics`` implements it with Prometheus.

    ``role`` is ``"aggregated"``, ``"decode"`` or ``"prefill"``. ``error_kind`` is ``None``
    for a request that finished normally, else one of ``"invalid_request"``,
    ``"overloaded"``, ``"engine_error"``, ``"engine_abort"`` (a decode stream the engine
    ended with ``finish_reason == "cancelled"`` though nobody cancelled it),
    ``"cancelled"`` (the caller cancelled or went away), ``"shutting_down"`` (stopped by the
    worker's shutdown), another request-plane error code, or ``"internal"`` (a bug).
    Every ``request_started`` is matched by exactly one ``request_finished``.
    """

    def request_started(self, role: str) -> None: ...

    def request_finished(self, role: str, error_kind: str | None) -> None: ...

    def first_token(self, seconds: float) -> None:
        """Time from the handler's start to the first chunk carrying tokens (decode legs)."""

    def inter_token(self, seconds: float) -> None:
        """Gap since the previous token chunk divided by this chunk's token count."""

    def tokens(self, prompt: int, cached: int, generated: int) -> None:
        """Once per request that finished with usage; a prefill leg reports ``generated=0``
        (its one token is streamed, and counted, by the decode leg)."""


def cancel_kind(ctx: Context) -> str:
    return "shutting_down" if ctx.stop_reason is StopReason.SHUTDOWN else "cancelled"


def error_kind_of(exc: BaseException) -> str:
    if isinstance(exc, InvalidRequestError):
        return "invalid_request"
    if isinstance(exc, OverloadedError):
        return "overloaded"
    if isinstance(exc, EngineError):
        return "engine_error"
    if isinstance(exc, ShuttingDownError):
        return "shutting_down"
    if isinstance(exc, MeshError):
        return exc.code.value
    return "internal"


def abort_message(raw: Any) -> str | None:
    """The message of an abort finish reason, or None if ``raw`` is not an abort."""
    if isinstance(raw, str):
        return "the engine aborted the request" if raw.startswith("abort") else None
    if isinstance(raw, Mapping) and str(raw.get("type") or "").startswith("abort"):
        return str(raw.get("message") or "the engine aborted the request")
    return None


class EngineCall:
    """One engine request: its rid, its stream, and the abort/drain/close discipline."""

    __slots__ = ("_engine", "_request_id", "exhausted", "rid", "stream")

    def __init__(self, engine: Engine, request_id: str) -> None:
        self._engine = engine
        self._request_id = request_id
        # SGLang's rids must be unique per engine; the mesh request id is only logged, as in
        # the reference (a retried or migrated request may reach the same engine again).
        self.rid = uuid.uuid4().hex
        self.stream: AsyncIterator[dict[str, Any]] | None = None
        self.exhausted = False

    def start(self, kwargs: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        self.stream = self._engine.async_generate(**kwargs)
        return self.stream

    def _abort(self) -> None:
        try:
            self._engine.abort_request(self.rid)
        except Exception:
            log.warning(
                "aborting the engine request failed",
                exc_info=True,
                extra={"request_id": self._request_id, "rid": self.rid},
            )

    async def abort_and_drain(self) -> None:
        """Abort now, then read the stream (discarding it) until it ends, for a bounded time."""
        if self.stream is None or self.exhausted:
            return
        self._abort()
        try:
            async with asyncio.timeout(ABORT_DRAIN_SECONDS):
                async for _ in self.stream:
                    pass
            self.exhausted = True
        except TimeoutError:
            log.warning(
                "the engine did not end an aborted request within %.1f s",
                ABORT_DRAIN_SECONDS,
                extra={"request_id": self._request_id, "rid": self.rid},
            )
        except Exception as exc:
            # The request is being dropped anyway; an engine that ends it with an error is
            # still an engine that ended it.
            self.exhausted = True
            log.debug(
                "aborted engine stream ended with %r",
                exc,
                extra={"request_id": self._request_id, "rid": self.rid},
            )

    async def close(self) -> None:
        """Release the stream. An engine request that may still run (an error or a bug
        interrupted the loop) is aborted first: aborting a finished rid is a no-op."""
        stream = self.stream
        if stream is None:
            return
        if not self.exhausted:
            self._abort()
        aclose = getattr(stream, "aclose", None)
        if aclose is None:
            return
        try:
            await aclose()
        except Exception:
            log.debug(
                "closing the engine stream failed",
                exc_info=True,
                extra={"request_id": self._request_id, "rid": self.rid},
            )


class ClearKvBlocksHandler:
    """``clear_kv_blocks``: drop the engine's prefix cache, only while it serves nothing.

    Refusing instead of waiting keeps the operation predictable: flushing under load would
    stall every running request's prefix and make the KV router's view wrong mid-flight.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    async def generate(
        self, request: dict[str, Any], ctx: Context
    ) -> AsyncIterator[dict[str, Any]]:
        del request  # the endpoint takes no parameters
        active = self._engine.num_active_requests()
        if active > 0:
            yield {
                "status": "error",
                "message": f"refusing to clear the KV cache: {active} requests active",
            }
            return
        try:
            flushed = await self._engine.flush_cache()
        except Exception as exc:
            log.warning("flush_cache failed", exc_info=True, extra={"request_id": ctx.request_id})
            yield {"status": "error", "message": f"clearing the KV cache failed: {exc}"}
            return
        if flushed:
            yield {"status": "success", "message": "cleared the KV cache (all cached blocks)"}
        else:
            yield {
                "status": "error",
                "message": "the engine refused to clear the KV cache (requests became active)",
            }
