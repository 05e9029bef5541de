"""Contracts between the CPU engines' parts.

The scheduler (``scheduler.py``) drives a model runner (``runner.py``) and a radix prefix cache
(``radix.py``), hands each step's
KV events to an event sink (``kv_events.py``: SGLang's ZMQ PUB + replay socket), load metrics to
a metrics sink (``kv_events.py``: SGLang's ``KvMetrics`` over ZMQ PUSH), and, when
disaggregated, KV payloads to a transfer (``transfer.py``: bootstrap server on the prefill side,
receiver on the decode side). Each part is tested on its own against these protocols.
"""

from __future__ import annotations

from typing import Protocol

from proto.kv_events import KVEvent
from proto.metrics import KvMetrics
from shared.engine.cpu.runner import KvPayload, KvSink


class KvEventSink(Protocol):
    """Takes the KV events of one scheduler step (one ``KVEventBatch`` on the wire)."""

    def publish(self, events: list[KVEvent]) -> None: ...


class MetricsSink(Protocol):
    def publish(self, metrics: KvMetrics) -> None: ...


class TransferError(Exception):
    """A disaggregated KV transfer failed; the request ends with an abort."""


class TransferTimeout(TransferError):
    """The peer never showed up within the bootstrap timeout."""


class TransferAborted(TransferError):
    """The peer aborted its side of the request (or hung up)."""


class KvSender(Protocol):
    """Prefill side: push one request's KV to the decode engine that registered its room."""

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
        """Wait (up to the bootstrap timeout) for a decode engine to register ``room``, then
        stream it ``payload``, ``first_token`` and ``extra``.

        Raises TransferTimeout / TransferAborted / TransferError.
        """
        ...

    def abort(self, room: int) -> None:
        """The prefill request was aborted: release the decode side waiting on ``room``."""
        ...


class KvReceiver(Protocol):
    """Decode side: register ``room`` with the prefill engine's bootstrap server and receive."""

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
        """Returns the first output token (sampled by prefill) and the prefill's ``extra``
        once all KV bytes arrived in ``sink``.

        Raises TransferTimeout / TransferAborted / TransferError. Cancelling it (decode abort)
        closes the connection, which the prefill side sees as an abort.
        """
        ...
