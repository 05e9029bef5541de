"""One request's output stream, from the scheduler (producer) to ``async_generate`` (consumer).

A deque plus one future, cheaper than ``asyncio.Queue`` on the hot path. Increments a slow
consumer has not picked up yet are merged, exactly what SGLang's incremental streaming hands a
slow reader, so a lagging stream costs one dict, not one per token.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["OutputChannel"]


class OutputChannel:
    """One request's stream: the scheduler pushes SGLang-shaped dicts, one consumer iterates.

    Unconsumed increments are merged into one dict (``output_ids`` and logprob lists
    concatenated, ``meta_info`` taken from the newest), exactly what SGLang's incremental
    streaming hands a slow reader.
    """

    __slots__ = ("_closed", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[dict[str, Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, item: dict[str, Any], *, final: bool = False) -> None:
        if self._closed:
            return
        items = self._items
        if items:
            last = items[-1]
            last["output_ids"].extend(item["output_ids"])
            meta = item["meta_info"]
            old = last["meta_info"]
            for key in ("output_token_logprobs", "output_top_logprobs"):
                if key in meta and key in old:
                    meta[key] = old[key] + meta[key]
            last["meta_info"] = meta
        else:
            items.append(item)
        if final:
            self._closed = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def merge_token(self, token: int, completion_tokens: int, reason: Any) -> bool:
        """Add one token (no logprobs) to the increment the consumer has not read yet, as
        :meth:`push` would merge it, without building the item: the scheduler's per-token
        work while a stream is behind. False if there is no unread item to add it to (the
        caller pushes a new one). The unread item must carry no logprobs."""
        if self._closed:
            return True  # dropped, as push drops it
        items = self._items
        if not items:
            return False
        last = items[-1]
        last["output_ids"].append(token)
        meta = last["meta_info"]
        meta["completion_tokens"] = completion_tokens
        meta["finish_reason"] = reason
        if reason is not None:
            self._closed = True
        # A waiter exists only while nothing is unread: nobody to wake.
        return True

    def close(self) -> None:
        """End the stream without a final item (only for teardown paths)."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        items = self._items
        loop = asyncio.get_running_loop()
        while True:
            if items:
                yield items.popleft()
                continue
            if self._closed:
                return
            waiter = loop.create_future()
            self._waiter = waiter
            await waiter
