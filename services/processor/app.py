"""The processor's HTTP surface: the OpenAI API, health, metrics, OpenAPI.

Why aiohttp: its HTTP parser and writer are C (llhttp), it streams responses without an ASGI
message layer per write, it cancels a handler when its client disconnects
(``handler_cancellation``), which is what stops the worker downstream within milliseconds,
and it sets TCP_NODELAY on every connection, so a streamed token leaves at once.
``bench/serve.py`` measures the processor's CPU per request on this stack.

A streaming request reads its first batch of output *before* sending the response headers:
errors that happen before any token (no workers, busy, invalid for the worker) still get their
real HTTP status and an OpenAI error body. Errors after that arrive as an SSE ``error`` event.
Every batch of output that arrived together is written as one SSE event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from proto.embedding import EmbeddingRequest
from proto.openai import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelList,
    ModelObject,
    RequestError,
    decode_request,
    error_body,
)
from proto.plane import ErrorCode
from proto.request import PreprocessedRequest
from proto.response import EngineOutput
from services.processor import metrics
from services.processor.args import ProcessorFlags
from services.processor.connections import GuardedSite, server_ssl_context
from services.processor.dispatch import Dispatcher
from services.processor.embeddings import (
    EmbeddingDispatcher,
    embedding_response,
    tokenize_inputs,
)
from services.processor.fields import decode_openai
from services.processor.models import ModelRegistry, ServedModel
from services.processor.offload import OffloadBusy, Offloader
from services.processor.openapi import openapi_document
from services.processor.respond import (
    EngineFailure,
    FastChunks,
    OutputAssembler,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
)
from shared.http_auth import bearer_token, token_matches
from shared.router import BusyError
from shared.runtime import DistributedRuntime, MeshError

__all__ = ["ProcessorApp"]

log = logging.getLogger(__name__)

_JSON = "application/json"
_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_DONE = b"data: [DONE]\n\n"
# Bodies larger than this are decoded, templated and tokenized on the preprocessing threads.
_OFFLOAD_BYTES = 64 * 1024
_encode = msgspec.json.Encoder().encode

# Request-plane failures as HTTP statuses: the client's fault, a busy or absent worker
# (try again), or a fault on our side.
_STATUS_BY_CODE = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.OVERLOADED: 503,
    ErrorCode.NO_RESPONDERS: 503,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.RESPONDER_GONE: 503,
    ErrorCode.TRANSPORT: 503,
    ErrorCode.TIMEOUT: 504,
}


class _Failure(Exception):
    """An error to answer with: status, OpenAI body, extra headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type_: str | None = None,
        retry_after: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(status, message, param=param, type_=type_)
        self.headers = dict(headers or {})
        if retry_after is not None:
            self.headers["Retry-After"] = str(retry_after)

    def response(self) -> web.Response:
        return web.Response(
            body=self.body, status=self.status, content_type=_JSON, headers=self.headers
        )


class ProcessorApp:
    def __init__(
        self,
        flags: ProcessorFlags,
        runtime: DistributedRuntime,
        registry: ModelRegistry,
        dispatcher: Dispatcher,
        embedder: EmbeddingDispatcher | None = None,
    ) -> None:
        self.flags = flags
        self.runtime = runtime
        self.registry = registry
        self.dispatcher = dispatcher
        self.embedder = embedder or EmbeddingDispatcher(migration_limit=flags.migration_limit)
        self.inflight = 0
        # Engine requests of the HTTP requests in flight (prompts x n each): what
        # --max-inflight bounds.
        self.engine_inflight = 0
        self.offload = Offloader(flags.preprocess_threads, flags.preprocess_queue)
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._openapi: bytes | None = None
        self.port = flags.http_port
        self.app = web.Application(client_max_size=flags.max_body_bytes)
        add = self.app.router.add_route
        add("POST", "/v1/chat/completions", self.chat_completions)
        add("POST", "/v1/completions", self.completions)
        add("POST", "/v1/embeddings", self.embeddings)
        add("GET", "/v1/models", self.list_models)
        add("GET", "/v1/models/{model:.+}", self.get_model)
        add("GET", "/health", self.health)
        add("GET", "/live", self.live)
        add("GET", "/metrics", self.metrics)
        add("GET", "/openapi.json", self.openapi)
        self._known_paths = {r.get_info().get("path") for r in self.app.router.resources()}
        add("*", "/{tail:.*}", self.not_found)
        self._runner: web.AppRunner | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        # handler_cancellation: a client that disconnects cancels its handler, which cancels
        # the worker streams it reads.
        flags = self.flags
        ssl_context = (
            server_ssl_context(flags.tls_cert, flags.tls_key)
            if flags.tls_cert is not None and flags.tls_key is not None
            else None
        )
        self._runner = web.AppRunner(
            self.app,
            access_log=None,
            handler_cancellation=True,
            keepalive_timeout=flags.idle_timeout,
        )
        await self._runner.setup()
        site = GuardedSite(
            self._runner,
            flags.http_host,
            flags.http_port,
            header_timeout=flags.header_timeout,
            ssl_context=ssl_context,
            backlog=4096,
        )
        await site.start()
        self.port = site.port
        log.info(
            "HTTP server listening",
            extra={
                "host": flags.http_host,
                "port": self.port,
                "tls": ssl_context is not None,
                "api_keys": len(flags.api_key),
            },
        )
        if not flags.api_key:
            log.warning("no --api-key: /v1/* answers anyone who can reach this port")

    async def drain(self, grace: float) -> None:
        """Refuse new requests (503, /health not ready), let in-flight ones finish."""
        self.draining = True
        if self.inflight:
            log.info("draining HTTP requests", extra={"inflight": self.inflight, "grace": grace})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), timeout=max(grace, 0.0))

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.offload.close()

    def _authorize(self, request: web.Request) -> None:
        """401 unless the request carries one of the API keys (when any are set)."""
        keys = self.flags.api_key
        if keys and not token_matches(bearer_token(request.headers.get("Authorization")), keys):
            metrics.rejected.labels("unauthorized").inc()
            raise _Failure(
                401,
                "Missing or invalid API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    # -- small endpoints -----------------------------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        try:
            self._authorize(request)
        except _Failure as exc:
            return exc.response()
        data = [
            ModelObject(id=name, created=model.created)
            for name, model in self.registry.served_names()
        ]
        return web.Response(body=_encode(ModelList(data=data)), content_type=_JSON)

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        try:
            self._authorize(request)
            model = self.registry.lookup(name)
        except (RequestError, _Failure) as exc:
            return self._failure(exc).response()
        body = _encode(ModelObject(id=name, created=model.created))
        return web.Response(body=body, content_type=_JSON)

    async def health(self, request: web.Request) -> web.Response:
        models = sorted(name for name, _ in self.registry.served_names())
        ready = (
            bool(models)
            and not self.draining
            and self.runtime.nats.is_connected
            and not self.runtime.shutting_down
        )
        body = {
            "status": "healthy" if ready else "unhealthy",  # "draining" below
            "models": models,
            "inflight": self.inflight,
            "engine_inflight": self.engine_inflight,
            "nats": "connected" if self.runtime.nats.is_connected else "disconnected",
            "etcd": "healthy" if self.runtime.etcd.healthy else "unreachable",
        }
        if self.draining or self.runtime.shutting_down:
            body["status"] = "draining"
        return web.json_response(body, status=200 if ready else 503)

    async def live(self, request: web.Request) -> web.Response:
        if self.runtime.shutting_down and not self.draining:
            return web.json_response({"status": "shutting_down"}, status=503)
        return web.json_response({"status": "live"})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def openapi(self, request: web.Request) -> web.Response:
        if self._openapi is None:
            self._openapi = _encode(openapi_document())
        return web.Response(body=self._openapi, content_type=_JSON)

    async def not_found(self, request: web.Request) -> web.Response:
        if request.path in self._known_paths:
            return _Failure(
                405,
                f"Method {request.method} is not allowed on {request.path}",
                type_="invalid_request_error",
            ).response()
        return _Failure(404, f"Unknown path {request.path}").response()

    # -- generation ----------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat_completions", self._chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completions", self._completion)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "embeddings", self._embeddings)

    async def _serve(
        self,
        request: web.Request,
        endpoint: str,
        run: Callable[[web.Request, bytes, _Tracker], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        tracker = _Tracker(endpoint)
        try:
            self._authorize(request)
            if self.draining or self.runtime.shutting_down:
                metrics.rejected.labels("shutting_down").inc()
                raise _Failure(
                    503, "The server is shutting down", retry_after=self.flags.retry_after
                )
            if request.content_type != _JSON:
                # A browser may send a cross-site "simple" POST as text/plain without asking
                # first: only a JSON content type (which needs a CORS preflight) is taken.
                raise _Failure(
                    415,
                    f"Content-Type must be {_JSON}, got {request.content_type or 'none'!r}",
                )
            limit = self.flags.max_inflight
            if limit and self.engine_inflight >= limit:
                raise self._busy()
            self.inflight += 1
            self._idle.clear()
            try:
                body = await self._read_body(request)
                response = await run(request, body, tracker)
            finally:
                self.inflight -= 1
                if not self.inflight:
                    self._idle.set()
        except Exception as exc:
            # Every refusal and failure answers here, in the API's format: bad input, unknown
            # model, busy mesh, worker errors, and a bug too (logged), never aiohttp's
            # plain-text 500.
            failure = self._failure(exc)
            tracker.status = failure.status
            return failure.response()
        except asyncio.CancelledError:
            tracker.status = 499  # nginx's "client closed request"
            if tracker.model != "unknown":
                metrics.client_disconnects.labels(tracker.model).inc()
            raise
        else:
            if not tracker.status:  # a mid-stream failure already set its own
                tracker.status = response.status
            return response
        finally:
            tracker.finish()

    async def _read_body(self, request: web.Request) -> bytes:
        flags = self.flags
        try:
            async with asyncio.timeout(flags.body_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _Failure(
                413, f"Request body is larger than {flags.max_body_bytes} bytes"
            ) from None
        except TimeoutError:
            metrics.rejected.labels("body_timeout").inc()
            raise _Failure(
                408, f"The request body did not arrive within {flags.body_timeout:g} s"
            ) from None

    def _busy(self) -> _Failure:
        metrics.rejected.labels("max_inflight").inc()
        return _Failure(
            503,
            f"The server is busy ({self.engine_inflight} engine requests in flight); retry later",
            retry_after=self.flags.retry_after,
        )

    async def _prepare(self, large: bool, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` here, or on a preprocessing thread when the input is large."""
        if not large:
            return fn(*args)
        try:
            return await self.offload.run(fn, *args)
        except OffloadBusy as exc:
            metrics.rejected.labels("preprocess_queue").inc()
            raise _Failure(503, str(exc), retry_after=self.flags.retry_after) from None

    async def _chat(
        self, request: web.Request, body: bytes, tracker: _Tracker
    ) -> web.StreamResponse:
        large = len(body) > _OFFLOAD_BYTES
        req, ignored = await self._prepare(large, decode_openai, body, ChatCompletionRequest)
        _report_ignored(ignored, tracker.endpoint)
        model = self._model(req.model, tracker)
        pre = model.preprocessor
        assert pre is not None
        preq = await self._prepare(large, pre.preprocess_chat, req)
        return await self._generate(
            request, tracker, model, req, [preq], chat=True, logprobs=req.logprobs
        )

    async def _completion(
        self, request: web.Request, body: bytes, tracker: _Tracker
    ) -> web.StreamResponse:
        large = len(body) > _OFFLOAD_BYTES
        req, ignored = await self._prepare(large, decode_openai, body, CompletionRequest)
        _report_ignored(ignored, tracker.endpoint)
        model = self._model(req.model, tracker)
        pre = model.preprocessor
        assert pre is not None
        self._check_cost(len(req.prompts()) * (req.n or 1))
        preqs = await self._prepare(large, pre.preprocess_completion, req)
        echo = None
        if req.echo:
            n = req.n or 1
            texts = [
                p if isinstance(p, str) else pre.tokenizer.decode(p, req.skip_special_tokens)
                for p in req.prompts()
            ]
            echo = [text for text in texts for _ in range(n)]
        return await self._generate(
            request,
            tracker,
            model,
            req,
            preqs,
            chat=False,
            logprobs=req.logprobs is not None,
            echo=echo,
        )

    async def _embeddings(
        self, request: web.Request, body: bytes, tracker: _Tracker
    ) -> web.StreamResponse:
        req = decode_request(body, EmbeddingRequest)
        model = self._model(req.model, tracker, embedding=True)
        pre, info = model.preprocessor, model.embedding
        assert pre is not None and info is not None
        batches = await tokenize_inputs(pre, info, req)
        tracker.prompt_tokens = sum(map(len, batches))
        metrics.input_tokens.labels(model.name).observe(tracker.prompt_tokens)
        vectors = await self.embedder.embed(model, batches, req.dimensions)
        reply = embedding_response(req, req.model, vectors, tracker.prompt_tokens)
        return web.Response(body=_encode(reply), content_type=_JSON)

    def _check_cost(self, cost: int) -> None:
        """Refuse a request whose engine requests (prompts x n) can never be admitted."""
        limit = self.flags.max_inflight
        if limit and cost > limit:
            raise _Failure(
                400,
                f"This request needs {cost} engine requests (prompts x n), more than this "
                f"server runs at once ({limit}); split it",
                param="n",
            )

    def _model(self, name: str, tracker: _Tracker, *, embedding: bool = False) -> ServedModel:
        model = self.registry.lookup(name)
        if model.is_embedding != embedding:
            if embedding:
                message = (
                    f"Model {name!r} is not an embedding model; use /v1/chat/completions or "
                    "/v1/completions with it"
                )
            else:
                message = f"Model {name!r} is an embedding model; use /v1/embeddings with it"
            raise RequestError(message, param="model")
        tracker.bind(model.name)
        return model

    async def _generate(
        self,
        request: web.Request,
        tracker: _Tracker,
        model: ServedModel,
        req: ChatCompletionRequest | CompletionRequest,
        preqs: list[PreprocessedRequest],
        *,
        chat: bool,
        logprobs: bool,
        echo: list[str] | None = None,
    ) -> web.StreamResponse:
        pre = model.preprocessor
        assert pre is not None
        try:
            self.dispatcher.check_capacity(model)
        except BusyError as exc:
            metrics.rejected.labels("busy").inc()
            raise _Failure(503, str(exc), retry_after=self.flags.retry_after) from None
        with self._admitted(len(preqs) * (req.n or 1)):
            n = req.n or 1
            streams = _fan_out(preqs, n)
            tracker.prompt_tokens = sum(len(p.token_ids) for p in preqs)
            assembler = OutputAssembler(
                pre,
                [p.token_ids for p in streams],
                prompt_tokens=tracker.prompt_tokens,
                stop=req.stop_list(),
                logprobs=logprobs,
                keep_text=not req.stream,
                cache_owners=range(0, len(streams), n),
                skip_special_tokens=req.skip_special_tokens,
                include_stop=req.include_stop_str_in_output,
                echo=echo,
            )
            prefix = "chatcmpl-" if chat else "cmpl-"
            rid = prefix + uuid.uuid4().hex
            created = int(time.time())
            name = req.model
            run = self.dispatcher.run
            outputs = (
                run(model, streams[0])
                if len(streams) == 1
                else _merge([run(model, p, i) for i, p in enumerate(streams)])
            )
            async with contextlib.aclosing(outputs):
                # Errors before the first output propagate to `_serve`: a real HTTP status.
                first = await anext(outputs, None)
                if not req.stream:
                    return await self._unary(
                        outputs, first, assembler, tracker, rid, created, name, chat, logprobs
                    )
                return await self._stream(
                    request,
                    outputs,
                    first,
                    assembler,
                    tracker,
                    rid,
                    created,
                    name,
                    chat,
                    logprobs,
                    include_usage=req.include_usage(),
                )

    @contextlib.contextmanager
    def _admitted(self, cost: int) -> Iterator[None]:
        """Count a request's engine requests (prompts x n) against --max-inflight."""
        self._check_cost(cost)
        limit = self.flags.max_inflight
        if limit and self.engine_inflight + cost > limit:
            raise self._busy()
        self.engine_inflight += cost
        try:
            yield
        finally:
            self.engine_inflight -= cost

    def _failure(self, exc: BaseException) -> _Failure:
        if isinstance(exc, _Failure):
            return exc
        if isinstance(exc, BusyError):
            metrics.rejected.labels("busy").inc()
            return _Failure(503, str(exc), retry_after=self.flags.retry_after)
        if isinstance(exc, MeshError):
            status = _STATUS_BY_CODE.get(exc.code, 500)
            retry = self.flags.retry_after if status == 503 else None
            message = exc.message if status == 400 else f"{exc.message} ({exc.code.value})"
            return _Failure(status, message, retry_after=retry)
        if isinstance(exc, EngineFailure):
            return _Failure(500, str(exc))
        if isinstance(exc, RequestError):
            retry = self.flags.retry_after if exc.status == 503 else None
            return _Failure(
                exc.status, exc.message, param=exc.param, type_=exc.type, retry_after=retry
            )
        log.exception("request failed", exc_info=exc)
        return _Failure(500, f"Internal error: {type(exc).__name__}")

    async def _unary(
        self,
        outputs: AsyncGenerator[tuple[int, list[EngineOutput]], None],
        first: tuple[int, list[EngineOutput]] | None,
        assembler: OutputAssembler,
        tracker: _Tracker,
        rid: str,
        created: int,
        name: str,
        chat: bool,
        logprobs: bool,
    ) -> web.Response:
        item = first
        while item is not None:
            prompt, batch = item
            if assembler.feed(prompt, batch) and tracker.first_at is None:
                tracker.first_token()
            if assembler.done:
                break
            item = await anext(outputs, None)
        assembler.finish_all()
        tracker.done(assembler)
        build = chat_response if chat else completion_response
        body = _encode(build(rid, created, name, assembler, logprobs))
        return web.Response(body=body, content_type=_JSON)

    async def _stream(
        self,
        request: web.Request,
        outputs: AsyncGenerator[tuple[int, list[EngineOutput]], None],
        first: tuple[int, list[EngineOutput]] | None,
        assembler: OutputAssembler,
        tracker: _Tracker,
        rid: str,
        created: int,
        name: str,
        chat: bool,
        logprobs: bool,
        *,
        include_usage: bool,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        offsets = [0] * len(assembler.choices)
        fast = FastChunks(rid, created, name, chat=chat)

        def render(deltas: list[Any]) -> bytes:
            if len(deltas) == 1 and not logprobs:
                d = deltas[0]
                if not d.first and d.finish_reason is None:
                    offsets[d.index] += len(d.text)
                    return fast.text(d.index, d.text)
            if chat:
                chunk: Any = chat_chunk(rid, created, name, deltas, logprobs)
            else:
                chunk = completion_chunk(rid, created, name, deltas, logprobs, offsets)
            return b"data: " + _encode(chunk) + b"\n\n"

        try:
            try:
                item = first
                while item is not None:
                    prompt, batch = item
                    deltas = assembler.feed(prompt, batch)
                    if deltas:
                        tracker.tokens_written(sum(len(o.token_ids) for o in batch))
                        await response.write(render(deltas))
                    if assembler.done:
                        break
                    item = await anext(outputs, None)
                deltas = assembler.finish_all()
                tail = render(deltas) if deltas else b""
            except (ConnectionError, asyncio.CancelledError):
                raise
            except Exception as exc:
                failure = self._failure(exc)
                tracker.status = failure.status
                await response.write(b"data: " + failure.body + b"\n\n")
                await response.write_eof()
                return response
            if include_usage:
                usage_chunk: Any = (
                    chat_chunk(rid, created, name, [], False)
                    if chat
                    else completion_chunk(rid, created, name, [], False, offsets)
                )
                usage_chunk.usage = assembler.usage()
                tail += b"data: " + _encode(usage_chunk) + b"\n\n"
            await response.write(tail + _DONE)
            await response.write_eof()
        except ConnectionError:
            # The client left mid-stream; leaving the block closes the worker streams.
            tracker.status = 499
            metrics.client_disconnects.labels(tracker.model).inc()
            return response
        tracker.done(assembler)
        return response


class _Tracker:
    """Per-request metrics bookkeeping."""

    __slots__ = (
        "_itl",
        "arrived",
        "endpoint",
        "first_at",
        "last_at",
        "model",
        "prompt_tokens",
        "status",
    )

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.model = "unknown"
        self._itl: Any = None
        self.status = 0
        self.arrived = time.perf_counter()
        self.first_at: float | None = None
        self.last_at = 0.0
        self.prompt_tokens = 0

    def first_token(self) -> None:
        now = time.perf_counter()
        self.first_at = self.last_at = now
        metrics.time_to_first_token.labels(self.model).observe(now - self.arrived)

    def tokens_written(self, count: int) -> None:
        if self.first_at is None:
            self.first_token()
            return
        now = time.perf_counter()
        if count:
            itl = self._itl
            if itl is None:  # looked up once per request, not per write
                itl = self._itl = metrics.inter_token_latency.labels(self.model)
            itl.observe((now - self.last_at) / count)
        self.last_at = now

    def done(self, assembler: OutputAssembler) -> None:
        metrics.input_tokens.labels(self.model).observe(assembler.prompt_tokens)
        metrics.output_tokens.labels(self.model).observe(assembler.completion_tokens)
        cached = sum(assembler.cached_tokens.values())
        if cached:
            metrics.cached_tokens.labels(self.model).inc(cached)

    def bind(self, model: str) -> None:
        self.model = model
        metrics.inflight.labels(model).inc()

    def finish(self) -> None:
        if self.model != "unknown":
            metrics.inflight.labels(self.model).dec()
        metrics.requests.labels(self.model, self.endpoint, str(self.status or 500)).inc()
        metrics.request_duration.labels(self.model, self.endpoint).observe(
            time.perf_counter() - self.arrived
        )


_IGNORED_LABELS: set[str] = set()
_MAX_IGNORED_LABELS = 64  # client-chosen names: bound the metric's label values


def _report_ignored(fields: list[str], endpoint: str) -> None:
    """One warning per request naming the fields ignored, and the counter per field."""
    if not fields:
        return
    log.warning(
        "ignoring request fields no standard defines: %s",
        ", ".join(repr(f[:64]) for f in fields[:16]) + (" ..." if len(fields) > 16 else ""),
        extra={"endpoint": endpoint},
    )
    for field in fields:
        name = field[:64]
        if name not in _IGNORED_LABELS:
            if len(_IGNORED_LABELS) >= _MAX_IGNORED_LABELS:
                name = "other"
            else:
                _IGNORED_LABELS.add(name)
        metrics.ignored_fields.labels(name).inc()


def _fan_out(preqs: list[PreprocessedRequest], n: int) -> list[PreprocessedRequest]:
    """One single-choice request per choice: ``n > 1`` then works on every engine and every
    topology (disaggregated too), and each choice migrates on its own. A given seed becomes
    ``seed + i`` so the choices differ but stay reproducible."""
    if n == 1:
        return preqs
    out = []
    for preq in preqs:
        opts = preq.sampling_options
        for i in range(n):
            seed = (
                opts.seed
                if opts.seed is None or i == 0
                else (opts.seed + i + 2**63) % 2**64 - 2**63
            )
            out.append(
                msgspec.structs.replace(
                    preq, sampling_options=msgspec.structs.replace(opts, n=None, seed=seed)
                )
            )
    return out


async def _merge(
    streams: list[AsyncGenerator[tuple[int, list[EngineOutput]], None]],
) -> AsyncGenerator[tuple[int, list[EngineOutput]], None]:
    """The tagged batches of several streams, as they come."""
    queue: asyncio.Queue[tuple[int, list[EngineOutput] | BaseException | None]] = asyncio.Queue()

    async def pump(
        index: int, stream: AsyncGenerator[tuple[int, list[EngineOutput]], None]
    ) -> None:
        try:
            async for item in stream:
                await queue.put(item)
            await queue.put((index, None))
        except Exception as exc:
            await queue.put((index, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
