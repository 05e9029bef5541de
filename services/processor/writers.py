"""Writing a generation's output to the client: one JSON response, or an SSE stream.

Both take a :class:`Generation`, the per-request context (what was asked, the assembler
turning engine output into text, the worker streams, the tracker), so neither needs a dozen
parameters. A stream's response headers are sent only once its first output arrived (the
caller reads it first): errors before any token keep their real HTTP status. Errors after
that arrive as an SSE ``error`` event. Every batch of output that arrived together is written
as one SSE event.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

from proto.response import EngineOutput
from services.processor.failures import JSON, failure_for
from services.processor.respond import (
    FastChunks,
    OutputAssembler,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
)
from services.processor.tracking import RequestTracker

__all__ = ["SSE_HEADERS", "Generation", "Outputs", "write_stream", "write_unary"]

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
_DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.Encoder().encode


class _SseResponse(web.StreamResponse):
    """An SSE response whose headers go out with its first event (aiohttp keeps them until
    the first body write when this is off; versions without the switch send them at once),
    and whose last events go out with the end of the chunked body (``write_eof``): a short
    answer is one or two socket writes, not four. Each write to a local client is a syscall
    and a wake-up of the reader, a per-request cost that shows with a connection per
    request."""

    _send_headers_immediately = False


# Tagged batches of engine output: (stream index, outputs that arrived together).
Outputs = AsyncGenerator[tuple[int, list[EngineOutput]], None]


@dataclass(slots=True)
class Generation:
    """One chat or completion request being answered."""

    rid: str
    created: int
    model: str  # the name the client asked for
    chat: bool
    logprobs: bool
    include_usage: bool
    assembler: OutputAssembler
    tracker: RequestTracker
    outputs: Outputs
    first: tuple[int, list[EngineOutput]] | None  # already read: see the module docstring
    retry_after: int  # for a 503 that arrives mid-stream


async def write_unary(gen: Generation) -> web.Response:
    assembler, tracker = gen.assembler, gen.tracker
    item = gen.first
    while item is not None:
        prompt, batch = item
        if assembler.feed(prompt, batch) and tracker.first_at is None:
            tracker.first_token()
        if assembler.done:
            break
        item = await anext(gen.outputs, None)
    assembler.finish_all()
    tracker.done(assembler)
    build = chat_response if gen.chat else completion_response
    body = _encode(build(gen.rid, gen.created, gen.model, assembler, gen.logprobs))
    return web.Response(body=body, content_type=JSON)


async def write_stream(request: web.Request, gen: Generation) -> web.StreamResponse:
    assembler, tracker = gen.assembler, gen.tracker
    rid, created, name, chat, logprobs = gen.rid, gen.created, gen.model, gen.chat, gen.logprobs
    response = _SseResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    offsets = [0] * len(assembler.choices)
    fast = FastChunks(rid, created, name, chat=chat)

    def render(deltas: list[Any]) -> bytes:
        if len(deltas) == 1 and not logprobs:
            d = deltas[0]
            if not d.first and d.finish_reason is None and not (d.reasoning or d.tool_calls):
                offsets[d.index] += len(d.text)
                return fast.text(d.index, d.text)
        if chat:
            chunk: Any = chat_chunk(rid, created, name, deltas, logprobs)
        else:
            chunk = completion_chunk(rid, created, name, deltas, logprobs, offsets)
        return b"data: " + _encode(chunk) + b"\n\n"

    # The events of the batch that ends the answer wait for the end of the body: they go
    # out in one write with the usage event, [DONE] and the chunked body's terminator.
    tail = b""
    try:
        try:
            item = gen.first
            while item is not None:
                prompt, batch = item
                deltas = assembler.feed(prompt, batch)
                if deltas:
                    tracker.tokens_written(sum(len(o.token_ids) for o in batch))
                    if assembler.done:
                        tail = render(deltas)
                        break
                    await response.write(render(deltas))
                if assembler.done:
                    break
                if item is gen.first and not deltas:
                    await response.write(b"")  # the headers: no event carried them
                item = await anext(gen.outputs, None)
            deltas = assembler.finish_all()
            if deltas:
                tail += render(deltas)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            failure = failure_for(exc, gen.retry_after)
            tracker.status = failure.status
            await response.write_eof(tail + b"data: " + failure.body + b"\n\n")
            return response
        if gen.include_usage:
            usage_chunk: Any = (
                chat_chunk(rid, created, name, [], False)
                if chat
                else completion_chunk(rid, created, name, [], False, offsets)
            )
            usage_chunk.usage = assembler.usage()
            tail += b"data: " + _encode(usage_chunk) + b"\n\n"
        await response.write_eof(tail + _DONE)
    except ConnectionError:
        # The client left mid-stream; the caller leaving its block closes the worker streams.
        tracker.disconnected()
        return response
    tracker.done(assembler)
    return response
