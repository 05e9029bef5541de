"""Dynamic batching: concurrent embedding requests share one forward pass.

Why: an encoder forward over 32 short inputs costs little more than over one (the weights are
read once, the matrix products get wider), so a worker that runs each request on its own
leaves most of its throughput unused. Every input of every request goes into one queue; a
single loop takes inputs from it in arrival order and runs them through the model together.

The bounds, all flags of the encode service:

- ``max_batch_size`` inputs per forward;
- ``max_batch_tokens`` padded tokens per forward (inputs x the longest input): a forward's
  time and memory stay bounded whatever the inputs' lengths, and a round is also cut where
  padding short inputs to a longer one's length would cost more than another forward;
- ``max_wait``: how long the loop may hold a partial batch waiting for more inputs, and only
  under load (the previous round had more than one input): an idle worker answers a lone
  request at once. Under a closed loop of many callers the answers of one forward come back
  as new requests spread over a few milliseconds; without the wait the next forward would
  start with the first few of them and the rest would wait a whole forward for theirs.

Each round takes up to ``max_batch_size`` inputs, oldest first (no input waits behind later
ones for more than a round), sorts them by length and cuts them into forwards under the token
budget, shortest first: padding is limited to neighbours of similar length, and one oversized
input is its own forward, after the short ones have been answered -- it never holds them back.
A request whose caller went away is dropped from the queue before its forward.

Forwards run on one dedicated thread (torch releases the GIL inside its kernels), so the event
loop keeps receiving requests and sending answers while the model computes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = ["BatchLimits", "BatchStats", "DynamicBatcher", "plan_forwards"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch_size: int = 64
    max_batch_tokens: int = 16384
    max_wait: float = 0.002  # seconds

    def __post_init__(self) -> None:
        if self.max_batch_size < 1 or self.max_batch_tokens < 1 or self.max_wait < 0:
            raise ValueError(f"invalid batch limits {self}")


class BatchStats(Protocol):
    """What the batcher reports (``services.encode.metrics`` implements it)."""

    def forward(self, inputs: int, tokens: int, padded: int, seconds: float) -> None: ...

    def queued(self, depth: int) -> None: ...


@dataclass(slots=True)
class _Item:
    ids: Sequence[int]
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.monotonic)


# What one more forward pass costs beyond its tokens, in tokens: a forward over one 16-token
# input takes as long as ~46 tokens in a batch (all-MiniLM-L6-v2, torch on 2 CPU cores,
# measured over batches of 1 to 32 inputs of 16 to 48 tokens), so about 32 beyond its own.
FORWARD_OVERHEAD_TOKENS = 32


def plan_forwards(
    lengths: Sequence[int], max_tokens: int, overhead: int = FORWARD_OVERHEAD_TOKENS
) -> list[list[int]]:
    """Cut inputs (given by length) into forwards, indices sorted by length.

    Each forward's ``count x longest`` stays within ``max_tokens`` (an input longer than that
    goes alone), and a new forward starts where the padding a longer input would add to the
    inputs already in one exceeds what another forward costs (``overhead`` tokens): short
    inputs are not padded to a long one's length."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    forwards: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        # Sorted ascending: the newcomer is the longest of the forward it joins.
        length = lengths[i]
        padding = len(current) * (length - longest)
        if current and ((len(current) + 1) * length > max_tokens or padding > overhead):
            forwards.append(current)
            current = []
        current.append(i)
        longest = length
    if current:
        forwards.append(current)
    return forwards


class DynamicBatcher:
    """Batches calls of ``forward(list of token id lists) -> rows`` (one row per input)."""

    def __init__(
        self,
        forward: Callable[[list[Sequence[int]]], Any],
        limits: BatchLimits,
        *,
        stats: BatchStats | None = None,
        name: str = "embedding-forward",
    ) -> None:
        self._forward = forward
        self.limits = limits
        self._stats = stats
        self._queue: collections.deque[_Item] = collections.deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._task: asyncio.Task[None] | None = None
        self.forwards = 0  # forwards run so far (tests and metrics)
        self._last_round = 0  # inputs in the previous round: is the worker under load?

    @property
    def queued(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="embedding-batcher")

    async def close(self) -> None:
        """Stop batching; inputs still queued fail with ``RuntimeError``."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the embedding engine is shutting down"))
        # A forward may still run on the thread: wait for it without blocking the loop.
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)

    async def run(self, batch: Sequence[Sequence[int]]) -> list[Any]:
        """The rows of ``batch``'s inputs, in order. Cancelling drops them from the queue."""
        if self._task is None:
            raise RuntimeError("the batcher is not running")
        loop = asyncio.get_running_loop()
        items = [_Item(ids, loop.create_future()) for ids in batch]
        self._queue.extend(items)
        self._arrived.set()
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        except BaseException:
            for item in items:
                item.future.cancel()  # the loop skips them
            raise

    # -- the loop ------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._wait_for_more()
            round_ = self._take()
            self._last_round = len(round_)
            if self._stats is not None:
                self._stats.queued(len(self._queue))
            if not round_:
                continue
            try:
                await self._run_round(round_)
            except asyncio.CancelledError:
                for item in round_:
                    item.future.cancel()
                raise

    async def _wait_for_more(self) -> None:
        """Hold a partial batch for up to ``max_wait`` after its oldest input arrived."""
        limits = self.limits
        if limits.max_wait <= 0 or self._last_round <= 1:
            return
        deadline = self._queue[0].enqueued + limits.max_wait
        while len(self._queue) < limits.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    def _take(self) -> list[_Item]:
        taken: list[_Item] = []
        queue = self._queue
        while queue and len(taken) < self.limits.max_batch_size:
            item = queue.popleft()
            if not item.future.done():  # cancelled by a caller that left
                taken.append(item)
        return taken

    async def _run_round(self, round_: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        lengths = [len(item.ids) for item in round_]
        for forward in plan_forwards(lengths, self.limits.max_batch_tokens):
            items = [round_[i] for i in forward if not round_[i].future.done()]
            if not items:
                continue
            inputs = [item.ids for item in items]
            started = time.perf_counter()
            try:
                rows = await loop.run_in_executor(self._executor, self._forward, inputs)
            except Exception as exc:
                log.exception("embedding forward failed", extra={"inputs": len(inputs)})
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.forwards += 1
            if self._stats is not None:
                longest = max(len(ids) for ids in inputs)
                self._stats.forward(
                    len(inputs),
                    sum(len(ids) for ids in inputs),
                    longest * len(inputs),
                    time.perf_counter() - started,
                )
            for item, row in zip(items, rows, strict=True):
                if not item.future.done():
                    item.future.set_result(row)
