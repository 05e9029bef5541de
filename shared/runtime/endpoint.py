"""Serving an endpoint: NATS subscriptions, the instance record in etcd, and response streams.

An instance listens on two subjects: the endpoint's queue-group subject (``ns.comp.ep``: any
one instance gets each request) and its own direct subject (``ns.comp.ep.<instance hex>``). A
request is answered on its reply subject by a stream of frames (see ``proto.plane``). The
handler is an async generator; its chunks are coalesced into fewer frames when the caller has
not granted credit for more, which bounds what a slow caller can make a worker buffer.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from proto.discovery import InstanceRecord, instance_key
from proto.plane import ErrorBody, ErrorCode, Frame, FrameKind, RequestEnvelope, StreamFrame
from shared.config import EndpointId
from shared.runtime import metrics
from shared.runtime.errors import MeshError

if TYPE_CHECKING:
    from shared.runtime.response_plane import ResponderConnection
    from shared.runtime.runtime import DistributedRuntime

log = logging.getLogger(__name__)

Handler = Callable[[Any, "Context"], AsyncIterator[Any]]
# Merges the chunks of one stream that wait for the same frame into fewer (an endpoint's own
# rule: for generate, consecutive token chunks of one choice become one, as SGLang merges the
# increments a slow reader has not picked up). Its chunks then wait unencoded until framed.
Coalesce = Callable[[list[Any]], list[Any]]

# A handler may run this many chunks ahead of the caller's credit before it is paused.
MAX_PENDING_CHUNKS = 4096
# A handler that has sent nothing this long after it started gets a bare ACK frame. Not at the
# next loop iteration: an engine's first token usually takes a scheduler step or a timeslice
# longer, and then nine requests in ten cost an extra frame (counted at c=64 on the simulator).
ACK_DELAY = 0.002
_ENVELOPE_DECODER = msgspec.msgpack.Decoder(RequestEnvelope)


class StopReason(enum.Enum):
    CALLER = "caller"
    SHUTDOWN = "shutdown"
    TRANSPORT = "transport"
    CALLER_GONE = "caller_gone"


class Context:
    """What a handler knows about its request besides the payload."""

    __slots__ = ("_stopped", "_task", "instance_id", "request_id", "stop_reason")

    def __init__(self, request_id: str, instance_id: int) -> None:
        self.request_id = request_id
        self.instance_id = instance_id
        self.stop_reason: StopReason | None = None
        self._stopped = False
        self._task: asyncio.Task[None] | None = None

    def is_stopped(self) -> bool:
        """True once the caller cancelled, the caller is gone, or the instance is shutting down."""
        return self._stopped

    def _stop(self, reason: StopReason) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.stop_reason = reason
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()


class ServerStream:
    """One response stream: sequence numbers, credit, and chunks waiting for credit."""

    __slots__ = (
        "acked",
        "coalesce",
        "conn",
        "credit",
        "ctx",
        "deferred",
        "last_send",
        "pending",
        "reply",
        "request_id",
        "runtime",
        "seq",
        "stream_id",
        "window",
    )

    def __init__(
        self, runtime: DistributedRuntime, request_id: str, reply: str, window: int
    ) -> None:
        self.runtime = runtime
        self.request_id = request_id
        self.reply = reply
        self.window = window
        self.seq = 0  # next seq to send
        self.acked = 0
        # Chunks not yet framed: encoded, or (with ``coalesce``) as the handler made them.
        self.pending: list[Any] = []
        self.coalesce: Coalesce | None = None
        self.last_send = time.monotonic()
        self.credit = asyncio.Event()
        self.ctx = Context(request_id, runtime.instance_id)
        # Set when the caller named its response server: frames go there, not to ``reply``.
        self.conn: ResponderConnection | None = None
        self.stream_id = reply[reply.rfind(".") + 1 :]
        # Chunks wait in ``pending`` for the connection's next write (``frame_deferred``).
        self.deferred = False

    def can_send_data(self) -> bool:
        return self.window <= 0 or self.seq <= self.acked + self.window

    def take_chunks(self) -> list[msgspec.Raw]:
        """The pending chunks, merged by ``coalesce`` and encoded, for one frame."""
        chunks, self.pending = self.pending, []
        coalesce = self.coalesce
        if coalesce is None:
            return chunks
        if len(chunks) > 1:
            chunks = coalesce(chunks)
        encode = self.runtime.encoder.encode
        return [c if isinstance(c, msgspec.Raw) else msgspec.Raw(encode(c)) for c in chunks]

    def _frame(self, kind: FrameKind, fields: dict[str, Any]) -> Frame:
        if self.seq == 0:
            # The first frame always names the instance: it is the acknowledgement.
            fields["instance_id"] = self.runtime.instance_id
        frame = Frame(seq=self.seq, kind=kind, **fields)
        self.seq += 1
        self.last_send = time.monotonic()
        return frame

    async def send(self, kind: FrameKind, **fields: Any) -> None:
        frame = self._frame(kind, fields)
        conn = self.conn
        if conn is None:
            await self.runtime.publish(self.reply, self.runtime.encoder.encode(frame))
            return
        self._write(conn, frame, urgent=kind is FrameKind.END or kind is FrameKind.ERROR)
        if conn.paused:
            await conn.drain()

    def _write(self, conn: ResponderConnection, frame: Frame, *, urgent: bool = False) -> None:
        # A closed connection has stopped this stream already (the caller failed its side).
        conn.send(self.runtime.encoder.encode(StreamFrame(self.stream_id, frame)), urgent=urgent)

    def defer_data(self, conn: ResponderConnection) -> None:
        """Frame the pending chunks when ``conn`` writes next (its write is deferred): the
        chunks a stream makes meanwhile travel as one frame, not one frame each."""
        if not self.deferred:
            self.deferred = True
            conn.defer(self.frame_deferred)

    def frame_deferred(self) -> None:
        """Called by the connection just before its write."""
        self.deferred = False
        conn = self.conn
        if not self.pending or self.ctx._stopped or conn is None or not self.can_send_data():
            return  # ended (END took them, or an error dropped them), or waiting for credit
        try:
            chunks = self.take_chunks()
        except Exception as exc:
            # Outside the handler's task: answer its error here and stop it.
            log.exception("a handler's chunks did not encode")
            body = ErrorBody(ErrorCode.HANDLER_ERROR, f"{type(exc).__name__}: {exc}", False)
            self._write(conn, self._frame(FrameKind.ERROR, {"error": body}), urgent=True)
            self.ctx._stop(StopReason.CALLER_GONE)
            return
        self._write(conn, self._frame(FrameKind.DATA, {"chunks": chunks}))

    async def flush_data(self) -> None:
        if self.pending:
            await self.send(FrameKind.DATA, chunks=self.take_chunks())

    async def grant(self, consumed_seq: int) -> None:
        if consumed_seq > self.acked:
            self.acked = consumed_seq
            self.credit.set()
            if self.pending and self.can_send_data():
                await self.flush_data()


class ServedEndpoint:
    """An endpoint this process serves; created by :meth:`Endpoint.serve`."""

    def __init__(
        self,
        runtime: DistributedRuntime,
        eid: EndpointId,
        handler: Handler,
        request_type: Any,
        limit: int,
        record_fields: dict[str, Any],
        coalesce: Coalesce | None = None,
    ) -> None:
        self.runtime = runtime
        self.eid = eid
        self.name = str(eid)
        self._handler = handler
        self._coalesce = coalesce
        self._decoder = msgspec.msgpack.Decoder(request_type)
        self._limit = limit
        fields = dict(record_fields)
        self._metadata: dict[str, str] = dict(fields.pop("metadata", None) or {})
        self._record_fields = fields
        self.streams: dict[str, ServerStream] = {}
        self.direct_subject = f"{eid.subject}.{runtime.instance_id:x}"
        self.key = instance_key(eid.namespace, eid.component, eid.endpoint, runtime.instance_id)
        self.serving = False
        self.registered = False
        # When a request last started or ended here (monotonic): health canaries run only
        # after an idle spell, so real traffic is never delayed by them.
        self.last_activity = time.monotonic()
        self._subs: list[Any] = []
        self._drained = asyncio.Event()
        self._drained.set()
        self._m_requests = metrics.requests_total.labels(self.name)
        self._m_inflight = metrics.inflight_requests.labels(self.name)
        self._m_duration = metrics.request_duration.labels(self.name)

    def record(self, *, draining: bool = False) -> InstanceRecord:
        metadata = {**self._metadata, "state": "draining"} if draining else self._metadata
        return InstanceRecord(
            namespace=self.eid.namespace,
            component=self.eid.component,
            endpoint=self.eid.endpoint,
            instance_id=self.runtime.instance_id,
            subject=self.direct_subject,
            control_subject=self.runtime.control_subject,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=self.runtime.started_at,
            lease_id=self.runtime.etcd.lease_id,
            metadata=metadata,
            **self._record_fields,
        )

    def _encoded_record(self, *, draining: bool = False) -> bytes:
        return self.runtime.encoder.encode(self.record(draining=draining))

    async def start(self, *, register: bool = True) -> None:
        nc = self.runtime.nats
        self._subs.append(
            await nc.subscribe(self.eid.subject, queue=self.eid.subject, cb=self._on_request)
        )
        self._subs.append(await nc.subscribe(self.direct_subject, cb=self._on_request))
        # A PING round trip: the server has our subscriptions before anyone can find us in
        # etcd (else a caller quick off the mark gets "no responders").
        await nc.flush()
        self.serving = True
        if register:
            await self.register()

    async def register(self) -> None:
        """Make the instance discoverable (again)."""
        await self.runtime.etcd.put(self.key, self._encoded_record())
        self.registered = True

    def refresh_lease(self, lease_id: int) -> None:
        del lease_id  # the record reads the current lease id when encoded
        if self.registered:
            self.runtime.etcd.remember(self.key, self._encoded_record())

    async def unregister(self) -> None:
        """Leave discovery; in-flight streams go on.

        The record is first rewritten as draining, so callers that see the deletion next know
        it was graceful and keep waiting for the streams this instance still serves.
        """
        if not self.registered:
            return
        self.registered = False
        with contextlib.suppress(Exception):
            await self.runtime.etcd.put(self.key, self._encoded_record(draining=True))
        with contextlib.suppress(Exception):
            await self.runtime.etcd.delete(self.key)

    async def stop_accepting(self) -> None:
        self.serving = False
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.drain()

    async def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for in-flight streams, then stop the rest as retryable."""
        if self.streams:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), timeout=max(grace, 0.0))
        for stream in list(self.streams.values()):
            stream.ctx._stop(StopReason.SHUTDOWN)
        tasks = [s.ctx._task for s in self.streams.values() if s.ctx._task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    def stop_all(self, reason: StopReason) -> None:
        for stream in list(self.streams.values()):
            stream.ctx._stop(reason)

    async def _reject(self, reply: str, code: ErrorCode, message: str) -> None:
        metrics.errors_total.labels(self.name, code.value).inc()
        body = MeshError(message, code=code).to_body()
        frame = Frame(seq=0, kind=FrameKind.ERROR, error=body)
        with contextlib.suppress(Exception):
            await self.runtime.publish(reply, self.runtime.encoder.encode(frame))

    async def deliver(self, data: bytes, reply: str) -> None:
        """Take a request that did not come over NATS (the process calling itself)."""
        if not self.serving:
            await self._reject(reply, ErrorCode.NO_RESPONDERS, f"{self.name} is not serving")
            return
        await self._on_request(_LocalMessage(data, reply))

    async def _on_request(self, msg: Any) -> None:
        reply: str = msg.reply
        try:
            env = _ENVELOPE_DECODER.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("undecodable request", extra={"endpoint": self.name, "error": str(exc)})
            if reply:
                await self._reject(reply, ErrorCode.INVALID_REQUEST, f"bad request frame: {exc}")
            return
        if not reply:
            log.warning("request without reply subject", extra={"endpoint": self.name})
            return
        if not self.serving or self.runtime.shutting_down:
            await self._reject(reply, ErrorCode.SHUTTING_DOWN, f"{self.name} is shutting down")
            return
        if self._limit > 0 and len(self.streams) >= self._limit:
            await self._reject(
                reply, ErrorCode.OVERLOADED, f"{self.name} is at its limit of {self._limit}"
            )
            return
        try:
            request = self._decoder.decode(env.body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self._reject(reply, ErrorCode.INVALID_REQUEST, f"invalid request: {exc}")
            return
        self.last_activity = time.monotonic()
        stream = ServerStream(self.runtime, env.request_id, reply, env.window)
        self.streams[env.request_id] = stream
        self.runtime.server_streams[env.request_id] = stream
        self._drained.clear()
        stream.ctx._task = asyncio.create_task(self._run(stream, request, env))

    def _ack_if_quiet(self, stream: ServerStream) -> None:
        # Runs ACK_DELAY after the handler started: a handler that answered by then has sent
        # its first frame (which acknowledges); a slow one gets a bare ACK now, so the caller
        # learns who serves it without waiting for a chunk. A timer, not a task per request:
        # the task is made only for the slow ones.
        if stream.seq == 0 and stream.request_id in self.streams:
            self.runtime.spawn(stream.send(FrameKind.ACK))

    async def _run(self, stream: ServerStream, request: Any, env: RequestEnvelope) -> None:
        started = time.perf_counter()
        self._m_requests.inc()
        self._m_inflight.inc()
        if env.reply_addr and self.runtime.direct_responses:
            stream.conn = self.runtime.responder_connections.get(env.reply_addr, env.reply_token)
        asyncio.get_running_loop().call_later(ACK_DELAY, self._ack_if_quiet, stream)
        encode = self.runtime.encoder.encode
        coalesce = stream.coalesce = self._coalesce
        error: ErrorBody | None = None
        agen = self._handler(request, stream.ctx)
        try:
            async for chunk in agen:
                if coalesce is not None or isinstance(chunk, msgspec.Raw):
                    stream.pending.append(chunk)
                else:
                    stream.pending.append(msgspec.Raw(encode(chunk)))
                conn = stream.conn
                if conn is not None and conn.write_deferred:
                    stream.defer_data(conn)  # framed just before the connection's next write
                elif stream.can_send_data():
                    await stream.flush_data()
                if len(stream.pending) >= MAX_PENDING_CHUNKS:
                    await self._wait_for_credit(stream)
            await stream.send(FrameKind.END, chunks=stream.take_chunks())
        except asyncio.CancelledError:
            reason = stream.ctx.stop_reason
            if reason is None:
                raise  # cancelled from outside the request plane (loop teardown)
            if reason is StopReason.CALLER:
                metrics.cancellations_total.labels(self.name).inc()
            elif reason is StopReason.SHUTDOWN:
                error = ErrorBody(ErrorCode.SHUTTING_DOWN, f"{self.name} is shutting down", True)
        except MeshError as exc:
            error = exc.to_body()
        except Exception as exc:
            log.exception("handler failed", extra={"endpoint": self.name})
            error = ErrorBody(ErrorCode.HANDLER_ERROR, f"{type(exc).__name__}: {exc}", False)
        finally:
            stream.ctx._stopped = True
            with contextlib.suppress(BaseException):
                await agen.aclose()  # type: ignore[attr-defined]
            self.streams.pop(stream.request_id, None)
            self.runtime.server_streams.pop(stream.request_id, None)
            if not self.streams:
                self._drained.set()
            self.last_activity = time.monotonic()
            self._m_inflight.dec()
            self._m_duration.observe(time.perf_counter() - started)
        if error is not None:
            metrics.errors_total.labels(self.name, error.code.value).inc()
            with contextlib.suppress(Exception):
                await stream.send(FrameKind.ERROR, error=error)

    async def _wait_for_credit(self, stream: ServerStream) -> None:
        # A caller that grants no credit for this long is gone (or hopelessly stuck): stop
        # working for it instead of holding engine capacity forever.
        timeout = self.runtime.config.stream_timeout * 2
        while not stream.can_send_data():
            stream.credit.clear()
            try:
                await asyncio.wait_for(stream.credit.wait(), timeout)
            except TimeoutError:
                stream.ctx._stop(StopReason.CALLER_GONE)
                raise asyncio.CancelledError from None
        await stream.flush_data()


class _LocalMessage:
    __slots__ = ("data", "reply")

    def __init__(self, data: bytes, reply: str) -> None:
        self.data = data
        self.reply = reply


class Endpoint:
    """A named endpoint: serve it here, or call it with :meth:`client`."""

    def __init__(self, runtime: DistributedRuntime, eid: EndpointId) -> None:
        self.runtime = runtime
        self.id = eid

    async def serve(
        self,
        handler: Handler,
        *,
        request_type: Any = Any,
        concurrency_limit: int | None = None,
        register: bool = True,
        coalesce: Coalesce | None = None,
        **record_fields: Any,
    ) -> ServedEndpoint:
        """Start serving ``handler``; returns once subscribed and registered.

        ``record_fields`` go into the instance record (model, worker_type, runtime_config,
        zmq, metadata). ``concurrency_limit`` defaults to ``--engine-request-limit``.
        ``coalesce`` merges a stream's chunks that wait for the same frame (see ``Coalesce``).
        """
        limit = (
            self.runtime.config.engine_request_limit
            if concurrency_limit is None
            else concurrency_limit
        )
        served = ServedEndpoint(
            self.runtime, self.id, handler, request_type, limit, record_fields, coalesce
        )
        await self.runtime.add_served(served, register=register)
        return served
