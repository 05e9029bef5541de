"""The consumer side of an engine's ZMQ sockets: KV events (with replay) and load metrics.

Why here, in ``shared/``: the mesh's publisher service (``services/publisher``) runs these
against real SGLang engines and the simulated engine alike, and the simulated engine's tests
use them to check what it publishes. The producer side, a faithful copy of SGLang's sockets,
is ``shared/engine/cpu/kv_events.py``; the wire formats are ``proto/kv_events.py`` and
``proto/metrics.py``.

- :class:`KvEventSubscriber`: a ``SUB`` on one publisher (DP rank) that yields batches in
  sequence order, filling gaps through the engine's replay ``ROUTER``.
- :class:`KvMetricsReceiver`: the ``PULL`` an engine's scheduler ``PUSH``-connects to, bound
  by the consumer, yielding decoded :class:`~proto.metrics.KvMetrics`.
- :func:`decode_kv_metrics`: one report in either of SGLang's encodings. SGLang sends the
  report pickled unless ``SGLANG_USE_PICKLE_IPC`` is off; unpickling is restricted to
  SGLang's ``KvMetrics`` class and msgspec's rebuild function (:class:`KvMetricsUnpickler`),
  so a peer on the metrics socket cannot make this process run anything. Everything else is
  msgpack (``["KvMetrics", ...]``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import logging
import os
import pickle
import stat
from types import TracebackType
from typing import Any, Self

import msgspec
import zmq
import zmq.asyncio

from proto.kv_events import REPLAY_END_SEQ, SEQ_SIZE, KVEventBatch, decode_seq, encode_seq
from proto.metrics import SGLANG_KV_METRICS_CLASS, KvMetrics, SglangKvMetrics

__all__ = [
    "KvEventSubscriber",
    "KvMetricsReceiver",
    "KvMetricsUnpickler",
    "decode_kv_metrics",
    "enable_ipv6",
]

log = logging.getLogger(__name__)


def enable_ipv6(sock: zmq.Socket[Any], endpoint: str) -> None:
    """Let ``sock`` use a bracketed IPv6 ``endpoint``.

    libzmq refuses bracketed IPv6 hosts on a socket without ZMQ_IPV6; SGLang's PUB never sets
    it (so IPv6 event endpoints fail there), accepting them here costs nothing.
    """
    if endpoint.startswith("tcp://["):
        sock.setsockopt(zmq.IPV6, 1)


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

    A gap is only noticed when the next batch arrives, so a batch lost just before the
    publisher falls quiet would stay missing until it publishes again. With
    ``idle_check_interval`` (and a replay endpoint), a live socket quiet for that long makes
    the subscriber ask the replay socket for anything after the last batch it has
    (``tail_checks`` counts these); batches found that way are yielded as usual.
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
        idle_check_interval: float | None = None,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        if start_seq is not None and start_seq < 0:
            raise ValueError(f"start_seq must be >= 0, got {start_seq}")
        if idle_check_interval is not None and idle_check_interval <= 0:
            raise ValueError(f"idle_check_interval must be > 0, got {idle_check_interval}")
        self.endpoint = endpoint
        self.replay_endpoint = replay_endpoint
        self.topic = topic
        self.start_seq = start_seq
        self.replay_timeout = replay_timeout
        self.hwm = hwm
        self.idle_check_interval = idle_check_interval
        # Live messages received, batches obtained through replay, gaps seen, sequence numbers
        # never obtained, publisher restarts, payloads that did not decode, and replay requests
        # made because the live socket was quiet.
        self.received = 0
        self.replayed = 0
        self.gaps = 0
        self.lost = 0
        self.restarts = 0
        self.undecodable = 0
        self.tail_checks = 0
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
        enable_ipv6(sub, self.endpoint)
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
        idle = self.idle_check_interval if self.replay_endpoint is not None else None
        try:
            frames = await self._recv(self._sub, idle)
        except TimeoutError:
            await self._check_tail()
            return
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

    async def _check_tail(self) -> None:
        """The live socket was quiet: fetch whatever the replay socket has past our last."""
        expected = self.start_seq if self._last is None else self._last + 1
        if expected is None or self._closed:
            return
        self.tail_checks += 1
        await self._fill(expected, None)

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
            # A deadline on this task, not wait_for's extra task per message.
            async with asyncio.timeout(timeout):
                return await sock.recv_multipart()
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
            enable_ipv6(dealer, self.replay_endpoint)
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


# --------------------------------------------------------------------------------------------
# Load metrics

# Where msgspec's pickles of a keyword-only Struct point: ``rebuild(cls, {field: value})``
# (``msgspec._utils`` since 0.19; ``msgspec._core`` in earlier releases).
_MSGSPEC_REBUILD = frozenset({("msgspec._utils", "rebuild"), ("msgspec._core", "rebuild")})
_KV_METRICS_FIELDS: tuple[str, ...] = KvMetrics.__struct_fields__
# A report is a handful of numbers; anything far larger is not one.
MAX_METRICS_MESSAGE = 64 * 1024


def _kv_metrics(fields: dict[str, Any]) -> KvMetrics:
    # Fields a newer SGLang adds are dropped; the ones we know are type-checked.
    known = {k: v for k, v in fields.items() if k in _KV_METRICS_FIELDS}
    try:
        return msgspec.convert(known, KvMetrics)
    except msgspec.ValidationError as exc:
        raise pickle.UnpicklingError(f"bad KvMetrics field: {exc}") from None


def _sglang_kv_metrics_class(*args: Any, **kwargs: Any) -> KvMetrics:
    """Stands in for SGLang's class: a pickle that calls it (positional fields, as msgspec
    pickles a positional Struct) gets our :class:`KvMetrics`."""
    if len(args) > len(_KV_METRICS_FIELDS):
        args = args[: len(_KV_METRICS_FIELDS)]
    return _kv_metrics({**dict(zip(_KV_METRICS_FIELDS, args, strict=False)), **kwargs})


def _msgspec_rebuild(cls: Any, state: Any) -> KvMetrics:
    """Stands in for msgspec's ``rebuild``, for SGLang's class only."""
    if cls is not _sglang_kv_metrics_class:
        raise pickle.UnpicklingError("msgspec rebuild of a class other than SGLang's KvMetrics")
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise pickle.UnpicklingError("KvMetrics state is not a dict of fields")
    return _kv_metrics(state)


class KvMetricsUnpickler(pickle.Unpickler):
    """Unpickles SGLang's ``KvMetrics`` and nothing else.

    Only two globals resolve: SGLang's class (:data:`proto.metrics.SGLANG_KV_METRICS_CLASS`)
    and msgspec's ``rebuild``, both to stand-ins that build our :class:`KvMetrics`. Any other
    global, and persistent ids, raise ``pickle.UnpicklingError``, so no code of the sender's
    choosing runs here.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == SGLANG_KV_METRICS_CLASS:
            return _sglang_kv_metrics_class
        if (module, name) in _MSGSPEC_REBUILD:
            return _msgspec_rebuild
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a metrics report")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in a metrics report")


def decode_kv_metrics(data: bytes) -> KvMetrics:
    """One load report, pickled (SGLang's default) or msgpack; ``ValueError`` if it is
    neither, or is anything but SGLang's ``KvMetrics``."""
    if len(data) > MAX_METRICS_MESSAGE:
        raise ValueError(f"a metrics report of {len(data)} bytes is too large")
    # Pickle protocol 2+ starts with PROTO (0x80); in msgpack that byte is an empty map, which
    # no report is. SGLang's msgpack form is a tagged array.
    if not data.startswith(b"\x80"):
        try:
            return msgspec.msgpack.decode(data, type=SglangKvMetrics)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            # Protocol 0 and 1 pickles open with GLOBAL ("c") or MARK ("(").
            if data[:1] not in (b"c", b"("):
                raise ValueError(f"not a KvMetrics report: {exc}") from None
    try:
        obj = KvMetricsUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as exc:
        raise ValueError(f"refused metrics pickle: {exc}") from None
    except Exception as exc:  # a malformed stream can raise almost anything
        raise ValueError(f"undecodable metrics pickle: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, KvMetrics):
        raise ValueError(f"a metrics pickle must hold SGLang's KvMetrics, not {type(obj).__name__}")
    return obj


class KvMetricsReceiver:
    """The ``PULL`` socket an engine's schedulers push their ``KvMetrics`` to.

    The consumer binds (SGLang's schedulers connect), so :meth:`bind` fails when another
    process holds a TCP address. An ``ipc://`` path left by a process that died is taken
    over (libzmq unlinks it before binding), which is what lets a restarted consumer resume;
    it also means two consumers of one ipc path silently steal it from each other.

    ``await recv()`` returns the next decodable report, or None once closed; undecodable or
    refused messages are logged and counted in ``undecodable``.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        hwm: int = 1000,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.hwm = hwm
        self.received = 0
        self.undecodable = 0
        self._owns_ctx = ctx is None
        self._ctx = (
            zmq.asyncio.Context() if ctx is None else zmq.asyncio.Context.shadow(ctx.underlying)
        )
        self._pull: zmq.asyncio.Socket | None = None
        self._closed = False

    def bind(self) -> None:
        """Bind the PULL; raises ``zmq.ZMQError`` when the address cannot be bound."""
        if self._closed:
            raise RuntimeError("metrics receiver is closed")
        if self._pull is not None:
            return
        pull = self._ctx.socket(zmq.PULL)
        try:
            pull.setsockopt(zmq.RCVHWM, self.hwm)
            pull.setsockopt(zmq.MAXMSGSIZE, MAX_METRICS_MESSAGE)
            enable_ipv6(pull, self.endpoint)
            pull.bind(self.endpoint)
        except BaseException:
            pull.close(linger=0)
            raise
        self._pull = pull

    async def recv(self) -> KvMetrics | None:
        while True:
            pull = self._pull
            if pull is None:
                if self._closed:
                    return None
                raise RuntimeError("metrics receiver not bound")
            try:
                data = await pull.recv()
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if self._closed and (task is None or not task.cancelling()):
                    return None
                raise
            except zmq.ZMQError:
                if self._closed:
                    return None
                raise
            self.received += 1
            try:
                return decode_kv_metrics(data)
            except ValueError as exc:
                self.undecodable += 1
                log.warning("ignoring load metrics message: %s", exc)

    def close(self) -> None:
        """Close the socket (linger 0); a pending ``recv`` returns None. Idempotent.

        The socket file of an ``ipc://`` bind is removed (libzmq leaves it behind).
        """
        self._closed = True
        if self._pull is not None:
            self._pull.close(linger=0)
            self._pull = None
            _unlink_ipc(self.endpoint)
        if self._owns_ctx and not self._ctx.closed:
            self._ctx.term()


def _unlink_ipc(endpoint: str) -> None:
    path = endpoint.removeprefix("ipc://")
    if path == endpoint or path.startswith("@"):  # not ipc, or the abstract namespace
        return
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
