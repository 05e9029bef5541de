"""The simulated engine's KV-event and metrics bytes, checked against SGLang 0.5.23's own code.

Why: the mesh's publisher must read a real engine and the simulated one with the same code, so
"looks like SGLang" is not enough; SGLang's own classes must decode what we send and produce
what we decode, and SGLang's own publisher must feed our subscriber (replay included).

SGLang's classes come from the installed package when it imports. Where it does not (sglang
is installed without its dependencies, and ``kv_events_publisher`` pulls in transformers
through ``io_struct``), the module's own source file is executed statement by statement,
skipping the statements whose imports are missing: the classes under test are still SGLang's
definitions, byte for byte, just without the unrelated machinery around them. The module is
skipped only when no SGLang source is found at all.
"""

from __future__ import annotations
import __future__

import ast
import asyncio
import importlib
import importlib.metadata
import socket
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from proto.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    encode_seq,
)
from proto.metrics import KvMetrics
from shared.engine.cpu.kv_events import (
    KvEventsConfig,
    KvEventSubscriber,
    ZmqKvEventPublisher,
    ZmqKvMetricsPusher,
    encode_kv_metrics,
    offset_endpoint_port,
)

pytestmark = pytest.mark.timeout(30)

KV_EVENTS = "sglang.srt.disaggregation.kv_events"
KV_PUBLISHER = "sglang.srt.managers.scheduler_components.kv_events_publisher"


def _source_file(module: str) -> Path | None:
    relpath = module.replace(".", "/") + ".py"
    try:
        located = Path(str(importlib.metadata.distribution("sglang").locate_file(relpath)))
        if located.is_file():
            return located
    except importlib.metadata.PackageNotFoundError:
        pass
    # A source tree or an unpacked wheel on sys.path (no dist-info).
    for entry in sys.path:
        candidate = Path(entry or ".") / relpath
        if candidate.is_file():
            return candidate
    return None


def _exec_source(module: str, path: Path) -> types.ModuleType:
    tree = ast.parse(path.read_text(), str(path))
    flags = 0
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            for alias in node.names:
                flags |= getattr(__future__, alias.name).compiler_flag
    mod = types.ModuleType(f"_sglang_source.{module}")
    mod.__file__ = str(path)
    # msgspec resolves string annotations through the defining module in sys.modules.
    sys.modules[mod.__name__] = mod
    for node in tree.body:
        code = compile(ast.Module([node], []), str(path), "exec", flags=flags, dont_inherit=True)
        try:
            exec(code, mod.__dict__)
        except (ImportError, NameError):
            # A missing dependency, or a statement that uses one.
            continue
    return mod


def _sglang(module: str) -> tuple[types.ModuleType, str]:
    try:
        return importlib.import_module(module), "import"
    except Exception:  # sglang, or one of its many heavy dependencies, does not import here
        path = _source_file(module)
        if path is None:
            pytest.skip(f"{module} is not installed", allow_module_level=True)
        return _exec_source(module, path), "source"


sgl_events, EVENTS_FROM = _sglang(KV_EVENTS)
sgl_publisher, PUBLISHER_FROM = _sglang(KV_PUBLISHER)

EVENTS: list[KVEvent] = [
    BlockStored(
        block_hashes=[-(2**63), 2**63 - 1, 7],
        parent_block_hash=None,
        token_ids=[0, 1, 127, 128, 65535, 2**31],
        block_size=2,
        lora_id=None,
    ),
    BlockStored(
        block_hashes=[11],
        parent_block_hash=7,
        token_ids=[5, 6],
        block_size=2,
        lora_id=3,
        medium="CPU_PINNED",
        cache_salt="salt",
        session_id="s-1",
        lora_name="adapter",
    ),
    BlockRemoved(block_hashes=[11, 7]),
    BlockRemoved(block_hashes=[1], medium="DISK"),
    AllBlocksCleared(),
]


def _sglang_events() -> list[Any]:
    out: list[Any] = []
    for event in EVENTS:
        cls = getattr(sgl_events, type(event).__name__)
        out.append(cls(**msgspec.structs.asdict(event)))
    return out


def _as_plain(batch: Any) -> tuple[float, list[tuple[str, dict[str, Any]]], int | None]:
    return (
        batch.ts,
        [(type(e).__name__, msgspec.structs.asdict(e)) for e in batch.events],
        batch.attn_dp_rank,
    )


@pytest.fixture
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def test_sglang_classes_were_found() -> None:
    # Not a check of ours: says in the test log which way SGLang's classes were obtained.
    assert EVENTS_FROM in ("import", "source")
    assert PUBLISHER_FROM in ("import", "source")
    assert hasattr(sgl_events, "KVEventBatch") and hasattr(sgl_publisher, "KvMetrics")


async def test_our_published_bytes_decode_with_sglangs_classes(
    zctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    # DP rank 3 publishes on base + 3; a concrete host needs "bind": true to be bound.
    config = KvEventsConfig(
        publisher="zmq", endpoint=f"tcp://127.0.0.1:{port - 3}", bind=True, topic="kv"
    )
    pub = ZmqKvEventPublisher(config, dp_rank=3)
    pub.start()
    assert pub.connect_address == f"tcp://127.0.0.1:{port}"
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    assert pub.connect_address is not None
    sub.connect(pub.connect_address)
    try:
        deadline = time.monotonic() + 3
        while not sub.poll(0):
            assert time.monotonic() < deadline, "subscriber never connected"
            pub.publish(EVENTS)
            await asyncio.sleep(0.005)
        topic, seq, payload = sub.recv_multipart()
    finally:
        sub.close(linger=0)
        await pub.close()
    assert topic == b"kv"
    assert int.from_bytes(seq, "big") < pub.next_seq
    theirs = msgspec.msgpack.Decoder(sgl_events.KVEventBatch).decode(payload)
    ours = msgspec.msgpack.decode(payload, type=KVEventBatch)
    assert _as_plain(theirs) == _as_plain(ours)
    assert theirs.attn_dp_rank == 3
    assert [type(e).__name__ for e in theirs.events] == [type(e).__name__ for e in EVENTS]
    # And SGLang would have sent exactly these bytes for the same batch.
    assert msgspec.msgpack.Encoder().encode(theirs) == payload


def test_sglangs_bytes_decode_with_ours() -> None:
    for rank in (None, 0, 5):
        batch = sgl_events.KVEventBatch(ts=1234.5, events=_sglang_events(), attn_dp_rank=rank)
        payload = msgspec.msgpack.Encoder().encode(batch)
        ours = msgspec.msgpack.decode(payload, type=KVEventBatch)
        assert _as_plain(ours) == _as_plain(batch)
        assert ours.events == EVENTS
        assert msgspec.msgpack.encode(ours) == payload


def test_kv_metrics_bytes_match_sglangs() -> None:
    fields: dict[str, Any] = {
        "request_active_slots": 3,
        "request_total_slots": 48,
        "kv_active_blocks": 4321,
        "kv_total_blocks": 65536,
        "num_requests_waiting": 7,
        "gpu_cache_usage_perc": 0.0659,
        "gpu_prefix_cache_hit_rate": 0.25,
        "data_parallel_rank": 2,
    }
    theirs = sgl_publisher.KvMetrics(**fields)
    raw = encode_kv_metrics(KvMetrics(**fields))
    assert msgspec.msgpack.encode(theirs) == raw
    decoded = msgspec.msgpack.decode(raw, type=sgl_publisher.KvMetrics)
    assert msgspec.structs.asdict(decoded) == fields
    # SGLang's IPC decoder is a tagged union of many structs and a few primitives.
    union = msgspec.msgpack.Decoder(sgl_publisher.KvMetrics | int | float | bool | bytes)
    assert msgspec.structs.asdict(union.decode(raw)) == fields
    assert msgspec.structs.asdict(sgl_publisher.KvMetrics()) == msgspec.structs.asdict(KvMetrics())


async def test_metrics_pusher_feeds_a_pull_that_decodes_with_sglangs_class(
    tmp_path: Path, zctx: zmq.Context[zmq.Socket[bytes]]
) -> None:
    pull = zctx.socket(zmq.PULL)
    pull.bind(f"ipc://{tmp_path}/metrics")
    pusher = ZmqKvMetricsPusher(f"ipc://{tmp_path}/metrics")
    pusher.start()
    try:
        deadline = time.monotonic() + 3
        while not pull.poll(0):
            assert time.monotonic() < deadline, "nothing arrived"
            pusher.publish(KvMetrics(request_active_slots=1, data_parallel_rank=1))
            await asyncio.sleep(0.005)
        got = msgspec.msgpack.decode(pull.recv(), type=sgl_publisher.KvMetrics)
    finally:
        pusher.close()
    assert (got.request_active_slots, got.data_parallel_rank) == (1, 1)


@pytest.mark.parametrize(
    ("endpoint", "rank"),
    [
        ("tcp://*:5557", 0),
        ("tcp://*:5557", 3),
        ("tcp://0.0.0.0:6000", 1),
        ("tcp://10.1.2.3:5557", 7),
        ("tcp://[::1]:5557", 2),
        ("inproc://cache", 0),
        ("inproc://cache", 2),
        ("ipc:///tmp/kv", 0),
        ("ipc:///tmp/kv", 1),
        ("ipc:///tmp/tcp-events:5557", 1),
        ("tcp://*:notaport", 1),
    ],
)
def test_offset_endpoint_port_matches_sglangs(endpoint: str, rank: int) -> None:
    theirs: str | type[Exception]
    ours: str | type[Exception]
    try:
        theirs = sgl_events.ZmqEventPublisher.offset_endpoint_port(endpoint, rank)
    except ValueError:
        theirs = ValueError
    try:
        ours = offset_endpoint_port(endpoint, rank)
    except ValueError:
        ours = ValueError
    assert ours == theirs


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        '{"publisher": "zmq"}',
        '{"publisher": "zmq", "endpoint": "tcp://*:6000", "replay_endpoint": "tcp://*:6001",'
        ' "bind": true, "buffer_steps": 5, "hwm": 10, "max_queue_size": 20, "topic": "kv",'
        ' "format": "dynamo"}',
        '{"publisher": "zmq", "hwm": "10", "bind": "false", "unknown": [1]}',
    ],
)
def test_config_parses_like_sglang(text: str) -> None:
    if not hasattr(sgl_events, "KVEventsConfig"):
        pytest.skip("pydantic is not installed")
    theirs = sgl_events.KVEventsConfig.from_cli(text).model_dump()
    assert msgspec.structs.asdict(KvEventsConfig.parse(text)) == theirs


def _sglang_publisher(**kwargs: Any) -> Any:
    return sgl_events.ZmqEventPublisher(
        attn_dp_rank=0, endpoint="tcp://127.0.0.1:*", bind=True, **kwargs
    )


async def _shutdown(publisher: Any) -> None:
    await asyncio.to_thread(publisher.shutdown)


async def test_sglangs_publisher_feeds_our_subscriber_with_replay() -> None:
    publisher = _sglang_publisher(replay_endpoint="tcp://127.0.0.1:*", topic="kv")
    sent: dict[int, list[Any]] = {}
    count = 0

    def publish() -> None:
        nonlocal count
        events = [sgl_events.BlockRemoved(block_hashes=[count])]
        sent[count] = events
        count += 1
        publisher.publish(sgl_events.KVEventBatch(ts=time.time(), events=events))

    for _ in range(5):  # before anyone listens: only the replay socket has them
        publish()
    # SGLang sends from a thread: wait until those five left its queue (and its PUB socket,
    # with nobody subscribed), or a slow thread would deliver them live to the subscriber.
    deadline = time.monotonic() + 5
    while len(publisher._buffer) < 5 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)  # a thread's deque: nothing to await
    assert len(publisher._buffer) == 5

    async def keep_publishing() -> None:
        while True:
            publish()
            await asyncio.sleep(0.005)

    feeder = asyncio.create_task(keep_publishing())
    got: list[tuple[int, KVEventBatch]] = []
    try:
        async with KvEventSubscriber(
            publisher._local_pub_endpoint,
            replay_endpoint=publisher._local_replay_endpoint,
            topic="kv",
        ) as sub:

            async def take() -> None:
                async for item in sub:
                    got.append(item)
                    if len(got) == 30:
                        return

            await asyncio.wait_for(take(), 10)
    finally:
        feeder.cancel()
        await _shutdown(publisher)
    assert [seq for seq, _ in got] == list(range(30))
    for seq, batch in got:
        assert batch.attn_dp_rank == 0
        assert [msgspec.structs.asdict(e) for e in batch.events] == [
            msgspec.structs.asdict(e) for e in sent[seq]
        ]
    assert sub.replayed >= 5 and sub.lost == 0


async def test_our_replay_socket_answers_like_sglangs(
    zctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    theirs = _sglang_publisher(replay_endpoint="tcp://127.0.0.1:*", buffer_steps=3, topic="t")
    ours = ZmqKvEventPublisher(
        KvEventsConfig(
            publisher="zmq",
            endpoint="tcp://127.0.0.1:*",
            bind=True,
            replay_endpoint="tcp://127.0.0.1:*",
            buffer_steps=3,
            topic="t",
        )
    )
    ours.start()
    for i in range(5):
        theirs.publish(sgl_events.KVEventBatch(ts=1.0, events=[sgl_events.BlockRemoved([i])]))
        ours.publish([BlockRemoved(block_hashes=[i])])

    async def ask(endpoint: str, start: bytes) -> list[list[bytes]]:
        dealer = zctx.socket(zmq.DEALER)
        dealer.connect(endpoint)
        dealer.send_multipart([b"", start])
        replies: list[list[bytes]] = []
        deadline = time.monotonic() + 3
        try:
            while not replies or replies[-1][2] != encode_seq(-1):
                assert time.monotonic() < deadline, f"no end marker from {endpoint}"
                if dealer.poll(0):
                    replies.append(dealer.recv_multipart())
                else:
                    await asyncio.sleep(0.002)
        finally:
            dealer.close(linger=0)
        return replies

    try:
        for start in (encode_seq(1), encode_seq(4), encode_seq(9), b"\x02"):
            mine = await ask(str(ours.replay_connect_address), start)
            sglangs = await ask(theirs._local_replay_endpoint, start)
            # Identical frames; the payload differs only by its timestamp.
            assert [r[:3] for r in mine] == [r[:3] for r in sglangs]
            assert mine[-1] == sglangs[-1] == [b"", b"", b"\xff" * 8, b""]
            decode = msgspec.msgpack.Decoder(sgl_events.KVEventBatch).decode
            assert [decode(r[3]).events for r in mine[:-1]] == [
                decode(r[3]).events for r in sglangs[:-1]
            ]
    finally:
        await ours.close()
        await _shutdown(theirs)
