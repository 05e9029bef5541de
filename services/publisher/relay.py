"""Relaying one engine: its KV-event sockets (one per DP rank) and its load-metrics socket.

Per DP rank a :class:`~shared.zmq_events.KvEventSubscriber` follows the engine's ``PUB``
socket. It starts by asking the replay ``ROUTER`` for everything from seq 0 (the engine keeps
its last ``buffer_steps`` batches, 10,000 by default), so a publisher that starts or restarts
after the engine rebuilds the engine's cache state first, then follows live; a sequence gap
(this side fell behind, a batch was dropped) is filled from the replay socket too, and a
quiet socket is checked against the replay socket every ``idle_check_interval``, so a batch
lost just before the engine fell idle is not left missing. Each batch, in sequence order,
updates the publisher's cache table (``state.py``) and is republished as a
``KvEventsMessage`` with the engine's own sequence number, which lets consumers drop the
duplicates a restarted publisher's replay produces.

History older than the engine's replay buffer is lost to a publisher that starts late: it
relays what the buffer holds (and logs how much is missing). An engine without a replay
socket can only be followed live.

An engine that restarts numbers its batches from 0 again. The subscriber sees the step back;
the relay then empties that rank's table and publishes a reset marker, a
``KvEventsMessage`` with ``seq`` -1 and one ``AllBlocksCleared``, before the new batches.

The metrics socket is a ``PULL`` the relay binds where the engine's schedulers push (all DP
ranks push to one socket); each report is republished as ``LoadMetrics`` (tokens turned into
blocks with the engine's page size) and kept for the ``sglang:*`` gauges. An address that
cannot be bound is retried every ``rebind_interval``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import zmq
import zmq.asyncio

from proto.kv_events import AllBlocksCleared
from proto.metrics import KvEventsMessage, KvMetrics, LoadMetrics
from proto.status import EngineStatus
from services.publisher import metrics
from services.publisher.sources import EngineSource, RankSockets
from services.publisher.state import CacheState
from shared.zmq_events import KvEventSubscriber, KvMetricsReceiver

__all__ = ["RESET_SEQ", "EngineRelay", "EventSink", "RelaySettings"]

log = logging.getLogger(__name__)

# The seq of the reset marker published when an engine restarts.
RESET_SEQ = -1


class EventSink(Protocol):
    """Where relayed messages go (NATS in the service, a list in tests). Must not raise."""

    async def kv(self, message: KvEventsMessage) -> None: ...

    async def load(self, message: LoadMetrics) -> None: ...


@dataclass(frozen=True, slots=True)
class RelaySettings:
    # How long a replay request may take before what arrived is used.
    replay_timeout: float = 2.0
    # A KV socket quiet this long is checked against the replay socket; None: never.
    idle_check_interval: float | None = 5.0
    # SUB high-water mark, in batches.
    hwm: int = 100_000
    # Retry period for a metrics address that cannot be bound, and for a failed KV relay.
    rebind_interval: float = 5.0


class EngineRelay:
    """One engine's relay: ``start()`` spawns a task per KV rank and one for load metrics;
    ``close()`` stops them and closes the sockets. The caller drops the engine's state."""

    def __init__(
        self,
        source: EngineSource,
        state: CacheState,
        sink: EventSink,
        settings: RelaySettings,
        ctx: zmq.asyncio.Context,
    ) -> None:
        self.source = source
        self.state = state
        self.sink = sink
        self.settings = settings
        self._ctx = ctx
        # Last load report per DP rank, for the sglang:* gauges.
        self.loads: dict[int, KvMetrics] = {}
        # Per DP rank: the engine timestamp of the last batch and how many events went out.
        self.last_event_ts: dict[int, float] = {}
        self.events_relayed: dict[int, int] = {}
        self.subscribers: dict[int, KvEventSubscriber] = {}
        self.receiver: KvMetricsReceiver | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._log_extra = {"worker_id": f"{source.worker_id:x}"}

    def start(self) -> None:
        wid = f"{self.source.worker_id:x}"
        for rank in self.source.ranks:
            self._tasks.append(
                asyncio.create_task(self._relay_rank(rank), name=f"relay-kv-{wid}-{rank.dp_rank}")
            )
        if self.source.metrics is not None:
            self._tasks.append(
                asyncio.create_task(self._relay_load(self.source.metrics), name=f"relay-load-{wid}")
            )
        log.info(
            "relaying engine",
            extra={
                **self._log_extra,
                "dp_ranks": [r.dp_rank for r in self.source.ranks],
                "kv_events": [r.kv_events for r in self.source.ranks],
                "metrics": self.source.metrics,
            },
        )

    async def close(self) -> None:
        """Stop relaying (idempotent)."""
        self._closed = True
        for sub in list(self.subscribers.values()):
            await sub.close()
        if self.receiver is not None:
            self.receiver.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        log.info("stopped relaying engine", extra=self._log_extra)

    # -- KV events ------------------------------------------------------------------------------

    async def _relay_rank(self, rank: RankSockets) -> None:
        start_seq = 0
        while not self._closed:
            sub = KvEventSubscriber(
                rank.kv_events,
                replay_endpoint=rank.replay,
                topic=self.source.topic,
                start_seq=start_seq,
                replay_timeout=self.settings.replay_timeout,
                hwm=self.settings.hwm,
                idle_check_interval=self.settings.idle_check_interval,
                ctx=self._ctx,
            )
            self.subscribers[rank.dp_rank] = sub
            try:
                sub.connect()
                await self._follow(sub, rank.dp_rank)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception(
                    "kv events relay failed; restarting it",
                    extra={**self._log_extra, "dp_rank": rank.dp_rank},
                )
            finally:
                await sub.close()
            if self._closed:
                return
            await asyncio.sleep(self.settings.rebind_interval)
            cache = self.state.caches.get((self.source.worker_id, rank.dp_rank))
            # Go on after what was relayed; the engine still has the rest in its buffer.
            start_seq = cache.seq + 1 if cache is not None and cache.seq >= 0 else 0

    async def _follow(self, sub: KvEventSubscriber, dp_rank: int) -> None:
        worker_id = self.source.worker_id
        extra = {**self._log_extra, "dp_rank": dp_rank}
        gaps = lost = restarts = bad = 0
        first = True
        async for seq, batch in sub:
            if sub.restarts > restarts:
                metrics.engine_restarts_total.inc(sub.restarts - restarts)
                restarts = sub.restarts
                log.warning("engine restarted: its cache starts empty", extra=extra)
                self.state.reset(worker_id, dp_rank)
                await self.sink.kv(
                    KvEventsMessage(
                        worker_id=worker_id,
                        dp_rank=dp_rank,
                        seq=RESET_SEQ,
                        ts=time.time(),
                        events=[AllBlocksCleared()],
                    )
                )
            if sub.lost > lost:
                metrics.batches_lost_total.inc(sub.lost - lost)
                if first:
                    log.warning(
                        "the engine's history before this batch is lost (older than its replay "
                        "buffer, or it has no replay socket)",
                        extra={**extra, "first_seq": seq, "lost": sub.lost},
                    )
            if sub.gaps > gaps:
                # A gap that left batches lost is not counted as recovered.
                recovered = sub.gaps - gaps - (1 if sub.lost > lost else 0)
                if recovered > 0:
                    metrics.gaps_recovered_total.inc(recovered)
                gaps = sub.gaps
            lost = sub.lost
            if sub.undecodable > bad:
                metrics.undecodable_total.labels("kv_events").inc(sub.undecodable - bad)
                bad = sub.undecodable
            first = False
            self.state.apply(worker_id, dp_rank, seq, batch.events)
            await self.sink.kv(
                KvEventsMessage(
                    worker_id=worker_id,
                    dp_rank=dp_rank,
                    seq=seq,
                    ts=batch.ts,
                    events=batch.events,
                )
            )
            self.last_event_ts[dp_rank] = batch.ts
            self.events_relayed[dp_rank] = self.events_relayed.get(dp_rank, 0) + len(batch.events)
            metrics.batches_relayed_total.inc()
            metrics.events_relayed_total.inc(len(batch.events))
            metrics.event_lag_seconds.observe(max(0.0, time.time() - batch.ts))

    # -- load metrics ---------------------------------------------------------------------------

    async def _relay_load(self, endpoint: str) -> None:
        try:
            await self._relay_load_from(endpoint)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "load metrics relay failed", extra={**self._log_extra, "endpoint": endpoint}
            )

    async def _relay_load_from(self, endpoint: str) -> None:
        receiver = KvMetricsReceiver(endpoint, ctx=self._ctx)
        self.receiver = receiver
        warned = False
        while not self._closed:
            try:
                receiver.bind()
                break
            except zmq.ZMQError as exc:
                if not warned:
                    log.warning(
                        "cannot bind the engine's metrics socket; retrying",
                        extra={**self._log_extra, "endpoint": endpoint, "error": str(exc)},
                    )
                    warned = True
                await asyncio.sleep(self.settings.rebind_interval)
        bad = 0
        while True:
            report = await receiver.recv()
            if report is None:
                return
            if receiver.undecodable > bad:
                metrics.undecodable_total.labels("metrics").inc(receiver.undecodable - bad)
                bad = receiver.undecodable
            await self._on_report(report)

    async def _on_report(self, report: KvMetrics) -> None:
        self.loads[report.data_parallel_rank] = report
        message = LoadMetrics.from_kv_metrics(
            report,
            worker_id=self.source.worker_id,
            page_size=self.source.page_size,
            ts=time.time(),
        )
        metrics.load_reports_total.inc()
        await self.sink.load(message)

    def load_reports(self) -> list[tuple[int, int, KvMetrics]]:
        return [(self.source.worker_id, rank, m) for rank, m in self.loads.items()]

    def status(self, cached_blocks: Callable[[int], int]) -> list[EngineStatus]:
        """One entry per DP rank, for ``sglmesh status``."""
        wid = self.source.worker_id
        out = []
        for rank in self.source.ranks:
            r = rank.dp_rank
            report = self.loads.get(r)
            out.append(
                EngineStatus(
                    worker_id=wid,
                    dp_rank=r,
                    load=None
                    if report is None
                    else LoadMetrics.from_kv_metrics(
                        report, worker_id=wid, page_size=self.source.page_size, ts=time.time()
                    ),
                    last_event_ts=self.last_event_ts.get(r),
                    events_relayed=self.events_relayed.get(r, 0),
                    cached_blocks=cached_blocks(r),
                )
            )
        return out

    def describe(self) -> dict[str, Any]:
        """A summary for logs and tests."""
        return {
            "worker_id": f"{self.source.worker_id:x}",
            "ranks": {
                rank: {
                    "last_seq": sub.last_seq,
                    "gaps": sub.gaps,
                    "lost": sub.lost,
                    "replayed": sub.replayed,
                    "restarts": sub.restarts,
                }
                for rank, sub in self.subscribers.items()
            },
            "load_reports": len(self.loads),
        }
