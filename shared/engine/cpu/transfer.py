"""Disaggregated KV transfer between CPU engines: prefill pushes a request's KV to decode.

Why: in SGLang's prefill/decode disaggregation the prompt's KV cache moves from the prefill
engine to the decode engine (Mooncake or NIXL over RDMA on GPUs). The CPU engines go through the
same coordination -- the decode side may show up before or after the prefill, either side may
abort, a peer may never come, a worker may die mid-transfer -- over TCP. The bytes are whatever
the engines' model runner says a request's KV is (``runner.py``): the torch runner's real K/V
pages, or the simulated runner's stand-in bytes of a modelled size, so the mesh above sees
realistic latency, back-pressure and failures either way. As in SGLang,
only the prefill engine listens (its bootstrap server, default port 8998) and decode engines dial
it. Both legs of a request carry the same bootstrap room, the rendezvous key; one server serves
every DP rank of its engine (``room % dp_size == dp_rank`` picks the rank, the room alone
identifies the transfer). The fake bootstrap host (``FAKE_BOOTSTRAP_HOST``, health checks and
warm-up) means "no transfer": the engine must not call ``send`` for such requests, and
``KvReceiver.receive`` returns ``FAKE_FIRST_TOKEN`` at once rather than dialling 2.2.2.2.

Wire protocol: one TCP connection per request, decode dials prefill. Every frame is a 5-byte
header ``>BI`` (frame type, payload length) and the payload; control payloads are msgpack
arrays, DATA payloads raw bytes::

    decode  -> prefill  1 REGISTER   [room, num_tokens, nbytes, rid, layout]
    prefill -> decode   2 KV_HEADER  [num_tokens, first_token, nbytes, extra]
    prefill -> decode   3 DATA       raw KV bytes, <= 1 MiB per frame, until nbytes are sent
    prefill -> decode   4 DONE       [nbytes, crc32 of all DATA]
    decode  -> prefill  5 ACK        [nbytes]    (only now has the transfer succeeded)
    either  -> other    6 ABORT      [code, reason]   code: "aborted" | "timeout" | "error"

``layout`` names what the bytes mean (dtype, layers, heads, page size); a prefill whose layout
or size differs from the decode's fails the transfer on both sides with both in the message.
``extra`` is opaque to the transfer (the engines put the first token's logprobs there).

ABORT may take the place of any frame after REGISTER (frames are written whole, so it never
splits a DATA frame); its code picks what the other side raises: ``TransferAborted``,
``TransferTimeout`` or ``TransferError``. A connection closed before ACK is an abort.

Timeouts (``timeout``, SGLang's bootstrap timeout, 300 s by default): ``send`` waits that long
for the decode to register, then for each write to drain and for the ACK; ``receive`` must
connect (retrying while refused: the prefill may still be starting), register and get the
KV_HEADER within it, then each further frame. The server drops a connection that does not
register in time, and a registration no prefill claims in time (ABORT "timeout"). Rooms aborted
by prefill, and rooms whose decode hung up before the prefill came, are remembered for
``timeout`` (bounded), so a late peer fails at once instead of waiting out the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
import zlib
from collections import OrderedDict
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Final, Literal, Self, TypeVar

import msgspec

from proto.request import FAKE_BOOTSTRAP_HOST, U32, U63
from shared.engine.cpu.contracts import TransferAborted, TransferError, TransferTimeout
from shared.engine.cpu.runner import KvPayload, KvSink

if TYPE_CHECKING:
    from shared.engine.cpu import contracts

__all__ = ["CHUNK_BYTES", "FAKE_FIRST_TOKEN", "BootstrapServer", "KvReceiver"]

log = logging.getLogger(__name__)

# DATA frame size: big enough that framing costs nothing, small enough that an ABORT gets
# through quickly and a receiver never buffers much.
CHUNK_BYTES: Final = 1 << 20

# What ``receive`` returns for the fake bootstrap host: there is no prefill to sample the
# first token, and SGLang's fake transfer produces no meaningful one either.
FAKE_FIRST_TOKEN: Final = 0

_HEADER = struct.Struct(">BI")
_REGISTER: Final = 1
_KV_HEADER: Final = 2
_DATA: Final = 3
_DONE: Final = 4
_ACK: Final = 5
_ABORT: Final = 6

# Limits on what a peer may make us buffer. DATA may be larger than we send, for a peer that
# chunks differently.
_MAX_CONTROL = 64 * 1024
_MAX_DATA = 16 * CHUNK_BYTES
_MAX_REASON = 2000
_MAX_LAYOUT = 1000
_MAX_EXTRA = 32 * 1024
# Bounded memory for aborted / hung-up rooms, however many requests fail.
_REMEMBERED_ROOMS = 65536
# A closing connection whose peer stopped reading is reset after this long, so a stuck peer
# cannot keep our buffers (and its socket) alive.
_LINGER = 1.0
# Decode's read buffer: a few DATA frames in flight before TCP back-pressure kicks in.
_READ_LIMIT = 4 * CHUNK_BYTES
# Prefill's write buffer: the same, so the socket never idles between two drains.
_WRITE_HIGH_WATER = 4 * CHUNK_BYTES
_CONNECT_RETRY_FIRST = 0.02
_CONNECT_RETRY_MAX = 0.5

_NonNegative = Annotated[int, msgspec.Meta(ge=0)]
AbortCode = Literal["aborted", "timeout", "error"]


class _Register(msgspec.Struct, array_like=True, frozen=True):
    room: U63
    num_tokens: U32
    nbytes: _NonNegative
    rid: str
    layout: Annotated[str, msgspec.Meta(max_length=_MAX_LAYOUT)]


class _KvHeader(msgspec.Struct, array_like=True, frozen=True):
    num_tokens: U32
    first_token: U32
    nbytes: _NonNegative
    extra: Annotated[bytes, msgspec.Meta(max_length=_MAX_EXTRA)] = b""


class _Done(msgspec.Struct, array_like=True, frozen=True):
    nbytes: _NonNegative
    crc32: U32


class _Ack(msgspec.Struct, array_like=True, frozen=True):
    nbytes: _NonNegative


class _Abort(msgspec.Struct, array_like=True, frozen=True):
    code: AbortCode
    reason: str


_ERRORS: Final[dict[str, type[TransferError]]] = {
    "aborted": TransferAborted,
    "timeout": TransferTimeout,
    "error": TransferError,
}

_ENCODER = msgspec.msgpack.Encoder()
_REGISTER_DECODER = msgspec.msgpack.Decoder(_Register)
_KV_HEADER_DECODER = msgspec.msgpack.Decoder(_KvHeader)
_DONE_DECODER = msgspec.msgpack.Decoder(_Done)
_ACK_DECODER = msgspec.msgpack.Decoder(_Ack)
_ABORT_DECODER = msgspec.msgpack.Decoder(_Abort)

_T = TypeVar("_T")


def _frame(kind: int, message: msgspec.Struct) -> bytes:
    body = _ENCODER.encode(message)
    return _HEADER.pack(kind, len(body)) + body


def _abort_frame(code: AbortCode, reason: str) -> bytes:
    return _frame(_ABORT, _Abort(code, reason[:_MAX_REASON]))


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One frame; raises IncompleteReadError/OSError when the peer is gone, TransferError when
    it announces more than we accept."""
    kind, length = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    limit = _MAX_DATA if kind == _DATA else _MAX_CONTROL
    if length > limit:
        raise TransferError(f"protocol error: frame type {kind} of {length} bytes (max {limit})")
    return kind, await reader.readexactly(length)


def _parse(body: bytes, decoder: msgspec.msgpack.Decoder[_T]) -> _T:
    try:
        return decoder.decode(body)
    except msgspec.DecodeError as exc:
        raise TransferError(f"protocol error: malformed frame: {exc}") from None


def _hang_up(writer: asyncio.StreamWriter) -> None:
    """Close after flushing what is queued (an ABORT, an ACK), but never wait on a peer that
    stopped reading."""
    transport = writer.transport
    if transport.is_closing():
        return
    transport.close()
    asyncio.get_running_loop().call_later(_LINGER, transport.abort)


def _check_request(room: int, num_tokens: int) -> None:
    if not 0 <= room < 2**63:
        raise ValueError(f"bootstrap room {room} is outside [0, 2**63)")
    if not 0 <= num_tokens < 2**32:
        raise ValueError(f"num_tokens {num_tokens} is outside [0, 2**32)")


def _check_timeout(timeout: float) -> None:
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, got {timeout}")


def _mark_retrieved(future: asyncio.Future[int]) -> None:
    # Unclaimed registrations end with an error nobody awaits; that is not a bug to log.
    if not future.cancelled():
        future.exception()


class _RoomMemory:
    """Rooms with a reason, forgotten after ``ttl`` seconds or when more than ``limit``."""

    def __init__(self, ttl: float, limit: int = _REMEMBERED_ROOMS) -> None:
        self._ttl = ttl
        self._limit = limit
        self._rooms: OrderedDict[int, tuple[float, str]] = OrderedDict()

    def add(self, room: int, reason: str) -> None:
        now = time.monotonic()
        self._rooms.pop(room, None)
        self._rooms[room] = (now + self._ttl, reason)
        # Insertion order is expiry order (one ttl), so expired rooms sit at the front.
        while self._rooms and (
            len(self._rooms) > self._limit or next(iter(self._rooms.values()))[0] < now
        ):
            self._rooms.popitem(last=False)

    def get(self, room: int) -> str | None:
        entry = self._rooms.get(room)
        if entry is None:
            return None
        if entry[0] < time.monotonic():
            del self._rooms[room]
            return None
        return entry[1]

    def pop(self, room: int) -> str | None:
        reason = self.get(room)
        self._rooms.pop(room, None)
        return reason

    def __len__(self) -> int:
        return len(self._rooms)


class _Peer:
    """A decode connection that registered a room, from REGISTER to the end of its transfer.

    ``outcome`` is the single place the transfer's end is decided: the ACK's byte count, or the
    error of whoever ended it first (decode hang-up or ABORT, prefill abort, timeout, close).
    """

    __slots__ = (
        "expiry",
        "layout",
        "nbytes",
        "num_tokens",
        "outcome",
        "reader",
        "rid",
        "room",
        "writer",
    )

    def __init__(
        self, reg: _Register, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.room = reg.room
        self.num_tokens = reg.num_tokens
        self.nbytes = reg.nbytes
        self.rid = reg.rid
        self.layout = reg.layout
        self.reader = reader
        self.writer = writer
        self.outcome: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.outcome.add_done_callback(_mark_retrieved)
        self.expiry: asyncio.TimerHandle | None = None

    def fail(self, code: AbortCode, reason: str) -> None:
        """End the transfer on both sides: ABORT to the decode, the error to the sender."""
        if self.expiry is not None:
            self.expiry.cancel()
        if self.outcome.done():
            return
        if not self.writer.transport.is_closing():
            self.writer.write(_abort_frame(code, reason))
        self.outcome.set_exception(_ERRORS[code](reason))
        _hang_up(self.writer)

    def check(self) -> None:
        """Raise if the transfer already ended (it can only end early by an error)."""
        if not self.outcome.done():
            return
        error = self.outcome.exception()
        if error is not None:
            raise error
        raise TransferError(
            f"protocol error: decode engine (rid {self.rid}) acknowledged bootstrap room "
            f"{self.room} before the transfer finished"
        )


class BootstrapServer:
    """Prefill side (``contracts.KvSender``): decode engines register rooms here; ``send``
    pushes each room's KV to its decode engine.

    Metrics (plain attributes): ``bytes_transferred`` (KV bytes written, failed transfers
    included), ``transfers_ok``, ``transfers_failed`` (cancelled sends included),
    ``last_transfer_seconds`` (KV_HEADER to ACK of the last successful transfer),
    ``pending_registrations`` and ``pending_sends`` (rooms waiting for their peer).
    ``abort`` must be called on the event loop's thread.
    """

    def __init__(
        self,
        host: str = "0.0.0.0",
        port: int = 8998,
        *,
        timeout: float = 300.0,
    ) -> None:
        _check_timeout(timeout)
        self.host = host
        self.port = port
        self.timeout = timeout
        self.bytes_transferred = 0
        self.transfers_ok = 0
        self.transfers_failed = 0
        self.last_transfer_seconds = 0.0
        self._server: asyncio.Server | None = None
        self._closed = False
        # A room is in at most one of these: registered by decode and waiting for its send,
        # awaited by a send that has no registration yet, or being transferred.
        self._registrations: dict[int, _Peer] = {}
        self._waiters: dict[int, asyncio.Future[_Peer]] = {}
        self._active: dict[int, _Peer] = {}
        self._aborted = _RoomMemory(timeout)
        self._hung_up = _RoomMemory(timeout)
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pending_registrations(self) -> int:
        return len(self._registrations)

    @property
    def pending_sends(self) -> int:
        return len(self._waiters)

    async def start(self) -> None:
        """Listen; with ``port=0`` the kernel picks a free port, then found in ``.port``."""
        if self._server is not None or self._closed:
            raise RuntimeError(f"bootstrap server {self.address} was already started or closed")
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("KV bootstrap server listening on %s", self.address)

    async def close(self) -> None:
        """Stop listening and end every connection; pending sends and receives fail with
        TransferAborted."""
        self._closed = True
        if self._server is not None:
            self._server.close()
        reason = f"bootstrap server {self.address} is shutting down"
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(TransferAborted(reason))
        self._waiters.clear()
        for peer in [*self._registrations.values(), *self._active.values()]:
            peer.fail("aborted", reason)
        self._registrations.clear()
        # Handlers still reading a REGISTER hold no peer; cancelling them closes those too.
        handlers = list(self._handlers)
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def send(
        self,
        *,
        room: int,
        num_tokens: int,
        first_token: int,
        rid: str,
        layout: str,
        payload: KvPayload,
        extra: bytes = b"",
    ) -> None:
        """Wait for the decode engine of ``room``, stream it ``payload`` (``num_tokens`` tokens
        of KV in ``layout``), ``first_token`` and ``extra``, and return once it acknowledged
        receipt.

        Raises TransferTimeout (no decode within ``timeout``, or it stopped reading),
        TransferAborted (decode hung up or aborted, ``abort(room)``, server closed) or
        TransferError (size or layout mismatch between the two sides, protocol error).
        Cancelling it aborts the decode side.
        """
        _check_request(room, num_tokens)
        if len(extra) > _MAX_EXTRA:
            raise ValueError(f"extra is {len(extra)} bytes (max {_MAX_EXTRA})")
        if not 0 <= first_token < 2**32:
            raise ValueError(f"first_token {first_token} is outside [0, 2**32)")
        try:
            if self._closed:
                raise TransferAborted(f"bootstrap server {self.address} is closed")
            aborted = self._aborted.get(room)
            if aborted is not None:
                raise TransferAborted(f"{aborted} (rid {rid})")
            hung_up = self._hung_up.pop(room)
            if hung_up is not None:
                raise TransferAborted(f"{hung_up} (prefill rid {rid})")
            if room in self._waiters or room in self._active:
                raise TransferError(
                    f"bootstrap room {room} (rid {rid}) already has a send in progress"
                )
            peer = await self._claim(room, rid)
            try:
                await self._transfer(
                    peer, _KvHeader(num_tokens, first_token, payload.nbytes, extra), layout, payload
                )
            except BaseException as exc:
                # Whatever ended the send, the decode must hear of it now, not at its timeout
                # (a no-op if the transfer already ended on the decode's side).
                if isinstance(exc, asyncio.CancelledError):
                    peer.fail("aborted", f"prefill cancelled bootstrap room {room} (rid {rid})")
                else:
                    peer.fail("error", f"prefill failed bootstrap room {room} (rid {rid}): {exc}")
                raise
            finally:
                if self._active.get(room) is peer:
                    del self._active[room]
        except (TransferError, asyncio.CancelledError):
            self.transfers_failed += 1
            raise
        self.transfers_ok += 1

    def abort(self, room: int) -> None:
        """The prefill request of ``room`` was aborted: its decode engine gets ABORT now if it
        registered, or when it registers within ``timeout``; a pending send fails."""
        reason = f"prefill aborted bootstrap room {room}"
        self._aborted.add(room, reason)
        waiter = self._waiters.pop(room, None)
        if waiter is not None and not waiter.done():
            waiter.set_exception(TransferAborted(reason))
        peer = self._registrations.pop(room, None)
        if peer is not None:
            peer.fail("aborted", reason)
        peer = self._active.get(room)
        if peer is not None:
            peer.fail("aborted", reason)

    async def _claim(self, room: int, rid: str) -> _Peer:
        """The registered decode connection for ``room``, waiting for it if need be."""
        peer = self._registrations.pop(room, None)
        if peer is not None:
            if peer.expiry is not None:
                peer.expiry.cancel()
            self._active[room] = peer
            return peer
        waiter: asyncio.Future[_Peer] = asyncio.get_running_loop().create_future()
        self._waiters[room] = waiter
        try:
            async with asyncio.timeout(self.timeout):
                return await waiter
        except TimeoutError:
            self._drop_claimed(waiter, "timeout", f"prefill of bootstrap room {room} timed out")
            raise TransferTimeout(
                f"no decode engine registered bootstrap room {room} (rid {rid}) with bootstrap "
                f"server {self.address} within {self.timeout:g}s"
            ) from None
        except asyncio.CancelledError:
            reason = f"prefill cancelled bootstrap room {room} (rid {rid})"
            self._drop_claimed(waiter, "aborted", reason)
            # This prefill will never come: a decode registering later should not wait for it.
            self._aborted.add(room, reason)
            raise
        finally:
            if self._waiters.get(room) is waiter:
                del self._waiters[room]

    def _drop_claimed(self, waiter: asyncio.Future[_Peer], code: AbortCode, reason: str) -> None:
        # The registration may have been handed over just as the send gave up.
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            peer = waiter.result()
            peer.fail(code, reason)
            if self._active.get(peer.room) is peer:
                del self._active[peer.room]

    async def _transfer(
        self, peer: _Peer, header: _KvHeader, layout: str, payload: KvPayload
    ) -> None:
        room = peer.room
        rid = peer.rid
        num_tokens = header.num_tokens
        nbytes = header.nbytes
        # Either may have happened between the registration's hand-over and now.
        if self._closed:
            peer.fail("aborted", f"bootstrap server {self.address} is shutting down")
        aborted = self._aborted.get(room)
        if aborted is not None:
            peer.fail("aborted", aborted)
        if peer.layout != layout:
            peer.fail(
                "error",
                f"KV layout mismatch for bootstrap room {room}: the prefill engine holds "
                f"[{layout}], the decode engine (rid {rid}) expects [{peer.layout}]",
            )
        elif peer.num_tokens != num_tokens or peer.nbytes != nbytes:
            peer.fail(
                "error",
                f"KV size mismatch for bootstrap room {room}: prefill has {num_tokens} tokens "
                f"= {nbytes} bytes, decode (rid {rid}) expects {peer.num_tokens} tokens = "
                f"{peer.nbytes} bytes",
            )
        peer.check()
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer = peer.writer
        writer.write(_frame(_KV_HEADER, header))
        sent = crc = 0
        for data in payload.chunks(CHUNK_BYTES):
            size = len(data)
            if not size:
                continue
            if size > CHUNK_BYTES or sent + size > nbytes:
                raise TransferError(
                    f"the KV payload of bootstrap room {room} is larger than its {nbytes} bytes"
                )
            writer.write(_HEADER.pack(_DATA, size))
            writer.write(data)
            crc = zlib.crc32(data, crc)
            sent += size
            self.bytes_transferred += size
            await self._drain(peer)
        if sent != nbytes:
            raise TransferError(
                f"the KV payload of bootstrap room {room} gave {sent} of its {nbytes} bytes"
            )
        peer.check()
        writer.write(_frame(_DONE, _Done(nbytes, crc)))
        # No drain after DONE: the ACK can only come once everything arrived, and it may come
        # before a drain would return.
        try:
            async with asyncio.timeout(self.timeout):
                # Shielded: cancelling the send must leave the outcome to ``fail``, which
                # tells the decode.
                await asyncio.shield(peer.outcome)
        except TimeoutError:
            peer.fail(  # a no-op if the ACK came just as the timer fired
                "timeout",
                f"decode engine (rid {peer.rid}) did not acknowledge the KV of bootstrap room "
                f"{room} within {self.timeout:g}s",
            )
        acked = peer.outcome.result()  # raises the transfer's error, if it failed
        if acked != nbytes:
            raise TransferError(
                f"protocol error: decode engine (rid {peer.rid}) acknowledged {acked} of "
                f"{nbytes} bytes for bootstrap room {room}"
            )
        self.last_transfer_seconds = loop.time() - started
        log.debug(
            "sent KV of bootstrap room %d (rid %s): %d bytes in %.3fs",
            room,
            rid,
            nbytes,
            self.last_transfer_seconds,
        )

    async def _drain(self, peer: _Peer) -> None:
        """Wait for TCP back-pressure to ease, but stop at once when the transfer ends
        otherwise (a decode that hung up, an abort) or the decode stops reading."""
        peer.check()
        drain = asyncio.ensure_future(peer.writer.drain())
        try:
            done, _ = await asyncio.wait(
                (drain, peer.outcome), timeout=self.timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if drain.done():
                error = None if drain.cancelled() else drain.exception()
            else:
                drain.cancel()
                error = None
        peer.check()
        if not done:
            peer.fail(
                "timeout",
                f"decode engine (rid {peer.rid}) stopped reading the KV of bootstrap room "
                f"{peer.room} for {self.timeout:g}s",
            )
        elif error is not None:
            peer.fail("aborted", f"lost the decode engine of bootstrap room {peer.room}: {error}")
        peer.check()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        peer: _Peer | None = None
        try:
            writer.transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
            try:
                async with asyncio.timeout(self.timeout):
                    kind, body = await _read_frame(reader)
                if kind != _REGISTER:
                    raise TransferError(f"protocol error: expected REGISTER, got frame {kind}")
                reg = _parse(body, _REGISTER_DECODER)
            except TransferError as exc:
                log.warning("bootstrap server %s: %s", self.address, exc)
                writer.write(_abort_frame("error", str(exc)))
                return
            except (TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
                log.debug("bootstrap server %s: connection never registered: %r", self.address, exc)
                return
            peer = _Peer(reg, reader, writer)
            refusal = self._admit(peer)
            if refusal is not None:
                peer.fail(*refusal)
                return
            await self._read_replies(peer)
        except asyncio.CancelledError:
            # Only ``close`` (or loop shutdown) cancels a handler, and nothing awaits it but
            # ``close``. Swallowed because asyncio 3.11 logs a cancelled connection handler as
            # an "unhandled exception in client_connected_cb".
            pass
        finally:
            if peer is not None:
                self._release(peer)
            _hang_up(writer)
            if task is not None:
                self._handlers.discard(task)

    def _admit(self, peer: _Peer) -> tuple[AbortCode, str] | None:
        """Hand a registration to its waiting send, or park it; or say why it is refused."""
        room = peer.room
        if self._closed:
            return "aborted", f"bootstrap server {self.address} is shutting down"
        aborted = self._aborted.get(room)
        if aborted is not None:
            return "aborted", aborted
        if room in self._registrations or room in self._active:
            return "error", f"bootstrap room {room} is already registered by another decode"
        self._hung_up.pop(room)
        waiter = self._waiters.pop(room, None)
        if waiter is not None and not waiter.done():
            self._active[room] = peer
            waiter.set_result(peer)
        else:
            self._registrations[room] = peer
            peer.expiry = asyncio.get_running_loop().call_later(self.timeout, self._expire, peer)
        return None

    def _expire(self, peer: _Peer) -> None:
        if self._registrations.get(peer.room) is peer:
            del self._registrations[peer.room]
            peer.fail(
                "timeout",
                f"no prefill request for bootstrap room {peer.room} reached bootstrap server "
                f"{self.address} within {self.timeout:g}s",
            )

    async def _read_replies(self, peer: _Peer) -> None:
        """Read what the decode says after REGISTER (ACK or ABORT) or notice it is gone."""
        try:
            kind, body = await _read_frame(peer.reader)
            if peer.outcome.done():
                return
            if kind == _ACK and self._active.get(peer.room) is peer:
                peer.outcome.set_result(_parse(body, _ACK_DECODER).nbytes)
            elif kind == _ABORT:
                abort = _parse(body, _ABORT_DECODER)
                peer.outcome.set_exception(
                    _ERRORS[abort.code](
                        f"decode engine (rid {peer.rid}) ended bootstrap room {peer.room}: "
                        f"{abort.reason}"
                    )
                )
            else:
                raise TransferError(f"protocol error: unexpected frame {kind} from decode")
        except TransferError as exc:
            peer.fail("error", f"bootstrap room {peer.room}: {exc}")
        except (asyncio.IncompleteReadError, OSError):
            pass  # hung up: ``_release`` reports it

    def _release(self, peer: _Peer) -> None:
        if self._registrations.get(peer.room) is peer:
            # It left before any prefill came for it; tell that prefill at once when it does.
            del self._registrations[peer.room]
            self._hung_up.add(
                peer.room,
                f"the decode engine (rid {peer.rid}) of bootstrap room {peer.room} hung up "
                "before the prefill was ready",
            )
        if peer.expiry is not None:
            peer.expiry.cancel()
        if not peer.outcome.done():
            peer.outcome.set_exception(
                TransferAborted(
                    f"the decode engine (rid {peer.rid}) of bootstrap room {peer.room} hung up"
                )
            )


class KvReceiver:
    """Decode side (``contracts.KvReceiver``): pull one request's KV from the prefill engine's
    bootstrap server.

    Metrics (plain attributes): ``bytes_transferred`` (KV bytes received, failed transfers
    included), ``transfers_ok``, ``transfers_failed`` (cancelled receives included),
    ``last_transfer_seconds`` (KV_HEADER to ACK of the last successful transfer).
    """

    def __init__(self, *, timeout: float = 300.0) -> None:
        _check_timeout(timeout)
        self.timeout = timeout
        self.bytes_transferred = 0
        self.transfers_ok = 0
        self.transfers_failed = 0
        self.last_transfer_seconds = 0.0
        self._closing = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()

    async def close(self) -> None:
        """End every receive in flight (TransferAborted); later ones fail at once."""
        self._closing.set()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.sleep(0)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def receive(
        self,
        *,
        host: str,
        port: int,
        room: int,
        num_tokens: int,
        rid: str,
        layout: str,
        sink: KvSink,
    ) -> tuple[int, bytes]:
        """Register ``room`` with the bootstrap server at ``host:port``, receive all
        ``sink.nbytes`` bytes (``num_tokens`` tokens of KV in ``layout``) into ``sink``,
        acknowledge them and return the first token and the prefill's ``extra``.

        Raises TransferTimeout, TransferAborted (prefill aborted or hung up, receiver closed)
        or TransferError (size or checksum mismatch, protocol error). Cancelling it closes the
        connection, which the prefill's ``send`` sees as an abort.
        """
        if host == FAKE_BOOTSTRAP_HOST:
            return FAKE_FIRST_TOKEN, b""
        _check_request(room, num_tokens)
        try:
            if self._closing.is_set():
                raise TransferAborted("KV receiver is closed")
            result = await self._receive(host, port, room, num_tokens, rid, layout, sink)
        except (TransferError, asyncio.CancelledError):
            self.transfers_failed += 1
            raise
        self.transfers_ok += 1
        return result

    async def _receive(
        self, host: str, port: int, room: int, num_tokens: int, rid: str, layout: str, sink: KvSink
    ) -> tuple[int, bytes]:
        what = f"bootstrap room {room} (rid {rid}) from prefill bootstrap server {host}:{port}"
        nbytes = sink.nbytes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        writer: asyncio.StreamWriter | None = None
        last_error = "no attempt finished"
        try:
            try:
                async with asyncio.timeout_at(deadline):
                    delay = _CONNECT_RETRY_FIRST
                    while writer is None:
                        try:
                            reader, writer = await asyncio.open_connection(
                                host, port, limit=_READ_LIMIT
                            )
                        except OSError as exc:
                            # Refused or unreachable: the prefill may still be starting.
                            last_error = str(exc) or type(exc).__name__
                            await self._pause(delay)
                            delay = min(delay * 2, _CONNECT_RETRY_MAX)
                    self._writers.add(writer)
                    if self._closing.is_set():
                        raise TransferAborted(f"KV receiver closed while waiting for {what}")
                    writer.write(
                        _frame(_REGISTER, _Register(room, num_tokens, nbytes, rid, layout))
                    )
                    await writer.drain()
                    kind, body = await _read_frame(reader)
            except TimeoutError:
                state = (
                    "connected and registered, but no KV came"
                    if writer is not None
                    else f"could not connect: {last_error}"
                )
                raise TransferTimeout(
                    f"timed out after {self.timeout:g}s waiting for the KV of {what} ({state})"
                ) from None
            header = _parse(self._expect(kind, _KV_HEADER, body, what), _KV_HEADER_DECODER)
            if header.num_tokens != num_tokens or header.nbytes != nbytes:
                raise TransferError(
                    f"KV size mismatch for {what}: decode expects {num_tokens} tokens = "
                    f"{nbytes} bytes, prefill sends {header.num_tokens} tokens = "
                    f"{header.nbytes} bytes",
                )
            started = loop.time()
            received = crc = 0
            while True:
                try:
                    async with asyncio.timeout(self.timeout):
                        kind, body = await _read_frame(reader)
                except TimeoutError:
                    raise TransferTimeout(
                        f"the KV stream of {what} stalled for {self.timeout:g}s after "
                        f"{received} of {nbytes} bytes"
                    ) from None
                if kind != _DATA:
                    break
                if received + len(body) > nbytes:
                    raise TransferError(f"got more than {nbytes} KV bytes for {what}")
                sink.write(received, body)
                received += len(body)
                self.bytes_transferred += len(body)
                crc = zlib.crc32(body, crc)
            done = _parse(self._expect(kind, _DONE, body, what), _DONE_DECODER)
            if received != nbytes or done.nbytes != nbytes:
                raise TransferError(
                    f"got {received} of {nbytes} KV bytes for {what} (DONE says {done})"
                )
            if done.crc32 != crc:
                raise TransferError(f"KV checksum mismatch for {what}")
            writer.write(_frame(_ACK, _Ack(received)))
            await writer.drain()
            self.last_transfer_seconds = loop.time() - started
            return header.first_token, header.extra
        except TransferError as exc:
            if (
                writer is not None
                and not writer.transport.is_closing()
                and not isinstance(exc, (TransferAborted, TransferTimeout))
            ):
                # Found here (size, checksum, protocol): the prefill raises it too. If it came
                # from the prefill's own ABORT, this lands on a closed connection, harmlessly.
                writer.write(_abort_frame("error", str(exc)))
            raise
        except (asyncio.IncompleteReadError, OSError) as exc:
            if self._closing.is_set():
                raise TransferAborted(f"KV receiver closed while receiving {what}") from None
            raise TransferAborted(f"connection lost while receiving {what}: {exc!r}") from None
        finally:
            if writer is not None:
                self._writers.discard(writer)
                _hang_up(writer)

    async def _pause(self, seconds: float) -> None:
        """Sleep before a reconnect, but fail at once if the receiver is closed meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        if self._closing.is_set():
            raise TransferAborted("KV receiver closed while connecting")

    @staticmethod
    def _expect(kind: int, wanted: int, body: bytes, what: str) -> bytes:
        if kind == wanted:
            return body
        if kind == _ABORT:
            abort = _parse(body, _ABORT_DECODER)
            raise _ERRORS[abort.code](f"prefill ended {what}: {abort.reason}")
        raise TransferError(f"protocol error: expected frame {wanted}, got {kind} for {what}")


if TYPE_CHECKING:
    # The engine takes these through the contracts; keep them structurally compatible.
    def _conforms(
        server: BootstrapServer, receiver: KvReceiver
    ) -> tuple[contracts.KvSender, contracts.KvReceiver]:
        return server, receiver
