"""A minimal closed-loop load generator for streamed OpenAI chat completions.

Used by ``bench/serve.py``. Built to cost the machine under test as little CPU as possible:

- one keep-alive HTTP/1.1 connection per simulated user, opened once and reused for every
  request of the run (no connection pool, no client library);
- an ``asyncio.Protocol`` per connection: each read from the socket is handled in the
  ``data_received`` callback (no coroutine resumption per chunk), timestamped once, and
  parsed just enough to find the HTTP chunk boundaries;
- the request bytes are built once: only a fixed-width counter inside the body changes, so
  the Content-Length never does;
- SSE events are not JSON-decoded, except the one event per request carrying ``usage``.

Definitions (per request; ``now`` is ``time.perf_counter()`` when the bytes are read):

- *TTFT*: from writing the request to the arrival of the first HTTP chunk carrying a
  ``"delta"`` (the processor sends its headers with the first token, so this is also the
  time to the response head);
- *token event*: an HTTP chunk carrying a ``"delta"`` (the processor writes one SSE event per
  batch of engine output, one HTTP chunk per write; several events that arrive in one read
  share one timestamp, as a real client would see them);
- *ITL* (the aiperf/genai-perf definition): ``(t_last_event - t_first_event) /
  (completion_tokens - 1)``, with ``completion_tokens`` from the final ``usage`` event;
- *event gap*: time between two consecutive token events of one request; the normalised gap
  divides it by the request's mean tokens per event (``completion_tokens / events``), exact
  when no event is coalesced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

__all__ = ["Connection", "LoadResult", "RequestResult", "build_request", "run_users"]

_COUNTER = "@@@@@@@@"  # replaced by a zero-padded request number of the same width
_HEAD, _SIZE, _DATA, _TRAILER, _BODY = range(5)


def build_request(
    host: str, port: int, model: str, message: str, max_tokens: int
) -> Callable[[int], bytes]:
    """The request as bytes, for request number ``n``; ``message`` must contain ``_COUNTER``
    (use :func:`counter_message`)."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": message}],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        separators=(",", ":"),
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    before, sep, after = (head + body).partition(_COUNTER.encode())
    if not sep:
        raise ValueError("the message has no request counter placeholder")
    width = len(_COUNTER)
    modulo = 10**width

    def make(n: int) -> bytes:
        return before + b"%0*d" % (width, n % modulo) + after

    return make


def counter_message(text: str) -> str:
    """``text`` behind a per-request counter, so no two prompts share more than the template's
    prefix (the system prompt)."""
    return f"Request {_COUNTER}. {text}"


@dataclass(slots=True)
class RequestResult:
    sent: float
    done: float = 0.0
    status: int = 0
    error: str | None = None
    events: list[float] = field(default_factory=list)  # arrival time of each token event
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.state = _HEAD
        self.remaining = 0
        self.chunked = False
        self.result: RequestResult | None = None
        self.waiter: asyncio.Future[RequestResult] | None = None
        self.closed = False
        self.error_body = bytearray()

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(f"connection lost: {exc!r}" if exc else "connection closed by the server")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def request(self, payload: bytes) -> RequestResult:
        if self.closed or self.transport is None:
            raise ConnectionError("connection is closed")
        self.result = RequestResult(sent=time.perf_counter())
        self.waiter = asyncio.get_running_loop().create_future()
        self.state = _HEAD
        self.transport.write(payload)
        return await self.waiter

    def _fail(self, error: str) -> None:
        if self.waiter is not None and not self.waiter.done() and self.result is not None:
            self.result.error = error
            self.result.done = time.perf_counter()
            self.waiter.set_result(self.result)

    def _finish(self) -> None:
        result, waiter = self.result, self.waiter
        assert result is not None and waiter is not None
        result.done = time.perf_counter()
        if result.status != 200 and result.error is None:
            result.error = f"HTTP {result.status}: {bytes(self.error_body[:200])!r}"
        elif result.error is None and not (result.events and result.completion_tokens):
            result.error = "stream ended without tokens or usage"
        if not waiter.done():
            waiter.set_result(result)
        self.result = self.waiter = None

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf
        buf += data
        pos = 0
        result = self.result
        if result is None:  # bytes nobody asked for
            buf.clear()
            return
        while True:
            state = self.state
            if state == _SIZE:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(buf[pos:end].partition(b";")[0], 16)
                pos = end + 2
                if size == 0:
                    self.state = _TRAILER
                else:
                    self.remaining = size
                    self.state = _DATA
            elif state == _DATA:
                end = pos + self.remaining  # the chunk, then its CRLF
                if len(buf) < end + 2:
                    break
                start, pos = pos, end + 2
                self.state = _SIZE
                if result.status != 200:
                    self.error_body += buf[start:end]
                elif buf.find(b'"delta"', start, end) >= 0:  # no copy of the chunk
                    result.events.append(now)
                elif buf.find(b'"error":{', start, end) >= 0:  # an SSE error event
                    result.error = bytes(buf[start : min(end, start + 200)]).decode("replace")
                if buf.find(b'"usage":{', start, end) >= 0:
                    _read_usage(bytes(buf[start:end]), result)
            elif state == _TRAILER:
                if len(buf) - pos < 2:
                    break
                if buf[pos : pos + 2] == b"\r\n":
                    self._done_at(pos + 2)
                    return
                end = buf.find(b"\r\n\r\n", pos)  # trailer fields, then an empty line
                if end < 0:
                    break
                self._done_at(end + 4)
                return
            elif state == _BODY:
                have = min(self.remaining, len(buf) - pos)
                self.error_body += buf[pos : pos + have]
                pos += have
                self.remaining -= have
                if self.remaining:
                    break
                self._done_at(pos)
                return
            else:  # _HEAD
                end = buf.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                head = bytes(buf[pos:end]).lower()
                pos = end + 4
                result.status = int(head[9:12])
                self.error_body.clear()
                self.chunked = b"transfer-encoding: chunked" in head
                if self.chunked:
                    self.state = _SIZE
                else:
                    marker = head.find(b"content-length:")
                    length = 0
                    if marker >= 0:
                        line_end = head.find(b"\r\n", marker)
                        length = int(head[marker + 15 : line_end if line_end >= 0 else None])
                    self.remaining = length
                    self.state = _BODY
        del buf[:pos]

    def _done_at(self, pos: int) -> None:
        del self.buf[:pos]
        self.state = _HEAD
        self._finish()


def _read_usage(chunk: bytes, result: RequestResult) -> None:
    for event in chunk.split(b"\n\n"):
        if event.startswith(b"data: {") and b'"usage":{' in event:
            usage = json.loads(event[6:])["usage"]
            result.prompt_tokens = usage["prompt_tokens"]
            result.completion_tokens = usage["completion_tokens"]


@dataclass
class LoadResult:
    results: list[RequestResult]
    window_start: float
    window_end: float
    connect_errors: int = 0


async def run_users(
    host: str,
    port: int,
    make_request: Callable[[int], bytes],
    concurrency: int,
    warmup: float,
    duration: float,
    on_window: Callable[[str], None],
    drain_timeout: float = 30.0,
) -> LoadResult:
    """``concurrency`` users, each on its own connection, send requests back to back for
    ``warmup + duration`` seconds. ``on_window("start")`` and ``on_window("end")`` are called
    at the measured window's edges (to sample CPU counters); requests that *finish* inside the
    window are returned. After the window no new request is sent; those in flight are awaited
    (up to ``drain_timeout``) but not counted."""
    conns = await asyncio.gather(*(Connection.open(host, port) for _ in range(concurrency)))
    counter = iter(range(1, 10**12))
    done: list[RequestResult] = []
    stop = False
    connect_errors = 0

    async def user(index: int) -> None:
        nonlocal connect_errors
        conn = conns[index]
        while not stop:
            if conn.closed:
                try:
                    conn = conns[index] = await Connection.open(host, port)
                except OSError:
                    connect_errors += 1
                    await asyncio.sleep(0.05)
                    continue
            result = await conn.request(make_request(next(counter)))
            done.append(result)
            if result.error is not None and not conn.closed:
                await asyncio.sleep(0.01)  # a refusal (e.g. 503): do not spin

    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(user(i)) for i in range(concurrency)]
    try:
        await asyncio.sleep(warmup)
        on_window("start")
        window_start = time.perf_counter()
        first = len(done)
        await asyncio.sleep(duration)
        on_window("end")
        window_end = time.perf_counter()
        last = len(done)
        stop = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*tasks), drain_timeout)
    finally:
        stop = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for conn in conns:
            conn.close()
    measured = [r for r in done[first:last] if window_start <= r.done <= window_end]
    return LoadResult(measured, window_start, window_end, connect_errors)
