"""``POST /v1/embeddings``: check and tokenize the inputs, send them to embedding workers by
load, assemble the vectors in the encoding the client asked for.

Why the processor tokenizes (as for chat): every limit is known here, from the model card's
:class:`~proto.discovery.EmbeddingInfo`, so a bad request is a 400 naming the limit before any
worker is bothered, and ``usage.prompt_tokens`` is exact. Rules, as OpenAI's API has them
where it has one:

- ``input``: a string, a list of strings, a list of token ids or a list of lists; at most
  :data:`MAX_INPUTS` inputs (OpenAI's limit); no empty string; token ids within the model's
  vocabulary.
- An input longer than the model's limit (special tokens included) is a 400 naming the limit,
  unless ``truncate_prompt_tokens`` asks to cut it (``k``, or ``-1`` for the model's limit):
  text keeps its first tokens and the model's special tokens, as sentence-transformers
  truncates; token ids keep their first ``k``.
- ``dimensions``: Matryoshka truncation where the model allows it, else 400
  (``EmbeddingInfo.dimensions_error``).
- ``encoding_format``: ``float`` (JSON numbers) or ``base64`` (little-endian float32, what the
  worker sends anyway: one base64 call per vector).

Dispatch. A large batch is cut into parts of at most :data:`PART_INPUTS` inputs and
:data:`PART_TOKENS` tokens, sent at once, each to the least loaded embedding worker (the
processor's own count of what it has in flight there), so one big request uses every worker
and no message nears NATS's payload limit. Embeddings are idempotent: a part whose worker
fails with a retryable error (killed, gone, shutting down, overloaded) is sent to another
worker, up to ``--migration-limit`` times; the client sees one answer.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import struct
from collections.abc import Sequence

import msgspec

from proto.discovery import EmbeddingInfo, WorkerType
from proto.embedding import (
    EmbeddingData,
    EmbeddingOutput,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    PreprocessedEmbeddingRequest,
)
from proto.openai import RequestError
from services.processor import metrics
from services.processor.dispatch import with_retries, worker_stream
from services.processor.models import ServedModel, WorkerPool
from services.processor.preprocess import ModelPreprocessor
from shared.router import LoadTracker, RouterMode, Selector
from shared.runtime import MeshError, NoInstancesError

__all__ = [
    "MAX_INPUTS",
    "PART_INPUTS",
    "PART_TOKENS",
    "EmbeddingDispatcher",
    "embedding_response",
    "tokenize_inputs",
]

log = logging.getLogger(__name__)

MAX_INPUTS = 2048
PART_INPUTS = 256
PART_TOKENS = 16384
# Texts longer than this (in total) are tokenized on a thread, not on the event loop.
_INLINE_CHARS = 64 * 1024


# --------------------------------------------------------------------------------------------
# Preprocessing


def _texts_to_ids(pre: ModelPreprocessor, texts: Sequence[str]) -> list[list[int]]:
    tokenizer = pre.tokenizer
    if len(texts) == 1:
        return [tokenizer.encode(texts[0]).ids]
    return [e.ids for e in tokenizer.encode_batch(list(texts))]


def _truncate_text(pre: ModelPreprocessor, text: str, keep: int) -> list[int]:
    """The first tokens of ``text`` with the model's special tokens, ``keep`` in all."""
    tokenizer = pre.tokenizer
    encoding = tokenizer.encode(text, add_special_tokens=False)
    encoding.truncate(max(keep - tokenizer.num_special_tokens_to_add(False), 1))
    ids: list[int] = tokenizer.post_process(encoding).ids
    return ids


def _param(req: EmbeddingRequest, i: int) -> str:
    return "input" if isinstance(req.input, str) or len(req.input) == 1 else f"input[{i}]"


async def tokenize_inputs(
    pre: ModelPreprocessor, info: EmbeddingInfo, req: EmbeddingRequest
) -> list[list[int]]:
    """The request's inputs as token id lists, checked and (if asked) truncated; RequestError
    (400) naming the field otherwise."""
    limit = info.max_input_tokens
    keep = req.truncate_prompt_tokens
    if keep is not None:
        if keep == -1:
            keep = limit
        elif keep > limit:
            raise RequestError(
                f"truncate_prompt_tokens {keep} is more than model {pre.model!r}'s limit of "
                f"{limit} tokens per input",
                param="truncate_prompt_tokens",
            )
    texts = req.texts()
    if texts is not None:
        count = len(texts)
        _check_count(count)
        for i, text in enumerate(texts):
            if not text:
                raise RequestError("The input must not be an empty string", param=_param(req, i))
        if sum(map(len, texts)) > _INLINE_CHARS:
            batches = await asyncio.to_thread(_texts_to_ids, pre, texts)
        else:
            batches = _texts_to_ids(pre, texts)
        if keep is not None:
            for i, ids in enumerate(batches):
                if len(ids) > keep:
                    batches[i] = _truncate_text(pre, texts[i], keep)
    else:
        given = req.token_batches()
        assert given is not None
        _check_count(len(given))
        vocab = info.vocab_size or pre.vocab_size
        batches = []
        for i, ids in enumerate(given):
            low, high = min(ids), max(ids)
            if high >= vocab:
                raise RequestError(
                    f"Token id {high} is out of range for model {pre.model!r}'s vocabulary "
                    f"(size {vocab})",
                    param=_param(req, i),
                )
            del low  # the wire type already refuses negative ids
            batches.append(list(ids[:keep]) if keep is not None else list(ids))
    for i, ids in enumerate(batches):
        if len(ids) > limit:
            raise RequestError(
                f"{_param(req, i).capitalize()} has {len(ids)} tokens, over model "
                f"{pre.model!r}'s limit of {limit} tokens per input; shorten it, or set "
                "truncate_prompt_tokens to cut it",
                param=_param(req, i),
            )
    problem = info.dimensions_error(pre.model, req.dimensions)
    if problem is not None:
        raise RequestError(problem, param="dimensions")
    return batches


def _check_count(count: int) -> None:
    if count > MAX_INPUTS:
        raise RequestError(
            f"{count} inputs in one request; at most {MAX_INPUTS} are allowed", param="input"
        )


def _parts(batches: list[list[int]]) -> list[tuple[int, list[list[int]]]]:
    """(first index, inputs) parts of at most PART_INPUTS inputs and PART_TOKENS tokens."""
    parts: list[tuple[int, list[list[int]]]] = []
    start, tokens = 0, 0
    for i, ids in enumerate(batches):
        if i > start and (i - start >= PART_INPUTS or tokens + len(ids) > PART_TOKENS):
            parts.append((start, batches[start:i]))
            start, tokens = i, 0
        tokens += len(ids)
    parts.append((start, batches[start:]))
    return parts


# --------------------------------------------------------------------------------------------
# Dispatch


class EmbeddingDispatcher:
    """Sends embedding batches to the least loaded embedding worker, with retries."""

    def __init__(self, *, migration_limit: int) -> None:
        self.migration_limit = migration_limit
        self.tracker = LoadTracker()
        self._selectors: dict[str, Selector] = {}

    def _selector(self, model: str) -> Selector:
        selector = self._selectors.get(model)
        if selector is None:
            selector = self._selectors[model] = Selector(RouterMode.LEAST_LOADED, self.tracker)
        return selector

    def forget(self, instance_id: int) -> None:
        self.tracker.forget(instance_id)

    async def embed(
        self, model: ServedModel, batches: list[list[int]], dimensions: int | None
    ) -> list[bytes]:
        """One vector per input, in order (little-endian float32 bytes)."""
        vectors: list[bytes] = [b""] * len(batches)
        parts = _parts(batches)
        if len(parts) == 1:
            await self._part(model, parts[0][0], parts[0][1], dimensions, vectors)
        else:
            await asyncio.gather(
                *(self._part(model, start, part, dimensions, vectors) for start, part in parts)
            )
        return vectors

    async def _part(
        self,
        model: ServedModel,
        start: int,
        inputs: list[list[int]],
        dimensions: int | None,
        into: list[bytes],
    ) -> None:
        request = PreprocessedEmbeddingRequest(
            token_ids=inputs, model=model.name, dimensions=dimensions
        )
        body = msgspec.Raw(msgspec.msgpack.encode(request))
        tokens = sum(map(len, inputs))

        async def send(excluded: set[int]) -> None:
            pool = model.pool(WorkerType.EMBEDDING)
            if pool is None or pool.client is None:
                raise NoInstancesError(f"no embedding workers for model {model.name!r}")
            await self._send(model, pool, body, tokens, excluded, start, len(inputs), into)

        await with_retries(
            send, limit=self.migration_limit, label=model.name, what="embedding part"
        )

    async def _send(
        self,
        model: ServedModel,
        pool: WorkerPool,
        body: msgspec.Raw,
        tokens: int,
        excluded: set[int],
        start: int,
        count: int,
        into: list[bytes],
    ) -> None:
        candidates = pool.candidates()
        if not candidates:
            raise NoInstancesError(f"no live embedding workers for model {model.name!r}")
        chosen = self._selector(model.name).select(candidates, excluded)
        iid = chosen.instance_id
        metrics.routing_decisions.labels(model.name, WorkerType.EMBEDDING.value, f"{iid:x}").inc()
        active = self.tracker.begin(iid, tokens, 1)
        got = 0
        async with worker_stream(pool, iid, body, EmbeddingOutput, excluded, active) as stream:
            async for out in stream:
                for offset, vector in enumerate(out.embeddings):
                    position = out.index + offset
                    if not 0 <= position < count:
                        raise MeshError(f"worker {iid:x} answered input {position} of {count}")
                    into[start + position] = vector
                    got += 1
            if got != count:
                raise MeshError(f"worker {iid:x} answered {got} of {count} inputs")


# --------------------------------------------------------------------------------------------
# The answer


def embedding_response(
    req: EmbeddingRequest, name: str, vectors: list[bytes], prompt_tokens: int
) -> EmbeddingResponse:
    data: list[EmbeddingData] = []
    if req.encoding_format == "base64":
        for i, vector in enumerate(vectors):
            data.append(EmbeddingData(embedding=base64.b64encode(vector).decode(), index=i))
    else:
        for i, vector in enumerate(vectors):
            floats = list(struct.unpack(f"<{len(vector) // 4}f", vector))
            data.append(EmbeddingData(embedding=floats, index=i))
    usage = EmbeddingUsage(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)
    return EmbeddingResponse(data=data, model=name, usage=usage)
