"""What a request handler works with: the process-wide :class:`Serving` parts and the
per-request :class:`RequestContext`, instead of a long parameter list per handler."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from proto.openai import RequestError
from services.processor import metrics
from services.processor.admission import Admission
from services.processor.args import ProcessorFlags
from services.processor.dispatch import Dispatcher
from services.processor.embeddings import EmbeddingDispatcher
from services.processor.failures import Failure
from services.processor.images import ImageEncoder
from services.processor.models import ModelRegistry, ServedModel
from services.processor.offload import OffloadBusy, Offloader
from services.processor.tracking import RequestTracker
from shared.http_auth import bearer_token, token_matches
from shared.runtime import DistributedRuntime

__all__ = ["OFFLOAD_BYTES", "RequestContext", "Serving", "authorize"]

# Bodies larger than this are decoded, templated and tokenized on the preprocessing threads.
OFFLOAD_BYTES = 64 * 1024

T = TypeVar("T")


@dataclass(slots=True)
class RequestContext:
    """One HTTP request on its way through: the aiohttp request, its body, its metrics."""

    request: web.Request
    body: bytes
    tracker: RequestTracker

    @property
    def large(self) -> bool:
        return len(self.body) > OFFLOAD_BYTES


@dataclass(slots=True)
class Serving:
    """The processor's long-lived parts that request handlers use."""

    flags: ProcessorFlags
    runtime: DistributedRuntime
    registry: ModelRegistry
    dispatcher: Dispatcher
    embedder: EmbeddingDispatcher
    offload: Offloader
    admission: Admission
    images: ImageEncoder

    async def prepare(self, ctx: RequestContext, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` here, or on a preprocessing thread when the body is large."""
        if not ctx.large:
            return fn(*args)
        try:
            result: T = await self.offload.run(fn, *args)
        except OffloadBusy as exc:
            metrics.rejected.labels("preprocess_queue").inc()
            raise Failure(503, str(exc), retry_after=self.flags.retry_after) from None
        return result

    def model(self, name: str, tracker: RequestTracker, *, embedding: bool = False) -> ServedModel:
        """The served model ``name`` (404 unknown; 400 the wrong kind for the endpoint)."""
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


def authorize(flags: ProcessorFlags, request: web.Request) -> None:
    """401 unless the request carries one of the API keys (when any are set)."""
    keys = flags.api_key
    if keys and not token_matches(bearer_token(request.headers.get("Authorization")), keys):
        metrics.rejected.labels("unauthorized").inc()
        raise Failure(
            401,
            "Missing or invalid API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
