"""The simulated engine's KV-event and metrics sockets, over real ZMQ on loopback and ipc.

Why real sockets: the properties that matter (frame layout on the wire, the DP port offset,
late joiners, high-water-mark drops, ports freed on close) live in libzmq's behaviour, not in
our code alone. Everything binds 127.0.0.1 or an ipc path in a temporary directory.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from proto.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    encode_seq,
)
from proto.metrics import KvMetrics, SglangKvMetrics
from shared.engine.cpu.kv_events import (
    KvEventsConfig,
    KvEventSubscriber,
    ZmqKvEventPublisher,
    ZmqKvMetricsPusher,
    connect_endpoint,
    encode_kv_metrics,
    offset_endpoint_port,
    should_bind,
)

pytestmark = pytest.mark.timeout(20)

ANY_PORT = "tcp://127.0.0.1:*"


def _config(**overrides: Any) -> KvEventsConfig:
    fields: dict[str, Any] = {"publisher": "zmq", "endpoint": ANY_PORT, "bind": True}
    fields.update(overrides)
    return KvEventsConfig(**fields)


def _events(i: int) -> list[KVEvent]:
    return [BlockRemoved(block_hashes=[i])]


def _free_port_pair() -> int:
    """A port P with P and P + 1 both free right now (for DP rank 0 and 1)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture
def zctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


async def _started(config: KvEventsConfig, dp_rank: int = 0) -> ZmqKvEventPublisher:
    pub = ZmqKvEventPublisher(config, dp_rank)
    pub.start()
    return pub


async def _sync_raw_sub(pub: ZmqKvEventPublisher, sub: zmq.Socket[bytes]) -> int:
    """Publish probes until ``sub`` (a slow joiner) gets one; returns the last probe's seq."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        pub.publish([AllBlocksCleared()])
        await asyncio.sleep(0.005)
        if sub.poll(0):
            while sub.poll(20):
                sub.recv_multipart()
            return pub.next_seq - 1
    raise AssertionError("subscriber never connected")


async def _take(sub: KvEventSubscriber, n: int) -> list[tuple[int, KVEventBatch]]:
    out: list[tuple[int, KVEventBatch]] = []

    async def run() -> None:
        async for item in sub:
            out.append(item)
            if len(out) == n:
                return

    await asyncio.wait_for(run(), 5)
    return out


# --- config and addresses -----------------------------------------------------------------


def test_config_defaults_are_sglangs() -> None:
    cfg = KvEventsConfig.parse("{}")
    assert cfg == KvEventsConfig()
    assert (cfg.publisher, cfg.endpoint, cfg.bind, cfg.replay_endpoint) == (
        "null",
        "tcp://*:5557",
        None,
        None,
    )
    assert (cfg.buffer_steps, cfg.hwm, cfg.max_queue_size, cfg.topic, cfg.format) == (
        10_000,
        100_000,
        100_000,
        "",
        "default",
    )


def test_config_parses_the_cli_value_like_pydantic() -> None:
    cfg = KvEventsConfig.parse(
        '{"publisher": "zmq", "endpoint": "tcp://*:6000", "replay_endpoint": "tcp://*:6100",'
        ' "bind": "true", "buffer_steps": "5", "hwm": 7.0, "topic": "kv", "format": "dynamo",'
        ' "some_newer_option": 1}'
    )
    assert cfg == KvEventsConfig(
        publisher="zmq",
        endpoint="tcp://*:6000",
        replay_endpoint="tcp://*:6100",
        bind=True,
        buffer_steps=5,
        hwm=7,
        topic="kv",
        format="dynamo",
    )
    assert KvEventsConfig.parse(cfg.to_json()) == cfg
    assert KvEventsConfig.parse(b'{"publisher": "zmq"}').publisher == "zmq"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("  ", "empty"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected `object`"),
        ('{"publisher": "kafka"}', "$.publisher"),
        ('{"format": "vllm"}', "$.format"),
        ('{"hwm": -1}', "$.hwm"),
        ('{"buffer_steps": 1.5}', "$.buffer_steps"),
        ('{"endpoint": null}', "$.endpoint"),
    ],
)
def test_config_errors_name_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        KvEventsConfig.parse(text)
    assert message.lower() in str(err.value).lower()


@pytest.mark.parametrize(
    ("endpoint", "rank", "expected"),
    [
        ("tcp://*:5557", 0, "tcp://*:5557"),
        ("tcp://*:5557", 3, "tcp://*:5560"),
        ("tcp://10.0.0.5:5557", 1, "tcp://10.0.0.5:5558"),
        ("tcp://[::1]:5557", 2, "tcp://[::1]:5559"),
        ("inproc://cache", 0, "inproc://cache"),
        ("inproc://cache", 2, "inproc://cache_dp2"),
        ("ipc:///tmp/kv", 0, "ipc:///tmp/kv"),
    ],
)
def test_offset_endpoint_port(endpoint: str, rank: int, expected: str) -> None:
    assert offset_endpoint_port(endpoint, rank) == expected


@pytest.mark.parametrize(
    ("endpoint", "rank", "message"),
    [
        # SGLang cannot offset ipc, so an ipc endpoint only works for a single DP rank.
        ("ipc:///tmp/kv", 1, "only tcp"),
        ("tcp://*:notaport", 1, "not a number"),
        ("tcp://*:5557", -1, "dp_rank"),
    ],
)
def test_offset_endpoint_port_errors(endpoint: str, rank: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        offset_endpoint_port(endpoint, rank)


@pytest.mark.parametrize(
    ("endpoint", "bind", "expected"),
    [
        ("tcp://*:5557", None, True),
        ("tcp://0.0.0.0:5557", None, True),
        ("tcp://[::]:5557", None, True),
        # SGLang tests substrings: any IPv6 literal contains "::".
        ("tcp://[fd00::1]:5557", None, True),
        ("ipc:///tmp/kv", None, True),
        ("inproc://kv", None, True),
        ("tcp://10.0.0.5:5557", None, False),
        ("tcp://127.0.0.1:5557", None, False),
        ("tcp://127.0.0.1:5557", True, True),
        ("tcp://*:5557", False, False),
    ],
)
def test_should_bind(endpoint: str, bind: bool | None, expected: bool) -> None:
    assert should_bind(endpoint, bind) is expected


def test_connect_endpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert connect_endpoint("tcp://*:5557") == "tcp://127.0.0.1:5557"
    assert connect_endpoint("tcp://0.0.0.0:5557") == "tcp://127.0.0.1:5557"
    assert connect_endpoint("tcp://[::]:5557") == "tcp://[::1]:5557"
    assert connect_endpoint("tcp://10.0.0.5:5557") == "tcp://10.0.0.5:5557"
    assert connect_endpoint("inproc://kv") == "inproc://kv"
    assert connect_endpoint("ipc://@abstract") == "ipc://@abstract"
    monkeypatch.chdir(tmp_path)
    assert connect_endpoint("ipc://kv.sock") == f"ipc://{tmp_path}/kv.sock"


# --- the event stream -----------------------------------------------------------------------


async def test_frames_are_byte_exact(zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pub = await _started(_config(topic="kv"), dp_rank=0)
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    assert pub.connect_address is not None
    sub.connect(pub.connect_address)
    try:
        last = await _sync_raw_sub(pub, sub)
        events: list[KVEvent] = [
            BlockStored(
                block_hashes=[-5, 2**62],
                parent_block_hash=None,
                token_ids=[1, 2, 3, 300],
                block_size=2,
                lora_id=None,
            ),
            BlockStored(
                block_hashes=[9],
                parent_block_hash=2**62,
                token_ids=[4, 5],
                block_size=2,
                lora_id=None,
                medium="GPU",
                lora_name="adapter",
            ),
            BlockRemoved(block_hashes=[9], medium="CPU_PINNED"),
            AllBlocksCleared(),
        ]
        before = time.time()
        pub.publish(events)
        pub.publish([])  # an empty step is not sent and takes no number
        pub.publish(_events(1))
        assert sub.poll(2000)
        topic, seq, payload = sub.recv_multipart()
        assert topic == b"kv"
        assert seq == (last + 1).to_bytes(8, "big")
        ts = msgspec.msgpack.decode(payload)[0]
        assert before <= ts <= time.time()
        # Built from plain containers, so this pins the wire shape, not our structs: a
        # positional batch with attn_dp_rank present, "type" first, None optionals omitted,
        # but parent_block_hash and lora_id always there.
        expected = [
            ts,
            [
                {
                    "type": "BlockStored",
                    "block_hashes": [-5, 2**62],
                    "parent_block_hash": None,
                    "token_ids": [1, 2, 3, 300],
                    "block_size": 2,
                    "lora_id": None,
                },
                {
                    "type": "BlockStored",
                    "block_hashes": [9],
                    "parent_block_hash": 2**62,
                    "token_ids": [4, 5],
                    "block_size": 2,
                    "lora_id": None,
                    "medium": "GPU",
                    "lora_name": "adapter",
                },
                {"type": "BlockRemoved", "block_hashes": [9], "medium": "CPU_PINNED"},
                {"type": "AllBlocksCleared"},
            ],
            0,
        ]
        assert payload == msgspec.msgpack.encode(expected)
        assert sub.poll(2000)
        assert sub.recv_multipart()[1] == encode_seq(last + 2)
        assert pub.next_seq == last + 3
        assert pub.published == last + 3
        assert pub.dropped == 0
    finally:
        sub.close(linger=0)
        await pub.close()


async def test_ipc_stream_and_replay(tmp_path: Path) -> None:
    # ipc binds without "bind": true, like SGLang.
    config = KvEventsConfig(
        publisher="zmq",
        endpoint=f"ipc://{tmp_path}/ev",
        replay_endpoint=f"ipc://{tmp_path}/replay",
    )
    pub = await _started(config)
    assert pub.bind
    assert pub.connect_address == f"ipc://{tmp_path}/ev"
    assert pub.replay_connect_address == f"ipc://{tmp_path}/replay"
    for i in range(3):
        pub.publish(_events(i))
    try:
        async with KvEventSubscriber(
            pub.connect_address, replay_endpoint=pub.replay_connect_address
        ) as sub:
            # Nothing published after it joined: the first three come from the replay socket.
            got = await _take(sub, 3)
            assert [seq for seq, _ in got] == [0, 1, 2]
            assert [b.events for _, b in got] == [_events(i) for i in range(3)]
            assert (sub.replayed, sub.gaps, sub.lost) == (3, 0, 0)
    finally:
        await pub.close()


async def test_dp_rank_offsets_ports_and_stamps_batches() -> None:
    events_port, replay_port = _free_port_pair(), 0
    while replay_port in (0, events_port, events_port + 1):
        replay_port = _free_port_pair()
    config = _config(
        endpoint=f"tcp://127.0.0.1:{events_port}",
        replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
    )
    pub = await _started(config, dp_rank=1)
    assert pub.endpoint == f"tcp://127.0.0.1:{events_port + 1}"
    assert pub.connect_address == f"tcp://127.0.0.1:{events_port + 1}"
    assert pub.replay_connect_address == f"tcp://127.0.0.1:{replay_port + 1}"
    pub.publish(_events(7))
    try:
        async with KvEventSubscriber(
            f"tcp://127.0.0.1:{events_port + 1}",
            replay_endpoint=f"tcp://127.0.0.1:{replay_port + 1}",
        ) as sub:
            [(seq, batch)] = await _take(sub, 1)
            assert seq == 0
            assert batch.attn_dp_rank == 1
            assert batch.events == _events(7)
    finally:
        await pub.close()


async def test_late_subscriber_catches_up_to_the_full_sequence() -> None:
    pub = await _started(_config(replay_endpoint=ANY_PORT))
    assert pub.connect_address is not None
    sent: dict[int, list[KVEvent]] = {}

    def publish() -> None:
        events = _events(1000 + pub.next_seq)
        sent[pub.next_seq] = events
        pub.publish(events)

    for _ in range(5):  # missed: published before the subscriber exists
        publish()

    async def keep_publishing() -> None:
        while True:
            publish()
            await asyncio.sleep(0.002)

    feeder = asyncio.create_task(keep_publishing())
    try:
        async with KvEventSubscriber(
            pub.connect_address, replay_endpoint=pub.replay_connect_address
        ) as sub:
            got = await _take(sub, 60)
    finally:
        feeder.cancel()
        await pub.close()
    assert [seq for seq, _ in got] == list(range(60))
    assert all(batch.events == sent[seq] for seq, batch in got)
    assert sub.replayed >= 5
    assert sub.lost == 0


async def test_subscriber_behind_its_high_water_mark_recovers_through_replay(
    zctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    pub = ZmqKvEventPublisher(_config(replay_endpoint=ANY_PORT, hwm=1), ctx=zctx)
    pub.start()
    assert pub.connect_address is not None
    try:
        async with KvEventSubscriber(
            pub.connect_address, replay_endpoint=pub.replay_connect_address, hwm=1
        ) as sub:
            pub.publish(_events(0))
            await _take(sub, 1)  # joined (it replays 0 if the live copy was too early)
            start = time.monotonic()
            # Megabytes while the subscriber cannot read: more than the kernel buffers hold.
            big = list(range(1000, 2000))
            for i in range(1, 1000):
                pub.publish([BlockRemoved(block_hashes=[i, *big])])
            assert time.monotonic() - start < 1.0  # never waits on the subscriber

            async def tail() -> None:
                # A lost tail only shows as a gap once a later batch arrives.
                while True:
                    await asyncio.sleep(0.005)
                    pub.publish(_events(pub.next_seq))

            feeder = asyncio.create_task(tail())
            try:
                got = await _take(sub, 1000)
            finally:
                feeder.cancel()
            assert [seq for seq, _ in got] == list(range(1, 1001))
            assert sub.gaps >= 1
            assert sub.lost == 0
            assert pub.replayed > 0
    finally:
        await pub.close()


async def test_what_replay_no_longer_holds_is_counted_lost() -> None:
    pub = await _started(_config(replay_endpoint=ANY_PORT, buffer_steps=3))
    assert pub.connect_address is not None
    for i in range(10):
        pub.publish(_events(i))
    try:
        async with KvEventSubscriber(
            pub.connect_address, replay_endpoint=pub.replay_connect_address
        ) as sub:
            got = await _take(sub, 3)
        assert [seq for seq, _ in got] == [7, 8, 9]
        assert (sub.lost, sub.replayed, sub.last_seq) == (7, 3, 9)
    finally:
        await pub.close()


async def test_replay_waits_for_a_slow_client_instead_of_dropping(
    zctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    pub = await _started(_config(replay_endpoint=ANY_PORT))
    assert pub.replay_connect_address is not None
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVHWM, 100)
    dealer.setsockopt(zmq.RCVBUF, 4096)
    dealer.connect(pub.replay_connect_address)
    # Several MB: more than the ROUTER's high-water mark and the kernel's buffers hold, so a
    # plain ROUTER (SGLang's) would drop replies, the end marker included.
    big = list(range(1000, 2500))
    for i in range(3000):
        pub.publish([BlockRemoved(block_hashes=[i, *big])])
    try:
        dealer.send_multipart([b"", encode_seq(0)])
        # Not reading: the replay task must start, then wait for us without blocking the loop.
        started = time.monotonic() + 2
        while pub.replayed == 0:
            assert time.monotonic() < started, "the replay never started"
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert 0 < pub.replayed < 3000
        seqs: list[int] = []
        deadline = time.monotonic() + 5
        while not seqs or seqs[-1] != -1:
            assert time.monotonic() < deadline, f"replay stalled after {len(seqs)} replies"
            if not dealer.poll(0):
                await asyncio.sleep(0.001)
                continue
            seqs.append(int.from_bytes(dealer.recv_multipart()[2], "big", signed=True))
        assert seqs == [*range(3000), -1]
        assert pub.replayed == 3000
    finally:
        dealer.close(linger=0)
        await pub.close()


async def test_replay_wire_protocol(zctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    pub = await _started(_config(replay_endpoint=ANY_PORT, buffer_steps=3, topic="t"))
    for i in range(5):
        pub.publish(_events(i))
    dealer = zctx.socket(zmq.DEALER)
    assert pub.replay_connect_address is not None
    dealer.connect(pub.replay_connect_address)

    async def recv() -> list[bytes]:
        deadline = time.monotonic() + 2
        while not dealer.poll(0):
            assert time.monotonic() < deadline, "no reply"
            await asyncio.sleep(0.002)
        return dealer.recv_multipart()

    try:
        # Only the last buffer_steps batches are kept; start is read as an unsigned integer.
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        replies = [await recv() for _ in range(4)]
        decoder = msgspec.msgpack.Decoder(KVEventBatch)
        for seq, reply in zip((2, 3, 4), replies, strict=False):
            assert reply[:3] == [b"", b"t", seq.to_bytes(8, "big")]
            assert decoder.decode(reply[3]).events == _events(seq)
        assert replies[3] == [b"", b"", b"\xff" * 8, b""]
        # Past the end: only the end marker.
        dealer.send_multipart([b"", (99).to_bytes(8, "big")])
        assert await recv() == [b"", b"", b"\xff" * 8, b""]
        # A malformed request is ignored (as SGLang does) and the socket keeps serving.
        dealer.send_multipart([b"", b"x", b"y"])
        await asyncio.sleep(0.05)
        assert not dealer.poll(0)
        dealer.send_multipart([b"", (4).to_bytes(8, "big")])
        assert (await recv())[2] == encode_seq(4)
        assert (await recv())[2] == encode_seq(-1)
        assert pub.replayed == 4
    finally:
        dealer.close(linger=0)
        await pub.close()


async def test_subscriber_sees_a_restarted_publisher() -> None:
    port = _free_port_pair()
    endpoint = f"tcp://127.0.0.1:{port}"
    first = await _started(_config(endpoint=endpoint))
    async with KvEventSubscriber(endpoint, start_seq=None) as sub:

        async def feed(pub: ZmqKvEventPublisher) -> None:
            while True:
                pub.publish(_events(pub.next_seq))
                await asyncio.sleep(0.002)

        feeder = asyncio.create_task(feed(first))
        try:
            before = await _take(sub, 3)
        finally:
            feeder.cancel()
        while first.next_seq < 200:  # so the new publisher's numbers look like a step back
            first.publish(_events(first.next_seq))
        await asyncio.sleep(0.05)
        await first.close()
        second = await _started(_config(endpoint=endpoint))
        feeder = asyncio.create_task(feed(second))
        try:
            seen: list[int] = []
            async for seq, _ in sub:
                seen.append(seq)
                if sub.restarts:
                    break
        finally:
            feeder.cancel()
            await second.close()
    assert [s for s, _ in before] == sorted(s for s, _ in before)
    assert sub.restarts == 1
    assert seen[-1] < 200


# --- never blocking ------------------------------------------------------------------------


async def test_publishing_without_any_subscriber_never_blocks() -> None:
    port = _free_port_pair()
    # Connect mode towards a port nobody listens on, and bind mode with nobody connected.
    connecting = await _started(_config(endpoint=f"tcp://127.0.0.1:{port}", bind=False))
    assert connecting.connect_address is None
    binding = await _started(_config(hwm=1))
    start = time.monotonic()
    for i in range(5000):
        connecting.publish(_events(i))
        binding.publish(_events(i))
    assert time.monotonic() - start < 1.0
    assert connecting.published == binding.published == 5000
    await connecting.close()
    await binding.close()


def test_publish_before_start_and_after_close() -> None:
    pub = ZmqKvEventPublisher(_config())
    with pytest.raises(RuntimeError, match="not started"):
        pub.publish(_events(0))
    asyncio.run(pub.close())
    with pytest.raises(RuntimeError, match="closed"):
        pub.publish(_events(0))
    with pytest.raises(RuntimeError, match="closed"):
        pub.start()


async def test_replay_needs_the_event_loop() -> None:
    pub = ZmqKvEventPublisher(_config(replay_endpoint=ANY_PORT))
    with pytest.raises(RuntimeError, match="no running event loop"):
        await asyncio.to_thread(pub.start)
    await pub.close()


async def test_close_releases_the_ports() -> None:
    pub = await _started(_config(replay_endpoint=ANY_PORT))
    events, replay = pub.connect_address, pub.replay_connect_address
    assert events is not None and replay is not None
    await pub.close()
    await pub.close()  # idempotent
    again = await _started(_config(endpoint=events, replay_endpoint=replay))
    assert (again.connect_address, again.replay_connect_address) == (events, replay)
    await again.close()


async def test_closing_the_subscriber_ends_iteration() -> None:
    pub = await _started(_config())
    assert pub.connect_address is not None
    sub = KvEventSubscriber(pub.connect_address)
    sub.connect()

    async def drain() -> list[tuple[int, KVEventBatch]]:
        return [item async for item in sub]

    task = asyncio.create_task(drain())
    await asyncio.sleep(0.02)
    await sub.close()
    assert await asyncio.wait_for(task, 1) == []
    await pub.close()


# --- load metrics ---------------------------------------------------------------------------


METRICS = KvMetrics(
    request_active_slots=3,
    request_total_slots=64,
    kv_active_blocks=1234,
    kv_total_blocks=100_000,
    num_requests_waiting=2,
    gpu_cache_usage_perc=0.01234,
    gpu_prefix_cache_hit_rate=0.5,
    data_parallel_rank=1,
)


def test_kv_metrics_encoding_is_a_tagged_array() -> None:
    raw = encode_kv_metrics(METRICS)
    # A 9-element array whose first item is the class name, then the fields in order.
    assert raw == msgspec.msgpack.encode(["KvMetrics", 3, 64, 1234, 100_000, 2, 0.01234, 0.5, 1])
    assert raw[:11] == b"\x99\xa9KvMetrics"
    assert encode_kv_metrics(SglangKvMetrics(**msgspec.structs.asdict(METRICS))) == raw


async def test_metrics_pusher_reaches_a_bound_pull(
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
            pusher.publish(METRICS)
            await asyncio.sleep(0.005)
        raw = pull.recv()
        decoded = msgspec.msgpack.decode(raw, type=SglangKvMetrics)
        assert msgspec.structs.asdict(decoded) == msgspec.structs.asdict(METRICS)
        assert pusher.published >= 1
    finally:
        pusher.close()
        pusher.close()


def test_metrics_pusher_without_a_consumer_drops_instead_of_blocking() -> None:
    pusher = ZmqKvMetricsPusher(f"tcp://127.0.0.1:{_free_port_pair()}")
    pusher.start()
    start = time.monotonic()
    for _ in range(2000):
        pusher.publish(METRICS)
    assert time.monotonic() - start < 1.0
    assert (pusher.published, pusher.dropped) == (0, 2000)
    pusher.close()
    with pytest.raises(RuntimeError, match="closed"):
        pusher.publish(METRICS)
