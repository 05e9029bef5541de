"""The embedding worker's ``generate`` handler: one batch of inputs in, their vectors out.

Runs on either engine (the CPU sentence-embedding engine, or SGLang's ``--is-embedding``
engine on GPUs): both answer ``async_encode`` in SGLang's shape. The handler's own job:

- check the request against the model (count of inputs, ``dimensions`` allowed), so a bad
  request is an ``invalid_request`` error (the processor's 400), never a crash;
- Matryoshka truncation: the first ``dimensions`` values, re-normalised to unit length when
  the model's vectors are normalised (``EmbeddingInfo.normalized``);
- answer little-endian float32 bytes, in chunks of at most :data:`CHUNK_BYTES`, so no message
  on the request plane nears NATS's payload limit however large the batch.

Embeddings are idempotent: a worker that dies mid-request leaves nothing half-done, and the
processor simply sends the batch to another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

import numpy as np

from proto.discovery import EmbeddingInfo
from proto.embedding import EmbeddingOutput, PreprocessedEmbeddingRequest
from shared.runtime.endpoint import Context
from shared.runtime.errors import InvalidRequestError
from shared.worker.handlers import cancel_kind, error_kind_of

__all__ = [
    "CHUNK_BYTES",
    "MAX_INPUTS",
    "EmbeddingEngine",
    "EmbeddingHandler",
    "tracked",
    "truncate",
]

log = logging.getLogger(__name__)

# Largest payload of one answer chunk; NATS's default message limit is 1 MiB.
CHUNK_BYTES = 256 * 1024
# Inputs one request may carry: the processor splits larger batches before sending them.
MAX_INPUTS = 2048
ROLE = "embedding"


class EmbeddingEngine(Protocol):
    """What the handler needs of an engine: SGLang's ``async_encode``."""

    async def async_encode(
        self,
        *,
        prompt: str | list[str] | None = None,
        input_ids: list[list[int]] | None = None,
        rid: str | None = None,
    ) -> list[dict[str, Any]]: ...


class EmbeddingHooks(Protocol):
    """What the handler reports (``services.encode.metrics``)."""

    def request_started(self, role: str) -> None: ...

    def request_finished(self, role: str, error_kind: str | None) -> None: ...

    def embedded(self, inputs: int, tokens: int, seconds: float) -> None: ...


def truncate(
    vectors: np.ndarray[Any, np.dtype[np.float32]], dimensions: int, *, renormalize: bool
) -> np.ndarray[Any, np.dtype[np.float32]]:
    """Matryoshka: keep the first ``dimensions`` values of each row, re-normalised."""
    cut = np.ascontiguousarray(vectors[:, :dimensions])
    if renormalize:
        norms = np.linalg.norm(cut, axis=1, keepdims=True)
        cut = cut / np.maximum(norms, 1e-12)
    return cut.astype("<f4", copy=False)


class EmbeddingHandler:
    """``generate`` for an embedding worker (see the module docstring)."""

    def __init__(
        self,
        engine: EmbeddingEngine,
        info: EmbeddingInfo,
        *,
        model: str,
        metrics: EmbeddingHooks | None = None,
    ) -> None:
        self._engine = engine
        self._info = info
        self._model = model
        self._metrics = metrics

    async def generate(
        self, request: PreprocessedEmbeddingRequest, ctx: Context
    ) -> AsyncIterator[EmbeddingOutput]:
        metrics = self._metrics
        started = time.perf_counter()
        with tracked(metrics, ROLE, ctx):
            count = len(request)
            if count > MAX_INPUTS:
                raise InvalidRequestError(
                    f"{count} inputs in one request; a worker takes at most {MAX_INPUTS}"
                )
            problem = self._info.dimensions_error(self._model, request.dimensions)
            if problem is not None:
                raise InvalidRequestError(problem)
            rid = uuid.uuid4().hex
            if request.token_ids:
                results = await self._engine.async_encode(input_ids=request.token_ids, rid=rid)
            else:
                results = await self._engine.async_encode(prompt=request.texts, rid=rid)
            if len(results) != count:
                raise RuntimeError(f"the engine answered {len(results)} of {count} inputs")
            vectors = np.asarray([r["embedding"] for r in results], dtype="<f4")
            if request.dimensions is not None and request.dimensions != vectors.shape[1]:
                vectors = truncate(vectors, request.dimensions, renormalize=self._info.normalized)
            tokens = [int((r.get("meta_info") or {}).get("prompt_tokens") or 0) for r in results]
            if metrics is not None:
                metrics.embedded(count, sum(tokens), time.perf_counter() - started)
            if ctx.is_stopped():
                raise asyncio.CancelledError
            per_chunk = max(1, CHUNK_BYTES // max(vectors.shape[1] * 4, 1))
            for start in range(0, count, per_chunk):
                rows = vectors[start : start + per_chunk]
                yield EmbeddingOutput(
                    index=start,
                    embeddings=[row.tobytes() for row in rows],
                    prompt_tokens=sum(tokens[start : start + per_chunk]),
                )


@contextlib.contextmanager
def tracked(metrics: EmbeddingHooks | None, role: str, ctx: Context) -> Iterator[None]:
    """One request of an encode handler counted: started, then finished with the kind of
    error that ended it (a cancel as the caller's or the worker's), whatever happens inside."""
    if metrics is not None:
        metrics.request_started(role)
    error_kind: str | None = None
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        error_kind = cancel_kind(ctx)
        raise
    except BaseException as exc:
        error_kind = error_kind_of(exc)
        raise
    finally:
        if metrics is not None:
            metrics.request_finished(role, error_kind)
