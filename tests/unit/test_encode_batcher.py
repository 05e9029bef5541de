"""The encode service's dynamic batcher over a recording forward function: concurrent inputs
share forwards, order is kept, the bounds hold, an oversized input never holds short ones
back, cancelled inputs never reach a forward, a failing forward fails only its own inputs."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from services.encode.batcher import BatchLimits, DynamicBatcher, plan_forwards


class Recorder:
    """A forward that records its batches and answers ``sum(ids)`` per input."""

    def __init__(self, delay_per_token: float = 0.0, gate: threading.Event | None = None) -> None:
        self.batches: list[list[list[int]]] = []
        self.delay_per_token = delay_per_token
        self.gate = gate
        self.fail_on: int | None = None

    def __call__(self, batch: list[Sequence[int]]) -> list[int]:
        if self.gate is not None:
            self.gate.wait(5)
        self.batches.append([list(ids) for ids in batch])
        if self.fail_on is not None and any(self.fail_on in ids for ids in batch):
            raise RuntimeError("forward blew up")
        time.sleep(self.delay_per_token * max(len(ids) for ids in batch))
        return [sum(ids) for ids in batch]


@contextlib.asynccontextmanager
async def _batcher(forward: Any, **limits: Any) -> AsyncIterator[DynamicBatcher]:
    batcher = DynamicBatcher(forward, BatchLimits(**limits))
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.close()


def test_plan_sorts_by_length_and_keeps_each_forward_within_the_token_budget() -> None:
    lengths = [5, 1, 300, 2, 5, 4]
    plan = plan_forwards(lengths, max_tokens=12)
    assert sorted(i for forward in plan for i in forward) == list(range(6))
    for forward in plan:
        longest = max(lengths[i] for i in forward)
        assert len(forward) * longest <= 12 or len(forward) == 1
        assert [lengths[i] for i in forward] == sorted(lengths[i] for i in forward)
    assert plan[-1] == [2]  # the oversized input alone, last
    assert plan_forwards([], 10) == []


async def test_concurrent_requests_share_forwards_and_keep_their_order() -> None:
    gate = threading.Event()
    forward = Recorder(gate=gate)
    async with _batcher(forward, max_batch_size=64) as batcher:
        first = asyncio.create_task(batcher.run([[1]]))
        await asyncio.sleep(0.05)  # the first forward is running (held at the gate)
        rest = [asyncio.create_task(batcher.run([[i, 1], [i]])) for i in range(10)]
        await asyncio.sleep(0.05)
        gate.set()
        assert await first == [1]
        assert await asyncio.gather(*rest) == [[i + 1, i] for i in range(10)]
        # Everything that queued during the first forward went into one round (20 inputs,
        # two lengths: at most two forwards).
        assert len(forward.batches) <= 3
        assert sum(len(b) for b in forward.batches) == 21


async def test_max_batch_size_bounds_every_forward() -> None:
    forward = Recorder()
    async with _batcher(forward, max_batch_size=4) as batcher:
        results = await batcher.run([[i] for i in range(10)])
        assert results == list(range(10))
        assert max(len(b) for b in forward.batches) <= 4


async def test_an_oversized_input_does_not_hold_short_ones_back() -> None:
    forward = Recorder(delay_per_token=0.002)  # the long input's forward takes ~0.6 s
    async with _batcher(forward, max_batch_size=64, max_batch_tokens=64) as batcher:
        done_at: dict[str, float] = {}

        async def timed(name: str, batch: list[list[int]]) -> None:
            await batcher.run(batch)
            done_at[name] = time.monotonic()

        await asyncio.gather(
            timed("long", [[1] * 300]), *(timed(f"s{i}", [[1, 2]]) for i in range(5))
        )
        assert all(done_at[f"s{i}"] < done_at["long"] for i in range(5))
        assert [len(b) for b in forward.batches if len(b[0]) == 300] == [1]


async def test_max_wait_fills_batches_under_load_and_never_delays_an_idle_worker() -> None:
    forward = Recorder()
    async with _batcher(forward, max_batch_size=8, max_wait=0.5) as batcher:
        # Idle (the previous round held one input): a lone request is answered at once.
        await batcher.run([[1]])
        started = time.monotonic()
        assert await batcher.run([[2]]) == [2]
        assert time.monotonic() - started < 0.25
        # Under load (a round of two): staggered arrivals wait for each other.
        await batcher.run([[1], [2]])
        forward.batches.clear()
        tasks = []
        for i in range(5):
            tasks.append(asyncio.create_task(batcher.run([[i]])))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert [len(b) for b in forward.batches] == [5]


def test_padding_splits_forwards_where_another_forward_is_cheaper() -> None:
    lengths = [10] * 10 + [40]
    # One forward would pad ten inputs by 30 tokens each (300 > 64): the long one goes alone.
    assert plan_forwards(lengths, max_tokens=10_000, overhead=64) == [list(range(10)), [10]]
    # Padding cheaper than a forward: one forward.
    assert plan_forwards([10, 11, 12], max_tokens=10_000, overhead=64) == [[0, 1, 2]]


async def test_cancelled_inputs_never_reach_a_forward() -> None:
    gate = threading.Event()
    forward = Recorder(gate=gate)
    async with _batcher(forward, max_batch_size=64) as batcher:
        busy = asyncio.create_task(batcher.run([[1]]))
        await asyncio.sleep(0.05)
        gone = asyncio.create_task(batcher.run([[7, 7, 7]]))
        kept = asyncio.create_task(batcher.run([[2]]))
        await asyncio.sleep(0.05)
        gone.cancel()
        gate.set()
        assert await busy == [1] and await kept == [2]
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert [7, 7, 7] not in [ids for b in forward.batches for ids in b]


async def test_a_failing_forward_fails_only_its_own_inputs() -> None:
    forward = Recorder()
    forward.fail_on = 666
    async with _batcher(forward, max_batch_size=64, max_batch_tokens=2) as batcher:
        bad, good = await asyncio.gather(
            batcher.run([[666, 1]]), batcher.run([[3]]), return_exceptions=True
        )
        assert isinstance(bad, RuntimeError)
        assert good == [3]
        assert await batcher.run([[4]]) == [4]  # the loop survives


async def test_close_fails_what_is_still_queued() -> None:
    gate = threading.Event()
    forward = Recorder(gate=gate)
    batcher = DynamicBatcher(forward, BatchLimits())
    batcher.start()
    busy = asyncio.create_task(batcher.run([[1]]))
    await asyncio.sleep(0.05)
    queued = asyncio.create_task(batcher.run([[2]]))
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0.01)
    gate.set()
    await closing
    with pytest.raises((RuntimeError, asyncio.CancelledError)):
        await queued
    with pytest.raises((RuntimeError, asyncio.CancelledError)):
        await busy
    with pytest.raises(RuntimeError, match="not running"):
        await batcher.run([[3]])


def test_limits_are_checked() -> None:
    for bad in ({"max_batch_size": 0}, {"max_batch_tokens": 0}, {"max_wait": -1.0}):
        with pytest.raises(ValueError):
            BatchLimits(**bad)
