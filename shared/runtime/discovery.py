"""A live view of an etcd prefix: initial list, then watch events, resynced after failures.

When the watch breaks (etcd restarted, compaction, network), the watcher lists the prefix again
and reports the difference as puts and deletes, so listeners never see a stale state for longer
than the outage. During an outage the last known state is kept: NATS may still work, and
dropping every instance because etcd blinked would fail requests that could succeed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

import msgspec
from aetcd.rtypes import EventKind

from shared.runtime.etcd import EtcdSession

log = logging.getLogger(__name__)

T = TypeVar("T")

_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 2.0
_CANCEL_TIMEOUT = 1.0


class PrefixWatcher(Generic[T]):
    def __init__(self, session: EtcdSession, prefix: str, value_type: type[T]) -> None:
        self._session = session
        self._prefix = prefix.encode()
        self._decoder = msgspec.msgpack.Decoder(value_type)
        self.items: dict[str, T] = {}
        self._on_put: list[Callable[[str, T], None]] = []
        self._on_delete: list[Callable[[str, T], None]] = []
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._synced = asyncio.Event()

    def on_put(self, callback: Callable[[str, T], None]) -> None:
        self._on_put.append(callback)

    def on_delete(self, callback: Callable[[str, T], None]) -> None:
        self._on_delete.append(callback)

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"watch:{self._prefix.decode()}")
        synced = asyncio.ensure_future(self._synced.wait())
        done, _ = await asyncio.wait({synced, self._task}, return_when=asyncio.FIRST_COMPLETED)
        if self._task in done:
            synced.cancel()
            self._task.result()

    async def wait_for(self, predicate: Callable[[dict[str, T]], bool], timeout: float) -> None:
        """Wait until ``predicate(items)`` holds; raise TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            while not predicate(self.items):
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait({self._task}, timeout=_CANCEL_TIMEOUT * 2)

    def _decode(self, key: bytes, value: bytes) -> T | None:
        try:
            return self._decoder.decode(value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("ignoring undecodable etcd value", extra={"key": key, "error": str(exc)})
            return None

    def _apply_put(self, key: str, value: T) -> None:
        self.items[key] = value
        for cb in self._on_put:
            cb(key, value)
        self._changed.set()

    def _apply_delete(self, key: str) -> None:
        old = self.items.pop(key, None)
        if old is None:
            return
        for cb in self._on_delete:
            cb(key, old)
        self._changed.set()

    async def _resync(self) -> int:
        client = self._session.client
        resp = await client.get_prefix(self._prefix)
        fresh: dict[str, T] = {}
        for kv in resp:
            value = self._decode(kv.key, kv.value)
            if value is not None:
                fresh[kv.key.decode()] = value
        for key in [k for k in self.items if k not in fresh]:
            self._apply_delete(key)
        for key, value in fresh.items():
            if self.items.get(key) != value:
                self._apply_put(key, value)
        return int(resp.header.revision)

    async def _run(self) -> None:
        backoff = _BACKOFF_MIN
        while True:
            try:
                revision = await self._resync()
                self._synced.set()
                watch = await self._session.client.watch_prefix(
                    self._prefix, start_revision=revision + 1
                )
                try:
                    async for event in watch:
                        backoff = _BACKOFF_MIN
                        key = event.kv.key.decode()
                        if event.kind == EventKind.DELETE:
                            self._apply_delete(key)
                        else:
                            value = self._decode(event.kv.key, event.kv.value)
                            if value is not None:
                                self._apply_put(key, value)
                finally:
                    # Bounded: aetcd's cancel is a round trip that can wait forever on a
                    # stalled stream, and it runs while this task is being cancelled.
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(_CANCEL_TIMEOUT):
                            await watch.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not self._synced.is_set() and backoff >= _BACKOFF_MAX:
                    raise
                log.info(
                    "etcd watch interrupted; resyncing",
                    extra={"prefix": self._prefix.decode(), "error": repr(exc)},
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
