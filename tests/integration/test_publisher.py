"""The publisher as deployed: real NATS, etcd, worker processes on the simulated engine with KV
events and metrics on, and ``sglmesh publisher`` processes that are started, killed (-9) and
restarted around them. What a consumer rebuilds from them (``KvEventsFeed`` into the router's
``KvIndex``) is compared block for block with what each engine really caches
(``GET /engine/kv_cache``)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from proto.kv_events import BlockStored
from proto.metrics import KvEventsMessage, LoadMetrics
from proto.request import PreprocessedRequest, RoutingHints, SamplingOptions, StopConditions
from proto.response import EngineOutput
from services.processor.kv_events_feed import KvEventsFeed
from services.publisher.args import PublisherFlags
from services.publisher.state import CacheState
from services.publisher.supervisor import Supervisor
from shared.config import MeshConfig
from shared.infra import EtcdServer, NatsServer, free_port
from shared.model import make_test_tokenizer
from shared.router.hashing import block_hashes
from shared.router.kv_index import KvIndex
from shared.runtime import Client, DistributedRuntime
from tests.integration.mesh import ADMIN_HEADERS, ROOT, make_config, mesh_flags, runtime

PAGE = 16


class Proc:
    """A mesh process with its system server on a known port."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.system_port = _fresh_port()
        self.base = f"http://127.0.0.1:{self.system_port}"
        # Unnamed: the log is gone with the handle, nothing is left in the temp directory.
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in close()
        self.argv = [*argv, "--system-host", "127.0.0.1", "--system-port", str(self.system_port)]
        # Its own temp dir: the engine's metrics ipc socket lives there, not in /tmp.
        self.tmp = tempfile.mkdtemp(prefix="sglmesh-")
        env = {**os.environ, "TMPDIR": self.tmp}
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, stdout=self.log, stderr=self.log, env=env)
        self.health: dict[str, Any] = {}

    async def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"exited {self.proc.returncode}:\n{self.output()}")
                try:
                    async with http.get(f"{self.base}/health") as resp:
                        # Ready with no endpoint served yet is the runtime starting up.
                        if resp.status == 200 and (await resp.json())["endpoints"]:
                            self.health = await resp.json()
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"not ready:\n{self.output()}")
                await asyncio.sleep(0.05)

    async def get(self, path: str) -> Any:
        async with (
            aiohttp.ClientSession(headers=ADMIN_HEADERS) as http,
            http.get(f"{self.base}{path}") as resp,
        ):
            assert resp.status == 200, await resp.text()
            return await resp.json() if path != "/metrics" else await resp.text()

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def terminate(self, timeout: float = 15) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        self.kill()
        self.log.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


# Ports handed out in this module: free_port() alone can return a port handed out a moment
# ago that nobody has bound yet (a worker's system port landed on another's KV port).
_TAKEN: set[int] = set()


def _fresh_port() -> int:
    while True:
        port = free_port()
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


def _consecutive_ports(n: int) -> int:
    """A base port with ``n`` free ports from it (SGLang offsets the KV port by DP rank)."""
    for _ in range(100):
        base = free_port()
        ok = not _TAKEN.intersection(range(base, base + 2 * n))
        for port in range(base, base + 2 * n):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            _TAKEN.update(range(base, base + 2 * n))
            return base
    raise RuntimeError("no run of free ports")


class Worker(Proc):
    """``sglmesh worker --engine sim`` publishing KV events (with replay) and load metrics."""

    def __init__(
        self, cfg: MeshConfig, model: Path, *, dp_size: int = 1, max_total_tokens: int = 32768
    ) -> None:
        base = _consecutive_ports(dp_size)
        events = {
            "publisher": "zmq",
            "endpoint": f"tcp://127.0.0.1:{base}",
            "replay_endpoint": f"tcp://127.0.0.1:{base + dp_size}",
            "bind": True,
        }
        super().__init__(
            "worker",
            [
                sys.executable, "-m", "sglmesh", "worker",
                "--engine", "sim",
                "--model-path", str(model),
                "--speedup-ratio", "0",
                "--page-size", str(PAGE),
                "--max-total-tokens", str(max_total_tokens),
                "--dp-size", str(dp_size),
                "--kv-events-config", json.dumps(events),
                "--enable-metrics",
                "--decode-log-interval", "4",
                "--no-health-check",
                *mesh_flags(cfg, grace=1),
            ],
        )  # fmt: skip
        self.instance_id = 0

    async def wait_ready(self, timeout: float = 30) -> None:
        await super().wait_ready(timeout)
        self.instance_id = int(self.health["instance_id"], 16)

    async def cache(self) -> dict[int, list[dict[str, Any]]]:
        """Per DP rank, the engine's cached pages (parents first)."""
        body = await self.get("/engine/kv_cache")
        assert body["page_size"] == PAGE
        return {r["dp_rank"]: r["pages"] for r in body["dp_ranks"]}


class Publisher(Proc):
    def __init__(self, cfg: MeshConfig, *extra: str) -> None:
        super().__init__(
            "publisher",
            [
                sys.executable, "-m", "sglmesh", "publisher",
                "--idle-check-interval", "0.5",
                "--replay-timeout", "2",
                "--rebind-interval", "0.5",
                *mesh_flags(cfg, grace=1),
                *extra,
            ],
        )  # fmt: skip

    async def metric(self, name: str, **labels: str) -> float | None:
        text = await self.get("/metrics")
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            key, _, value = line.rpartition(" ")
            if key == (f"{name}{{{want}}}" if labels else name):
                return float(value)
        return None


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_tokenizer(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
async def mesh(
    nats_server: NatsServer, etcd_server: EtcdServer
) -> AsyncIterator[tuple[MeshConfig, DistributedRuntime]]:
    cfg = make_config(nats_server, etcd_server)
    async with runtime(cfg) as rt:
        yield cfg, rt


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.close()


async def start(procs: list[Proc], *new: Proc) -> None:
    procs.extend(new)
    await asyncio.gather(*(p.wait_ready() for p in new))


async def wait_until(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def generate(
    client: Client, worker: Worker, prompt: list[int], max_tokens: int, dp_rank: int | None = None
) -> None:
    request = PreprocessedRequest(
        token_ids=prompt,
        stop_conditions=StopConditions(max_tokens=max_tokens, ignore_eos=True),
        sampling_options=SamplingOptions(temperature=0.0),
        routing=None if dp_rank is None else RoutingHints(dp_rank=dp_rank),
    )
    stream = await client.generate(
        request, instance_id=worker.instance_id, response_type=EngineOutput
    )
    async for _ in stream:
        pass


class Collector:
    """Everything relayed on NATS, as a plain subscriber sees it."""

    def __init__(self) -> None:
        self.kv: list[KvEventsMessage] = []
        self.load: list[LoadMetrics] = []

    async def subscribe(self, rt: DistributedRuntime) -> None:
        ns = rt.config.namespace

        async def on_kv(msg: Any) -> None:
            self.kv.append(msgspec.msgpack.decode(msg.data, type=KvEventsMessage))

        async def on_load(msg: Any) -> None:
            self.load.append(msgspec.msgpack.decode(msg.data, type=LoadMetrics))

        await rt.nats.subscribe(f"{ns}.events.kv.*", cb=on_kv)
        await rt.nats.subscribe(f"{ns}.events.load.*", cb=on_load)
        await rt.nats.flush()

    def stored_by(self, worker_id: int) -> list[BlockStored]:
        return [
            e
            for m in self.kv
            if m.worker_id == worker_id
            for e in m.events
            if isinstance(e, BlockStored)
        ]


async def test_relays_every_worker_on_the_node_as_they_come_and_go(
    mesh: tuple[MeshConfig, DistributedRuntime], model_dir: Path, procs: list[Proc]
) -> None:
    cfg, rt = mesh
    seen = Collector()
    await seen.subscribe(rt)
    publisher = Publisher(cfg)
    w1, w2 = Worker(cfg, model_dir), Worker(cfg, model_dir)
    await start(procs, publisher, w1, w2)
    client = await rt.client("backend", "generate")
    await client.wait_for_instances(2, timeout=10)
    prompts = {w.instance_id: [1000 + w.system_port % 100 + i for i in range(48)] for w in (w1, w2)}
    for w in (w1, w2):
        await generate(client, w, prompts[w.instance_id], 8)

    def relayed(w: Worker) -> bool:
        tokens = [t for e in seen.stored_by(w.instance_id) for t in e.token_ids]
        return tokens[:48] == prompts[w.instance_id]

    await wait_until(lambda: relayed(w1) and relayed(w2), 10, "both workers' events")
    event = seen.stored_by(w1.instance_id)[0]
    assert event.block_size == PAGE and len(event.block_hashes) == 3  # 48 prompt tokens
    assert all(m.dp_rank == 0 and m.seq >= 0 for m in seen.kv)

    # Engines report load while they work, and drop reports until the publisher's metrics
    # socket is bound (it binds once it sees the worker's record): keep them busy until then.
    async def reported() -> bool:
        missing = [w for w in (w1, w2) if w.instance_id not in {m.worker_id for m in seen.load}]
        for w in missing:
            await generate(client, w, prompts[w.instance_id], 8)
        return not missing

    await wait_until(reported, 10, "load reports from both workers")
    report = next(m for m in seen.load if m.worker_id == w1.instance_id)
    assert report.kv_total_blocks == 32768 // PAGE and report.max_running > 0

    # Prometheus: the sources, and sglang:* per worker and rank.
    assert await publisher.metric("sglmesh_publisher_sources") == 2
    assert (await publisher.metric("sglmesh_publisher_events_relayed_total") or 0) >= 2
    for w in (w1, w2):
        total = await publisher.metric(
            "sglang:max_total_num_tokens", dp_rank="0", worker_id=f"{w.instance_id:x}"
        )
        assert total == 32768
        running = await publisher.metric(
            "sglang:num_running_reqs", dp_rank="0", worker_id=f"{w.instance_id:x}"
        )
        assert running is not None

    # A worker that joins later is picked up (with a DP rank of its own per scheduler) ...
    w3 = Worker(cfg, model_dir, dp_size=2)
    await start(procs, w3)
    await client.wait_for_instances(3, timeout=10)
    await wait_until(
        lambda: _equals(publisher.metric("sglmesh_publisher_sources"), 3), 10, "3 sources"
    )
    for i in range(4):
        await generate(client, w3, [7000 + 50 * i + j for j in range(40)], 4, dp_rank=i % 2)
    await wait_until(
        lambda: {m.dp_rank for m in seen.kv if m.worker_id == w3.instance_id} == {0, 1},
        10,
        "both of the new worker's DP ranks",
    )
    # ... and one that leaves is dropped, label sets and all.
    assert w1.terminate() == 0
    await wait_until(
        lambda: _equals(publisher.metric("sglmesh_publisher_sources"), 2), 10, "2 sources"
    )
    gone = await publisher.metric(
        "sglang:max_total_num_tokens", dp_rank="0", worker_id=f"{w1.instance_id:x}"
    )
    assert gone is None
    assert publisher.terminate() == 0  # SIGTERM drains and exits cleanly


async def _equals(value: Any, expected: float) -> bool:
    return bool(await value == expected)


def engine_blocks(pages: list[dict[str, Any]]) -> tuple[set[int], set[int]]:
    """An engine's cache as (engine block hashes, the router's chained hashes of them)."""
    mesh: dict[int, int] = {}
    for page in pages:  # parents first
        parent = page["parent_block_hash"]
        (mesh[page["block_hash"]],) = block_hashes(
            page["token_ids"], PAGE, parent=None if parent is None else mesh[parent]
        )
    return set(mesh), set(mesh.values())


class Consumer:
    """A processor's view: a KvEventsFeed into the KV index, and into a plain table."""

    def __init__(self, rt: DistributedRuntime) -> None:
        self.index = KvIndex()
        self.table = CacheState()
        self.feed = KvEventsFeed(rt, self.on_events, lambda _: None)

    def on_events(self, message: KvEventsMessage) -> None:
        self.index.apply(message.worker_id, message.dp_rank, message.events)
        self.table.apply(message.worker_id, message.dp_rank, message.seq, message.events)

    async def matches(self, workers: list[Worker]) -> bool:
        for w in workers:
            for rank, pages in (await w.cache()).items():
                engine, mesh = engine_blocks(pages)
                if self.table.block_hashes(w.instance_id, rank) != engine:
                    return False
                if self.index.blocks((w.instance_id, rank)) != mesh:
                    return False
        return True


class Progress:
    """Requests done so far, to act at points of a workload."""

    def __init__(self) -> None:
        self.done = 0
        self._changed = asyncio.Event()
        self.stop = asyncio.Event()

    def tick(self) -> None:
        self.done += 1
        self._changed.set()

    async def reach(self, n: int, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while self.done < n:
                self._changed.clear()
                await self._changed.wait()


async def workload(
    client: Client,
    workers: list[Worker],
    seed: int,
    count: int,
    progress: Progress | None = None,
) -> None:
    """Shared prefixes and random suffixes, 8 at a time: hits, misses and evictions. With
    ``progress``, goes on past ``count`` requests until ``progress.stop`` is set."""
    rng = random.Random(seed)
    lengths = [rng.choice((32, 64, 96)) for _ in range(8)]
    prefixes = [[rng.randrange(100, 30000) for _ in range(n)] for n in lengths]
    issued = 0

    async def lane() -> None:
        nonlocal issued
        while issued < count or (progress is not None and not progress.stop.is_set()):
            i = issued
            issued += 1
            suffix = [rng.randrange(100, 30000) for _ in range(rng.randrange(1, 40))]
            prompt = rng.choice(prefixes) + suffix
            await generate(client, workers[i % len(workers)], prompt, rng.randrange(1, 24))
            if progress is not None:
                progress.tick()

    await asyncio.gather(*(lane() for _ in range(8)))


async def test_a_killed_publisher_restarts_and_loses_nothing(
    mesh: tuple[MeshConfig, DistributedRuntime], model_dir: Path, procs: list[Proc]
) -> None:
    cfg, rt = mesh
    # Small KV pools (64 and 2 x 48 pages), so the workload evicts: stores and removals.
    workers = [
        Worker(cfg, model_dir, max_total_tokens=1024),
        Worker(cfg, model_dir, dp_size=2, max_total_tokens=768),
    ]
    publisher = Publisher(cfg)
    await start(procs, publisher, *workers)
    client = await rt.client("backend", "generate")
    await client.wait_for_instances(2, timeout=10)
    consumer = Consumer(rt)
    await consumer.feed.start()
    try:
        await workload(client, workers, seed=1, count=60)
        # Killed mid-workload, restarted while the workload goes on: the engines publish
        # while nobody relays them, and go on while the new publisher catches up.
        progress = Progress()
        running = asyncio.create_task(workload(client, workers, 2, 0, progress))
        await progress.reach(40)
        publisher.kill()
        applied_at_kill = consumer.feed.stats.applied
        await progress.reach(120)
        publisher = Publisher(cfg)
        await start(procs, publisher)
        resumed = progress.done
        await progress.reach(resumed + 60)  # and after it is back
        progress.stop.set()
        await running
        await workload(client, workers, seed=3, count=40)
        await wait_until(lambda: consumer.matches(workers), 15, "the index to equal the engines")
        stats = consumer.feed.stats
        assert stats.applied > applied_at_kill
        assert stats.duplicates > 0  # the restarted publisher replayed history: dropped
        removed = consumer.index.stats.removed_blocks
        assert removed > 0, "the workload must evict"
        assert consumer.index.stats.unknown_parent_events == 0

        # A consumer started now gets the whole state from the dump, without new events.
        late = Consumer(rt)
        await late.feed.start()
        try:
            assert late.feed.stats.snapshots == 3  # two workers, three DP ranks
            assert await late.matches(workers)
            assert late.feed.stats.applied == 0
        finally:
            await late.feed.close()
    finally:
        await consumer.feed.close()


async def test_a_large_state_dump_streams_in_parts_and_rebuilds_exactly(
    mesh: tuple[MeshConfig, DistributedRuntime],
) -> None:
    """Hundreds of parts (more than the request plane's flow-control window) through real
    NATS: the consumer reassembles every engine rank's cache exactly."""
    cfg, rt = mesh
    flags = PublisherFlags(node="*", discover=False)
    async with runtime(cfg) as publisher_rt:
        supervisor = Supervisor(publisher_rt, flags, max_part_tokens=64)
        await supervisor.start()
        try:
            rng = random.Random(5)
            for worker_id, rank in ((0xA, 0), (0xA, 1), (0xB, 0)):
                events: list[Any] = []
                parents: list[int | None] = [None]
                for _ in range(400):
                    block = rng.getrandbits(62)
                    events.append(
                        BlockStored(
                            block_hashes=[block],
                            parent_block_hash=rng.choice(parents),
                            token_ids=[rng.randrange(1, 1 << 20) for _ in range(PAGE)],
                            block_size=PAGE,
                            lora_id=None,
                            medium="GPU",
                        )
                    )
                    parents.append(block)
                supervisor.state.apply(worker_id, rank, 10 + rank, events)
            parts = supervisor.state.snapshot(max_part_tokens=64)
            assert len(parts) > 2 * 128  # twice the request plane's default window
            consumer = Consumer(rt)
            await consumer.feed.start()
            try:
                assert consumer.feed.stats.snapshots == 3
                for key, cache in supervisor.state.caches.items():
                    assert consumer.table.block_hashes(*key) == set(cache.blocks)
                    assert consumer.table.caches[key].seq == cache.seq
                    assert consumer.index.num_blocks(key) == len(cache.blocks)
            finally:
                await consumer.feed.close()
        finally:
            await supervisor.close()
