"""The publisher's core: one relay per engine of the node, the cache table, the state dump.

Sources come from etcd (``sources.SourceWatcher``) and from ``--zmq-endpoint``; a single task
reconciles the relays with them, so starting and stopping relays never interleave: a new
engine gets a relay, an engine that left has its relay closed and its cache table dropped, and
an engine whose sockets changed gets a fresh relay. Static sources win over discovered ones
with the same worker id.

``{ns}.publisher.kv_state`` (``--endpoint`` overrides it) answers a ``KvStateRequest`` with
the cache table as ``KvStateSnapshot`` parts (see ``state.py``): consumers that start late
take that, then the live events after its ``seq``. The table is read in one synchronous
step, so each snapshot is a consistent cut even while batches keep arriving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import msgspec
import zmq.asyncio

from proto.metrics import (
    KV_STATE_COMPONENT,
    KV_STATE_ENDPOINT,
    KvEventsMessage,
    KvMetrics,
    KvStateRequest,
    KvStateSnapshot,
    LoadMetrics,
    kv_events_subject,
    load_metrics_subject,
)
from proto.status import EngineStatus, PublisherStatusRequest
from services.publisher import metrics
from services.publisher.args import PublisherFlags
from services.publisher.relay import EngineRelay, EventSink
from services.publisher.sources import EngineSource, SourceWatcher
from services.publisher.state import DEFAULT_PART_TOKENS, CacheState
from shared.runtime import Context, DistributedRuntime

__all__ = ["NatsSink", "Supervisor"]

log = logging.getLogger(__name__)

STATUS_ENDPOINT = "status"


class NatsSink:
    """Publishes relayed messages on core NATS (fire and forget, no request plane)."""

    def __init__(self, runtime: DistributedRuntime) -> None:
        self._runtime = runtime
        self._namespace = runtime.config.namespace
        self._encoder = msgspec.msgpack.Encoder()
        self._failing = False

    async def kv(self, message: KvEventsMessage) -> None:
        subject = kv_events_subject(self._namespace, message.worker_id)
        await self._publish("kv", subject, self._encoder.encode(message))

    async def load(self, message: LoadMetrics) -> None:
        subject = load_metrics_subject(self._namespace, message.worker_id)
        await self._publish("load", subject, self._encoder.encode(message))

    async def _publish(self, kind: str, subject: str, data: bytes) -> None:
        try:
            await self._runtime.nats.publish(subject, data)
        except Exception as exc:
            # Consumers see the missing seq as a gap and resynchronize from a snapshot.
            metrics.publish_errors_total.labels(kind).inc()
            if not self._failing:
                log.warning(
                    "cannot publish on NATS", extra={"subject": subject, "error": repr(exc)}
                )
            self._failing = True
        else:
            self._failing = False


class Supervisor:
    def __init__(
        self,
        runtime: DistributedRuntime,
        flags: PublisherFlags,
        *,
        sink: EventSink | None = None,
        max_part_tokens: int = DEFAULT_PART_TOKENS,
    ) -> None:
        self.runtime = runtime
        self.flags = flags
        self.settings = flags.relay_settings()
        self.sink: EventSink = sink if sink is not None else NatsSink(runtime)
        self.state = CacheState()
        self.relays: dict[int, EngineRelay] = {}
        self.max_part_tokens = max_part_tokens
        self._static = {s.worker_id: s for s in flags.static_sources}
        self._discovered: dict[int, EngineSource] = {}
        self._watcher: SourceWatcher | None = None
        self._ctx: zmq.asyncio.Context | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._uninstall_metrics: Callable[[], None] | None = None
        self._closed = False

    @property
    def sources(self) -> dict[int, EngineSource]:
        return {**self._discovered, **self._static}

    async def start(self, *, serve: bool = True) -> None:
        self._ctx = zmq.asyncio.Context()
        try:
            self._uninstall_metrics = metrics.install(self.load_reports)
        except ValueError as exc:
            # Only when embedded in a process that already exports sglang:* (a worker).
            log.warning("sglang:* gauges not exported", extra={"error": str(exc)})
        if self.flags.discover:
            self._watcher = SourceWatcher(
                self.runtime.etcd,
                self.runtime.config.namespace,
                node=self.flags.node,
                on_change=self._on_sources,
            )
            await self._watcher.start()
        await self._reconcile()
        self._task = asyncio.create_task(self._reconcile_loop(), name="publisher-reconcile")
        if serve:
            eid = self.runtime.config.endpoint_or(KV_STATE_COMPONENT, KV_STATE_ENDPOINT)
            await self.runtime.endpoint(eid).serve(
                self.kv_state,
                request_type=KvStateRequest,
                metadata={"node": self.flags.node},
            )
            # Not named by --endpoint: `sglmesh status` always asks {ns}.publisher.status.
            await self.runtime.endpoint(KV_STATE_COMPONENT, STATUS_ENDPOINT).serve(
                self.status, request_type=PublisherStatusRequest
            )
        log.info(
            "publisher running",
            extra={
                "node": self.flags.node,
                "discover": self.flags.discover,
                "static_sources": len(self._static),
                "engines": len(self.relays),
            },
        )

    def _on_sources(self, sources: dict[int, EngineSource]) -> None:
        self._discovered = sources
        self._wake.set()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._reconcile()
            except Exception:
                log.exception("reconciling relays failed")

    async def _reconcile(self) -> None:
        if self._closed or self._ctx is None:
            return
        wanted = self.sources
        for worker_id in list(self.relays):
            relay = self.relays[worker_id]
            if wanted.get(worker_id) != relay.source:
                del self.relays[worker_id]
                await relay.close()
                self.state.drop_worker(worker_id)
        for worker_id, source in wanted.items():
            if worker_id not in self.relays:
                relay = EngineRelay(source, self.state, self.sink, self.settings, self._ctx)
                self.relays[worker_id] = relay
                relay.start()
        metrics.sources.set(len(self.relays))

    async def kv_state(
        self, request: KvStateRequest, ctx: Context
    ) -> AsyncIterator[KvStateSnapshot]:
        """The state dump: every wanted engine rank's cache, in parts."""
        del ctx
        snapshots = self.state.snapshot(request.worker_ids, max_part_tokens=self.max_part_tokens)
        metrics.snapshots_served_total.inc()
        log.info(
            "state dump",
            extra={
                "worker_ids": None
                if request.worker_ids is None
                else [f"{w:x}" for w in request.worker_ids],
                "parts": len(snapshots),
            },
        )
        for snapshot in snapshots:
            yield snapshot

    async def status(
        self, request: PublisherStatusRequest, ctx: Context
    ) -> AsyncIterator[EngineStatus]:
        """Per engine rank: last load report, last event, events relayed, cached blocks."""
        del ctx
        wanted = None if request.worker_ids is None else set(request.worker_ids)
        for worker_id, relay in list(self.relays.items()):
            if wanted is not None and worker_id not in wanted:
                continue

            def cached(rank: int, worker_id: int = worker_id) -> int:
                cache = self.state.caches.get((worker_id, rank))
                return len(cache.blocks) if cache is not None else 0

            for item in relay.status(cached):
                yield item

    def load_reports(self) -> list[tuple[int, int, KvMetrics]]:
        return [r for relay in list(self.relays.values()) for r in relay.load_reports()]

    async def drain(self, grace: float) -> None:
        """Runtime drain hook: stop relaying before NATS closes."""
        del grace
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            await self._watcher.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        relays, self.relays = list(self.relays.values()), {}
        for relay in relays:
            await relay.close()
        metrics.sources.set(0)
        if self._uninstall_metrics is not None:
            self._uninstall_metrics()
            self._uninstall_metrics = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
