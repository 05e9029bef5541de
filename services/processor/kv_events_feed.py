"""The consumer side of the publishers: every engine's KV events and load, in order, from now.

A router (the processor's KV index) needs each engine's whole cache, not just the events
published after it started. :class:`KvEventsFeed` gets it the way the publishers are built
to give it:

1. subscribe to the relayed events (``{ns}.events.kv.*``, ``{ns}.events.load.*``, core
   NATS) and make sure the server has the subscription;
2. ask every publisher instance (``{ns}.publisher.kv_state``) for its state dump and apply
   each (worker, DP rank)'s snapshot as ``[AllBlocksCleared(), BlockStored...]``;
3. apply the live batches that arrived meanwhile, and everything after, in sequence order.

Every batch carries the engine's own sequence number, so the feed keeps the last one applied
per ``(worker_id, dp_rank)`` and:

- drops duplicates (``seq`` at or below it): a publisher that restarts replays the engines'
  history from seq 0, and two publishers may relay one engine;
- treats a jump (``seq`` past the next one: NATS dropped messages, the feed fell behind, or
  a worker it has never seen starts mid-history) as a gap: that worker's live batches are
  held while it asks the publishers for that worker's snapshot again, then applied after it.
  Re-snapshots of one worker are at least ``resync_interval`` apart; if the snapshot does
  not close the gap (no publisher knows the worker, or the batches are gone everywhere), the
  held batches are applied as they are (best effort, logged, ``stats.accepted_gaps``);
- takes ``seq`` -1 (a publisher's reset marker: the engine restarted and numbers from 0
  again) as "apply, then expect seq 0";
- never adopts an absurd sequence number: a batch more than ``max_seq_jump`` past the last
  one applied (a forged or corrupt message: engines number their batches one by one) is
  dropped and the worker is re-synced from a snapshot, so one bad message cannot make the
  feed discard the real events as duplicates ever after.

With no publisher running, the feed still follows live events. Call :meth:`forget` when a
worker leaves and you drop it from your index: if it comes back (a paused worker rejoining
discovery) the publisher relays its history again, which then counts as new.

Callbacks run on the event loop, synchronously, one message at a time; an exception in one
is logged and does not stop the feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from proto.kv_events import AllBlocksCleared, BlockStored, KVEvent
from proto.metrics import (
    KV_STATE_COMPONENT,
    KV_STATE_ENDPOINT,
    KvEventsMessage,
    KvStateRequest,
    KvStateSnapshot,
    LoadMetrics,
)
from shared.config import EndpointId
from shared.runtime import Client, DistributedRuntime, MeshError

__all__ = ["FeedStats", "KvEventsFeed"]

log = logging.getLogger(__name__)

WorkerKey = tuple[int, int]

_KV_DECODER = msgspec.msgpack.Decoder(KvEventsMessage)
_LOAD_DECODER = msgspec.msgpack.Decoder(LoadMetrics)


@dataclass(slots=True)
class FeedStats:
    applied: int = 0  # live batches handed to on_events
    duplicates: int = 0  # batches dropped as already applied
    gaps: int = 0  # jumps in a worker key's sequence
    snapshots: int = 0  # (worker, rank) snapshots applied
    resyncs: int = 0  # snapshot requests made (the first included)
    resets: int = 0  # reset markers (engine restarts)
    accepted_gaps: int = 0  # gaps no snapshot could fill, applied anyway
    absurd: int = 0  # batches dropped for an impossible jump in sequence
    loads: int = 0
    undecodable: int = 0
    callback_errors: int = 0


@dataclass(slots=True)
class _Snapshot:
    seq: int
    events: list[BlockStored]
    complete: bool


class KvEventsFeed:
    """Feeds ``on_events`` every engine's KV batches (state first) and ``on_load`` its load
    reports; see the module docstring. ``start()`` returns once the state dump is applied."""

    def __init__(
        self,
        runtime: DistributedRuntime,
        on_events: Callable[[KvEventsMessage], None],
        on_load: Callable[[LoadMetrics], None] | None = None,
        *,
        endpoint: EndpointId | None = None,
        snapshot_timeout: float = 5.0,
        resync_interval: float = 1.0,
        max_held: int = 100_000,
        max_seq_jump: int = 1_000_000,
    ) -> None:
        self.runtime = runtime
        self.on_events = on_events
        self.on_load = on_load
        ns = runtime.config.namespace
        self.endpoint = endpoint or EndpointId(ns, KV_STATE_COMPONENT, KV_STATE_ENDPOINT)
        self.snapshot_timeout = snapshot_timeout
        self.resync_interval = resync_interval
        self.max_held = max_held
        self.max_seq_jump = max_seq_jump
        self.stats = FeedStats()
        self._kv_subject = f"{ns}.events.kv.*"
        self._load_subject = f"{ns}.events.load.*"
        self._subs: list[Any] = []
        self._client: Client | None = None
        # Last seq applied per worker key; absent: nothing known yet.
        self._last: dict[WorkerKey, int] = {}
        # Live batches held while a snapshot is being fetched: all of them during start(),
        # then per worker id.
        self._syncing_all = False
        self._syncing: set[int] = set()
        self._held: dict[WorkerKey, list[KvEventsMessage]] = {}
        self._last_resync: dict[int, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        nc = self.runtime.nats
        self._syncing_all = True
        try:
            self._subs.append(await nc.subscribe(self._kv_subject, cb=self._on_kv_msg))
            self._subs.append(await nc.subscribe(self._load_subject, cb=self._on_load_msg))
            # The server must have the subscription before the snapshot is cut, or batches
            # published in between would be in neither.
            await nc.flush()
            self._client = await self.runtime.client(self.endpoint)
            await self._sync(None)
        finally:
            self._syncing_all = False
            self._release(None)

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self._client is not None:
            await self._client.close()
            with contextlib.suppress(ValueError):
                self.runtime.clients.remove(self._client)
            self._client = None

    def forget(self, worker_id: int) -> None:
        """Drop what the feed knows about a worker (call when you drop it from your index)."""
        for key in [k for k in self._last if k[0] == worker_id]:
            del self._last[key]
        for key in [k for k in self._held if k[0] == worker_id]:
            del self._held[key]
        self._last_resync.pop(worker_id, None)

    def last_seq(self, worker_id: int, dp_rank: int) -> int | None:
        return self._last.get((worker_id, dp_rank))

    async def resync(self, worker_ids: Iterable[int] | None = None) -> None:
        """Fetch and apply the snapshot of some workers (None: all) now."""
        ids = None if worker_ids is None else sorted(set(worker_ids))
        if ids is None:
            self._syncing_all = True
        else:
            self._syncing.update(ids)
        try:
            await self._sync(ids)
        finally:
            if ids is None:
                self._syncing_all = False
            else:
                self._syncing.difference_update(ids)
            self._release(None if ids is None else set(ids))

    # -- live messages --------------------------------------------------------------------------

    async def _on_kv_msg(self, msg: Any) -> None:
        try:
            message = _KV_DECODER.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.stats.undecodable += 1
            log.warning("undecodable kv events message", extra={"error": str(exc)})
            return
        self._on_kv(message)

    async def _on_load_msg(self, msg: Any) -> None:
        try:
            message = _LOAD_DECODER.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.stats.undecodable += 1
            log.warning("undecodable load message", extra={"error": str(exc)})
            return
        self.stats.loads += 1
        if self.on_load is not None:
            try:
                self.on_load(message)
            except Exception:
                self.stats.callback_errors += 1
                log.exception("on_load failed")

    def _on_kv(self, message: KvEventsMessage) -> None:
        if self._syncing_all or message.worker_id in self._syncing:
            self._hold(message)
            return
        self._deliver(message)

    def _hold(self, message: KvEventsMessage) -> None:
        held = self._held.setdefault((message.worker_id, message.dp_rank), [])
        if len(held) >= self.max_held:
            # A snapshot that takes this long is not coming; the oldest go, and the gap they
            # leave is found (and re-synced) when the rest are delivered.
            del held[: len(held) // 2]
        held.append(message)

    def _deliver(self, message: KvEventsMessage) -> None:
        key = (message.worker_id, message.dp_rank)
        seq = message.seq
        if seq < 0:
            self.stats.resets += 1
            self._apply(message)
            self._last[key] = -1
            return
        last = self._last.get(key)
        if last is not None and seq <= last:
            self.stats.duplicates += 1
            return
        expected = 0 if last is None else last + 1
        if last is not None and seq - expected > self.max_seq_jump:
            self._drop_absurd(message, expected)
            return
        if seq > expected:
            self.stats.gaps += 1
            log.info(
                "kv events gap; re-syncing the worker",
                extra={
                    "worker_id": f"{message.worker_id:x}",
                    "dp_rank": message.dp_rank,
                    "expected": expected,
                    "seq": seq,
                },
            )
            self._hold(message)
            self._schedule_resync(message.worker_id)
            return
        self._apply(message)
        self._last[key] = seq
        self.stats.applied += 1

    def _drop_absurd(self, message: KvEventsMessage, expected: int) -> None:
        self.stats.absurd += 1
        log.warning(
            "kv events with an impossible sequence number dropped; re-syncing the worker",
            extra={
                "worker_id": f"{message.worker_id:x}",
                "dp_rank": message.dp_rank,
                "expected": expected,
                "seq": message.seq,
            },
        )
        self._schedule_resync(message.worker_id)

    def _apply(self, message: KvEventsMessage) -> None:
        try:
            self.on_events(message)
        except Exception:
            self.stats.callback_errors += 1
            log.exception("on_events failed")

    def _release(self, worker_ids: set[int] | None) -> None:
        """Deliver held batches (of ``worker_ids``; None: all not still syncing), in order."""
        for key in sorted(self._held):
            worker_id = key[0]
            if worker_ids is not None and worker_id not in worker_ids:
                continue
            if self._syncing_all or worker_id in self._syncing:
                continue
            held = sorted(self._held.pop(key), key=lambda m: m.seq)
            for message in held:
                if worker_id in self._syncing:
                    self._hold(message)  # a new gap started another re-sync
                else:
                    self._deliver(message)

    # -- snapshots ------------------------------------------------------------------------------

    def _schedule_resync(self, worker_id: int) -> None:
        if worker_id in self._syncing or self._closed:
            return
        self._syncing.add(worker_id)
        since = time.monotonic() - self._last_resync.get(worker_id, -1e9)
        delay = max(0.0, self.resync_interval - since)
        task = asyncio.get_running_loop().create_task(self._resync_later(worker_id, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resync_later(self, worker_id: int, delay: float) -> None:
        try:
            if delay:
                await asyncio.sleep(delay)
            await self._sync([worker_id])
        finally:
            self._syncing.discard(worker_id)
            if not self._closed:
                self._release({worker_id})

    async def _sync(self, worker_ids: list[int] | None) -> None:
        """Fetch snapshots and apply them; held batches are released by the caller."""
        self.stats.resyncs += 1
        now = time.monotonic()
        for worker_id in worker_ids or ():
            self._last_resync[worker_id] = now
        snapshots = await self._fetch(worker_ids)
        for (worker_id, dp_rank), snap in sorted(snapshots.items()):
            events: list[KVEvent] = [AllBlocksCleared(), *snap.events]
            self._apply(
                KvEventsMessage(
                    worker_id=worker_id,
                    dp_rank=dp_rank,
                    seq=snap.seq,
                    ts=time.time(),
                    events=events,
                )
            )
            self._last[(worker_id, dp_rank)] = snap.seq
            self.stats.snapshots += 1
        # Held batches that still do not follow on (no publisher knows the worker, or the
        # batches in between are gone everywhere): one re-sync per gap, then they are applied
        # as they are (a router skips stores whose parents it lacks).
        for key, held in self._held.items():
            if not held or (worker_ids is not None and key[0] not in worker_ids):
                continue
            first = min(m.seq for m in held)
            last = self._last.get(key)
            if last is not None and first - last - 1 > self.max_seq_jump:
                # Nothing known bridges it: drop what is absurdly far ahead, keep the rest.
                kept = [m for m in held if m.seq - last - 1 <= self.max_seq_jump]
                self.stats.absurd += len(held) - len(kept)
                held[:] = kept
                if not kept:
                    continue
                first = min(m.seq for m in kept)
            if first >= 0 and (last is None or first > last + 1):
                self.stats.accepted_gaps += 1
                log.warning(
                    "kv events missing and not in any snapshot; applying the worker's events "
                    "from here",
                    extra={
                        "worker_id": f"{key[0]:x}",
                        "dp_rank": key[1],
                        "after": last,
                        "seq": first,
                    },
                )
                self._last[key] = first - 1

    async def _fetch(self, worker_ids: list[int] | None) -> dict[WorkerKey, _Snapshot]:
        client = self._client
        if client is None:
            return {}
        instances = client.instance_ids()
        results = await asyncio.gather(
            *(self._fetch_one(client, iid, worker_ids) for iid in instances)
        )
        merged: dict[WorkerKey, _Snapshot] = {}
        for result in results:
            for key, snap in result.items():
                if key not in merged or snap.seq > merged[key].seq:
                    merged[key] = snap
        log.info(
            "kv state snapshot",
            extra={"publishers": len(instances), "worker_ranks": len(merged)},
        )
        return merged

    async def _fetch_one(
        self, client: Client, instance_id: int, worker_ids: list[int] | None
    ) -> dict[WorkerKey, _Snapshot]:
        out: dict[WorkerKey, _Snapshot] = {}
        try:
            async with asyncio.timeout(self.snapshot_timeout):
                # No flow-control window: every part then goes out as its own frame (a
                # window would let the responder coalesce parts past NATS' payload limit).
                stream = await client.generate(
                    KvStateRequest(worker_ids=worker_ids),
                    instance_id=instance_id,
                    response_type=KvStateSnapshot,
                    window=0,
                )
                async with stream:
                    async for part in stream:
                        key = (part.worker_id, part.dp_rank)
                        snap = out.get(key)
                        if part.part == 0 or snap is None or snap.seq != part.seq:
                            if part.part != 0:
                                continue  # a part without its start: ignore the rest of it
                            out[key] = _Snapshot(part.seq, list(part.events), part.last)
                        else:
                            snap.events.extend(part.events)
                            snap.complete = part.last
        except (MeshError, TimeoutError) as exc:
            log.warning(
                "kv state snapshot failed",
                extra={"publisher": f"{instance_id:x}", "error": repr(exc)},
            )
        return {k: s for k, s in out.items() if s.complete}
