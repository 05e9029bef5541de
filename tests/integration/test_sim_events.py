"""The CPU engines' KV events and load metrics over real ZMQ, as a publisher sees them.

The event stream must rebuild each engine's radix cache exactly, on the simulator and on the
torch engine running the real model (the same scheduler and cache drive both).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
import zmq.asyncio

from proto.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
from proto.metrics import SglangKvMetrics
from shared.engine.cpu.engine import CpuEngine
from shared.engine.cpu.kv_events import KvEventSubscriber
from shared.engine.sim.engine import SimConfig, SimEngine
from shared.infra import free_port
from tests.real_model import model_dir


def apply(blocks: set[int], batch: KVEventBatch) -> None:
    for event in batch.events:
        if isinstance(event, BlockStored):
            blocks.update(event.block_hashes)
        elif isinstance(event, BlockRemoved):
            blocks.difference_update(event.block_hashes)
        elif isinstance(event, AllBlocksCleared):
            blocks.clear()


async def run(engine: CpuEngine, rid: str, prompt: list[int], **sampling: Any) -> None:
    async for _ in engine.async_generate(
        input_ids=prompt, sampling_params=sampling, rid=rid, stream=True
    ):
        pass


def _engine(kind: str, events: dict[str, Any]) -> tuple[CpuEngine, int, int, int]:
    """The engine, and its workload's size: (requests per half, prefix, tail length)."""
    common: dict[str, Any] = {
        "page_size": 16,
        "max_running_requests": 8,
        "kv_events_config": json.dumps(events),
        "random_seed": 1,
    }
    if kind == "sim":
        # 128 pages: the workload below must evict.
        return SimEngine(SimConfig(max_total_tokens=2048, speedup_ratio=0, **common)), 40, 160, 40
    from shared.engine.pytorch.engine import TorchConfig, TorchEngine

    # The real model: a smaller workload (it computes every token), a pool to match.
    engine = TorchEngine(TorchConfig(model_path=str(model_dir()), max_total_tokens=384, **common))
    return engine, 10, 48, 8


@pytest.mark.parametrize("kind", ["sim", "torch"])
async def test_event_stream_rebuilds_the_cache_and_late_subscribers_catch_up(kind: str) -> None:
    if kind == "torch":
        pytest.importorskip("torch")
    port, replay_port = free_port(), free_port()
    events = {
        "publisher": "zmq",
        "endpoint": f"tcp://127.0.0.1:{port}",
        "replay_endpoint": f"tcp://127.0.0.1:{replay_port}",
        "bind": True,
        "topic": "kv",
    }
    engine, count, prefix, tail = _engine(kind, events)
    await engine.start()
    rng = random.Random(42)
    prefixes = [[rng.randrange(1000, 30000) for _ in range(prefix)] for _ in range(5)]

    async def workload(tag: str, count: int) -> None:
        jobs = []
        for i in range(count):
            prompt = rng.choice(prefixes) + [rng.randrange(1000, 30000) for _ in range(tail)]
            coro = run(engine, f"{tag}-{i}", prompt, max_new_tokens=rng.randrange(1, tail + 20))
            jobs.append(asyncio.create_task(coro))
            if rng.random() < 0.15:
                await asyncio.sleep(0)
                engine.abort_request(f"{tag}-{i}")
        await asyncio.gather(*jobs)

    try:
        await workload("a", count)
        assert await engine.flush_cache()
        await workload("b", count)
        scheduler = engine.schedulers[0]
        # Gone idle: the last events go out once the publication interval has passed.
        await asyncio.sleep(scheduler.config.publish_interval * 4 + 0.05)
        publisher = engine.publishers[0]
        last_seq = publisher.next_seq - 1
        # A subscriber that joins now has missed every batch: it catches up through replay.
        blocks: set[int] = set()
        kinds: set[type] = set()
        async with KvEventSubscriber(
            f"tcp://127.0.0.1:{port}",
            replay_endpoint=f"tcp://127.0.0.1:{replay_port}",
            topic="kv",
            start_seq=0,
        ) as sub:
            seqs = []
            async with asyncio.timeout(10):
                async for seq, batch in sub:
                    seqs.append(seq)
                    apply(blocks, batch)
                    kinds.update(type(e) for e in batch.events)
                    if seq == last_seq:
                        break
        assert seqs == list(range(last_seq + 1))
        assert {BlockStored, BlockRemoved, AllBlocksCleared} <= kinds, kinds
        assert blocks == scheduler.cache.block_hashes()
        assert blocks  # the second half left something cached
    finally:
        await engine.shutdown()


async def test_load_metrics_track_running_waiting_and_kv(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/metrics.ipc"
    ctx = zmq.asyncio.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(endpoint)
    engine = SimEngine(
        SimConfig(
            page_size=16,
            max_total_tokens=65536,
            max_running_requests=16,
            speedup_ratio=1,  # realistic step times, so reports come while work is queued
            enable_metrics=True,
            metrics_endpoint=endpoint,
            decode_log_interval=5,
            random_seed=3,
        )
    )
    await engine.start()
    reports: list[SglangKvMetrics] = []

    async def collect() -> None:
        while True:
            raw = await pull.recv()
            reports.append(msgspec.msgpack.decode(raw, type=SglangKvMetrics))

    collector = asyncio.create_task(collect())
    try:
        prompts = [[1000 + i] * 200 for i in range(48)]
        t0 = time.monotonic()
        await asyncio.gather(
            *(
                run(engine, f"r{i}", p, max_new_tokens=30, ignore_eos=True)
                for i, p in enumerate(prompts)
            )
        )
        assert time.monotonic() - t0 < 20
        await asyncio.sleep(0.3)  # the idle report
    finally:
        collector.cancel()
        await engine.shutdown()
        pull.close(linger=0)
        ctx.term()
    assert reports
    assert max(r.request_active_slots for r in reports) == 16  # the batch was full
    assert all(r.request_total_slots == 16 for r in reports)
    assert max(r.num_requests_waiting for r in reports) > 0  # and work was queued behind it
    busiest = max(reports, key=lambda r: r.kv_active_blocks)
    # Tokens, as SGLang reports them: at least 16 running requests x 200 prompt tokens.
    assert busiest.kv_active_blocks >= 16 * 200
    assert busiest.kv_total_blocks == 65536
    assert 0 < busiest.gpu_cache_usage_perc <= 1
    last = reports[-1]
    assert last.request_active_slots == 0 and last.num_requests_waiting == 0
