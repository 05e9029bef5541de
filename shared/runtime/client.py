"""Calling an endpoint: instance discovery, routing, and response streams.

A :class:`Client` watches the endpoint's instances in etcd. ``generate`` picks an instance
(round robin, random, or a given one) and sends to its direct subject, or lets NATS pick one
(``any``: the queue group). The returned :class:`ResponseStream` is an async iterator of the
handler's chunks; it grants the responder credit as it consumes, detects gaps and silence, and
cancels the remote handler when it is closed or its consuming task is cancelled.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
import time
import weakref
from typing import TYPE_CHECKING, Any

import msgspec

from proto.discovery import InstanceRecord, instances_prefix
from proto.plane import Control, ControlKind, Frame, FrameKind, RequestEnvelope
from shared.config import EndpointId
from shared.router.mode import CLIENT_MODES, RouterMode
from shared.runtime import metrics
from shared.runtime.discovery import PrefixWatcher
from shared.runtime.errors import (
    MeshError,
    NoInstancesError,
    RemoteError,
    ResponderDeadError,
    StreamGapError,
    TransportError,
)

if TYPE_CHECKING:
    from shared.runtime.response_plane import CallerConnection
    from shared.runtime.runtime import DistributedRuntime

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 128
_REPROBE_INTERVAL = 0.5


def control_subject(instance_id: int) -> str:
    """Where an instance takes cancels and credit; derivable from its id alone."""
    return f"_SGLMESH.ctl.{instance_id:x}"


class ResponseStream:
    """The chunks of one request, in order. Use ``async for``; close it to cancel."""

    def __init__(
        self,
        client: Client,
        stream_id: str,
        request_id: str,
        decoder: msgspec.msgpack.Decoder[Any],
        instance_id: int | None,
        window: int,
    ) -> None:
        self._client = client
        self._runtime = client.runtime
        self.stream_id = stream_id
        self.request_id = request_id
        self.instance_id = instance_id
        self._decoder = decoder
        self._window = window
        self._frames: collections.deque[Frame] = collections.deque()
        self._chunks: collections.deque[msgspec.Raw] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._expected = 0
        self._credited = 0
        self._error: MeshError | None = None
        self._ended = False
        self._closed = False
        self.sent_at = time.perf_counter()
        self.last_recv = time.monotonic()
        self.acked = False
        # The responder's direct connection, once a frame came on it (controls go back there).
        self.conn: CallerConnection | None = None

    # -- called by the runtime's inbox dispatcher -------------------------------------------
    def _deliver(self, frame: Frame) -> None:
        self.last_recv = time.monotonic()
        self._frames.append(frame)
        self._wake()

    def _fail(self, error: MeshError) -> None:
        if self._error is None and not self._ended:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def abort(self, error: MeshError) -> None:
        """Fail the stream from the caller's side (e.g. its sibling leg failed): the reader
        gets ``error`` and the remote handler is cancelled."""
        self._fail(error)

    def ready(self) -> list[Any]:
        """Every chunk already received, decoded, without waiting -- including frames that
        arrived while the reader was busy -- so a reader that fell behind catches up in one
        write instead of one per chunk. Errors and the end are left for the next read."""
        frames = self._frames
        credit: int | None = None
        while frames and not self._ended and self._error is None:
            credit = self._take(frames.popleft()) or credit
        if credit is not None:
            self._runtime.spawn(self._send_control(ControlKind.CREDIT, credit))
        chunks = self._chunks
        if not chunks:
            return []
        decode = self._decoder.decode
        out = [decode(raw) for raw in chunks]
        chunks.clear()
        return out

    # -- iteration ---------------------------------------------------------------------------
    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> Any:
        if self._chunks:  # fast path: no await, nothing to cancel
            return self._decoder.decode(self._chunks.popleft())
        try:
            return await self._next()
        except asyncio.CancelledError:
            # The consumer was cancelled (e.g. its HTTP client left): stop the handler.
            self._finish(cancel=True)
            raise

    async def _next(self) -> Any:
        while True:
            if self._chunks:
                return self._decoder.decode(self._chunks.popleft())
            if self._ended:
                self._finish()
                raise StopAsyncIteration
            if self._frames:
                await self._consume(self._frames.popleft())
                continue
            if self._error is not None:
                self._finish(cancel=self._error.code != "no_responders")
                self._client.count_error(self._error)
                raise self._error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def _consume(self, frame: Frame) -> None:
        credit = self._take(frame)
        if credit is not None:
            await self._send_control(ControlKind.CREDIT, credit)

    def _take(self, frame: Frame) -> int | None:
        """Apply one frame; returns the sequence number to grant credit up to, if it is time."""
        if frame.seq != self._expected:
            self._fail(StreamGapError(f"expected frame {self._expected}, got {frame.seq}"))
            self._frames.clear()
            return None
        self._expected += 1
        if frame.instance_id is not None and not self.acked:
            self.instance_id = frame.instance_id
            self.acked = True
            self._client.ack_latency.observe(time.perf_counter() - self.sent_at)
        kind = frame.kind
        if kind is FrameKind.DATA:
            self._chunks.extend(frame.chunks)
        elif kind is FrameKind.END:
            self._chunks.extend(frame.chunks)
            self._ended = True
            self._finish()
            return None
        elif kind is FrameKind.ERROR:
            assert frame.error is not None
            self._fail(RemoteError(frame.error))
            self._frames.clear()
            return None
        if self._window > 0 and frame.seq - self._credited >= self._window // 4:
            self._credited = frame.seq
            return frame.seq
        return None

    async def _send_control(self, kind: ControlKind, value: int = 0) -> None:
        if self.instance_id is None:
            return
        conn = self.conn
        if conn is not None and not conn.closed:
            conn.send_control(Control(self.request_id, kind, value))
            return
        if self.instance_id == self._runtime.instance_id:
            await self._runtime.handle_control(Control(self.request_id, kind, value))
            return
        data = self._runtime.encoder.encode(Control(self.request_id, kind, value))
        with contextlib.suppress(Exception):
            await self._runtime.publish(control_subject(self.instance_id), data)

    def _finish(self, *, cancel: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        self._runtime.client_streams.pop(self.stream_id, None)
        self._client.streams.discard(self)
        if cancel and not self._ended and self.instance_id is not None:
            self._runtime.spawn(self._send_control(ControlKind.CANCEL))
            # else: the ACK, if it ever comes, finds no stream and the dispatcher cancels.

    async def aclose(self) -> None:
        """Stop reading; cancels the remote handler if the stream has not ended."""
        if not self._closed and not self._ended:
            self._finish()
            await self._send_control(ControlKind.CANCEL)

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # A consumer that walked away without closing must not leave the handler running.
        if not self._closed and not self._ended and self.instance_id is not None:
            self._runtime.cancel_remote(self.instance_id, self.request_id, from_gc=True)


class Client:
    """Calls one endpoint; create with :meth:`DistributedRuntime.client`."""

    def __init__(self, runtime: DistributedRuntime, eid: EndpointId) -> None:
        self.runtime = runtime
        self.eid = eid
        self.name = str(eid)
        self._watcher: PrefixWatcher[InstanceRecord] = PrefixWatcher(
            runtime.etcd,
            instances_prefix(eid.namespace, eid.component, eid.endpoint),
            InstanceRecord,
        )
        self._watcher.on_put(self._on_put)
        self._watcher.on_delete(self._on_delete)
        self.streams: weakref.WeakSet[ResponseStream] = weakref.WeakSet()
        self._draining: set[int] = set()
        self._rr = itertools.count()
        self.ack_latency = metrics.client_ack_latency.labels(self.name)
        self._m_requests = metrics.client_requests_total.labels(self.name)
        self._ids: list[int] = []
        self._records: dict[int, InstanceRecord] = {}
        # Instances found dead (no responders, silent) while their lease lives on: out of
        # routing at once, back when a probe answers.
        self._quarantined: dict[int, str] = {}
        self._reprobe_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._watcher.start()

    async def close(self) -> None:
        if self._reprobe_task is not None:
            self._reprobe_task.cancel()
        await self._watcher.close()

    # -- discovery ---------------------------------------------------------------------------
    def instances(self) -> list[InstanceRecord]:
        """Instances that take new requests (draining and quarantined ones excluded)."""
        return [
            r
            for r in self._watcher.items.values()
            if r.instance_id not in self._draining and r.instance_id not in self._quarantined
        ]

    def quarantine(self, instance_id: int, why: str) -> None:
        """Take an instance out of routing now (it died: no responders, or silent); a
        background probe brings it back if it answers again."""
        if instance_id in self._quarantined or not any(
            r.instance_id == instance_id for r in self._watcher.items.values()
        ):
            return
        self._quarantined[instance_id] = why
        log.warning(
            "instance out of routing",
            extra={"endpoint": self.name, "instance_id": f"{instance_id:x}", "reason": why},
        )
        metrics.client_quarantines_total.labels(self.name).inc()
        self._refresh_ids()
        if self._reprobe_task is None or self._reprobe_task.done():
            self._reprobe_task = asyncio.get_running_loop().create_task(self._reprobe())

    async def _reprobe(self) -> None:
        while self._quarantined:
            await asyncio.sleep(_REPROBE_INTERVAL)
            known = {r.instance_id for r in self._watcher.items.values()}
            for iid in list(self._quarantined):
                if iid not in known:
                    del self._quarantined[iid]  # its lease expired: nothing to bring back
                elif await self.runtime.probe(iid) is True:
                    del self._quarantined[iid]
                    log.info(
                        "instance back in routing",
                        extra={"endpoint": self.name, "instance_id": f"{iid:x}"},
                    )
                    self._refresh_ids()

    def instance_ids(self) -> list[int]:
        return list(self._ids)

    def records(self) -> dict[int, InstanceRecord]:
        """Live instances (draining ones excluded) by instance id. Kept up to date by the
        watch, not rebuilt per call: routers read it on every request."""
        return self._records

    def _refresh_ids(self) -> None:
        self._records = {r.instance_id: r for r in self.instances()}
        self._ids = sorted(self._records)

    def _on_put(self, key: str, record: InstanceRecord) -> None:
        if record.metadata.get("state") == "draining":
            self._draining.add(record.instance_id)
        else:
            self._draining.discard(record.instance_id)
        self._refresh_ids()

    def _on_delete(self, key: str, record: InstanceRecord) -> None:
        iid = record.instance_id
        graceful = iid in self._draining
        self._draining.discard(iid)
        self._refresh_ids()
        if graceful:
            return  # its in-flight streams still finish; heartbeats guard them
        for stream in list(self.streams):
            if stream.instance_id == iid:
                stream._fail(ResponderDeadError(f"instance {iid:x} left discovery"))

    async def wait_for_instances(self, count: int = 1, timeout: float = 10.0) -> None:
        await self._watcher.wait_for(lambda _: len(self.instances()) >= count, timeout)

    # -- requests ----------------------------------------------------------------------------
    def _pick(self, mode: RouterMode) -> int:
        ids = self._ids
        if not ids:
            raise NoInstancesError(f"no instances of {self.name}")
        if mode is RouterMode.RANDOM:
            return random.choice(ids)
        return ids[next(self._rr) % len(ids)]

    async def generate(
        self,
        request: Any,
        *,
        mode: RouterMode | str = RouterMode.ROUND_ROBIN,
        instance_id: int | None = None,
        response_type: Any = Any,
        window: int = DEFAULT_WINDOW,
    ) -> ResponseStream:
        """Send ``request``; returns the stream of response chunks.

        ``instance_id`` routes directly to one instance. Raises :class:`NoInstancesError`
        when discovery knows none and :class:`TransportError` while NATS is disconnected.
        """
        rt = self.runtime
        self._m_requests.inc()
        if not rt.nats.is_connected:
            down = TransportError("NATS is not connected")
            self.count_error(down)
            raise down
        mode = RouterMode(mode)
        if mode not in CLIENT_MODES:
            raise ValueError(
                f"a runtime client routes by {', '.join(CLIENT_MODES)}, not {mode} (load- "
                "and KV-aware routing is the processor's router)"
            )
        if instance_id is None and mode is not RouterMode.ANY:
            try:
                instance_id = self._pick(mode)
            except NoInstancesError as err:
                self.count_error(err)
                raise
        subject = self.eid.subject if instance_id is None else f"{self.eid.subject}.{instance_id:x}"
        stream_id, request_id = rt.next_stream_ids()
        body = (
            request if isinstance(request, msgspec.Raw) else msgspec.Raw(rt.encoder.encode(request))
        )
        stream = ResponseStream(
            self, stream_id, request_id, rt.decoder_for(response_type), instance_id, window
        )
        rt.client_streams[stream_id] = stream
        self.streams.add(stream)
        local = rt.served_here(self.eid) if instance_id == rt.instance_id else None
        server = rt.response_server
        if server is not None and local is None:
            envelope = RequestEnvelope(request_id, body, window, server.address, server.token)
        else:
            envelope = RequestEnvelope(request_id, body, window)
        data = rt.encoder.encode(envelope)
        try:
            if local is not None:
                # A process calling itself (a worker's health canary): the request is handed
                # over here, so no credential needs the right to call workers; the answer
                # still comes back over NATS.
                await local.deliver(data, f"{rt.inbox}.{stream_id}")
            else:
                await rt.publish(subject, data, reply=f"{rt.inbox}.{stream_id}")
        except Exception as exc:
            stream._finish()
            failed = TransportError(f"cannot publish to {subject}: {exc}")
            self.count_error(failed)
            raise failed from exc
        return stream

    def count_error(self, error: MeshError) -> None:
        metrics.client_errors_total.labels(self.name, error.code.value).inc()
