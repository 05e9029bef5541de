"""One engine's relay over real ZMQ sockets: the simulated engine's PUB + replay ROUTER and
metrics PUSH on one side, a list standing in for NATS on the other."""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio
from prometheus_client import REGISTRY

from proto.kv_events import AllBlocksCleared, BlockStored, KVEvent
from proto.metrics import SGLANG_KV_METRICS_CLASS, KvEventsMessage, KvMetrics, LoadMetrics
from services.publisher.relay import RESET_SEQ, EngineRelay, RelaySettings
from services.publisher.sources import EngineSource, RankSockets
from services.publisher.state import CacheState
from shared.engine.cpu.kv_events import KvEventsConfig, ZmqKvEventPublisher, ZmqKvMetricsPusher
from shared.infra import free_port

WORKER = 0xA11CE
PAGE = 4


class Sink:
    """An ``EventSink`` that keeps what it is given."""

    def __init__(self) -> None:
        self.batches: list[KvEventsMessage] = []
        self.reports: list[LoadMetrics] = []
        self.changed = asyncio.Event()

    async def kv(self, message: KvEventsMessage) -> None:
        self.batches.append(message)
        self.changed.set()

    async def load(self, message: LoadMetrics) -> None:
        self.reports.append(message)
        self.changed.set()

    async def wait(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def seqs(self) -> list[int]:
        return [m.seq for m in self.batches]


def counter(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def batch(n: int) -> list[KVEvent]:
    """Batch ``n``: one root block of its own."""
    return [
        BlockStored(
            block_hashes=[1000 + n],
            parent_block_hash=None,
            token_ids=[n] * PAGE,
            block_size=PAGE,
            lora_id=None,
            medium="GPU",
        )
    ]


class Engine:
    """A KV-event publisher with replay on fixed ports (so it can be restarted)."""

    def __init__(self) -> None:
        self.port, self.replay_port = free_port(), free_port()
        self.pub: ZmqKvEventPublisher | None = None

    def start(self) -> ZmqKvEventPublisher:
        config = KvEventsConfig(
            publisher="zmq",
            endpoint=f"tcp://127.0.0.1:{self.port}",
            replay_endpoint=f"tcp://127.0.0.1:{self.replay_port}",
            bind=True,
        )
        self.pub = ZmqKvEventPublisher(config, 0)
        self.pub.start()
        return self.pub

    def source(self) -> EngineSource:
        rank = RankSockets(0, f"tcp://127.0.0.1:{self.port}", f"tcp://127.0.0.1:{self.replay_port}")
        return EngineSource(worker_id=WORKER, ranks=(rank,), metrics=None, page_size=PAGE)

    def drop_next(self, *seqs: int) -> None:
        """Make the PUB socket silently skip these sequence numbers (they stay replayable)."""
        assert self.pub is not None and self.pub._pub is not None
        sock = self.pub._pub
        send = sock.send_multipart

        def lossy(frames: Any, *args: Any, **kwargs: Any) -> Any:
            if int.from_bytes(frames[1], "big") in seqs:
                return None
            return send(frames, *args, **kwargs)

        sock.send_multipart = lossy  # type: ignore[method-assign]


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    eng = Engine()
    yield eng
    if eng.pub is not None:
        await eng.pub.close()


def make_relay(
    source: EngineSource, ctx: zmq.asyncio.Context, **settings: Any
) -> tuple[EngineRelay, Sink, CacheState]:
    sink = Sink()
    state = CacheState()
    relay = EngineRelay(source, state, sink, RelaySettings(replay_timeout=1.0, **settings), ctx)
    return relay, sink, state


async def test_a_late_relay_replays_history_then_follows_live(
    engine: Engine, ctx: zmq.asyncio.Context
) -> None:
    pub = engine.start()
    for n in range(5):
        pub.publish(batch(n))
    relay, sink, state = make_relay(engine.source(), ctx, idle_check_interval=None)
    relay.start()
    try:
        await sink.wait(lambda: sink.seqs() == [0, 1, 2, 3, 4])
        await asyncio.sleep(0.2)  # the subscription reaches the PUB socket
        pub.publish(batch(5))
        pub.publish([AllBlocksCleared(), *batch(6)])
        await sink.wait(lambda: len(sink.batches) == 7)
        assert sink.seqs() == list(range(7))
        assert all(m.worker_id == WORKER and m.dp_rank == 0 for m in sink.batches)
        assert sink.batches[6].events[0] == AllBlocksCleared()
        assert state.block_hashes(WORKER, 0) == {1006}
        assert state.caches[(WORKER, 0)].seq == 6
    finally:
        await relay.close()


async def test_a_dropped_batch_is_recovered_through_replay(
    engine: Engine, ctx: zmq.asyncio.Context
) -> None:
    pub = engine.start()
    relay, sink, state = make_relay(engine.source(), ctx, idle_check_interval=None)
    relay.start()
    try:
        await asyncio.sleep(0.3)  # connected and caught up (nothing to replay)
        recovered = counter("sglmesh_publisher_gaps_recovered_total")
        engine.drop_next(2)
        for n in range(5):
            pub.publish(batch(n))
        await sink.wait(lambda: len(sink.batches) == 5)
        assert sink.seqs() == [0, 1, 2, 3, 4]
        assert relay.subscribers[0].gaps == 1 and relay.subscribers[0].lost == 0
        assert counter("sglmesh_publisher_gaps_recovered_total") == recovered + 1
        assert state.block_hashes(WORKER, 0) == {1000, 1001, 1002, 1003, 1004}
    finally:
        await relay.close()


async def test_a_batch_lost_before_the_engine_falls_quiet_is_found(
    engine: Engine, ctx: zmq.asyncio.Context
) -> None:
    pub = engine.start()
    relay, sink, _ = make_relay(engine.source(), ctx, idle_check_interval=0.2)
    relay.start()
    try:
        await asyncio.sleep(0.3)
        engine.drop_next(2)
        for n in range(3):
            pub.publish(batch(n))
        # No later batch reveals the gap: the idle check does.
        await sink.wait(lambda: len(sink.batches) == 3, timeout=3)
        assert sink.seqs() == [0, 1, 2]
        assert relay.subscribers[0].tail_checks >= 1
    finally:
        await relay.close()


async def test_an_engine_restart_resets_its_state(engine: Engine, ctx: zmq.asyncio.Context) -> None:
    pub = engine.start()
    for n in range(4):
        pub.publish(batch(n))
    relay, sink, state = make_relay(engine.source(), ctx, idle_check_interval=None)
    relay.start()
    try:
        await sink.wait(lambda: len(sink.batches) == 4)
        await asyncio.sleep(0.2)
        pub.publish(batch(4))  # seen live, so the restart shows as a step back
        await sink.wait(lambda: len(sink.batches) == 5)
        restarts = counter("sglmesh_publisher_engine_restarts_total")
        await pub.close()
        pub = engine.start()
        await asyncio.sleep(0.5)  # the SUB socket reconnects
        pub.publish(batch(50))
        pub.publish(batch(51))
        await sink.wait(lambda: len(sink.batches) >= 8)
        reset = sink.batches[5]
        assert (reset.seq, reset.events) == (RESET_SEQ, [AllBlocksCleared()])
        assert sink.seqs()[6:] == [0, 1]
        assert state.block_hashes(WORKER, 0) == {1050, 1051}
        assert counter("sglmesh_publisher_engine_restarts_total") == restarts + 1
    finally:
        await relay.close()


def sglang_pickle(fields: dict[str, object]) -> bytes:
    module, name = SGLANG_KV_METRICS_CLASS
    state = pickle.dumps(fields, protocol=2)[2:-1]
    return (
        b"\x80\x02cmsgspec._utils\nrebuild\n" + f"c{module}\n{name}\n".encode() + state + b"\x86R."
    )


async def test_load_reports_are_normalized_and_kept_for_the_gauges(
    ctx: zmq.asyncio.Context, tmp_path: Path
) -> None:
    endpoint = f"ipc://{tmp_path}/metrics.ipc"
    source = EngineSource(worker_id=WORKER, ranks=(), metrics=endpoint, page_size=PAGE)
    relay, sink, _ = make_relay(source, ctx)
    relay.start()
    pusher = ZmqKvMetricsPusher(endpoint)
    pusher.start()
    raw = zmq.Context.instance().socket(zmq.PUSH)
    raw.connect(endpoint)
    bad = counter("sglmesh_publisher_undecodable_total", socket="metrics")
    try:
        await asyncio.sleep(0.3)  # both pushers connected
        pusher.publish(
            KvMetrics(
                request_active_slots=2,
                request_total_slots=8,
                kv_active_blocks=10,  # tokens: 3 blocks of 4, rounded up
                kv_total_blocks=400,
                num_requests_waiting=1,
                gpu_cache_usage_perc=0.025,
                data_parallel_rank=0,
            )
        )
        await sink.wait(lambda: len(sink.reports) == 1)
        raw.send(b"\x80\x02cos\nsystem\n(S'true'\ntR.")  # refused, skipped
        raw.send(sglang_pickle({"request_active_slots": 5, "data_parallel_rank": 1}))
        await sink.wait(lambda: len(sink.reports) == 2)
        first, second = sink.reports
        assert (first.worker_id, first.dp_rank) == (WORKER, 0)
        assert (first.kv_used_blocks, first.kv_total_blocks) == (3, 100)
        assert (first.num_running, first.num_waiting, first.max_running) == (2, 1, 8)
        assert (second.dp_rank, second.num_running) == (1, 5)
        assert sorted((r, m.request_active_slots) for _, r, m in relay.load_reports()) == [
            (0, 2),
            (1, 5),
        ]
        assert counter("sglmesh_publisher_undecodable_total", socket="metrics") == bad + 1
    finally:
        raw.close(linger=0)
        pusher.close()
        await relay.close()
