"""Admission: which requests the processor takes on, and the counts that decide it.

``--max-inflight`` bounds *engine* requests (prompts x n of every HTTP request in flight),
checked twice: cheaply on arrival (already full: 503 before the body is read) and exactly
once the request's cost is known. A request that alone costs more than the limit can never
run and is a 400, not a 503 to retry forever. Draining refuses new requests and lets
:meth:`Admission.wait_idle` wait for the ones in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from services.processor import metrics
from services.processor.failures import Failure

__all__ = ["Admission"]


class Admission:
    def __init__(self, max_inflight: int, retry_after: int) -> None:
        self.max_inflight = max_inflight
        self.retry_after = retry_after
        self.inflight = 0  # HTTP requests being served
        self.engine_inflight = 0  # their engine requests: what --max-inflight bounds
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def busy(self) -> Failure:
        metrics.rejected.labels("max_inflight").inc()
        return Failure(
            503,
            f"The server is busy ({self.engine_inflight} engine requests in flight); retry later",
            retry_after=self.retry_after,
        )

    def check_arrival(self) -> None:
        """Refuse at once when no engine request could be admitted now."""
        limit = self.max_inflight
        if limit and self.engine_inflight >= limit:
            raise self.busy()

    def check_cost(self, cost: int) -> None:
        """Refuse a request whose engine requests (prompts x n) can never be admitted."""
        limit = self.max_inflight
        if limit and cost > limit:
            raise Failure(
                400,
                f"This request needs {cost} engine requests (prompts x n), more than this "
                f"server runs at once ({limit}); split it",
                param="n",
            )

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Count one HTTP request in flight (what draining waits for)."""
        self.inflight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.inflight -= 1
            if not self.inflight:
                self._idle.set()

    @contextlib.contextmanager
    def admitted(self, cost: int) -> Iterator[None]:
        """Count a request's engine requests (prompts x n) against --max-inflight."""
        self.check_cost(cost)
        limit = self.max_inflight
        if limit and self.engine_inflight + cost > limit:
            raise self.busy()
        self.engine_inflight += cost
        try:
            yield
        finally:
            self.engine_inflight -= cost

    async def wait_idle(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout=max(timeout, 0.0))
