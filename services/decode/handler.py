"""The decode service's ``generate`` handler: an aggregated worker, or the decode leg of a
disaggregated pair.

A decode leg needs ``bootstrap_info`` (the processor sets it from the prefill leg) and serves
``n == 1`` only; ``shared.engine.mapping.to_generate_kwargs`` enforces both. An abort carrying
an HTTP status is mapped by ``OutputMapper`` (400 invalid request, 429/503 overloaded, else
engine error); a plain abort ends the stream with ``finish_reason == "cancelled"``, as the
reference's decode handler yields it. Cancellation follows ``shared.worker.handlers``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from proto.request import PreprocessedRequest
from proto.response import CompletionUsage, EngineOutput, FinishReason
from shared.engine.mapping import OutputMapper, to_generate_kwargs
from shared.engine.protocol import Engine
from shared.runtime.endpoint import Context
from shared.worker.handlers import (
    AGGREGATED,
    DECODE,
    EngineCall,
    WorkerMetricsHooks,
    cancel_kind,
    error_kind_of,
)

__all__ = ["DecodeHandler"]

log = logging.getLogger(__name__)


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
        call = EngineCall(self._engine, ctx.request_id)
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
