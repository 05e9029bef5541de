"""The prefill service's ``generate`` handler: the bootstrap chunk at once, then the prefill.

Prefill legs answer with the bootstrap triple before any engine work, so the processor can start
the decode leg while the prefill computes; the prefill's own output token is discarded (the
decode leg streams it), and the stream ends with the prefix-cache hit for the KV router. A
prefill whose engine request ends in an abort the caller did not ask for (the decode peer never
came and the KV transfer timed out, the transfer broke, ...) is a failure, not a quiet end: the
decode leg waiting on that room will not get its KV, so the caller must learn it. It is raised
as :class:`~shared.engine.mapping.EngineError` (``handler_error``, not retryable): the room
belongs to this worker's bootstrap server, so resending only the prefill elsewhere cannot
complete the decode leg already bound to it; the processor decides what to do with the whole
request. Cancellation follows ``shared.worker.handlers``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

from proto.request import PreprocessedRequest
from proto.response import KV_CACHE_HIT_KEY, EngineOutput
from shared.engine.mapping import DP_RANK_UNSET, EngineError, OutputMapper, to_generate_kwargs
from shared.engine.protocol import Engine
from shared.router.bootstrap import choose_bootstrap_room
from shared.runtime.endpoint import Context
from shared.worker.handlers import (
    PREFILL,
    EngineCall,
    WorkerMetricsHooks,
    abort_message,
    cancel_kind,
    error_kind_of,
)

__all__ = ["PrefillHandler"]

log = logging.getLogger(__name__)


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
        call = EngineCall(self._engine, ctx.request_id)
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
                    message = abort_message(meta.get("finish_reason"))
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
            error_kind = cancel_kind(ctx)
            await call.abort_and_drain()
            raise
        except BaseException as exc:
            error_kind = error_kind_of(exc)
            raise
        finally:
            await call.close()
            if metrics is not None:
                metrics.request_finished(self.role, error_kind)
