"""ZMQ transport of KV events and load metrics, as an SGLang 0.5.23 scheduler runs it.

Why a faithful copy: the mesh's event publisher subscribes to real SGLang engines and to the
simulated engine through the same code, so the simulated engine must open the same sockets, on
the same addresses, with the same frames:

- KV events: a ``PUB`` socket on ``--kv-events-config``'s ``endpoint`` with the port offset by
  the publisher's DP rank. Each scheduler step with events is one multipart message
  ``[topic, seq (8-byte big-endian, from 0 per publisher), msgpack(KVEventBatch)]``; steps
  without events are not sent and do not use a sequence number.
- Replay: an optional ``ROUTER`` on ``replay_endpoint`` (same offset) keeps the last
  ``buffer_steps`` messages. A ``DEALER`` sends ``[b"", start_seq]`` and gets
  ``[b"", topic, seq, payload]`` per buffered message with ``seq >= start_seq``, then
  ``[b"", b"", seq=-1, b""]``.
- Load metrics: a ``PUSH`` socket *connected* to the consumer's bound ``PULL``, carrying one
  msgpack ``["KvMetrics", ...]`` array per report (SGLang's non-pickle IPC encoding).

Where this deliberately differs from SGLang, it is so that a simulated scheduler running on the
event loop can never stall: ``publish`` encodes and sends in the caller's thread with
``NOBLOCK`` (SGLang hands batches to a thread through a queue, so ``max_queue_size`` is parsed
but unused); the replay socket is served by an asyncio task that waits for a slow client
instead of silently dropping past the ROUTER's high-water mark; and the metrics socket drops a
report when no consumer is connected instead of queueing without bound.

:class:`KvEventSubscriber` is the consumer side: the tests use it now and the mesh's publisher
service will use it for both real and simulated engines. It detects sequence gaps (a late
join, a subscriber behind its high-water mark) and fills them from the replay socket.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from types import TracebackType
from typing import Annotated, Any, Literal, Self

import msgspec
import zmq
import zmq.asyncio

from proto.kv_events import REPLAY_END_SEQ, SEQ_SIZE, KVEvent, KVEventBatch, decode_seq, encode_seq
from proto.metrics import KvMetrics, SglangKvMetrics

__all__ = [
    "DEFAULT_ENDPOINT",
    "KvEventSubscriber",
    "KvEventsConfig",
    "ZmqKvEventPublisher",
    "ZmqKvMetricsPusher",
    "connect_endpoint",
    "encode_kv_metrics",
    "offset_endpoint_port",
    "should_bind",
]

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "tcp://*:5557"

_NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class KvEventsConfig(msgspec.Struct, kw_only=True, frozen=True):
    """SGLang's ``--kv-events-config`` JSON object, with SGLang's field names and defaults.

    Unknown keys are ignored, as SGLang's pydantic model ignores them, so a config written for
    a newer engine still parses here.
    """

    publisher: Literal["null", "zmq"] = "null"
    endpoint: str = DEFAULT_ENDPOINT
    # None: decide from the endpoint (see :func:`should_bind`).
    bind: bool | None = None
    replay_endpoint: str | None = None
    # Batches kept for replay.
    buffer_steps: _NonNegative = 10_000
    # PUB high-water mark, in messages per subscriber; 0 is unlimited.
    hwm: _NonNegative = 100_000
    # SGLang's hand-off queue to its publisher thread; this publisher has no queue.
    max_queue_size: _NonNegative = 100_000
    topic: str = ""
    # "dynamo" namespaces block hashes (the radix cache's concern, not the transport's).
    format: Literal["default", "dynamo"] = "default"

    @classmethod
    def parse(cls, json_text: str | bytes) -> KvEventsConfig:
        """Parse the CLI value; raises ValueError naming the offending field."""
        text = json_text.decode() if isinstance(json_text, bytes) else json_text
        if not text.strip():
            raise ValueError(
                "kv-events config is empty; expected a JSON object such as "
                '{"publisher": "zmq", "endpoint": "tcp://*:5557"}'
            )
        try:
            # Lax like pydantic: "10" is an int and "true" a bool, as SGLang accepts them.
            return msgspec.json.decode(text, type=cls, strict=False)
        except msgspec.ValidationError as exc:
            raise ValueError(f"invalid kv-events config {text!r}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise ValueError(f"kv-events config is not valid JSON ({exc}): {text!r}") from None

    def to_json(self) -> str:
        """The ``--kv-events-config`` value a real SGLang engine accepts for this config."""
        return msgspec.json.encode(self).decode()


def offset_endpoint_port(endpoint: str, dp_rank: int) -> str:
    """The endpoint of publisher ``dp_rank``: SGLang's ``offset_endpoint_port``.

    ``tcp`` gets its port plus ``dp_rank``, ``inproc`` a ``_dp{rank}`` suffix, and rank 0 is
    left alone. SGLang raises for anything else at rank > 0, ``ipc`` included, so a
    multi-rank engine cannot use ipc. The schemes are matched as substrings, as SGLang does,
    so the mesh derives the address the engine really binds even for odd spellings.
    """
    if dp_rank < 0:
        raise ValueError(f"dp_rank must be >= 0, got {dp_rank}")
    if not endpoint or dp_rank == 0:
        return endpoint
    if "inproc" in endpoint:
        return f"{endpoint}_dp{dp_rank}"
    if "tcp" in endpoint:
        base, _, port = endpoint.rpartition(":")
        try:
            return f"{base}:{int(port) + dp_rank}"
        except ValueError:
            raise ValueError(
                f"cannot offset {endpoint!r} by DP rank {dp_rank}: its port {port!r} is not "
                "a number"
            ) from None
    raise ValueError(
        f"cannot offset {endpoint!r} by DP rank {dp_rank}: SGLang offsets only tcp (port + "
        "rank) and inproc (name suffix) endpoints"
    )


def should_bind(endpoint: str, bind: bool | None = None) -> bool:
    """Whether SGLang binds (True) or connects (False) its PUB socket on ``endpoint``.

    An explicit ``bind`` wins; otherwise wildcard hosts and local transports bind. SGLang
    tests substrings, so ``"::"`` inside any IPv6 literal (``tcp://[fd00::1]:5557``) binds too.
    """
    if bind is not None:
        return bind
    return (
        "*" in endpoint
        or "::" in endpoint
        or "0.0.0.0" in endpoint
        or endpoint.startswith(("ipc://", "inproc://"))
    )


def connect_endpoint(endpoint: str) -> str:
    """The address a subscriber on this host dials for a socket bound on ``endpoint``.

    Wildcard hosts become loopback (``*``/``0.0.0.0`` -> ``127.0.0.1``, ``[::]`` ->
    ``[::1]``) and relative ipc paths absolute, as SGLang advertises its local sources.
    """
    if endpoint.startswith("ipc://"):
        path = endpoint.removeprefix("ipc://")
        # Abstract-namespace names do not live in the filesystem.
        return endpoint if path.startswith("@") else f"ipc://{os.path.abspath(path)}"
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, sep, port = endpoint.removeprefix("tcp://").rpartition(":")
    if not sep:
        return endpoint
    if host in ("*", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"tcp://{host}:{port}"


def _enable_ipv6(sock: zmq.Socket[Any], endpoint: str) -> None:
    # libzmq refuses bracketed IPv6 hosts on a socket without ZMQ_IPV6; SGLang's PUB never sets
    # it (so IPv6 event endpoints fail there), accepting them here costs nothing.
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)


def _last_endpoint(sock: zmq.Socket[Any]) -> str:
    return connect_endpoint(sock.getsockopt_string(zmq.LAST_ENDPOINT))


class ZmqKvEventPublisher:
    """SGLang's KV-event PUB socket and replay ROUTER, for one publisher (DP) rank.

    ``start()`` binds or connects; with a replay endpoint it must run on the event loop, which
    then serves replay requests. ``publish`` never blocks: a PUB socket drops messages for a
    subscriber past its high-water mark, which that subscriber sees as a sequence gap and
    recovers through replay. ``published``, ``dropped`` (sends that failed outright) and
    ``replayed`` (batches sent in answer to replay requests) are for metrics.

    Whether to publish at all (``config.publisher == "null"``) is the caller's decision.
    """

    # A replay client that stops reading is given up on after this long, so it cannot hold up
    # everyone else's replay requests.
    REPLAY_SEND_TIMEOUT = 5.0

    def __init__(
        self,
        config: KvEventsConfig,
        dp_rank: int = 0,
        *,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        self.config = config
        self.dp_rank = dp_rank
        self.endpoint = offset_endpoint_port(config.endpoint, dp_rank)
        self.replay_endpoint = (
            offset_endpoint_port(config.replay_endpoint, dp_rank)
            if config.replay_endpoint
            else None
        )
        self.bind = should_bind(self.endpoint, config.bind)
        self.published = 0
        self.dropped = 0
        self.replayed = 0
        self._topic = config.topic.encode()
        self._owns_ctx = ctx is None
        # Shadows share the caller's libzmq context whatever its Python flavour: PUB sends
        # stay synchronous, the ROUTER gets asyncio sockets.
        self._ctx: zmq.Context[zmq.Socket[bytes]] = (
            zmq.Context() if ctx is None else zmq.Context.shadow(ctx.underlying)
        )
        self._buffer: collections.deque[tuple[int, bytes]] = collections.deque(
            maxlen=config.buffer_steps
        )
        self._encoder = msgspec.msgpack.Encoder()
        self._seq = 0
        self._pub: zmq.Socket[bytes] | None = None
        self._router: zmq.asyncio.Socket | None = None
        self._replay_task: asyncio.Task[None] | None = None
        self._bound_endpoint: str | None = None
        self._bound_replay_endpoint: str | None = None
        self._closed = False

    @property
    def next_seq(self) -> int:
        """The sequence number the next non-empty batch will carry."""
        return self._seq

    @property
    def connect_address(self) -> str | None:
        """What a subscriber dials (the real port when bound to port ``*``); None before
        ``start()`` and for a connecting PUB, whose subscriber binds its own address."""
        return self._bound_endpoint

    @property
    def replay_connect_address(self) -> str | None:
        """What a replay client dials; None without a replay endpoint or before ``start()``."""
        return self._bound_replay_endpoint

    def start(self) -> None:
        if self._closed:
            raise RuntimeError("publisher is closed")
        if self._pub is not None:
            return
        pub = self._ctx.socket(zmq.PUB)
        try:
            pub.set_hwm(self.config.hwm)
            _enable_ipv6(pub, self.endpoint)
            if self.bind:
                pub.bind(self.endpoint)
                self._bound_endpoint = _last_endpoint(pub)
            else:
                pub.connect(self.endpoint)
            if self.replay_endpoint is not None:
                self._start_replay()
        except BaseException:
            pub.close(linger=0)
            self._bound_endpoint = self._bound_replay_endpoint = None
            raise
        self._pub = pub
        log.info(
            "kv events %s %s (dp_rank %d, replay %s)",
            "bound on" if self.bind else "connected to",
            self._bound_endpoint or self.endpoint,
            self.dp_rank,
            self._bound_replay_endpoint,
        )

    def _start_replay(self) -> None:
        assert self.replay_endpoint is not None
        loop = asyncio.get_running_loop()  # raises RuntimeError outside the event loop
        router = zmq.asyncio.Context.shadow(self._ctx.underlying).socket(zmq.ROUTER)
        try:
            # Fail a send to a vanished client, and wait (as a task) for a slow one, instead of
            # dropping replies past the high-water mark as SGLang's ROUTER silently does.
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)
            _enable_ipv6(router, self.replay_endpoint)
            router.bind(self.replay_endpoint)
            self._bound_replay_endpoint = _last_endpoint(router)
        except BaseException:
            router.close(linger=0)
            raise
        self._router = router
        self._replay_task = loop.create_task(
            self._serve_replay(router), name=f"kv-events-replay-dp{self.dp_rank}"
        )

    def publish(self, events: list[KVEvent]) -> None:
        """Send one scheduler step's events as the next ``KVEventBatch``."""
        if self._pub is None:
            raise RuntimeError("publisher is closed" if self._closed else "publisher not started")
        if not events:
            # SGLang's scheduler skips empty steps before its publisher sees them, so they never
            # take a sequence number.
            return
        batch = KVEventBatch(ts=time.time(), events=events, attn_dp_rank=self.dp_rank)
        payload = self._encoder.encode(batch)
        seq = self._seq
        self._seq += 1
        # Buffered even if the send fails: the number is used, and replay can still deliver it.
        self._buffer.append((seq, payload))
        try:
            self._pub.send_multipart((self._topic, encode_seq(seq), payload), flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            self.dropped += 1
            log.warning("kv events batch %d not sent: %s", seq, exc)
        else:
            self.published += 1

    async def _serve_replay(self, router: zmq.asyncio.Socket) -> None:
        while True:
            frames = await router.recv_multipart()
            if len(frames) != 3:
                # SGLang ignores these too, so a client must not wait on an answer.
                log.warning("ignoring replay request of %d frames", len(frames))
                continue
            client_id, _, start_bytes = frames
            # SGLang reads the start unsigned, whatever its length.
            start = int.from_bytes(start_bytes, "big")
            try:
                await self._answer_replay(router, client_id, start)
            except (TimeoutError, zmq.ZMQError) as exc:
                log.warning("replay from %d to client %r abandoned: %r", start, client_id, exc)
            except Exception:
                # One bad request must not end replay for everyone else.
                log.exception("replay from %d to client %r failed", start, client_id)

    async def _answer_replay(
        self, router: zmq.asyncio.Socket, client_id: bytes, start: int
    ) -> None:
        # A snapshot: publish() appends while the sends below wait.
        batches = [(seq, payload) for seq, payload in self._buffer if seq >= start]
        for seq, payload in batches:
            await asyncio.wait_for(
                router.send_multipart((client_id, b"", self._topic, encode_seq(seq), payload)),
                self.REPLAY_SEND_TIMEOUT,
            )
            self.replayed += 1
        await asyncio.wait_for(
            router.send_multipart((client_id, b"", b"", encode_seq(REPLAY_END_SEQ), b"")),
            self.REPLAY_SEND_TIMEOUT,
        )

    async def close(self) -> None:
        """Stop serving replays and close the sockets (linger 0); idempotent."""
        self._closed = True
        if self._replay_task is not None:
            self._replay_task.cancel()
            try:
                await self._replay_task
            except asyncio.CancelledError:
                # Ours, unless close() itself is being cancelled: then let it through.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            except Exception:
                log.exception("kv events replay task had failed")
            self._replay_task = None
        if self._router is not None:
            self._router.close(linger=0)
            self._router = None
        if self._pub is not None:
            self._pub.close(linger=0)
            self._pub = None
        if self._owns_ctx and not self._ctx.closed:
            # term() returns once libzmq has really closed the sockets, so the ports are free
            # for the next bind; with linger 0 it does not wait on peers.
            self._ctx.term()


def encode_kv_metrics(metrics: KvMetrics) -> bytes:
    """SGLang's msgpack IPC form of ``KvMetrics``: ``["KvMetrics", request_active_slots, ...]``."""
    if not isinstance(metrics, SglangKvMetrics):
        metrics = SglangKvMetrics(**msgspec.structs.asdict(metrics))
    return msgspec.msgpack.encode(metrics)


class ZmqKvMetricsPusher:
    """SGLang's scheduler-metrics socket: ``PUSH`` connected to the consumer's bound ``PULL``.

    A report is dropped (counted in ``dropped``) when no consumer is connected or the consumer
    is ``hwm`` reports behind: a late load report is worth less than a stalled scheduler, and
    the next one supersedes it. SGLang instead queues without bound.
    """

    def __init__(
        self, endpoint: str, *, hwm: int = 1000, ctx: zmq.Context[Any] | None = None
    ) -> None:
        self.endpoint = endpoint
        self.hwm = hwm
        self.published = 0
        self.dropped = 0
        self._owns_ctx = ctx is None
        self._ctx: zmq.Context[zmq.Socket[bytes]] = (
            zmq.Context() if ctx is None else zmq.Context.shadow(ctx.underlying)
        )
        self._push: zmq.Socket[bytes] | None = None
        self._closed = False

    def start(self) -> None:
        if self._closed:
            raise RuntimeError("metrics pusher is closed")
        if self._push is not None:
            return
        push = self._ctx.socket(zmq.PUSH)
        try:
            push.setsockopt(zmq.SNDHWM, self.hwm)
            # Without IMMEDIATE a connecting PUSH queues for a peer that is not there yet.
            push.setsockopt(zmq.IMMEDIATE, 1)
            _enable_ipv6(push, self.endpoint)
            push.connect(self.endpoint)
        except BaseException:
            push.close(linger=0)
            raise
        self._push = push

    def publish(self, metrics: KvMetrics) -> None:
        if self._push is None:
            raise RuntimeError(
                "metrics pusher is closed" if self._closed else "metrics pusher not started"
            )
        try:
            self._push.send(encode_kv_metrics(metrics), flags=zmq.NOBLOCK)
        except zmq.Again:
            self.dropped += 1
        except zmq.ZMQError as exc:
            self.dropped += 1
            log.warning("load metrics not sent: %s", exc)
        else:
            self.published += 1

    def close(self) -> None:
        """Close the socket (linger 0); idempotent."""
        self._closed = True
        if self._push is not None:
            self._push.close(linger=0)
            self._push = None
        if self._owns_ctx and not self._ctx.closed:
            self._ctx.term()


class KvEventSubscriber:
    """Receives one publisher's batches in sequence order, filling gaps through replay.

    ``async for seq, batch in sub`` yields every batch once, in increasing ``seq``. With
    ``start_seq`` (default 0) and a replay endpoint, the first iteration first replays from
    ``start_seq``, so a late subscriber catches up; ``start_seq=None`` starts with whatever
    arrives. A live ``seq`` past the next expected one is a gap, filled from the replay socket;
    what the replay no longer holds is counted in ``lost`` and skipped. A live ``seq`` at or
    below the previous live one means the publisher restarted (``restarts``): numbering
    starts again and a new gap from ``start_seq`` is filled the same way. A restart is only
    visible as a step back in numbering: a new publisher whose first delivered batch numbers
    above the old one's last reads as a gap (filled from the new publisher's replay buffer).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        replay_endpoint: str | None = None,
        topic: str = "",
        start_seq: int | None = 0,
        replay_timeout: float = 2.0,
        hwm: int = 100_000,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        if start_seq is not None and start_seq < 0:
            raise ValueError(f"start_seq must be >= 0, got {start_seq}")
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.start_seq = start_seq
        self.replay_timeout = replay_timeout
        self.hwm = hwm
        # Live messages received, batches obtained through replay, gaps seen, sequence numbers
        # never obtained, publisher restarts, and payloads that did not decode.
        self.received = 0
        self.replayed = 0
        self.gaps = 0
        self.lost = 0
        self.restarts = 0
        self.undecodable = 0
        self._owns_ctx = ctx is None
        self._ctx = (
            zmq.asyncio.Context() if ctx is None else zmq.asyncio.Context.shadow(ctx.underlying)
        )
        self._decoder = msgspec.msgpack.Decoder(KVEventBatch)
        self._sub: zmq.asyncio.Socket | None = None
        self._dealer: zmq.asyncio.Socket | None = None
        self._replay_lock = asyncio.Lock()
        self._pending: collections.deque[tuple[int, KVEventBatch]] = collections.deque()
        self._caught_up = False
        # Highest seq queued for the caller, and highest seq seen on the live socket.
        self._last: int | None = None
        self._live_last: int | None = None
        self._closed = False

    @property
    def last_seq(self) -> int | None:
        """The highest sequence number obtained so far (yielded or about to be, or skipped
        because its payload did not decode); None before the first."""
        return self._last

    def connect(self) -> None:
        if self._closed:
            raise RuntimeError("subscriber is closed")
        if self._sub is not None:
            return
        sub = self._ctx.socket(zmq.SUB)
        sub.set_hwm(self.hwm)
        _enable_ipv6(sub, self.endpoint)
        sub.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        sub.connect(self.endpoint)
        self._sub = sub

    async def __aenter__(self) -> Self:
        self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> tuple[int, KVEventBatch]:
        while not self._pending:
            if self._closed:
                raise StopAsyncIteration
            if not self._caught_up:
                self._caught_up = True
                if self.start_seq is not None and self.replay_endpoint is not None:
                    await self._fill(self.start_seq, None)
                continue
            await self._receive_live()
        return self._pending.popleft()

    async def _receive_live(self) -> None:
        if self._sub is None:
            raise RuntimeError("subscriber not connected")
        frames = await self._recv(self._sub, None)
        if frames is None:
            return
        if len(frames) != 3 or len(frames[1]) != SEQ_SIZE:
            log.warning("ignoring kv events message of %d frames", len(frames))
            return
        self.received += 1
        seq = decode_seq(frames[1])
        if self._live_last is not None and seq <= self._live_last:
            # PUB/SUB never reorders or repeats, so the publisher is a new process.
            self.restarts += 1
            log.warning("kv events publisher restarted (seq %d after %d)", seq, self._live_last)
            self._last = None
        self._live_last = seq
        if self._last is not None and seq <= self._last:
            return  # already delivered through replay
        expected = self.start_seq if self._last is None else self._last + 1
        if expected is not None and seq > expected:
            self.gaps += 1
            await self._fill(expected, seq)
        if self._last is not None and seq <= self._last:
            return  # the fill's replay already included it
        self._last = seq
        try:
            batch = self._decoder.decode(frames[2])
        except msgspec.DecodeError as exc:
            self.undecodable += 1
            log.warning("kv events batch %d does not decode: %s", seq, exc)
            return
        self._pending.append((seq, batch))

    async def _fill(self, start: int, stop: int | None) -> None:
        """Queue every batch the replay socket has from ``start`` on; the sequence numbers in
        ``[start, stop)`` (the gap) that it no longer has are counted as lost.

        Batches past the gap are queued too: they are usually why the gap happened (this
        subscriber fell behind), and the live copies that follow are then skipped as
        duplicates instead of each causing another replay.
        """
        if self._closed:
            return
        got = await self.replay_from(start) if self.replay_endpoint is not None else []
        end = start
        for seq, batch in got:  # sorted, without duplicates
            if seq < end:
                continue
            self.replayed += 1
            self.lost += seq - end
            self._pending.append((seq, batch))
            self._last = seq
            end = seq + 1
        if stop is not None and stop > end:
            self.lost += stop - end
            log.warning("kv events %d..%d are lost (not in the replay buffer)", end, stop - 1)

    async def replay_from(self, seq: int) -> list[tuple[int, KVEventBatch]]:
        """Ask the replay socket for every buffered batch from ``seq`` on, in order.

        Returns what arrived before the end marker, deduplicated; a publisher that does not
        answer within ``replay_timeout`` gives what arrived so far.
        """
        if self.replay_endpoint is None:
            raise RuntimeError("no replay endpoint configured")
        if seq < 0:
            raise ValueError(f"seq must be >= 0, got {seq}")
        if self._closed:
            raise RuntimeError("subscriber is closed")
        async with self._replay_lock:
            if self._closed:
                return []  # closed while waiting for another replay
            dealer = self._replay_socket()
            await dealer.send_multipart((b"", encode_seq(seq)))
            out: dict[int, KVEventBatch] = {}
            while True:
                try:
                    frames = await self._recv(dealer, self.replay_timeout)
                except TimeoutError:
                    log.warning(
                        "replay from %d: no end marker within %.1fs", seq, self.replay_timeout
                    )
                    # Late answers to this request must not be read as answers to the next.
                    self._close_replay_socket()
                    break
                if frames is None:
                    break
                if len(frames) != 4 or frames[0] != b"" or len(frames[2]) != SEQ_SIZE:
                    log.warning("ignoring replay reply of %d frames", len(frames))
                    continue
                got = decode_seq(frames[2])
                if got == REPLAY_END_SEQ:
                    break
                try:
                    out[got] = self._decoder.decode(frames[3])
                except msgspec.DecodeError as exc:
                    self.undecodable += 1
                    log.warning("replayed kv events batch %d does not decode: %s", got, exc)
            return sorted(out.items())

    async def _recv(self, sock: zmq.asyncio.Socket, timeout: float | None) -> list[bytes] | None:
        """One multipart message, or None once close() has interrupted the wait."""
        try:
            if timeout is None:
                return await sock.recv_multipart()
            return await asyncio.wait_for(sock.recv_multipart(), timeout)
        except asyncio.CancelledError:
            # Closing a socket cancels its pending receive; that is not our task's cancellation.
            task = asyncio.current_task()
            if self._closed and (task is None or not task.cancelling()):
                return None
            raise
        except zmq.ZMQError:
            if self._closed:
                return None
            raise

    def _replay_socket(self) -> zmq.asyncio.Socket:
        if self._dealer is None:
            assert self.replay_endpoint is not None
            dealer = self._ctx.socket(zmq.DEALER)
            _enable_ipv6(dealer, self.replay_endpoint)
            dealer.connect(self.replay_endpoint)
            self._dealer = dealer
        return self._dealer

    def _close_replay_socket(self) -> None:
        if self._dealer is not None:
            self._dealer.close(linger=0)
            self._dealer = None

    async def close(self) -> None:
        """Close the sockets (linger 0); a pending iteration ends. Idempotent."""
        self._closed = True
        self._close_replay_socket()
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None
        if self._owns_ctx and not self._ctx.closed:
            self._ctx.term()
