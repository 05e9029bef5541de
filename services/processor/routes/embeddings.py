"""``/v1/embeddings``: tokenize the inputs, send them to an encode worker, answer the vectors
(the batching and the wire format live in ``services/processor/embeddings.py``)."""

from __future__ import annotations

import msgspec
from aiohttp import web

from proto.embedding import EmbeddingRequest
from proto.openai import decode_request
from services.processor import metrics
from services.processor.context import RequestContext, Serving
from services.processor.embeddings import embedding_response, tokenize_inputs
from services.processor.failures import JSON

__all__ = ["embeddings"]

_encode = msgspec.json.Encoder().encode


async def embeddings(s: Serving, ctx: RequestContext) -> web.StreamResponse:
    req = decode_request(ctx.body, EmbeddingRequest)
    tracker = ctx.tracker
    model = s.model(req.model, tracker, embedding=True)
    pre, info = model.preprocessor, model.embedding
    assert pre is not None and info is not None
    batches = await tokenize_inputs(pre, info, req)
    tracker.prompt_tokens = sum(map(len, batches))
    metrics.input_tokens.labels(model.name).observe(tracker.prompt_tokens)
    vectors = await s.embedder.embed(model, batches, req.dimensions)
    reply = embedding_response(req, req.model, vectors, tracker.prompt_tokens)
    return web.Response(body=_encode(reply), content_type=JSON)
