"""Direct response streams: responders stream a request's frames to the caller over TCP.

Why: a streamed 64-token answer is ~10 frames and a credit; on NATS each one is a publish in
the worker, a routing step in nats-server and a parse in the caller. In a py-spy profile (c=16,
one worker), NATS publishing and reading took about a quarter of both the processor's and the
worker's CPU, and nats-server another 0.5-0.7 ms per request. The request itself still goes
over NATS (discovery by subject, queue groups, "no responders", the planes' credentials); its
answer comes back on one TCP connection per (responder, caller) pair, multiplexed by stream
id, and the caller's credit and cancels go back on the same connection. The reference made
the same move (its 1.6 default streams responses over direct TCP).

Wire: every message is a 4-byte big-endian length and a msgpack body. A responder opens the
connection with a :class:`~proto.plane.StreamHello` carrying the caller's token, which it can
only have learned from a request envelope on the authenticated request plane; then it sends
:class:`~proto.plane.StreamFrame` s, and the caller sends :class:`~proto.plane.Control` s.
Writes are coalesced into one socket write per event-loop iteration and connection, and a
responder writes to a caller at most once per ``--response-flush-interval`` (5 ms): frames
that come sooner wait for the next write, while the first frame after a quiet spell goes at
once, and so does a stream's last frame (the caller's answer is complete only with it). At a
GPU's pace (a step every 10+ ms) every step's frames still go out when made. When steps come
faster (small batches on a fast engine) a write per step costs a send in the responder and a
wake-up and a read in the caller, for a frame or two each; the side-by-side figures are in the
README ("Mesh overhead").

Failure: a lost connection fails the caller's streams on it as retryable (migration takes
them on) and stops the responder's handlers as for a caller gone: a killed worker is noticed
at once, not after the stream timeout. A responder connects in the background on a caller's
first request, which it answers on the NATS reply subject meanwhile; one that cannot connect
keeps answering there (logged and counted, retried with a growing back-off).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import secrets
import socket
import struct
import time
from collections.abc import Callable

import msgspec

from proto.plane import Control, Frame, StreamFrame, StreamHello
from shared.runtime import metrics

__all__ = [
    "CallerConnection",
    "ResponderConnection",
    "ResponderConnections",
    "ResponseServer",
    "local_address_towards",
]

log = logging.getLogger(__name__)

_LEN = struct.Struct(">I")
# One message is one frame; frames carry token chunks (or an embedding), never megabytes.
MAX_MESSAGE = 64 * 1024 * 1024
CONNECT_TIMEOUT = 2.0
# After a failed connect, answers to that caller go over NATS for this long before a retry,
# doubling up to MAX_RETRY_AFTER while it stays unreachable.
RETRY_AFTER = 10.0
MAX_RETRY_AFTER = 300.0

_HELLO_DECODER = msgspec.msgpack.Decoder(StreamHello)
_FRAME_DECODER = msgspec.msgpack.Decoder(StreamFrame)
_CONTROL_DECODER = msgspec.msgpack.Decoder(Control)


def local_address_towards(host: str, port: int) -> str:
    """The local IP this machine uses to reach ``host`` (a UDP "connect" sends nothing):
    the interface that reaches NATS is the one the mesh's other processes can reach."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))
            return str(probe.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


class _Framed(asyncio.Protocol):
    """Length-prefixed messages both ways; subclasses take each message in :meth:`_message`."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._inbuf = bytearray()
        self._out = bytearray()
        # The pending write: at the end of this loop iteration (``_flush_soon``) or later.
        self._flush_handle: asyncio.Handle | None = None
        self._flush_soon = False
        # Called just before the next write, to add what they hold (``defer``).
        self._deferred: list[Callable[[], None]] = []
        self._writable: asyncio.Event | None = None
        # Least seconds between two writes (0: one per loop iteration), and the last write.
        self.flush_interval = 0.0
        self._flushed_at = -math.inf

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods.
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._inbuf:
            self._inbuf += data
            data = bytes(self._inbuf)
            self._inbuf.clear()
        # Messages are decoded from the immutable ``data``: msgspec.Raw chunks point into it.
        pos, end = 0, len(data)
        while end - pos >= 4 and not self.closed:
            (size,) = _LEN.unpack_from(data, pos)
            if size > MAX_MESSAGE:
                self.abort(f"a message of {size} bytes (limit {MAX_MESSAGE})")
                return
            stop = pos + 4 + size
            if stop > end:
                break
            try:
                self._message(data[pos + 4 : stop])
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                self.abort(f"undecodable message: {exc}")
                return
            pos = stop
        if pos < end:
            self._inbuf += data[pos:]

    def _message(self, body: bytes) -> None:
        raise NotImplementedError

    def send(self, data: bytes, *, urgent: bool = False) -> None:
        """Queue one message; everything queued until the next write goes in that write: at
        the end of this loop iteration, or ``flush_interval`` after the previous write. An
        ``urgent`` message (a stream's last frame: its caller's answer is complete only
        then) brings the write forward to the end of this iteration."""
        if self.closed:
            return
        out = self._out
        out += _LEN.pack(len(data))
        out += data
        handle = self._flush_handle
        if handle is not None:
            if not urgent or self._flush_soon:
                return
            handle.cancel()
        loop = self._loop
        if urgent or loop.time() >= self._flushed_at + self.flush_interval:
            self._flush_handle = loop.call_soon(self._flush)
            self._flush_soon = True
        else:
            self._flush_handle = loop.call_at(self._flushed_at + self.flush_interval, self._flush)
            self._flush_soon = False

    @property
    def write_deferred(self) -> bool:
        """True when the next write waits for the flush interval to pass (not this loop
        iteration): a message sent now would wait for it."""
        if self._flush_handle is not None:
            return not self._flush_soon
        return self._loop.time() < self._flushed_at + self.flush_interval

    def defer(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` just before the next write (it may :meth:`send`); a write is
        due when the flush interval has passed."""
        if self.closed:
            return
        self._deferred.append(callback)
        if self._flush_handle is None:
            due = self._flushed_at + self.flush_interval
            self._flush_handle = self._loop.call_at(due, self._flush)
            self._flush_soon = False

    def _flush(self) -> None:
        deferred = self._deferred
        if deferred:
            self._deferred = []
            for callback in deferred:
                callback()  # their sends join this write (a flush is still pending)
        self._flush_handle = None
        self._flushed_at = self._loop.time()
        if self.closed or self.transport is None or not self._out:
            return
        data, self._out = self._out, bytearray()
        self.transport.write(data)

    @property
    def paused(self) -> bool:
        return self._writable is not None and not self._writable.is_set()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = asyncio.Event()
        self._writable.clear()

    def resume_writing(self) -> None:
        if self._writable is not None:
            self._writable.set()

    async def drain(self) -> None:
        """Wait while the socket's send buffer is over its high-water mark."""
        if self._writable is not None and not self.closed:
            await self._writable.wait()

    def abort(self, why: str) -> None:
        log.warning("closing a response connection: %s", why)
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            if self._flush_handle is not None:
                self._flush_handle.cancel()
            self._flush()
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._writable is not None:
            self._writable.set()  # nobody waits on a dead connection
        self._lost()

    def _lost(self) -> None:
        pass


# -- the caller's side -------------------------------------------------------------------------


class CallerConnection(_Framed):
    """A responder's connection to this caller: frames in, controls out."""

    def __init__(self, server: ResponseServer) -> None:
        super().__init__()
        self._server = server
        self.instance_id: int | None = None

    def _message(self, body: bytes) -> None:
        if self.instance_id is None:
            hello = _HELLO_DECODER.decode(body)
            if not hmac.compare_digest(hello.token, self._server.token):
                self.abort("a responder presented a wrong token")
                return
            self.instance_id = hello.instance_id
            self._server.connections.add(self)
            metrics.response_connections.labels("caller").inc()
            return
        msg = _FRAME_DECODER.decode(body)
        self._server.on_frame(self, msg.stream_id, msg.frame)

    def send_control(self, control: Control) -> None:
        self.send(self._server.encoder.encode(control))

    def _lost(self) -> None:
        self._server.connections.discard(self)
        if self.instance_id is not None:
            metrics.response_connections.labels("caller").dec()
            self._server.on_lost(self)


class ResponseServer:
    """The TCP server a caller's responders stream to (one per process that calls)."""

    def __init__(
        self,
        encoder: msgspec.msgpack.Encoder,
        on_frame: Callable[[CallerConnection, str, Frame], None],
        on_lost: Callable[[CallerConnection], None],
    ) -> None:
        self.encoder = encoder
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.token = secrets.token_urlsafe(24)
        self.address = ""
        self.connections: set[CallerConnection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: CallerConnection(self), host=host, port=port, reuse_address=True
        )
        bound = self._server.sockets[0].getsockname()[1]
        self.address = _join(host, int(bound))
        log.info("response server listening", extra={"address": self.address})

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        self.connections.clear()


# -- the responder's side ----------------------------------------------------------------------


class ResponderConnection(_Framed):
    """This responder's connection to one caller: frames out, controls in."""

    def __init__(self, pool: ResponderConnections, addr: str) -> None:
        super().__init__()
        self._pool = pool
        self.addr = addr

    def _message(self, body: bytes) -> None:
        self._pool.on_control(_CONTROL_DECODER.decode(body))

    def _lost(self) -> None:
        self._pool.lost(self)


class ResponderConnections:
    """Connections to callers, one per caller address, opened on a caller's first request."""

    def __init__(
        self,
        instance_id: int,
        encoder: msgspec.msgpack.Encoder,
        on_control: Callable[[Control], None],
        on_lost: Callable[[ResponderConnection], None],
        *,
        flush_interval: float = 0.0,
    ) -> None:
        self._instance_id = instance_id
        self._flush_interval = flush_interval
        self._encoder = encoder
        self.on_control = on_control
        self._on_lost = on_lost
        self._conns: dict[str, ResponderConnection] = {}
        self._connecting: dict[str, asyncio.Task[None]] = {}
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}

    def get(self, addr: str, token: str) -> ResponderConnection | None:
        """The open connection to ``addr``, or None: answer this stream over NATS. A missing
        connection is opened in the background, so no request waits for a connect (and a
        caller unreachable by TCP costs nothing but its fallback)."""
        conn = self._conns.get(addr)
        if conn is not None and not conn.closed:
            return conn
        if addr not in self._connecting and time.monotonic() >= self._retry_at.get(addr, 0.0):
            task = asyncio.get_running_loop().create_task(self._connect(addr, token))
            self._connecting[addr] = task
        return None

    async def _connect(self, addr: str, token: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            host, port = _split(addr)
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: ResponderConnection(self, addr), host, port),
                CONNECT_TIMEOUT,
            )
        except (OSError, ValueError, TimeoutError) as exc:
            # Backing off: 10 s, 20 s, ... up to 5 minutes between attempts.
            wait = min(self._backoff.get(addr, RETRY_AFTER / 2) * 2, MAX_RETRY_AFTER)
            self._backoff[addr] = wait
            self._retry_at[addr] = time.monotonic() + wait
            metrics.response_fallbacks_total.inc()
            log.warning(
                "cannot reach a caller's response server; answering it over NATS",
                extra={"address": addr, "error": str(exc) or type(exc).__name__, "retry_in": wait},
            )
            return
        finally:
            self._connecting.pop(addr, None)
        self._backoff.pop(addr, None)
        conn.flush_interval = self._flush_interval
        conn.send(self._encoder.encode(StreamHello(token, self._instance_id)))
        self._conns[addr] = conn
        metrics.response_connections.labels("responder").inc()

    def lost(self, conn: ResponderConnection) -> None:
        if self._conns.get(conn.addr) is conn:
            del self._conns[conn.addr]
        metrics.response_connections.labels("responder").dec()
        self._on_lost(conn)

    def close(self) -> None:
        for task in self._connecting.values():
            task.cancel()
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()

    def __len__(self) -> int:
        return len(self._conns)
