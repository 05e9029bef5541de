"""Running CPU-heavy request preparation off the event loop, on a few threads.

Large requests (JSON decoding, chat templates, tokenization) go there whole, so one big
request never stalls the event loop and with it every other stream, ``/health`` included.
Bounded: at most ``threads`` jobs run and ``queue`` more wait; beyond that a new job is
refused at once (:class:`OffloadBusy`, a 503 for the client), so a flood of large bodies costs
a bounded amount of memory and never an unbounded queue.

Every other request's tokenization goes there too (:meth:`Offloader.tokenize`): the
tokenizer is Rust and releases the GIL, so the loop serves other connections meanwhile, and
requests prepared together reach the workers together (which batch them): measured in the
README's "Mesh overhead". The rest of a small request's preparation stays on the loop, where
handing it over would cost more than the work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

__all__ = ["OffloadBusy", "Offloader"]

T = TypeVar("T")


class OffloadBusy(Exception):
    """Every preprocessing thread is busy and the queue is full."""


class Offloader:
    def __init__(self, threads: int, queue: int) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="preprocess"
        )
        self._capacity = threads + queue
        self.pending = 0

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self.pending >= self._capacity:
            raise OffloadBusy(f"{self.pending} large requests are being prepared; retry later")
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self.pending -= 1

    async def tokenize(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)`` (a tokenizer call, which releases the GIL) on a thread. Not bounded
        by the queue: each job is a request already admitted, and one of them is short."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
