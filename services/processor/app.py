"""The processor's HTTP server: routes, lifecycle, and the pipeline every API request goes
through (API key, draining, content type, admission, body, error mapping).

Why aiohttp: its HTTP parser and writer are C (llhttp), it streams responses without an ASGI
message layer per write, it cancels a handler when its client disconnects
(``handler_cancellation``), which is what stops the worker downstream within milliseconds,
and it sets TCP_NODELAY on every connection, so a streamed token leaves at once.
``bench/serve.py`` measures the processor's CPU per request on this stack.

The handlers live by endpoint family in ``services/processor/routes/``; they get the
process-wide parts as one :class:`~services.processor.context.Serving` and each request as a
:class:`~services.processor.context.RequestContext`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from services.processor import metrics
from services.processor.admission import Admission
from services.processor.args import ProcessorFlags
from services.processor.connections import GuardedSite, server_ssl_context
from services.processor.context import RequestContext, Serving, authorize
from services.processor.dispatch import Dispatcher
from services.processor.embeddings import EmbeddingDispatcher
from services.processor.failures import JSON, Failure, failure_for
from services.processor.images import ImageEncoder, ImageLimits
from services.processor.models import ModelRegistry
from services.processor.offload import Offloader
from services.processor.routes import embeddings, generate
from services.processor.routes.info import InfoRoutes
from services.processor.tracking import RequestTracker
from shared.runtime import DistributedRuntime

__all__ = ["ProcessorApp"]

log = logging.getLogger(__name__)

Handler = Callable[[Serving, RequestContext], Awaitable[web.StreamResponse]]


class ProcessorApp:
    def __init__(
        self,
        flags: ProcessorFlags,
        runtime: DistributedRuntime,
        registry: ModelRegistry,
        dispatcher: Dispatcher,
        embedder: EmbeddingDispatcher | None = None,
        images: ImageEncoder | None = None,
    ) -> None:
        self.flags = flags
        self.runtime = runtime
        self.admission = Admission(flags.max_inflight, flags.retry_after)
        self.serving = Serving(
            flags=flags,
            runtime=runtime,
            registry=registry,
            dispatcher=dispatcher,
            embedder=embedder or EmbeddingDispatcher(migration_limit=flags.migration_limit),
            offload=Offloader(flags.preprocess_threads, flags.preprocess_queue),
            admission=self.admission,
            images=images
            or ImageEncoder(registry, ImageLimits(), migration_limit=flags.migration_limit),
        )
        self.port = flags.http_port
        self.app = web.Application(client_max_size=flags.max_body_bytes)
        known: set[str | None] = set()
        info = InfoRoutes(self.serving, known)
        add = self.app.router.add_route
        add("POST", "/v1/chat/completions", self._api("chat_completions", generate.chat))
        add("POST", "/v1/completions", self._api("completions", generate.completion))
        add("POST", "/v1/embeddings", self._api("embeddings", embeddings.embeddings))
        add("GET", "/v1/models", info.list_models)
        add("GET", "/v1/models/{model:.+}", info.get_model)
        add("GET", "/health", info.health)
        add("GET", "/live", info.live)
        add("GET", "/metrics", info.metrics)
        add("GET", "/openapi.json", info.openapi)
        known.update(r.get_info().get("path") for r in self.app.router.resources())
        add("*", "/{tail:.*}", info.not_found)
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
        admission = self.admission
        admission.draining = True
        if admission.inflight:
            log.info(
                "draining HTTP requests", extra={"inflight": admission.inflight, "grace": grace}
            )
            await admission.wait_idle(grace)

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.serving.offload.close()
        await self.serving.images.close()

    # -- the API pipeline ----------------------------------------------------------------------

    def _api(
        self, endpoint: str, handler: Handler
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def serve(request: web.Request) -> web.StreamResponse:
            return await self._serve(request, endpoint, handler)

        return serve

    async def _serve(
        self, request: web.Request, endpoint: str, handler: Handler
    ) -> web.StreamResponse:
        tracker = RequestTracker(endpoint)
        flags, admission = self.flags, self.admission
        try:
            authorize(flags, request)
            if admission.draining or self.runtime.shutting_down:
                metrics.rejected.labels("shutting_down").inc()
                raise Failure(503, "The server is shutting down", retry_after=flags.retry_after)
            if request.content_type != JSON:
                # A browser may send a cross-site "simple" POST as text/plain without asking
                # first: only a JSON content type (which needs a CORS preflight) is taken.
                raise Failure(
                    415,
                    f"Content-Type must be {JSON}, got {request.content_type or 'none'!r}",
                )
            admission.check_arrival()
            with admission.serving():
                body = await self._read_body(request)
                response = await handler(self.serving, RequestContext(request, body, tracker))
        except Exception as exc:
            # Every refusal and failure answers here, in the API's format: bad input, unknown
            # model, busy mesh, worker errors, and a bug too (logged), never aiohttp's
            # plain-text 500.
            failure = failure_for(exc, flags.retry_after)
            tracker.status = failure.status
            return failure.response()
        except asyncio.CancelledError:
            tracker.disconnected()
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
            raise Failure(
                413, f"Request body is larger than {flags.max_body_bytes} bytes"
            ) from None
        except TimeoutError:
            metrics.rejected.labels("body_timeout").inc()
            raise Failure(
                408, f"The request body did not arrive within {flags.body_timeout:g} s"
            ) from None
