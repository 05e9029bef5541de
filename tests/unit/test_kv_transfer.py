"""The CPU engines' KV transfer over real TCP on 127.0.0.1: both rendezvous orders, the wire
protocol, concurrency, timeouts, aborts and cancellation from either side, shutdown, size and
layout mismatches, bad peers and throughput.

The payloads are the simulated runner's stand-in bytes (room-specific, so a mix-up between rooms
fails the checksum); ``Server``/``Receiver`` adapt the transfer to "``kv`` bytes per token" so
each test states sizes in tokens.
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from proto.request import FAKE_BOOTSTRAP_HOST
from shared.engine.cpu import transfer as disagg
from shared.engine.cpu.contracts import TransferAborted, TransferError, TransferTimeout
from shared.engine.cpu.transfer import FAKE_FIRST_TOKEN, BootstrapServer, KvReceiver
from shared.engine.sim.runner import _StandInKv
from shared.infra import LOOPBACK, free_port

KV = 1024  # bytes per token
# A transfer that cannot finish during a test: 1 MiB per token, 100k tokens.
ENDLESS_KV = disagg.CHUNK_BYTES
ENDLESS_TOKENS = 100_000


def _layout(kv: int) -> str:
    return f"test KV, {kv} bytes per token"


def _pattern(room: int, nbytes: int) -> bytes:
    return b"".join(bytes(c) for c in _StandInKv(room, nbytes).chunks(disagg.CHUNK_BYTES))


class _Collect:
    """Keeps what arrives (transfers up to 64 MiB; the endless ones are only counted)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.data = bytearray(nbytes if nbytes <= 64 << 20 else 0)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if self.data:
            self.data[offset : offset + len(data)] = data


class Server:
    """A bootstrap server whose ``send`` takes a size in tokens of ``kv`` bytes."""

    def __init__(self, server: BootstrapServer, kv: int) -> None:
        self.server = server
        self.kv = kv

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)

    async def send(self, *, room: int, num_tokens: int, first_token: int, rid: str) -> None:
        await self.server.send(
            room=room,
            num_tokens=num_tokens,
            first_token=first_token,
            rid=rid,
            layout=_layout(self.kv),
            payload=_StandInKv(room, num_tokens * self.kv),
        )


class Receiver:
    """A KV receiver that takes ``kv`` bytes per token and keeps what each room received."""

    def __init__(self, *, kv_bytes_per_token: int, timeout: float) -> None:
        self.receiver = KvReceiver(timeout=timeout)
        self.kv = kv_bytes_per_token
        self.received: dict[int, bytes] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.receiver, name)

    async def receive(self, *, host: str, port: int, room: int, num_tokens: int, rid: str) -> int:
        sink = _Collect(num_tokens * self.kv)
        first, _ = await self.receiver.receive(
            host=host,
            port=port,
            room=room,
            num_tokens=num_tokens,
            rid=rid,
            layout=_layout(self.kv),
            sink=sink,
        )
        self.received[room] = bytes(sink.data)
        return first


@asynccontextmanager
async def _server(timeout: float = 5.0, kv: int = KV) -> AsyncIterator[Server]:
    server = Server(BootstrapServer(LOOPBACK, 0, timeout=timeout), kv)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def _until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


def _receive(receiver: Receiver, server: Server, room: int, num_tokens: int) -> Any:
    return asyncio.create_task(
        receiver.receive(
            host=LOOPBACK, port=server.port, room=room, num_tokens=num_tokens, rid=f"d-{room}"
        )
    )


def _send(server: Server, room: int, num_tokens: int, first_token: int = 7) -> Any:
    return asyncio.create_task(
        server.send(room=room, num_tokens=num_tokens, first_token=first_token, rid=f"p-{room}")
    )


async def _fails(task: asyncio.Task[Any], error: type[Exception], within: float = 2.0) -> str:
    """The task's error message, asserting its exact type (TransferError is the base class)."""
    with pytest.raises(TransferError) as caught:
        await asyncio.wait_for(task, within)
    assert type(caught.value) is error, repr(caught.value)
    return str(caught.value)


@pytest.mark.parametrize("decode_first", [True, False], ids=["register-then-send", "send-first"])
async def test_both_orders_deliver_every_byte_and_the_first_token(decode_first: bool) -> None:
    num_tokens = 1500  # 1.46 MiB: a full chunk and a partial one
    async with _server() as server:
        receiver = Receiver(kv_bytes_per_token=KV, timeout=5)
        if decode_first:
            received = _receive(receiver, server, 42, num_tokens)
            await _until(lambda: server.pending_registrations == 1)
            sent = _send(server, 42, num_tokens, first_token=31337)
        else:
            sent = _send(server, 42, num_tokens, first_token=31337)
            await _until(lambda: server.pending_sends == 1)
            received = _receive(receiver, server, 42, num_tokens)
        first_token, _ = await asyncio.wait_for(asyncio.gather(received, sent), 5)
        assert first_token == 31337
        assert receiver.received[42] == _pattern(42, num_tokens * KV)
        assert server.bytes_transferred == receiver.bytes_transferred == num_tokens * KV
        assert (server.transfers_ok, server.transfers_failed) == (1, 0)
        assert (receiver.transfers_ok, receiver.transfers_failed) == (1, 0)
        assert server.last_transfer_seconds > 0 and receiver.last_transfer_seconds > 0
        assert server.pending_registrations == server.pending_sends == 0


async def test_wire_protocol_as_documented() -> None:
    """A hand-written decode client: REGISTER, KV_HEADER, DATA..., DONE(crc32), ACK."""
    room, num_tokens = 2**63 - 1, 1100
    nbytes = num_tokens * KV
    async with _server() as server:
        sent = _send(server, room, num_tokens, first_token=5)
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        writer.write(
            disagg._frame(
                disagg._REGISTER, disagg._Register(room, num_tokens, nbytes, "r", _layout(KV))
            )
        )
        kind, body = await disagg._read_frame(reader)
        assert kind == disagg._KV_HEADER
        assert disagg._KV_HEADER_DECODER.decode(body) == disagg._KvHeader(num_tokens, 5, nbytes)
        data = bytearray()
        while (frame := await disagg._read_frame(reader))[0] == disagg._DATA:
            assert len(frame[1]) <= disagg.CHUNK_BYTES
            data += frame[1]
        assert frame[0] == disagg._DONE
        done = disagg._DONE_DECODER.decode(frame[1])
        assert len(data) == done.nbytes == nbytes
        assert done.crc32 == zlib.crc32(data)
        # Real, room-specific bytes, not zeros.
        assert data[: disagg.CHUNK_BYTES] == _pattern(room, disagg.CHUNK_BYTES)
        assert len(set(data[:64])) > 16
        assert not sent.done(), "send must wait for the ACK"
        writer.write(disagg._frame(disagg._ACK, disagg._Ack(nbytes)))
        await asyncio.wait_for(sent, 2)
        writer.close()


async def test_twenty_concurrent_rooms_on_one_server() -> None:
    dp_size = 4
    rooms = [(12345 + 7919 * i) * dp_size + i % dp_size for i in range(20)]
    async with _server() as server:
        receiver = Receiver(kv_bytes_per_token=KV, timeout=5)
        tasks = []
        for i, room in enumerate(rooms):
            num_tokens = 50 + 97 * i
            pair = [
                _receive(receiver, server, room, num_tokens),
                _send(server, room, num_tokens, i),
            ]
            if i % 2:
                pair.reverse()  # half the rooms: prefill first
            tasks.append(pair)
        for i, (first, second) in enumerate(tasks):
            results = await asyncio.wait_for(asyncio.gather(first, second), 5)
            assert i in results  # the receive returned this room's first token
        expected = sum((50 + 97 * i) * KV for i in range(20))
        assert server.bytes_transferred == receiver.bytes_transferred == expected
        assert server.transfers_ok == receiver.transfers_ok == 20


async def test_decode_times_out_when_no_prefill_comes() -> None:
    async with _server() as server:
        receiver = Receiver(kv_bytes_per_token=KV, timeout=0.3)
        started = time.monotonic()
        message = await _fails(_receive(receiver, server, 77, 10), TransferTimeout)
        assert 0.25 < time.monotonic() - started < 1.0
        assert f"{LOOPBACK}:{server.port}" in message
        assert "bootstrap room 77" in message and "0.3s" in message
        assert "registered" in message
        assert receiver.transfers_failed == 1
        # The server forgets the registration once the decode gave up.
        await _until(lambda: server.pending_registrations == 0)


async def test_decode_times_out_when_nothing_listens() -> None:
    port = free_port()
    receiver = Receiver(kv_bytes_per_token=KV, timeout=0.3)
    task = asyncio.create_task(
        receiver.receive(host=LOOPBACK, port=port, room=5, num_tokens=1, rid="d")
    )
    message = await _fails(task, TransferTimeout)
    assert f"{LOOPBACK}:{port}" in message and "could not connect" in message


async def test_server_drops_a_registration_no_prefill_claims() -> None:
    async with _server(timeout=0.3) as server:
        receiver = Receiver(kv_bytes_per_token=KV, timeout=5)
        message = await _fails(_receive(receiver, server, 8, 10), TransferTimeout)
        assert "no prefill request for bootstrap room 8" in message
        assert server.pending_registrations == 0


async def test_decode_retries_until_the_prefill_server_listens() -> None:
    port = free_port()
    receiver = Receiver(kv_bytes_per_token=KV, timeout=5)
    task = asyncio.create_task(
        receiver.receive(host=LOOPBACK, port=port, room=9, num_tokens=10, rid="d")
    )
    await asyncio.sleep(0.15)  # a few refused attempts
    server = Server(BootstrapServer(LOOPBACK, port, timeout=5), KV)
    await server.start()
    try:
        await server.send(room=9, num_tokens=10, first_token=3, rid="p")
        assert await asyncio.wait_for(task, 2) == 3
    finally:
        await server.close()


async def test_prefill_times_out_when_no_decode_comes() -> None:
    async with _server(timeout=0.3) as server:
        message = await _fails(_send(server, 66, 10), TransferTimeout)
        assert "bootstrap room 66" in message and "0.3s" in message
        assert server.transfers_failed == 1 and server.pending_sends == 0


async def test_decode_cancel_mid_transfer_aborts_the_send_promptly() -> None:
    async with _server(kv=ENDLESS_KV) as server:
        receiver = Receiver(kv_bytes_per_token=ENDLESS_KV, timeout=5)
        received = _receive(receiver, server, 11, ENDLESS_TOKENS)
        sent = _send(server, 11, ENDLESS_TOKENS)
        await _until(lambda: receiver.bytes_transferred > 0)
        started = time.monotonic()
        received.cancel()
        message = await _fails(sent, TransferAborted)
        assert time.monotonic() - started < 0.5
        assert "hung up" in message
        assert receiver.transfers_failed == server.transfers_failed == 1


async def test_decode_cancel_before_the_prefill_fails_the_later_send_at_once() -> None:
    async with _server() as server:
        receiver = Receiver(kv_bytes_per_token=KV, timeout=5)
        received = _receive(receiver, server, 12, 10)
        await _until(lambda: server.pending_registrations == 1)
        received.cancel()
        await _until(lambda: server.pending_registrations == 0)
        message = await _fails(_send(server, 12, 10), TransferAborted, within=0.2)
        assert "hung up before the prefill was ready" in message


@pytest.mark.parametrize("when", ["before-register", "after-register", "mid-transfer"])
async def test_prefill_abort_reaches_the_decode(when: str) -> None:
    kv = ENDLESS_KV if when == "mid-transfer" else KV
    async with _server(kv=kv) as server:
        receiver = Receiver(kv_bytes_per_token=kv, timeout=5)
        sent = None
        if when == "before-register":
            server.abort(13)
            received = _receive(receiver, server, 13, ENDLESS_TOKENS)
        else:
            received = _receive(receiver, server, 13, ENDLESS_TOKENS)
            await _until(lambda: server.pending_registrations == 1)
            if when == "mid-transfer":
                sent = _send(server, 13, ENDLESS_TOKENS)
                await _until(lambda: receiver.bytes_transferred > 0)
            server.abort(13)
        message = await _fails(received, TransferAborted, within=1.0)
        assert "prefill aborted bootstrap room 13" in message
        if sent is not None:
            await _fails(sent, TransferAborted, within=1.0)
        # A send for an aborted room fails at once too.
        await _fails(_send(server, 13, ENDLESS_TOKENS), TransferAborted, within=0.2)


async def test_prefill_abort_fails_a_waiting_send() -> None:
    async with _server() as server:
        sent = _send(server, 14, 10)
        await _until(lambda: server.pending_sends == 1)
        server.abort(14)
        await _fails(sent, TransferAborted, within=0.5)


async def test_prefill_cancel_mid_transfer_aborts_the_decode() -> None:
    async with _server(kv=ENDLESS_KV) as server:
        receiver = Receiver(kv_bytes_per_token=ENDLESS_KV, timeout=5)
        received = _receive(receiver, server, 15, ENDLESS_TOKENS)
        sent = _send(server, 15, ENDLESS_TOKENS)
        await _until(lambda: receiver.bytes_transferred > 0)
        sent.cancel()
        message = await _fails(received, TransferAborted, within=1.0)
        assert "prefill cancelled bootstrap room 15" in message


async def test_server_close_fails_everything_pending() -> None:
    server = Server(BootstrapServer(LOOPBACK, 0, timeout=5), ENDLESS_KV)
    await server.start()
    receiver = Receiver(kv_bytes_per_token=ENDLESS_KV, timeout=5)
    registered = _receive(receiver, server, 1, 10)
    waiting_send = _send(server, 2, 10)
    streaming = _receive(receiver, server, 3, ENDLESS_TOKENS)
    streaming_send = _send(server, 3, ENDLESS_TOKENS)
    _, silent = await asyncio.open_connection(LOOPBACK, server.port)  # never registers
    await _until(lambda: server.pending_registrations == 1 and receiver.bytes_transferred > 0)
    started = time.monotonic()
    await asyncio.wait_for(server.close(), 2)
    for task in (registered, waiting_send, streaming, streaming_send):
        assert "shutting down" in await _fails(task, TransferAborted, within=1.0)
    assert time.monotonic() - started < 1.0
    silent.close()
    # A closed server refuses new work instead of hanging.
    await _fails(_send(server, 4, 10), TransferAborted, within=0.2)


async def test_receiver_close_fails_pending_receives() -> None:
    async with _server() as server:
        receiver = Receiver(kv_bytes_per_token=KV, timeout=5)
        registered = _receive(receiver, server, 1, 10)
        connecting = asyncio.create_task(
            receiver.receive(host=LOOPBACK, port=free_port(), room=2, num_tokens=1, rid="d")
        )
        await _until(lambda: server.pending_registrations == 1)
        await receiver.close()
        for task in (registered, connecting):
            assert "closed" in await _fails(task, TransferAborted, within=1.0)
        await _fails(_receive(receiver, server, 3, 10), TransferAborted, within=0.2)


@pytest.mark.parametrize("mismatch", ["num_tokens", "kv_bytes_per_token"])
async def test_size_mismatch_fails_both_sides(mismatch: str) -> None:
    async with _server() as server:
        receiver = Receiver(
            kv_bytes_per_token=2 * KV if mismatch == "kv_bytes_per_token" else KV, timeout=5
        )
        received = _receive(receiver, server, 21, 10)
        sent = _send(server, 21, 11 if mismatch == "num_tokens" else 10)
        for task in (received, sent):
            message = await _fails(task, TransferError)
            if mismatch == "num_tokens":
                assert "KV size mismatch" in message
            else:  # both layouts named, so an operator sees which side is misconfigured
                assert "KV layout mismatch" in message
                assert _layout(KV) in message and _layout(2 * KV) in message


async def test_duplicate_registration_is_refused() -> None:
    async with _server() as server:
        receiver = Receiver(kv_bytes_per_token=KV, timeout=5)
        first = _receive(receiver, server, 22, 10)
        await _until(lambda: server.pending_registrations == 1)
        message = await _fails(_receive(receiver, server, 22, 10), TransferError)
        assert "already registered" in message
        sent = _send(server, 22, 10, first_token=1)
        assert await asyncio.wait_for(first, 2) == 1
        await sent


@asynccontextmanager
async def _fake_prefill(
    script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any],
) -> AsyncIterator[int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await disagg._read_frame(reader)  # REGISTER
            await script(reader, writer)
        finally:
            writer.close()

    fake = await asyncio.start_server(serve, LOOPBACK, 0)
    try:
        yield int(fake.sockets[0].getsockname()[1])
    finally:
        fake.close()


async def test_receiver_rejects_corrupt_kv_and_tells_the_prefill() -> None:
    replies: list[tuple[int, bytes]] = []

    async def corrupt(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        good = _pattern(1, 10 * KV)
        writer.write(disagg._frame(disagg._KV_HEADER, disagg._KvHeader(10, 0, 10 * KV)))
        writer.write(disagg._HEADER.pack(disagg._DATA, len(good)) + b"x" + good[1:])
        writer.write(disagg._frame(disagg._DONE, disagg._Done(10 * KV, zlib.crc32(good))))
        replies.append(await disagg._read_frame(reader))

    async with _fake_prefill(corrupt) as port:
        receiver = Receiver(kv_bytes_per_token=KV, timeout=5)
        task = asyncio.create_task(
            receiver.receive(host=LOOPBACK, port=port, room=1, num_tokens=10, rid="d")
        )
        assert "checksum" in await _fails(task, TransferError)
        await _until(lambda: bool(replies))
        assert replies[0][0] == disagg._ABORT
        assert disagg._ABORT_DECODER.decode(replies[0][1]).code == "error"


async def test_receiver_sees_a_prefill_dying_mid_stream_as_an_abort() -> None:
    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(disagg._frame(disagg._KV_HEADER, disagg._KvHeader(10, 0, 10 * KV)))
        writer.write(disagg._HEADER.pack(disagg._DATA, 5 * KV) + bytes(5 * KV))

    async with _fake_prefill(die) as port:
        receiver = Receiver(kv_bytes_per_token=KV, timeout=5)
        task = asyncio.create_task(
            receiver.receive(host=LOOPBACK, port=port, room=1, num_tokens=10, rid="d")
        )
        assert "connection lost" in await _fails(task, TransferAborted)


async def test_garbage_on_the_bootstrap_port_is_refused_and_harmless() -> None:
    async with _server() as server:
        reader, writer = await asyncio.open_connection(LOOPBACK, server.port)
        writer.write(b"GET /route HTTP/1.1\r\nHost: x\r\n\r\n")
        kind, body = await asyncio.wait_for(disagg._read_frame(reader), 2)
        assert kind == disagg._ABORT
        assert "protocol error" in disagg._ABORT_DECODER.decode(body).reason
        assert await reader.read() == b""  # and hung up
        writer.close()
        receiver = Receiver(kv_bytes_per_token=KV, timeout=5)
        received = _receive(receiver, server, 30, 10)
        await asyncio.wait_for(asyncio.gather(received, _send(server, 30, 10)), 2)


async def test_fake_bootstrap_host_transfers_nothing() -> None:
    receiver = Receiver(kv_bytes_per_token=KV, timeout=5)
    first_token = await asyncio.wait_for(
        receiver.receive(host=FAKE_BOOTSTRAP_HOST, port=1, room=0, num_tokens=4, rid="warmup"),
        0.1,
    )
    assert first_token == FAKE_FIRST_TOKEN
    assert receiver.transfers_ok == receiver.bytes_transferred == 0


async def test_large_transfer_throughput() -> None:
    kv, num_tokens = 64 * 1024, 1024  # 64 MiB
    async with _server(kv=kv) as server:
        receiver = Receiver(kv_bytes_per_token=kv, timeout=10)
        started = time.monotonic()
        received = _receive(receiver, server, 99, num_tokens)
        await asyncio.wait_for(asyncio.gather(received, _send(server, 99, num_tokens)), 10)
        elapsed = time.monotonic() - started
        assert receiver.bytes_transferred == kv * num_tokens
        print(
            f"\n64 MiB KV transfer over loopback TCP: {elapsed:.3f}s, "
            f"{64 / elapsed:.0f} MiB/s (send {server.last_transfer_seconds:.3f}s)"
        )
