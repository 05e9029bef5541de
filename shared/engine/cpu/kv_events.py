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

:class:`KvEventSubscriber`, the consumer side (gap detection, replay), lives in
``shared/zmq_events.py`` with the mesh's publisher service, which runs it against real and
simulated engines alike; it is re-exported here for existing imports.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from typing import Annotated, Any, Literal

import msgspec
import zmq
import zmq.asyncio

from proto.kv_events import REPLAY_END_SEQ, KVEvent, KVEventBatch, encode_seq
from proto.metrics import KvMetrics, SglangKvMetrics
from shared.zmq_events import KvEventSubscriber, enable_ipv6

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
            enable_ipv6(pub, self.endpoint)
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
            enable_ipv6(router, self.replay_endpoint)
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
            enable_ipv6(push, self.endpoint)
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
