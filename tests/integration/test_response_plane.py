"""The direct response plane on real NATS, etcd and TCP (``shared/runtime/response_plane.py``).

- answers travel on the TCP connection, not on NATS (a third client watching the caller's
  inbox sees nothing), and controls come back on it (a cancel stops the handler);
- frames sooner than ``--response-flush-interval`` share a write (a stream's, one frame),
  while the first after a quiet spell and a stream's last do not wait;
- an endpoint's ``coalesce`` merges the chunks that wait for one frame, and a merged chunk
  that does not encode ends its stream with a handler error;
- a connection with a wrong token is closed and its frames reach no stream;
- a responder that cannot reach the caller's server answers over NATS instead, counted;
- a killed responder fails its streams at once (the connection closes), long before the
  stream timeout, as retryable;
- a caller whose connection goes away stops the responder's handlers (caller gone).
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest

from proto.plane import ErrorCode, Frame, FrameKind, StreamFrame, StreamHello
from shared.infra import EtcdServer, NatsServer
from shared.runtime import Context, RouterMode
from shared.runtime import metrics as runtime_metrics
from shared.runtime.endpoint import StopReason
from shared.runtime.errors import RemoteError, ResponderDeadError
from tests.integration.mesh import Responder, make_config, runtime


async def connected(caller: Any, client: Any, count: int = 1) -> None:
    """A first request (answered over NATS while the responder connects), then wait until
    ``count`` responders hold a connection to the caller."""
    assert len([c async for c in await client.generate({"n": 2})]) == 2
    for _ in range(200):
        if len(caller.response_server.connections) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no responder connected to the caller's response server")


async def counting(request: dict[str, Any], ctx: Context) -> AsyncIterator[int]:
    for i in range(request["n"]):
        yield i
        await asyncio.sleep(request.get("delay", 0))


async def serving_two(worker: Any, caller: Any, name: str, handler: Any) -> tuple[Any, Any]:
    """``counting`` as ``generate`` and ``handler`` as ``name`` on the worker, a client for
    each on the caller, and the caller's response server connected to: (generate, name)."""
    await worker.endpoint("backend", "generate").serve(counting)
    await worker.endpoint("backend", name).serve(handler)
    client = await caller.client("backend", "generate")
    other = await caller.client("backend", name)
    await client.wait_for_instances(1, timeout=5)
    await other.wait_for_instances(1, timeout=5)
    await connected(caller, client)
    return client, other


async def test_answers_and_controls_use_the_direct_connection(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server, response_plane="tcp")
    stopped: list[StopReason | None] = []

    async def endless(request: dict[str, Any], ctx: Context) -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.001)
        finally:
            stopped.append(ctx.stop_reason)

    async with runtime(cfg) as worker, runtime(cfg) as caller:
        client, endless_client = await serving_two(worker, caller, "endless", endless)
        watcher = await nats.connect(nats_server.url)
        seen: list[str] = []

        async def on_msg(msg: Any) -> None:
            seen.append(msg.subject)

        try:
            await watcher.subscribe(f"{caller.inbox}.>", cb=on_msg)
            await watcher.flush()
            for _ in range(3):
                got = [c async for c in await client.generate({"n": 500}, window=8)]
                assert got == list(range(500))
            stream = await endless_client.generate({})
            for _ in range(20):
                await stream.__anext__()
            await stream.aclose()  # the cancel goes back on the connection
            for _ in range(100):
                if stopped:
                    break
                await asyncio.sleep(0.02)
            await watcher.flush()
        finally:
            await watcher.close()
        assert stopped == [StopReason.CALLER]
        assert seen == [], f"frames went over NATS: {seen[:5]}"
        server = caller.response_server
        assert server is not None
        assert [c.instance_id for c in server.connections] == [worker.instance_id]


class _CountingTransport:
    """Stands in for a connection's transport: counts the socket writes and the messages in
    them (each a 4-byte length and a body; a write holds whole messages), forwards the rest."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.writes = 0
        self.messages = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        pos = 0
        while pos < len(data):
            pos += 4 + struct.unpack_from(">I", data, pos)[0]
            self.messages += 1
        assert pos == len(data)
        self.inner.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.mark.parametrize("interval", [0.0, 0.05])
async def test_frames_sooner_than_the_flush_interval_share_a_write(
    nats_server: NatsServer, etcd_server: EtcdServer, interval: float
) -> None:
    """A stream of 10 chunks 2 ms apart. With no interval, every chunk is its own frame and
    write. With 50 ms, the first chunk goes at once, the next ones wait, in one frame, and the
    last frame (END) does not wait: it takes them all out as soon as the handler is done."""
    cfg = make_config(nats_server, etcd_server, response_plane="tcp")
    worker_cfg = dataclasses.replace(cfg, response_flush_interval=interval)
    handler_done: list[float] = []

    async def paced(request: dict[str, Any], ctx: Context) -> AsyncIterator[int]:
        for i in range(10):
            yield i
            await asyncio.sleep(0.002)
        handler_done.append(time.monotonic())

    async with runtime(worker_cfg) as worker, runtime(cfg) as caller:
        _, paced_client = await serving_two(worker, caller, "paced", paced)
        (conn,) = worker.responder_connections._conns.values()
        counter = _CountingTransport(conn.transport)
        conn.transport = counter  # type: ignore[assignment]
        await asyncio.sleep(2 * interval + 0.01)  # a quiet spell: the next frame goes at once
        arrived: list[float] = []
        async for chunk in await paced_client.generate({}):
            arrived.append(time.monotonic())
            assert chunk == len(arrived) - 1
        ended = time.monotonic()
        assert len(arrived) == 10 and len(handler_done) == 1
        if interval == 0:
            assert counter.writes >= 10
            assert counter.messages == 11  # 10 DATA frames and END
        else:
            # The first write, then one with the rest and END (two if the handler was so slow
            # that the interval ran out first); the chunks that waited share a frame.
            assert 2 <= counter.writes <= 3
            assert counter.messages == counter.writes
            assert arrived[1] - arrived[0] >= 0.01  # chunk 1 (made at ~2 ms) waited
            assert ended - handler_done[0] < 0.02  # END did not wait for the interval


async def test_chunks_that_wait_for_a_frame_are_coalesced(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    """An endpoint served with ``coalesce`` gets the chunks that wait for one frame, unencoded,
    and its caller reads what it made of them: here 10 lists 2 ms apart with a 50 ms interval
    arrive as the first list (no wait), then one list of the other nine."""
    cfg = make_config(nats_server, etcd_server, response_plane="tcp")
    worker_cfg = dataclasses.replace(cfg, response_flush_interval=0.05)
    merges: list[int] = []

    def concat(chunks: list[Any]) -> list[Any]:
        merges.append(len(chunks))
        return [[x for chunk in chunks for x in chunk]]

    async def lists(request: dict[str, Any], ctx: Context) -> AsyncIterator[list[int]]:
        for i in range(10):
            yield [i]
            await asyncio.sleep(0.002)

    async with runtime(worker_cfg) as worker, runtime(cfg) as caller:
        await worker.endpoint("backend", "generate").serve(counting)
        await worker.endpoint("backend", "lists").serve(lists, coalesce=concat)
        client = await caller.client("backend", "generate")
        lists_client = await caller.client("backend", "lists")
        await client.wait_for_instances(1, timeout=5)
        await lists_client.wait_for_instances(1, timeout=5)
        await connected(caller, client)
        await asyncio.sleep(0.11)  # a quiet spell: the first frame goes at once
        got = [chunk async for chunk in await lists_client.generate({})]
    # The first list, then the rest in one (two if the handler was so slow that the interval
    # ran out first), every number once and in order.
    assert got[0] == [0] and 2 <= len(got) <= 3
    assert [x for chunk in got for x in chunk] == list(range(10))
    assert sum(merges) >= 8 and all(n > 1 for n in merges)


async def test_a_coalesced_chunk_that_does_not_encode_is_a_handler_error(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    """Coalesced chunks are encoded when framed, which for a deferred frame is outside the
    handler's task: one that does not encode still ends its stream with a handler error (not a
    silent stall until the stream timeout), and stops the handler."""
    cfg = make_config(nats_server, etcd_server, response_plane="tcp")
    worker_cfg = dataclasses.replace(cfg, response_flush_interval=0.05)
    stopped: list[bool] = []

    async def bad(request: dict[str, Any], ctx: Context) -> AsyncIterator[Any]:
        yield [0]
        await asyncio.sleep(0.01)  # the first frame is written: the next one is deferred
        yield object()  # nothing msgpack can encode
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            stopped.append(True)  # cancelled while it waited: the deferred frame stopped it
            raise

    async with runtime(worker_cfg) as worker, runtime(cfg) as caller:
        await worker.endpoint("backend", "generate").serve(counting)
        await worker.endpoint("backend", "bad").serve(bad, coalesce=lambda chunks: chunks)
        client = await caller.client("backend", "generate")
        bad_client = await caller.client("backend", "bad")
        await client.wait_for_instances(1, timeout=5)
        await bad_client.wait_for_instances(1, timeout=5)
        await connected(caller, client)
        await asyncio.sleep(0.11)
        got: list[Any] = []
        started = time.monotonic()
        with pytest.raises(RemoteError) as info:
            async for chunk in await bad_client.generate({}):
                got.append(chunk)
        assert got == [[0]]
        assert info.value.code == ErrorCode.HANDLER_ERROR and not info.value.retryable
        assert time.monotonic() - started < 2
        for _ in range(100):
            if stopped:
                break
            await asyncio.sleep(0.01)
        assert stopped == [True]


async def test_a_wrong_token_is_refused(nats_server: NatsServer, etcd_server: EtcdServer) -> None:
    cfg = make_config(nats_server, etcd_server, response_plane="tcp")
    async with runtime(cfg) as worker, runtime(cfg) as caller:
        await worker.endpoint("backend", "generate").serve(counting)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(1, timeout=5)
        await connected(caller, client)
        server = caller.response_server
        assert server is not None
        host, _, port = server.address.rpartition(":")
        # A stream that waits for its answer; a forger tries to end it with its own frame.
        stream = await client.generate({"n": 3, "delay": 0.3})
        encoder = msgspec.msgpack.Encoder()
        reader, writer = await asyncio.open_connection(host, int(port))
        for message in (
            StreamHello("not-the-token", worker.instance_id),
            StreamFrame(stream.request_id.rsplit("-", 1)[1], Frame(0, FrameKind.END, [])),
        ):
            data = encoder.encode(message)
            writer.write(struct.pack(">I", len(data)) + data)
        await writer.drain()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the caller
        writer.close()
        assert [c async for c in stream] == [0, 1, 2]
        assert all(c.instance_id == worker.instance_id for c in server.connections)


async def test_an_unreachable_caller_is_answered_over_nats(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server, response_plane="tcp")
    async with runtime(cfg) as worker, runtime(cfg) as caller:
        await worker.endpoint("backend", "generate").serve(counting)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(1, timeout=5)
        server = caller.response_server
        assert server is not None
        with socket.socket() as closed:  # a port nobody listens on
            closed.bind(("127.0.0.1", 0))
            server.address = f"127.0.0.1:{closed.getsockname()[1]}"
        before = runtime_metrics.response_fallbacks_total._value.get()
        for _ in range(3):
            assert [c async for c in await client.generate({"n": 50})] == list(range(50))
            await asyncio.sleep(0.1)  # the background connect fails meanwhile
        # One failed connect, then NATS for a while without retrying each request.
        assert runtime_metrics.response_fallbacks_total._value.get() == before + 1
        assert len(worker.responder_connections) == 0


async def test_a_killed_responder_fails_its_streams_at_once(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    # Heartbeats and the stream timeout are far away: only the connection can tell.
    cfg = make_config(
        nats_server, etcd_server, response_plane="tcp", heartbeat_interval=10, stream_timeout=60
    )
    responder = Responder(cfg, f"{cfg.namespace}.backend.generate")
    try:
        async with runtime(cfg) as caller:
            client = await caller.client("backend", "generate")
            await client.wait_for_instances(1, timeout=5)
            await connected(caller, client)
            stream = await client.generate({"n": 1000, "delay": 0.05}, mode=RouterMode.ROUND_ROBIN)
            await stream.__anext__()
            responder.signal(signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(ResponderDeadError) as failed:
                async for _ in stream:
                    pass
            assert time.monotonic() - started < 2.0
            assert failed.value.retryable
    finally:
        responder.stop()


async def test_a_lost_caller_connection_stops_the_handlers(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server, response_plane="tcp")
    stopped: asyncio.Queue[StopReason | None] = asyncio.Queue()

    async def slow(request: dict[str, Any], ctx: Context) -> AsyncIterator[int]:
        try:
            for i in range(request.get("n", 1000)):
                yield i
                await asyncio.sleep(0.02)
        finally:
            stopped.put_nowait(ctx.stop_reason)

    async with runtime(cfg) as worker, runtime(cfg) as caller:
        await worker.endpoint("backend", "generate").serve(slow)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(1, timeout=5)
        await connected(caller, client)
        while not stopped.empty():
            stopped.get_nowait()  # the warm-up request's
        streams = [await client.generate({}) for _ in range(3)]
        for stream in streams:
            await stream.__anext__()
        server = caller.response_server
        assert server is not None
        for conn in list(server.connections):
            conn.abort("test: the caller's side goes away")
        reasons = [await asyncio.wait_for(stopped.get(), 5) for _ in streams]
        assert reasons == [StopReason.CALLER_GONE] * 3
        for stream in streams:
            with pytest.raises(ResponderDeadError):
                async for _ in stream:
                    pass
        # Requests go on (over NATS while the responder connects again), then on TCP again.
        await connected(caller, client)
