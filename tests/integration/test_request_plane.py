"""The request plane on real NATS and etcd: streaming, routing, cancel, errors, limits.

Every test runs twice: answers on direct TCP connections (the default) and on NATS reply
subjects (``--response-plane nats``, the fallback and the TLS setting)."""

from __future__ import annotations

import asyncio
import collections
import gc
import hashlib
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import msgspec
import nats
import pytest

from proto.plane import ErrorCode, Frame, FrameKind
from shared.infra import EtcdServer, NatsServer
from shared.runtime import (
    Context,
    InvalidRequestError,
    NoInstancesError,
    NoRespondersError,
    OverloadedError,
    RemoteError,
    RouterMode,
)
from shared.runtime.system_server import SystemServer
from tests.integration import mesh
from tests.integration.mesh import runtime

_PLANE = ["tcp"]  # the response plane of the running test (set by the fixture below)


@pytest.fixture(autouse=True, params=["tcp", "nats"])
def response_plane(request: pytest.FixtureRequest) -> Iterator[str]:
    _PLANE[0] = request.param
    yield request.param
    _PLANE[0] = "tcp"


def make_config(nats: NatsServer, etcd: EtcdServer, **overrides: Any) -> Any:
    overrides.setdefault("response_plane", _PLANE[0])
    return mesh.make_config(nats, etcd, **overrides)


async def counting_handler(request: dict[str, Any], ctx: Context) -> AsyncIterator[Any]:
    for i in range(request["n"]):
        yield {"i": i, "data": hashlib.sha256(str(i).encode()).hexdigest()}


async def test_ten_thousand_chunks_arrive_in_order_and_intact(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server)
    async with runtime(cfg) as worker, runtime(cfg) as caller:
        await worker.endpoint("backend", "generate").serve(counting_handler)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(1, timeout=5)
        stream = await client.generate({"n": 10_000})
        received = [chunk async for chunk in stream]
    assert len(received) == 10_000
    for i, chunk in enumerate(received):
        assert chunk == {"i": i, "data": hashlib.sha256(str(i).encode()).hexdigest()}


async def test_a_quiet_handler_is_acknowledged_before_its_first_chunk(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    """A handler that sends nothing for a while still tells the caller who serves it (a bare
    ACK after a couple of milliseconds), so a cancel can reach it before the first chunk.
    Heartbeats (which acknowledge too) are far apart here, so they cannot stand in for it."""
    cfg = make_config(nats_server, etcd_server, heartbeat_interval=10.0, stream_timeout=30.0)
    release = asyncio.Event()

    async def quiet(request: dict[str, Any], ctx: Context) -> AsyncIterator[Any]:
        await release.wait()
        yield "late"

    async with runtime(cfg) as worker, runtime(cfg) as caller:
        await worker.endpoint("backend", "generate").serve(quiet)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(1, timeout=5)
        stream = await client.generate({})
        for _ in range(200):
            assert stream.ready() == []
            if stream.acked:
                break
            await asyncio.sleep(0.01)
        assert stream.acked and stream.instance_id == worker.instance_id
        release.set()
        assert [chunk async for chunk in stream] == ["late"]


async def test_concurrent_streams_over_four_instances(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server)

    async def tagged(request: dict[str, Any], ctx: Context) -> AsyncIterator[Any]:
        for i in range(request["n"]):
            await asyncio.sleep(0)
            yield {"i": i, "who": ctx.instance_id}

    async with (
        runtime(cfg) as w1,
        runtime(cfg) as w2,
        runtime(cfg) as w3,
        runtime(cfg) as w4,
        runtime(cfg) as caller,
    ):
        workers = [w1, w2, w3, w4]
        for w in workers:
            await w.endpoint("backend", "generate").serve(tagged)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(4, timeout=5)

        async def one(k: int, mode: RouterMode) -> tuple[int, int]:
            stream = await client.generate({"n": 50}, mode=mode)
            chunks = [c async for c in stream]
            assert [c["i"] for c in chunks] == list(range(50))
            assert len({c["who"] for c in chunks}) == 1
            return k, chunks[0]["who"]

        results = await asyncio.gather(*(one(k, RouterMode.ROUND_ROBIN) for k in range(200)))
        assert len(results) == 200
        per_instance = collections.Counter(who for _, who in results)
        assert set(per_instance) == {w.instance_id for w in workers}
        assert all(n == 50 for n in per_instance.values())  # round robin is exact

        # Any-instance delivery (NATS queue group) spreads too.
        results = await asyncio.gather(*(one(k, RouterMode.ANY) for k in range(200)))
        per_instance = collections.Counter(who for _, who in results)
        assert set(per_instance) == {w.instance_id for w in workers}
        assert min(per_instance.values()) >= 10


async def test_direct_routing_reaches_the_named_instance(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server)

    async def who(request: Any, ctx: Context) -> AsyncIterator[int]:
        yield ctx.instance_id

    async with runtime(cfg) as w1, runtime(cfg) as w2, runtime(cfg) as caller:
        for w in (w1, w2):
            await w.endpoint("backend", "generate").serve(who)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(2, timeout=5)
        for target in (w1.instance_id, w2.instance_id, w1.instance_id):
            stream = await client.generate({}, instance_id=target)
            assert [c async for c in stream] == [target]


@pytest.mark.parametrize("how", ["aclose", "task_cancel", "walk_away"])
async def test_client_cancel_stops_the_handler(
    nats_server: NatsServer, etcd_server: EtcdServer, how: str
) -> None:
    cfg = make_config(nats_server, etcd_server)
    saw_cancel = asyncio.Event()
    stopped_flag: list[bool] = []

    async def endless(request: Any, ctx: Context) -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            stopped_flag.append(ctx.is_stopped())
            saw_cancel.set()
            raise

    async with runtime(cfg) as worker, runtime(cfg) as caller:
        served = await worker.endpoint("backend", "generate").serve(endless)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(1, timeout=5)
        stream = await client.generate({})
        got = [await stream.__anext__() for _ in range(3)]
        assert got == [0, 1, 2]
        t0 = time.perf_counter()
        if how == "aclose":
            await stream.aclose()
        elif how == "task_cancel":

            async def consume() -> None:
                async for _ in stream:
                    pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.05)
            t0 = time.perf_counter()
            task.cancel()
        else:  # the consumer drops the stream without closing it
            del stream
            gc.collect()  # finalizes the stream; its latency is not the request plane's
            t0 = time.perf_counter()
        await asyncio.wait_for(saw_cancel.wait(), timeout=1.0)
        elapsed = time.perf_counter() - t0
        assert stopped_flag == [True]
        # Closing or cancelling must reach the handler within 100 ms; the finalizer of a dropped
        # stream is a best-effort fallback that runs whenever the garbage collector gets to it.
        bound = 0.1 if how != "walk_away" else 0.5
        assert elapsed < bound, f"handler saw the cancel after {elapsed * 1000:.1f} ms"
        await asyncio.sleep(0.05)
        assert not served.streams


async def test_handler_errors_are_typed(nats_server: NatsServer, etcd_server: EtcdServer) -> None:
    cfg = make_config(nats_server, etcd_server)

    async def failing(request: dict[str, Any], ctx: Context) -> AsyncIterator[int]:
        yield 1
        if request["kind"] == "bug":
            raise ZeroDivisionError("boom")
        raise InvalidRequestError("prompt too long")

    async with runtime(cfg) as worker, runtime(cfg) as caller:
        await worker.endpoint("backend", "generate").serve(failing)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(1, timeout=5)

        stream = await client.generate({"kind": "bug"})
        assert await stream.__anext__() == 1
        with pytest.raises(RemoteError) as info:
            await stream.__anext__()
        assert info.value.code == ErrorCode.HANDLER_ERROR
        assert not info.value.retryable
        assert "ZeroDivisionError: boom" in str(info.value)

        stream = await client.generate({"kind": "invalid"})
        with pytest.raises(RemoteError) as info:
            [c async for c in stream]
        assert info.value.code == ErrorCode.INVALID_REQUEST
        assert not info.value.retryable


async def test_typed_request_validation(nats_server: NatsServer, etcd_server: EtcdServer) -> None:
    cfg = make_config(nats_server, etcd_server)

    class Req(msgspec.Struct):
        n: int

    async def typed(request: Req, ctx: Context) -> AsyncIterator[int]:
        yield request.n * 2

    async with runtime(cfg) as worker, runtime(cfg) as caller:
        await worker.endpoint("backend", "generate").serve(typed, request_type=Req)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(1, timeout=5)
        assert [c async for c in await client.generate(Req(n=21))] == [42]
        with pytest.raises(RemoteError) as info:
            [c async for c in await client.generate({"n": "not a number"})]
        assert info.value.code == ErrorCode.INVALID_REQUEST


async def test_concurrency_limit_answers_overloaded(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server)
    release = asyncio.Event()

    async def slow(request: Any, ctx: Context) -> AsyncIterator[int]:
        await release.wait()
        yield 1

    async with runtime(cfg) as worker, runtime(cfg) as caller:
        await worker.endpoint("backend", "generate").serve(slow, concurrency_limit=2)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(1, timeout=5)
        s1 = await client.generate({})
        s2 = await client.generate({})
        await asyncio.sleep(0.1)
        s3 = await client.generate({})
        with pytest.raises(RemoteError) as info:
            await s3.__anext__()
        assert info.value.code == ErrorCode.OVERLOADED
        assert info.value.retryable
        release.set()
        assert [c async for c in s1] == [1]
        assert [c async for c in s2] == [1]
        assert isinstance(OverloadedError("x"), Exception)


async def test_no_instances_and_no_responders(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server)
    async with runtime(cfg) as caller:
        client = await caller.client("nobody", "generate")
        with pytest.raises(NoInstancesError) as info:
            await client.generate({})
        assert info.value.retryable
        stream = await client.generate({}, mode=RouterMode.ANY)
        t0 = time.perf_counter()
        with pytest.raises(NoRespondersError):
            await stream.__anext__()
        # NATS says so at once: well before the 1 s stream timeout could have fired.
        assert time.perf_counter() - t0 < 0.9


async def test_garbage_on_the_subject_gets_an_error_and_the_worker_keeps_serving(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server)
    async with runtime(cfg) as worker, runtime(cfg) as caller:
        await worker.endpoint("backend", "generate").serve(counting_handler)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(1, timeout=5)
        raw = await nats.connect(nats_server.url)
        try:
            subject = f"{cfg.namespace}.backend.generate"
            for junk in (b"\xff\x00garbage", b"", b"\x93\x01\x02", b"\xc1"):
                await raw.publish(subject, junk)  # no reply subject: logged and dropped
                reply = await raw.request(subject, junk, timeout=2)
                frame = msgspec.msgpack.decode(reply.data, type=Frame)
                assert frame.kind is FrameKind.ERROR
                assert frame.error is not None
                assert frame.error.code == ErrorCode.INVALID_REQUEST
        finally:
            await raw.close()
        assert len([c async for c in await client.generate({"n": 3})]) == 3


async def test_slow_caller_gets_coalesced_frames_and_pauses_the_handler(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    from shared.runtime.endpoint import MAX_PENDING_CHUNKS

    cfg = make_config(nats_server, etcd_server)
    produced = 0
    total = 50_000

    async def fast(request: Any, ctx: Context) -> AsyncIterator[int]:
        nonlocal produced
        for i in range(total):
            produced += 1
            yield i
            if i % 64 == 0:
                await asyncio.sleep(0)

    async with runtime(cfg) as worker, runtime(cfg) as caller:
        await worker.endpoint("backend", "generate").serve(fast)
        client = await caller.client("backend", "generate")
        await client.wait_for_instances(1, timeout=5)
        stream = await client.generate({}, window=16)
        assert await stream.__anext__() == 0
        await asyncio.sleep(0.5)  # the caller is "behind": it reads nothing for a while
        # Without credit the handler may run only a bounded distance ahead.
        assert produced <= 16 * 2 + MAX_PENDING_CHUNKS + 64
        rest = [c async for c in stream]
        assert rest == list(range(1, total))


async def test_system_server_health_and_metrics(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    cfg = make_config(nats_server, etcd_server)
    async with runtime(cfg) as worker, runtime(cfg) as caller:
        system = SystemServer(worker, "127.0.0.1", 0)
        await system.start()
        base = f"http://127.0.0.1:{system.port}"
        try:
            async with aiohttp.ClientSession() as http:
                await worker.endpoint("backend", "generate").serve(counting_handler, register=False)
                async with http.get(f"{base}/health") as resp:
                    assert resp.status == 503  # serving but not registered yet
                await worker.served[0].register()
                async with http.get(f"{base}/health") as resp:
                    assert resp.status == 200
                    body = await resp.json()
                    assert body["status"] == "ready"
                    assert body["endpoints"] == {f"{cfg.namespace}.backend.generate": "ready"}
                async with http.get(f"{base}/live") as resp:
                    assert resp.status == 200
                client = await caller.client("backend", "generate")
                await client.wait_for_instances(1, timeout=5)
                assert len([c async for c in await client.generate({"n": 2})]) == 2
                async with http.get(f"{base}/metrics") as resp:
                    text = await resp.text()
                name = f"{cfg.namespace}.backend.generate"
                assert f'sglmesh_endpoint_requests_total{{endpoint="{name}"}}' in text
                assert "sglmesh_client_ack_latency_seconds_bucket" in text
                await worker.shutdown(grace=0)
                async with http.get(f"{base}/health") as resp:
                    assert resp.status == 503
                async with http.get(f"{base}/live") as resp:
                    assert resp.status == 503
        finally:
            await system.close()


async def test_a_caller_that_stops_granting_credit_is_treated_as_gone(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> None:
    from proto.plane import RequestEnvelope
    from shared.runtime.endpoint import StopReason

    cfg = make_config(nats_server, etcd_server)
    reasons: list[StopReason | None] = []
    stopped = asyncio.Event()

    async def endless(request: Any, ctx: Context) -> AsyncIterator[int]:
        try:
            i = 0
            while True:
                yield i
                i += 1
                await asyncio.sleep(0)
        finally:
            reasons.append(ctx.stop_reason)
            stopped.set()

    async with runtime(cfg) as worker:
        served = await worker.endpoint("backend", "generate").serve(endless)
        raw = await nats.connect(nats_server.url)
        try:
            inbox = raw.new_inbox()
            frames: list[Frame] = []

            async def on_frame(msg: Any) -> None:
                frames.append(msgspec.msgpack.decode(msg.data, type=Frame))

            await raw.subscribe(inbox, cb=on_frame)
            envelope = RequestEnvelope("stuck-1", msgspec.Raw(msgspec.msgpack.encode({})), 4)
            t0 = time.monotonic()
            await raw.publish(
                f"{cfg.namespace}.backend.generate", msgspec.msgpack.encode(envelope), reply=inbox
            )
            await asyncio.wait_for(stopped.wait(), timeout=cfg.stream_timeout * 2 + 2)
            waited = time.monotonic() - t0
        finally:
            await raw.close()
        assert reasons == [StopReason.CALLER_GONE]
        assert cfg.stream_timeout * 2 - 0.2 <= waited <= cfg.stream_timeout * 2 + 1.5
        # It sent what its credit allowed (frames 0..4) plus heartbeats, then stopped.
        data_frames = [f for f in frames if f.kind is FrameKind.DATA]
        assert 1 <= len(data_frames) <= 5
        assert not served.streams
