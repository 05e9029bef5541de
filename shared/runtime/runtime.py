"""The distributed runtime of one process: one NATS connection, one etcd session and lease.

It owns the process-wide plumbing every endpoint and client shares: a single wildcard inbox
subscription that demultiplexes response frames to their streams, a single control
subscription for cancels and credit, one ticker that sends heartbeats on quiet outgoing
streams and fails silent incoming ones, and the shutdown sequence.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS

from proto.plane import Control, ControlKind, Frame, FrameKind
from shared.config import EndpointId, MeshConfig, parse_endpoint
from shared.runtime import metrics
from shared.runtime.client import Client, ResponseStream, control_subject
from shared.runtime.endpoint import Endpoint, ServedEndpoint, ServerStream, StopReason
from shared.runtime.errors import (
    NoRespondersError,
    ResponderDeadError,
    StreamGapError,
    TransportError,
)
from shared.runtime.etcd import EtcdSession
from shared.runtime.planes_auth import etcd_auth, nats_auth_options
from shared.runtime.response_plane import (
    CallerConnection,
    ResponderConnection,
    ResponderConnections,
    ResponseServer,
    local_address_towards,
)

log = logging.getLogger(__name__)

_FRAME_DECODER = msgspec.msgpack.Decoder(Frame)
_CONTROL_DECODER = msgspec.msgpack.Decoder(Control)
_FINAL_KINDS = (FrameKind.END, FrameKind.ERROR)


class DistributedRuntime:
    def __init__(self, config: MeshConfig) -> None:
        self.config = config
        # Random, not the lease id: the id must survive a lease re-grant so routers and KV
        # indexes keep recognising the instance after an etcd restart.
        self.instance_id = secrets.randbits(63) or 1
        self.started_at = time.time()
        self.encoder = msgspec.msgpack.Encoder()
        self._decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
        self.nats = NATS()
        self.etcd = EtcdSession(config.etcd_hostports(), config.lease_ttl, auth=etcd_auth(config))
        self.control_subject = control_subject(self.instance_id)
        self.inbox = ""
        self.server_streams: dict[str, ServerStream] = {}
        # Weak, so a stream its consumer dropped without closing is collected, and its
        # finalizer cancels the remote handler.
        self.client_streams: weakref.WeakValueDictionary[str, ResponseStream] = (
            weakref.WeakValueDictionary()
        )
        self.served: list[ServedEndpoint] = []
        self._extra_keys: list[str] = []
        self.clients: list[Client] = []
        self._drain_hooks: list[Callable[[float], Awaitable[None]]] = []
        self.shutting_down = False
        self.shutdown_event = asyncio.Event()
        self._stream_ids = itertools.count(1)
        self._id_prefix = f"{self.instance_id:x}"
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._nats_warned = False
        self._connecting = False
        self._last_nats_error: Exception | None = None
        self._probing: set[int] = set()
        self._connected = asyncio.Event()
        self._reconnected_at = -1e9
        # Direct response streams (response_plane.py): the server this process's callers'
        # answers arrive on (started with the first client), and this process's connections
        # to other callers' servers.
        self.direct_responses = config.direct_responses  # read per request: computed once
        self.response_server: ResponseServer | None = None
        self._response_server_lock = asyncio.Lock()
        self.responder_connections = ResponderConnections(
            self.instance_id,
            self.encoder,
            self._on_direct_control,
            self._on_responder_lost,
            flush_interval=config.response_flush_interval,
        )

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, *, connect_timeout: float = 10.0) -> None:
        self.loop = asyncio.get_running_loop()
        await self._connect_nats(connect_timeout)
        self._connected.set()
        self.inbox = self.nats.new_inbox()
        await self.nats.subscribe(f"{self.inbox}.*", cb=self._on_inbox)
        await self.nats.subscribe(self.control_subject, cb=self._on_control)
        await self.etcd.start(connect_timeout=connect_timeout)
        self.etcd.on_lease_change(self._on_lease_change)
        self._ticker = asyncio.create_task(self._tick(), name="runtime-ticker")
        log.info(
            "runtime started",
            extra={
                "instance_id": f"{self.instance_id:x}",
                "namespace": self.config.namespace,
                "lease_id": self.etcd.lease_id,
            },
        )

    async def _connect_nats(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # Until the first connection, failed attempts are summed up in one line at the end,
        # not logged one by one.
        self._connecting = True
        try:
            await self._first_connect(deadline)
        finally:
            self._connecting = False

    async def _first_connect(self, deadline: float) -> None:
        while True:
            try:
                # nats-py retries an unreachable server forever when reconnects are unlimited;
                # the deadline is ours to enforce.
                await asyncio.wait_for(self._nats_connect(), max(deadline - time.monotonic(), 0.1))
                return
            except Exception as exc:
                if time.monotonic() >= deadline:
                    with contextlib.suppress(Exception):
                        await self.nats.close()
                    cause = self._last_nats_error or exc
                    reason = str(cause) or type(cause).__name__
                    if isinstance(cause, ConnectionRefusedError):
                        reason = "connection refused; is it running? (`sglmesh infra up`)"
                    raise ConnectionError(
                        f"cannot reach NATS at {self.config.nats_url}: {reason}"
                    ) from exc
                await asyncio.sleep(0.25)

    async def _nats_connect(self) -> None:
        await self.nats.connect(
            servers=self.config.nats_servers,
            name=f"sglmesh-{self.instance_id:x}",
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,  # type: ignore[arg-type]  # seconds; the stub says int
            connect_timeout=2,
            ping_interval=5,
            max_outstanding_pings=3,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            error_cb=self._on_nats_error,
            **nats_auth_options(self.config),
        )
        if not self._nats_warned and not self.nats._server_info.get("auth_required"):
            self._nats_warned = True
            log.warning(
                "the NATS server accepts anonymous clients: anyone who reaches it can read "
                "prompts and answers and call workers",
                extra={"nats": str(self.nats.connected_url)},
            )

    def request_shutdown(self) -> None:
        self.shutdown_event.set()

    async def shutdown(self, grace: float | None = None) -> None:
        """Leave discovery, let in-flight requests finish (up to ``grace``), then close."""
        if self.shutting_down:
            return
        self.shutting_down = True
        self.shutdown_event.set()
        grace = self.config.graceful_shutdown_grace_period if grace is None else grace
        log.info(
            "shutting down", extra={"grace_period": grace, "inflight": len(self.server_streams)}
        )
        for served in self.served:
            await served.unregister()
        for served in self.served:
            await served.stop_accepting()
        await asyncio.gather(
            *(served.drain(grace) for served in self.served),
            *(hook(grace) for hook in self._drain_hooks),
        )
        for client in self.clients:
            await client.close()
        if self._ticker is not None:
            self._ticker.cancel()
        self.responder_connections.close()
        if self.response_server is not None:
            await self.response_server.close()
        await self.etcd.close(revoke=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nats.drain(), 2.0)
        with contextlib.suppress(Exception):
            await self.nats.close()
        for task in list(self._tasks):
            task.cancel()
        log.info("runtime closed")

    # -- endpoints and clients ----------------------------------------------------------------
    def endpoint(self, name: str | EndpointId, endpoint: str | None = None) -> Endpoint:
        """``endpoint("backend", "generate")`` in this namespace, or a full ``ns.comp.ep``."""
        if isinstance(name, EndpointId):
            eid = name
        elif endpoint is not None:
            eid = EndpointId(self.config.namespace, name, endpoint)
        else:
            eid = parse_endpoint(name)
        return Endpoint(self, eid)

    async def client(self, name: str | EndpointId, endpoint: str | None = None) -> Client:
        await self._start_response_server()
        client = Client(self, self.endpoint(name, endpoint).id)
        await client.start()
        self.clients.append(client)
        return client

    async def _start_response_server(self) -> None:
        if not self.direct_responses or self.response_server is not None:
            return
        async with self._response_server_lock:
            if self.response_server is not None:
                return
            host = self.config.response_host
            if not host:
                url = self.nats.connected_url
                host = local_address_towards(
                    (url.hostname if url else None) or "127.0.0.1",
                    (url.port if url else None) or 4222,
                )
            server = ResponseServer(self.encoder, self._on_direct_frame, self._on_caller_lost)
            await server.start(host, self.config.response_port)
            self.response_server = server

    def _on_direct_frame(self, conn: CallerConnection, stream_id: str, frame: Frame) -> None:
        stream = self.client_streams.get(stream_id)
        if stream is not None:
            if stream.instance_id is not None and stream.instance_id != conn.instance_id:
                return  # another instance's connection: not this stream's responder
            stream.conn = conn
            stream._deliver(frame)
        elif frame.instance_id is not None and frame.kind not in _FINAL_KINDS:
            # The caller gave up before the responder acknowledged: cancel the orphan.
            conn.send_control(Control(f"{self._id_prefix}-{stream_id}", ControlKind.CANCEL))

    def _on_caller_lost(self, conn: CallerConnection) -> None:
        for stream in list(self.client_streams.values()):
            if stream.conn is conn:
                stream._fail(
                    ResponderDeadError(
                        f"the response connection from instance {conn.instance_id:x} closed"
                    )
                )

    def _on_direct_control(self, ctl: Control) -> None:
        # Called from the connection's data_received (not a coroutine).
        self.spawn(self.handle_control(ctl))

    def _on_responder_lost(self, conn: ResponderConnection) -> None:
        # The caller is gone (or its connection is): nobody reads these streams any more.
        for stream in list(self.server_streams.values()):
            if stream.conn is conn:
                stream.ctx._stop(StopReason.CALLER_GONE)

    async def add_served(self, served: ServedEndpoint, *, register: bool) -> None:
        self.served.append(served)
        await served.start(register=register)

    def served_here(self, eid: EndpointId) -> ServedEndpoint | None:
        """The endpoint ``eid`` if this process serves it."""
        for served in self.served:
            if served.eid == eid:
                return served
        return None

    def add_drain_hook(self, hook: Callable[[float], Awaitable[None]]) -> None:
        """``await hook(grace)`` during shutdown, beside the endpoints' drain: for work that
        is not an endpoint (an HTTP server's requests) but needs the mesh to finish."""
        self._drain_hooks.append(hook)

    async def put_registered(self, key: str, value: bytes) -> None:
        """Write a key under the lease (e.g. a model card): rewritten after a lease re-grant
        and deleted first when the process leaves discovery."""
        await self.etcd.put(key, value)
        if key not in self._extra_keys:
            self._extra_keys.append(key)

    def health(self) -> tuple[bool, dict[str, Any]]:
        endpoints = {
            s.name: "ready" if (s.serving and s.registered) else "notready" for s in self.served
        }
        ready = (
            not self.shutting_down
            and self.nats.is_connected
            and self.etcd.healthy
            and all(v == "ready" for v in endpoints.values())
        )
        return ready, {
            "status": "ready" if ready else "notready",
            "instance_id": f"{self.instance_id:x}",
            "endpoints": endpoints,
            "nats": "connected" if self.nats.is_connected else "disconnected",
            "etcd": "healthy" if self.etcd.healthy else "unreachable",
            "uptime": round(time.time() - self.started_at, 3),
        }

    # -- plumbing ----------------------------------------------------------------------------
    def decoder_for(self, type_: Any) -> msgspec.msgpack.Decoder[Any]:
        dec = self._decoders.get(type_)
        if dec is None:
            dec = self._decoders[type_] = msgspec.msgpack.Decoder(type_)
        return dec

    def next_stream_ids(self) -> tuple[str, str]:
        n = next(self._stream_ids)
        sid = f"{n:x}"
        return sid, f"{self._id_prefix}-{sid}"

    async def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        await self.nats.publish(subject, data, reply=reply)

    def cancel_remote(self, instance_id: int, request_id: str, *, from_gc: bool = False) -> None:
        """Tell an instance to stop a request, without waiting (callable from sync code)."""
        loop = self.loop
        if loop is None or loop.is_closed() or self.nats.is_closed:
            return
        if instance_id == self.instance_id:
            ctl = Control(request_id, ControlKind.CANCEL)
            if from_gc:
                loop.call_soon_threadsafe(lambda: self.spawn(self.handle_control(ctl)))
            else:
                self.spawn(self.handle_control(ctl))
            return
        data = self.encoder.encode(Control(request_id, ControlKind.CANCEL))
        subject = control_subject(instance_id)
        if from_gc:
            # Finalizers may run anywhere, even outside the loop's thread.
            loop.call_soon_threadsafe(lambda: self.spawn(self.publish(subject, data)))
        else:
            self.spawn(self.publish(subject, data))

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a fire-and-forget coroutine, keeping a reference so it is not collected."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_inbox(self, msg: Any) -> None:
        stream = self.client_streams.get(msg.subject[len(self.inbox) + 1 :])
        headers = msg.headers
        if headers and headers.get("Status") == "503":
            if stream is not None:
                stream._fail(NoRespondersError("no responders on the endpoint subject"))
                if stream.instance_id is not None:
                    # Nobody holds that instance's direct subject: it is gone (or, just
                    # after a NATS restart, not back yet: the clients' re-probes tell).
                    self.declare_dead(stream.instance_id, "no responders on its subject")
            return
        try:
            frame = _FRAME_DECODER.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("undecodable response frame", extra={"error": str(exc)})
            if stream is not None:
                stream._fail(StreamGapError(f"undecodable frame: {exc}"))
            return
        if stream is not None:
            stream._deliver(frame)
        elif frame.instance_id is not None and frame.kind not in _FINAL_KINDS:
            # The caller gave up before the responder acknowledged: cancel the orphan.
            request_id = f"{self._id_prefix}-{msg.subject[len(self.inbox) + 1 :]}"
            self.cancel_remote(frame.instance_id, request_id)

    async def _on_control(self, msg: Any) -> None:
        try:
            ctl = _CONTROL_DECODER.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("undecodable control message", extra={"error": str(exc)})
            return
        if ctl.kind is ControlKind.PING:
            if msg.reply:
                with contextlib.suppress(Exception):
                    await self.nats.publish(msg.reply, b"")
            return
        await self.handle_control(ctl)

    async def probe(self, instance_id: int, timeout: float = 0.5) -> bool | None:
        """Whether an instance is alive: True (it answered), False (NATS says nobody holds
        its control subject: the process or its connection is gone), None (no answer in
        time, or our own connection is down: unknown)."""
        if instance_id == self.instance_id:
            return True
        if not self.nats.is_connected:
            return None
        data = self.encoder.encode(Control("", ControlKind.PING))
        try:
            await self.nats.request(control_subject(instance_id), data, timeout=timeout)
        except nats.errors.NoRespondersError:
            return False
        except Exception:
            return None
        return True

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the NATS connection; True if it is up."""
        if self.nats.is_connected:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self.nats.is_connected

    def reconnected_within(self, seconds: float) -> bool:
        """Whether the NATS connection came back less than ``seconds`` ago (instances may
        still be resubscribing), or is down now."""
        if not self.nats.is_connected:
            return True
        return time.monotonic() - self._reconnected_at < seconds

    async def handle_control(self, ctl: Control) -> None:
        """Apply a cancel or credit to one of this instance's streams. A process calling its
        own endpoint (a worker's health canary) is served here without NATS, so its
        credentials need no right to publish on control subjects."""
        stream = self.server_streams.get(ctl.request_id)
        if stream is None:
            return
        if ctl.kind is ControlKind.CANCEL:
            stream.ctx._stop(StopReason.CALLER)
        elif ctl.kind is ControlKind.CREDIT:
            await stream.grant(ctl.value)

    async def _tick(self) -> None:
        hb = self.config.heartbeat_interval
        timeout = self.config.stream_timeout
        period = min(hb / 2, timeout / 4)
        # A stream silent for two heartbeats gets its instance probed: a killed process is
        # known dead (NATS: no responders) in about a second, not after --stream-timeout.
        suspect_after = min(2 * hb, timeout)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for stream in list(self.server_streams.values()):
                if now - stream.last_send >= hb:
                    with contextlib.suppress(Exception):
                        await stream.send(FrameKind.HEARTBEAT)
            suspects: set[int] = set()
            for cstream in list(self.client_streams.values()):
                silent = now - cstream.last_recv
                if silent > timeout:
                    cstream._fail(
                        ResponderDeadError(f"no frame from the responder for {timeout:g} s")
                    )
                elif silent > suspect_after and cstream.instance_id is not None:
                    suspects.add(cstream.instance_id)
            for iid in suspects - self._probing:
                self._probing.add(iid)
                self.spawn(self._check_suspect(iid))

    async def _check_suspect(self, instance_id: int) -> None:
        try:
            if await self.probe(instance_id) is False:
                self.declare_dead(instance_id, "it is gone from NATS (no responders)")
        finally:
            self._probing.discard(instance_id)

    def declare_dead(self, instance_id: int, why: str) -> None:
        """Fail every stream served by ``instance_id`` (retryable) and take it out of every
        client's routing set now, not when its lease expires."""
        for stream in list(self.client_streams.values()):
            if stream.instance_id == instance_id:
                stream._fail(ResponderDeadError(f"instance {instance_id:x} died: {why}"))
        for client in self.clients:
            client.quarantine(instance_id, why)

    async def _on_disconnected(self) -> None:
        if self.shutting_down or self._connecting:
            return
        self._connected.clear()
        log.warning("NATS disconnected; failing in-flight streams")
        for stream in list(self.client_streams.values()):
            stream._fail(TransportError("NATS connection lost"))
        # Their callers fail them too, so nobody would read what these handlers produce.
        for served in self.served:
            served.stop_all(StopReason.TRANSPORT)

    async def _on_reconnected(self) -> None:
        self._reconnected_at = time.monotonic()
        self._connected.set()
        metrics.nats_reconnects_total.inc()
        log.info("NATS reconnected", extra={"url": str(self.nats.connected_url)})

    async def _on_nats_error(self, exc: Exception) -> None:
        if self._connecting:
            self._last_nats_error = exc
            return
        if isinstance(exc, nats.errors.SlowConsumerError):
            log.warning("NATS slow consumer", extra={"subject": exc.subject})
        else:
            log.info("NATS error", extra={"error": repr(exc)})

    def _on_lease_change(self, lease_id: int) -> None:
        for served in self.served:
            served.refresh_lease(lease_id)
