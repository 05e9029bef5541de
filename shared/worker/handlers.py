"""The LLM worker's request handlers: aggregated/decode generate, prefill generate, clear_kv_blocks.

Why they are thin: the request and stream mapping lives in ``shared.engine.mapping`` (one
implementation for both engines), so what is left here is the part only a worker can do --
one fresh engine request id per mesh request, the disaggregation handshake, and making sure a
request the caller no longer wants stops costing engine capacity.

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

Prefill legs (``PrefillHandler``) answer with the bootstrap triple before any engine work, so
the processor can start the decode leg while the prefill computes; the prefill's own output
token is discarded (the decode leg streams it), and the stream ends with the prefix-cache hit
for the KV router. A prefill whose engine request ends in an abort the caller did not ask for
(the decode peer never came and the KV transfer timed out, the transfer broke, ...) is a
failure, not a quiet end: the decode leg waiting on that room will not get its KV, so the
caller must learn it. It is raised as :class:`~shared.engine.mapping.EngineError`
(``handler_error``, not retryable): the room belongs to this worker's bootstrap server, so
resending only the prefill elsewhere cannot complete the decode leg already bound to it; the
processor decides what to do with the whole request. An abort carrying an HTTP status is
mapped by ``OutputMapper`` on both legs (400 invalid request, 429/503 overloaded, else engine
error). A decode leg follows the mapper for plain aborts too: the chunk ends with
``finish_reason == "cancelled"``, as the reference's decode handler yields it.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from proto.request import PreprocessedRequest
from proto.response import KV_CACHE_HIT_KEY, CompletionUsage, EngineOutput, FinishReason
from shared.engine.mapping import DP_RANK_UNSET, EngineError, OutputMapper, to_generate_kwargs
from shared.engine.protocol import Engine
from shared.router.bootstrap import MAX_BOOTSTRAP_ROOM, choose_bootstrap_room
from shared.runtime.endpoint import Context, StopReason
from shared.runtime.errors import (
    InvalidRequestError,
    MeshError,
    OverloadedError,
    ShuttingDownError,
)

__all__ = [
    "ABORT_DRAIN_SECONDS",
    "MAX_BOOTSTRAP_ROOM",
    "ClearKvBlocksHandler",
    "DecodeHandler",
    "PrefillHandler",
    "WorkerMetricsHooks",
    "choose_bootstrap_room",
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


def _cancel_kind(ctx: Context) -> str:
    return "shutting_down" if ctx.stop_reason is StopReason.SHUTDOWN else "cancelled"


def _error_kind(exc: BaseException) -> str:
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


def _abort_message(raw: Any) -> str | None:
    """The message of an abort finish reason, or None if ``raw`` is not an abort."""
    if isinstance(raw, str):
        return "the engine aborted the request" if raw.startswith("abort") else None
    if isinstance(raw, Mapping) and str(raw.get("type") or "").startswith("abort"):
        return str(raw.get("message") or "the engine aborted the request")
    return None


class _EngineCall:
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


class DecodeHandler:
    """``generate`` for an aggregated worker (``"null"``) or a disaggregated decode worker.

    A decode leg needs ``bootstrap_info`` (the processor sets it from the prefill leg) and
    serves ``n == 1`` only; ``to_generate_kwargs`` raises ``InvalidRequestError`` otherwise,
    which the runtime sends as a non-retryable ``invalid_request`` error.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        disaggregation_mode: str,
        skip_tokenizer_init: bool = False,
        metrics: WorkerMetricsHooks | None = None,
    ) -> None:
        if disaggregation_mode not in ("null", "decode"):
            raise ValueError(
                f"DecodeHandler serves disaggregation mode null or decode, not "
                f"{disaggregation_mode!r} (prefill legs use PrefillHandler)"
            )
        self._engine = engine
        self._mode = disaggregation_mode
        self._skip_tokenizer_init = skip_tokenizer_init
        self._metrics = metrics
        self.role = AGGREGATED if disaggregation_mode == "null" else DECODE

    async def generate(
        self, request: PreprocessedRequest, ctx: Context
    ) -> AsyncIterator[EngineOutput]:
        started = time.perf_counter()
        metrics = self._metrics
        if metrics is not None:
            metrics.request_started(self.role)
        error_kind: str | None = None
        call = _EngineCall(self._engine, ctx.request_id)
        try:
            kwargs = to_generate_kwargs(
                request,
                rid=call.rid,
                disaggregation_mode=self._mode,
                dp_rank=None,
                skip_tokenizer_init=self._skip_tokenizer_init,
            )
            mapper = OutputMapper(request, disaggregation_mode=self._mode)
            if ctx.is_stopped():
                raise asyncio.CancelledError
            log.debug(
                "generate", extra={"request_id": ctx.request_id, "rid": call.rid, "role": self.role}
            )
            # Per choice: when its last token chunk went out, and its final usage.
            last_token_at: dict[int, float] = {}
            final_usage: dict[int, CompletionUsage] = {}
            engine_cancelled = False
            async for item in call.start(kwargs):
                if ctx.is_stopped():
                    raise asyncio.CancelledError
                out = mapper.map(item)
                if out is None:
                    continue
                if metrics is not None:
                    n = len(out.token_ids)
                    if n:
                        now = time.perf_counter()
                        last = last_token_at.get(out.index)
                        if not last_token_at:
                            metrics.first_token(now - started)
                        elif last is not None:
                            metrics.inter_token((now - last) / n)
                        last_token_at[out.index] = now
                if out.finish_reason is not None:
                    engine_cancelled |= out.finish_reason is FinishReason.CANCELLED
                    if out.completion_usage is not None:
                        final_usage[out.index] = out.completion_usage
                yield out
            call.exhausted = True
            if engine_cancelled:
                error_kind = "engine_abort"
            if metrics is not None and final_usage:
                usages = list(final_usage.values())
                details = usages[0].prompt_tokens_details
                metrics.tokens(
                    usages[0].prompt_tokens,
                    (details.cached_tokens or 0) if details is not None else 0,
                    sum(u.completion_tokens for u in usages),
                )
        except (asyncio.CancelledError, GeneratorExit):
            error_kind = _cancel_kind(ctx)
            await call.abort_and_drain()
            raise
        except BaseException as exc:
            error_kind = _error_kind(exc)
            raise
        finally:
            await call.close()
            if metrics is not None:
                metrics.request_finished(self.role, error_kind)


class PrefillHandler:
    """``generate`` for a prefill worker: the bootstrap chunk at once, then the prefill.

    The bootstrap triple comes from ``request.bootstrap_info`` when the processor chose it
    (it does, to start the decode leg without waiting), else this worker's own
    ``bootstrap_host``/``bootstrap_port`` and a fresh room, on the routed DP rank if the
    request names one. Health checks send the fake host (``proto.request.FAKE_BOOTSTRAP_HOST``)
    in ``bootstrap_info``; it is passed through like any other and the engine then prefills
    without sending its KV anywhere.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        bootstrap_host: str,
        bootstrap_port: int,
        dp_size: int = 1,
        skip_tokenizer_init: bool = False,
        metrics: WorkerMetricsHooks | None = None,
    ) -> None:
        if dp_size < 1:
            raise ValueError("dp_size must be >= 1")
        if not 0 <= bootstrap_port <= 65535:
            raise ValueError(f"bootstrap_port {bootstrap_port} is not a TCP port")
        self._engine = engine
        self._host = bootstrap_host
        self._port = bootstrap_port
        self._dp_size = dp_size
        self._skip_tokenizer_init = skip_tokenizer_init
        self._metrics = metrics
        self.role = PREFILL

    def _bootstrap(self, request: PreprocessedRequest) -> tuple[str, int, int]:
        info = request.bootstrap_info
        if info is not None:
            return info.bootstrap_host, info.bootstrap_port, info.bootstrap_room
        rank = request.routing.dp_rank if request.routing is not None else None
        if rank == DP_RANK_UNSET:
            rank = None
        return self._host, self._port, choose_bootstrap_room(rank, self._dp_size)

    async def generate(
        self, request: PreprocessedRequest, ctx: Context
    ) -> AsyncIterator[EngineOutput]:
        metrics = self._metrics
        if metrics is not None:
            metrics.request_started(self.role)
        error_kind: str | None = None
        call = _EngineCall(self._engine, ctx.request_id)
        try:
            # Validate before announcing anything: an invalid request must not hand the
            # processor a bootstrap room that no prefill will ever fill. The mapping forces
            # max_new_tokens to 1 and rejects n != 1 for this mode.
            kwargs = to_generate_kwargs(
                request,
                rid=call.rid,
                disaggregation_mode="prefill",
                dp_rank=None,
                skip_tokenizer_init=self._skip_tokenizer_init,
            )
            host, port, room = self._bootstrap(request)
            kwargs.update(bootstrap_host=host, bootstrap_port=port, bootstrap_room=room)
            mapper = OutputMapper(request, disaggregation_mode="prefill")
            yield EngineOutput(
                token_ids=[],
                disaggregated_params={
                    "bootstrap_host": host,
                    "bootstrap_port": port,
                    "bootstrap_room": room,
                },
            )
            if ctx.is_stopped():
                raise asyncio.CancelledError
            log.debug(
                "prefill",
                extra={"request_id": ctx.request_id, "rid": call.rid, "bootstrap_room": room},
            )
            async for item in call.start(kwargs):
                if ctx.is_stopped():
                    raise asyncio.CancelledError
                # Raises for aborts carrying an HTTP status; a plain abort maps to nothing.
                out = mapper.map(item)
                if out is None:
                    meta = item.get("meta_info") or {}
                    message = _abort_message(meta.get("finish_reason"))
                    if message is not None:
                        raise EngineError(f"prefill failed: {message}")
                    continue
                hit = (out.engine_data or {}).get(KV_CACHE_HIT_KEY)
                if metrics is not None and isinstance(hit, Mapping):
                    metrics.tokens(
                        int(hit.get("prompt_tokens") or 0), int(hit.get("reused_tokens") or 0), 0
                    )
                yield out
            call.exhausted = True
        except (asyncio.CancelledError, GeneratorExit):
            error_kind = _cancel_kind(ctx)
            await call.abort_and_drain()
            raise
        except BaseException as exc:
            error_kind = _error_kind(exc)
            raise
        finally:
            await call.close()
            if metrics is not None:
                metrics.request_finished(self.role, error_kind)


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
