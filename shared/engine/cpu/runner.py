"""The interface between the CPU scheduler and a model: one forward per scheduler step.

Why this split (SGLang's ``Scheduler`` / ``ModelRunner``, vLLM's scheduler / executor): the
scheduler decides *what* runs -- admission, chunked prefill, the decode batch, each request's
pages -- and a runner decides *how*: the simulated runner sleeps for a modelled GPU time and
draws deterministic tokens, the torch runner runs the model's real forward over the KV pool.
Everything the mesh sees (batching, prefix caching, KV events, load metrics, disaggregation)
lives in the scheduler and is the same for both.

A step (:class:`ForwardBatch`): prefill chunks -- ``length`` tokens of ``req.fill`` from
``start``, at positions ``start ..``, their K/V written into ``req.page_table`` -- and decode
rows -- ``req.output_ids[-1]`` at position ``req.kv_len``. Rows in ``sample`` (prefills that
complete their sequence, then every decode row) get one sampled token each, with its logprob
when the request asked. Attention of each row covers its own pages only.

Disaggregation moves a request's KV between two engines as bytes whose meaning ``kv_layout``
names (both sides must agree, else the transfer fails with both layouts in the message).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from shared.engine.cpu.request import Req, TokenLogprob

__all__ = ["ForwardBatch", "KvPayload", "KvSink", "ModelRunner", "StepOutput"]


@dataclass(slots=True)
class ForwardBatch:
    """One scheduler step's work (see the module docstring)."""

    # (request, start, length): compute ``req.fill[start:start + length]``.
    prefill: list[tuple[Req, int, int]] = field(default_factory=list)
    decode: list[Req] = field(default_factory=list)
    # Rows that produce a token: the prefills that complete their sequence, then ``decode``.
    sample: list[Req] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.prefill or self.decode)


@dataclass(slots=True)
class StepOutput:
    """What a forward produced: one token per ``ForwardBatch.sample`` row, in order."""

    tokens: list[int]
    # Per sampled row: its logprob entry when the request asked for logprobs, else None.
    logprobs: list[TokenLogprob | None] | None = None
    # Seconds the step took (modelled by the simulated runner, measured by the torch runner).
    seconds: float = 0.0
    # Sampled rows whose request cannot go on (a guided row whose grammar is stuck), by row
    # index, with why: the scheduler ends them with an error and drops their token.
    failed: dict[int, str] | None = None


class KvPayload(Protocol):
    """The prefill side of a transfer: a request's KV as bytes."""

    @property
    def nbytes(self) -> int: ...

    def chunks(self, size: int) -> Iterator[bytes | memoryview]:
        """The bytes in order, at most ``size`` per chunk."""
        ...


class KvSink(Protocol):
    """The decode side of a transfer: where received bytes go."""

    @property
    def nbytes(self) -> int: ...

    def write(self, offset: int, data: bytes | memoryview) -> None: ...


class ModelRunner(Protocol):
    """A model under the CPU scheduler (see the module docstring)."""

    @property
    def kv_layout(self) -> str:
        """What the KV bytes of a transfer mean; equal on both sides of a transfer."""
        ...

    def unsupported(self, req: Req) -> str | None:
        """Why this runner cannot serve ``req`` as asked (a 400), or None."""
        ...

    def add(self, req: Req) -> None:
        """``req`` entered the engine: set up its per-request state."""
        ...

    def remove(self, req: Req) -> None:
        """``req`` left the engine (finished or aborted): drop its state."""
        ...

    async def forward(self, batch: ForwardBatch) -> StepOutput:
        """Run one step. Requests may be aborted while it runs; their pages stay untouched
        until it returns (the scheduler allocates only between steps)."""
        ...

    def kv_nbytes(self, num_tokens: int) -> int:
        """Bytes a transfer of ``num_tokens`` tokens of KV carries."""
        ...

    def kv_export(self, req: Req, num_tokens: int) -> KvPayload:
        """The first ``num_tokens`` tokens of ``req``'s KV, for sending."""
        ...

    def kv_sink(self, req: Req, num_tokens: int) -> KvSink:
        """A buffer for receiving ``num_tokens`` tokens of KV for ``req``."""
        ...

    def kv_import(self, req: Req, sink: KvSink) -> None:
        """Write a received buffer into ``req.page_table``'s pages."""
        ...

    async def close(self) -> None: ...
