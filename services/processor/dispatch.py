"""Sending a preprocessed request to workers and streaming back their output, with migration.

One :meth:`Dispatcher.run` call serves one :class:`PreprocessedRequest` (one prompt, ``n``
choices) and yields *batches* of :class:`EngineOutput`: everything that arrived while the
reader was busy comes as one batch, so the HTTP side writes one SSE event per batch rather
than per token.

Aggregated: pick a worker, send, stream. Disaggregated (the model has prefill and decode
workers): pick one of each, draw a bootstrap room on the prefill worker's chosen DP rank
(``room % dp_size == dp_rank``), send the prefill leg (one token) and at once the decode leg
carrying the same ``bootstrap_info``; the prefill leg is read in the background. Either leg
failing fails the other: a decode leg whose prefill died would otherwise wait for SGLang's
bootstrap timeout, and a prefill whose decode died would hold its KV until the transfer
times out.

Migration: when an attempt fails with a retryable error (the worker died, left, stopped, was
overloaded, or NATS dropped the stream), the request is sent again to another worker with the
tokens generated so far appended to the prompt and the token budget reduced by as many. The
reader sees one uninterrupted stream. Two kinds of failure are told apart:

- a worker that took the request and then failed it (died, drained, overloaded) costs one of
  ``migration_limit`` attempts: a request that kills every worker it reaches must stop;
- a blip of the transport (NATS down or just back, nobody on a subject yet, every instance
  briefly out of routing after a reconnect) costs no attempt: the request waits, with backoff,
  for the transport to come back, within ``migration_budget`` seconds from the first failure.
  So a NATS restart of a few seconds fails nothing, while a mesh with no worker for the role
  (the only prefill killed) still answers 503 at once.

A disaggregated request whose prefill worker dies during the prefill or the KV transfer (the
decode engine then aborts, waiting for KV that never comes) is re-run on another prefill
worker, as long as no token reached the client. A request carries one
choice (the processor fans ``n > 1`` out into single-choice requests): several choices could
not be resumed as one prompt. Nor can a request with constrained output (a guide) once it
has output: the grammar's state is on the failed worker, so it fails with a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from proto.discovery import WorkerType
from proto.plane import ErrorBody, ErrorCode
from proto.request import BootstrapInfo, PreprocessedRequest, RoutingHints
from proto.response import EngineOutput, FinishReason, KvCacheHit, PromptTokensDetails
from services.processor import metrics
from services.processor.models import ServedModel, WorkerPool
from shared.router import (
    ActiveRequest,
    KvRouter,
    LoadTracker,
    RouterMode,
    Selector,
    WorkerCandidate,
)
from shared.router.bootstrap import choose_bootstrap_room
from shared.router.hashing import block_hashes
from shared.runtime import (
    DistributedRuntime,
    InvalidRequestError,
    MeshError,
    NoInstancesError,
    ResponseStream,
)
from shared.runtime.errors import RemoteError, ResponderDeadError

__all__ = ["RETRY_PAUSE", "Dispatcher", "NoWorkersError", "exhausted", "with_retries"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BLOCK_SIZE = 16
RETRY_PAUSE = 0.05
_BLIP_BACKOFF_MAX = 1.0
# Failures that say nothing about the worker, only about the transport or discovery.
_BLIP_CODES = (ErrorCode.TRANSPORT, ErrorCode.NO_RESPONDERS)
_ABORTED = (FinishReason.CANCELLED, FinishReason.ERROR)


class NoWorkersError(NoInstancesError):
    """No live worker can take the request (all left, or none registered for the role)."""


@dataclass
class _Progress:
    """What the reader has received so far, across attempts."""

    generated: list[int] = field(default_factory=list)
    excluded: set[int] = field(default_factory=set)


class Dispatcher:
    def __init__(
        self,
        *,
        mode: RouterMode,
        migration_limit: int,
        busy_threshold: float | None = None,
        tracker: LoadTracker | None = None,
        kv_router: KvRouter | None = None,
        runtime: DistributedRuntime | None = None,
        migration_budget: float = 10.0,
    ) -> None:
        self.runtime = runtime
        self.migration_budget = migration_budget
        self.tracker = kv_router.tracker if kv_router is not None else (tracker or LoadTracker())
        # KV-aware placement of aggregated requests and prefill legs; decode legs and every
        # other mode go through the load-only selectors.
        self.kv_router = kv_router
        self.mode = mode
        self.migration_limit = migration_limit
        self.busy_threshold = busy_threshold
        self._selectors: dict[tuple[str, WorkerType], Selector] = {}

    def selector(self, model: str, role: WorkerType) -> Selector:
        key = (model, role)
        selector = self._selectors.get(key)
        if selector is None:
            selector = self._selectors[key] = Selector(
                self.mode, self.tracker, busy_threshold=self.busy_threshold
            )
        return selector

    def check_capacity(self, model: ServedModel) -> None:
        """Raise ``BusyError`` now if every worker that would serve ``model`` is busy."""
        role = WorkerType.DECODE if model.disaggregated else WorkerType.AGGREGATED
        pool = model.pool(role)
        if pool is None:
            return
        candidates = pool.candidates()
        router = self.kv_router
        if router is not None and role is WorkerType.AGGREGATED:
            if candidates and all(router.is_busy(c) for c in candidates):
                router.select(candidates, block_size=1, hashes=(), prompt_tokens=0)  # raises
            return
        selector = self.selector(model.name, role)
        if candidates and all(selector.is_busy(c) for c in candidates):
            selector.select(candidates)  # raises BusyError with the message

    async def run(
        self, model: ServedModel, request: PreprocessedRequest, index: int = 0
    ) -> AsyncGenerator[tuple[int, list[EngineOutput]], None]:
        """Batches of the request's output, each tagged with ``index`` (the caller's choice
        number: tagging here saves a generator layer per token on the hot path)."""
        if (request.sampling_options.n or 1) != 1:
            raise InvalidRequestError("a dispatched request carries one choice: fan n > 1 out")
        limit = self.migration_limit
        progress = _Progress()
        attempt = 0
        first_failure: float | None = None
        backoff = RETRY_PAUSE
        # Chosen once: a retry after the decode pool vanished must say so, not fall back to
        # an aggregated pool the model never had.
        disaggregated = model.disaggregated
        guided = request.sampling_options.guided_decoding is not None
        while True:
            current = _continuation(request, progress.generated)
            try:
                if disaggregated:
                    stream = self._disaggregated(model, current, progress)
                else:
                    stream = self._aggregated(model, current, progress)
                generated = progress.generated
                async for batch in stream:
                    for out in batch:
                        generated.extend(out.token_ids)
                    yield index, batch
                return
            except MeshError as exc:
                if guided and progress.generated and exc.retryable:
                    # The grammar's state lives on the failed worker: resent with its output
                    # as prompt, the request would start a fresh grammar mid-output.
                    raise RemoteError(
                        ErrorBody(
                            code=exc.code,
                            message="a request with constrained output (response_format, "
                            "regex, ...) cannot migrate after its first token: "
                            f"{exc.message}",
                            retryable=False,
                        )
                    ) from exc
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                if self._is_blip(exc):
                    remaining = self.migration_budget - (now - first_failure)
                    if remaining <= 0 or (limit == 0 and not progress.generated and attempt):
                        raise exhausted(exc, attempt, waited=now - first_failure) from exc
                    metrics.migrations.labels(model.name, exc.code.value).inc()
                    log.info(
                        "waiting for the transport",
                        extra={"model": model.name, "error": exc.code.value,
                               "reason": exc.message, "remaining_s": round(remaining, 2)},
                    )  # fmt: skip
                    await self._wait_transport(min(backoff, remaining))
                    backoff = min(backoff * 2, _BLIP_BACKOFF_MAX)
                    continue
                if not exc.retryable or attempt >= limit or isinstance(exc, NoWorkersError):
                    if attempt and exc.retryable:
                        raise exhausted(exc, attempt) from exc
                    raise
                attempt += 1
                metrics.migrations.labels(model.name, exc.code.value).inc()
                # A short pause: an overloaded or restarting mesh is not helped by a retry storm.
                await asyncio.sleep(RETRY_PAUSE * (attempt - 1))
                log.info(
                    "migrating request",
                    extra={
                        "model": model.name,
                        "attempt": attempt,
                        "error": exc.code.value,
                        "reason": exc.message,
                        "generated": len(progress.generated),
                    },
                )

    def _is_blip(self, exc: MeshError) -> bool:
        """A failure of the transport or discovery, not of a worker (see the module doc)."""
        runtime = self.runtime
        if runtime is None:
            return False
        if isinstance(exc, NoWorkersError):
            # No live worker: a blip only while NATS is down or just back (instances are
            # resubscribing); otherwise the role has no worker and the answer is a fast 503.
            return runtime.reconnected_within(self.migration_budget)
        return exc.code in _BLIP_CODES

    async def _wait_transport(self, pause: float) -> None:
        """Wait for NATS to be connected (up to ``pause``), or ``pause`` when it is."""
        runtime = self.runtime
        if runtime is not None and not runtime.nats.is_connected:
            await runtime.wait_connected(pause)
            return
        await asyncio.sleep(pause)

    # -- aggregated ----------------------------------------------------------------------------

    async def _aggregated(
        self, model: ServedModel, request: PreprocessedRequest, progress: _Progress
    ) -> AsyncIterator[list[EngineOutput]]:
        pool = _require(model, WorkerType.AGGREGATED)
        chosen, rank, active = self._place(model, pool, progress, request.token_ids)
        if rank is not None:
            request = msgspec.structs.replace(
                request,
                routing=RoutingHints(backend_instance_id=chosen.instance_id, dp_rank=rank),
            )
        stream: ResponseStream | None = None
        try:
            assert pool.client is not None
            stream = await pool.client.generate(
                request, instance_id=chosen.instance_id, response_type=EngineOutput
            )
            async for first in stream:
                rest = stream.ready()
                batch = [first, *rest] if rest else [first]
                active.add_tokens(sum(len(o.token_ids) for o in batch))
                yield batch
        except MeshError:
            progress.excluded.add(chosen.instance_id)
            raise
        finally:
            active.finish()
            if stream is not None:
                await stream.aclose()

    # -- disaggregated -------------------------------------------------------------------------

    async def _disaggregated(
        self, model: ServedModel, request: PreprocessedRequest, progress: _Progress
    ) -> AsyncIterator[list[EngineOutput]]:
        prefill_pool = _require(model, WorkerType.PREFILL)
        decode_pool = _require(model, WorkerType.DECODE)
        prefill, prefill_rank, prefill_active = self._place(
            model, prefill_pool, progress, request.token_ids
        )
        try:
            decode, _, decode_active = self._place(model, decode_pool, progress, request.token_ids)
        except BaseException:
            prefill_active.finish()
            raise
        rank = (
            prefill_rank
            if prefill_rank is not None
            else self.selector(model.name, WorkerType.PREFILL).dp_rank(prefill)
        )
        record = prefill_pool.record(prefill.instance_id)
        rc = record.runtime_config if record is not None else None
        bootstrap: BootstrapInfo | None = None
        if rc is not None and rc.bootstrap_host and rc.bootstrap_port is not None:
            room = choose_bootstrap_room(rank - prefill.dp_start, prefill.dp_size)
            bootstrap = BootstrapInfo(
                bootstrap_host=rc.bootstrap_host,
                bootstrap_port=rc.bootstrap_port,
                bootstrap_room=room,
            )
        prefill_req = msgspec.structs.replace(
            request,
            stop_conditions=msgspec.structs.replace(request.stop_conditions, max_tokens=1),
            bootstrap_info=bootstrap,
            routing=RoutingHints(backend_instance_id=prefill.instance_id, dp_rank=rank),
        )
        prefill_stream: ResponseStream | None = None
        decode_stream: ResponseStream | None = None
        prefill_task: asyncio.Task[KvCacheHit | None] | None = None
        failed: MeshError | None = None
        try:
            assert prefill_pool.client is not None and decode_pool.client is not None
            try:
                prefill_stream = await prefill_pool.client.generate(
                    prefill_req, instance_id=prefill.instance_id, response_type=EngineOutput
                )
                if bootstrap is None:
                    # The prefill worker did not advertise its bootstrap server: it names it in
                    # its first chunk.
                    bootstrap = await _bootstrap_from_first_chunk(prefill_stream)
            except MeshError:
                progress.excluded.add(prefill.instance_id)
                raise
            decode_req = msgspec.structs.replace(
                request,
                bootstrap_info=bootstrap,
                routing=RoutingHints(
                    backend_instance_id=decode.instance_id,
                    prefill_worker_id=prefill.instance_id,
                    prefill_dp_rank=rank,
                ),
            )
            try:
                decode_stream = await decode_pool.client.generate(
                    decode_req, instance_id=decode.instance_id, response_type=EngineOutput
                )
            except MeshError:
                progress.excluded.add(decode.instance_id)
                raise

            def on_prefill_failure(error: MeshError) -> None:
                nonlocal failed
                failed = error
                progress.excluded.add(prefill.instance_id)
                assert decode_stream is not None
                decode_stream.abort(error)

            prefill_task = asyncio.create_task(
                _read_prefill(prefill_stream, on_prefill_failure, prefill_active.finish)
            )
            yielded = False
            try:
                async for first in decode_stream:
                    rest = decode_stream.ready()
                    batch = [first, *rest] if rest else [first]
                    if not yielded and any(o.finish_reason in _ABORTED for o in batch):
                        # The decode engine gave up before the first token: if the prefill
                        # died meanwhile, the request runs again on another prefill worker.
                        await self._check_prefill(prefill.instance_id, prefill_task, progress)
                    decode_active.add_tokens(sum(len(o.token_ids) for o in batch))
                    if prefill_task.done() and not prefill_task.cancelled():
                        hit = prefill_task.result()
                        if hit is not None:
                            _set_cached(batch, hit.reused_tokens)
                    yielded = True
                    yield batch
            except MeshError as exc:
                if failed is None or exc is not failed:
                    progress.excluded.add(decode.instance_id)
                raise
        finally:
            prefill_active.finish()
            decode_active.finish()
            if prefill_task is not None and not prefill_task.done():
                prefill_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await prefill_task
            for stream in (decode_stream, prefill_stream):
                if stream is not None:
                    await stream.aclose()

    async def _check_prefill(
        self,
        prefill_id: int,
        prefill_task: asyncio.Task[KvCacheHit | None],
        progress: _Progress,
    ) -> None:
        """Raise a retryable error if the prefill leg failed or its worker is dead."""
        with contextlib.suppress(TimeoutError, Exception):
            await asyncio.wait_for(asyncio.shield(prefill_task), 0.5)
        failed = (
            prefill_task.done()
            and not prefill_task.cancelled()
            and (prefill_task.exception() is not None or prefill_id in progress.excluded)
        )
        if not failed and self.runtime is not None:
            failed = await self.runtime.probe(prefill_id) is False
            if failed:
                self.runtime.declare_dead(prefill_id, "prefill worker gone during the transfer")
        if failed:
            progress.excluded.add(prefill_id)
            raise ResponderDeadError(
                f"prefill worker {prefill_id:x} died during the prefill or the KV transfer"
            )

    # -- helpers -------------------------------------------------------------------------------

    def _place(
        self,
        model: ServedModel,
        pool: WorkerPool,
        progress: _Progress,
        token_ids: list[int],
    ) -> tuple[WorkerCandidate, int | None, ActiveRequest]:
        """Choose a worker (and, KV-aware, its DP rank) and charge the request to it."""
        router = self.kv_router
        if router is None or pool.role is WorkerType.DECODE:
            chosen = self._choose(model, pool, progress)
            block = _block_size(pool, chosen.instance_id)
            return chosen, None, self.tracker.begin(chosen.instance_id, len(token_ids), block)
        candidates = pool.candidates()
        if not candidates:
            raise NoWorkersError(f"no live {pool.role.value} workers for model {model.name!r}")
        block = _block_size(pool, candidates[0].instance_id)
        # Hashed once, for the cache lookup and for counting shared prefix blocks once.
        hashes = block_hashes(token_ids, block)
        decision = router.select(
            candidates,
            block_size=block,
            hashes=hashes,
            prompt_tokens=len(token_ids),
            exclude=progress.excluded,
        )
        chosen = next(c for c in candidates if c.instance_id == decision.instance_id)
        metrics.routing_decisions.labels(
            model.name, pool.role.value, f"{chosen.instance_id:x}"
        ).inc()
        if token_ids:
            metrics.kv_overlap.labels(model.name).observe(
                min(decision.overlap_blocks * block / len(token_ids), 1.0)
            )
        return chosen, decision.dp_rank, router.begin(decision, len(token_ids), block, hashes)

    def _choose(self, model: ServedModel, pool: WorkerPool, progress: _Progress) -> WorkerCandidate:
        candidates = pool.candidates()
        if not candidates:
            raise NoWorkersError(f"no live {pool.role.value} workers for model {model.name!r}")
        chosen = self.selector(model.name, pool.role).select(candidates, progress.excluded)
        metrics.routing_decisions.labels(
            model.name, pool.role.value, f"{chosen.instance_id:x}"
        ).inc()
        return chosen


async def _bootstrap_from_first_chunk(stream: ResponseStream) -> BootstrapInfo:
    async for out in stream:
        params = out.disaggregated_params
        if params:
            try:
                return msgspec.convert(params, BootstrapInfo)
            except msgspec.ValidationError as exc:
                raise _handler_error(f"prefill worker sent invalid bootstrap info: {exc}") from None
        break
    raise _handler_error("prefill worker did not send bootstrap info")


async def _read_prefill(
    stream: ResponseStream,
    on_failure: Callable[[MeshError], None],
    on_done: Callable[[], None],
) -> KvCacheHit | None:
    hit: KvCacheHit | None = None
    try:
        async for out in stream:
            found = out.kv_cache_hit()
            if found is not None:
                hit = found
    except MeshError as exc:
        log.info("prefill leg failed", extra={"error": exc.code.value, "reason": exc.message})
        on_failure(exc)
        return None
    finally:
        on_done()
    return hit


def _set_cached(batch: list[EngineOutput], cached: int) -> None:
    for out in batch:
        usage = out.completion_usage
        if usage is not None:
            usage.prompt_tokens_details = PromptTokensDetails(cached_tokens=cached)


def _continuation(request: PreprocessedRequest, generated: list[int]) -> PreprocessedRequest:
    if not generated:
        return request
    stop = request.stop_conditions
    done = len(generated)
    return msgspec.structs.replace(
        request,
        token_ids=[*request.token_ids, *generated],
        stop_conditions=msgspec.structs.replace(
            stop,
            max_tokens=None if stop.max_tokens is None else max(stop.max_tokens - done, 1),
            min_tokens=None if stop.min_tokens is None else max(stop.min_tokens - done, 0),
        ),
    )


def _require(model: ServedModel, role: WorkerType) -> WorkerPool:
    pool = model.pool(role)
    if pool is None:
        raise NoWorkersError(f"no {role.value} workers for model {model.name!r}")
    return pool


def _block_size(pool: WorkerPool, instance_id: int) -> int:
    card = pool.cards.get(instance_id)
    if card is not None and card.kv_cache_block_size:
        return card.kv_cache_block_size
    return DEFAULT_BLOCK_SIZE


def _handler_error(message: str) -> MeshError:
    return MeshError(message, code=ErrorCode.HANDLER_ERROR)


@contextlib.asynccontextmanager
async def worker_stream(
    pool: WorkerPool,
    instance_id: int,
    request: Any,
    response_type: Any,
    excluded: set[int],
    active: ActiveRequest,
) -> AsyncIterator[ResponseStream]:
    """One idempotent call to one worker (an embedding, an image encode), for
    :func:`with_retries`: a mesh failure excludes the worker from the next attempt, and the
    load bookkeeping and the stream end however the call ends."""
    stream = None
    try:
        assert pool.client is not None
        stream = await pool.client.generate(
            request, instance_id=instance_id, response_type=response_type
        )
        yield stream
    except MeshError:
        excluded.add(instance_id)
        raise
    finally:
        active.finish()
        if stream is not None:
            await stream.aclose()


async def with_retries(
    send: Callable[[set[int]], Awaitable[T]], *, limit: int, label: str, what: str
) -> T:
    """``send(excluded)`` until it succeeds: after a retryable failure (the worker died, left,
    was overloaded) again, up to ``limit`` times, where ``send`` avoids the workers in
    ``excluded`` (it adds the one that failed). For idempotent work -- embeddings, image
    encodes -- which a new worker simply does again. ``label`` is the migrations metric's
    model label."""
    excluded: set[int] = set()
    attempt = 0
    while True:
        try:
            return await send(excluded)
        except MeshError as exc:
            if not exc.retryable or attempt >= limit:
                if attempt and exc.retryable:
                    raise exhausted(exc, attempt) from exc
                raise
            attempt += 1
            metrics.migrations.labels(label, exc.code.value).inc()
            log.info(
                f"retrying {what} on another worker",
                extra={"model": label, "attempt": attempt, "error": exc.code.value,
                       "reason": exc.message},
            )  # fmt: skip
            await asyncio.sleep(RETRY_PAUSE * (attempt - 1))


def exhausted(exc: MeshError, attempts: int, *, waited: float | None = None) -> MeshError:
    """The last retryable failure, made final: the caller must not retry it again."""
    if waited is not None:
        message = f"request failed after waiting {waited:.1f} s for the mesh: {exc.message}"
    else:
        message = f"request failed after {attempts} migration attempt(s): {exc.message}"
    return RemoteError(ErrorBody(code=exc.code, message=message, retryable=False))
