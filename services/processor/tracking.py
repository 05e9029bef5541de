"""Per-request metrics bookkeeping: arrival, first token, inter-token gaps, tokens, status."""

from __future__ import annotations

import time

from services.processor import metrics
from services.processor.respond import OutputAssembler
from shared.histograms import observe_many

__all__ = ["RequestTracker"]


class RequestTracker:
    """One request's metrics: ``bind`` when its model is known, ``finish`` when answered."""

    __slots__ = (
        "_itl_pending",
        "arrived",
        "endpoint",
        "first_at",
        "last_at",
        "model",
        "prompt_tokens",
        "status",
    )

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.model = "unknown"
        self._itl_pending: list[float] = []
        self.status = 0
        self.arrived = time.perf_counter()
        self.first_at: float | None = None
        self.last_at = 0.0
        self.prompt_tokens = 0

    def first_token(self) -> None:
        now = time.perf_counter()
        self.first_at = self.last_at = now
        metrics.time_to_first_token.labels(self.model).observe(now - self.arrived)

    def tokens_written(self, count: int) -> None:
        if self.first_at is None:
            self.first_token()
            return
        now = time.perf_counter()
        if count:  # observed together when the request ends (observe_many)
            self._itl_pending.append((now - self.last_at) / count)
        self.last_at = now

    def done(self, assembler: OutputAssembler) -> None:
        metrics.input_tokens.labels(self.model).observe(assembler.prompt_tokens)
        metrics.output_tokens.labels(self.model).observe(assembler.completion_tokens)
        cached = sum(assembler.cached_tokens.values())
        if cached:
            metrics.cached_tokens.labels(self.model).inc(cached)

    def bind(self, model: str) -> None:
        self.model = model
        metrics.inflight.labels(model).inc()

    def disconnected(self) -> None:
        """The client went away before the end."""
        self.status = 499  # nginx's "client closed request"
        if self.model != "unknown":
            metrics.client_disconnects.labels(self.model).inc()

    def finish(self) -> None:
        if self._itl_pending:
            observe_many(metrics.inter_token_latency.labels(self.model), self._itl_pending)
            self._itl_pending = []
        if self.model != "unknown":
            metrics.inflight.labels(self.model).dec()
        metrics.requests.labels(self.model, self.endpoint, str(self.status or 500)).inc()
        metrics.request_duration.labels(self.model, self.endpoint).observe(
            time.perf_counter() - self.arrived
        )
