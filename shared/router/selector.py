"""Selection policies: which of a model's workers gets the next request.

``round-robin`` cycles, ``random`` draws uniformly, ``least-loaded`` takes the worker with
the fewest active requests (then fewest active KV blocks; ties drawn at random so two
processors do not herd onto the same worker). Busy workers -- active KV blocks over
``busy_threshold`` of their pool -- are skipped; when every candidate is busy the request is
refused with :class:`BusyError` (the processor answers 503 with ``Retry-After``) rather than
queued behind a saturated engine.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from shared.router.load import LoadTracker
from shared.router.mode import RouterMode

__all__ = ["BusyError", "RouterMode", "Selector", "WorkerCandidate"]


class BusyError(Exception):
    """Every candidate worker is over the busy threshold."""


@dataclass(frozen=True, slots=True)
class WorkerCandidate:
    instance_id: int
    total_kv_blocks: int | None = None
    dp_size: int = 1
    dp_start: int = 0


class Selector:
    def __init__(
        self,
        mode: RouterMode,
        tracker: LoadTracker,
        *,
        busy_threshold: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.mode = mode
        self.tracker = tracker
        self.busy_threshold = busy_threshold
        self._rng = rng or random.Random()
        self._rr = itertools.count()

    def is_busy(self, candidate: WorkerCandidate) -> bool:
        threshold = self.busy_threshold
        total = candidate.total_kv_blocks
        if threshold is None or not total:
            return False
        load = self.tracker.loads.get(candidate.instance_id)
        return load is not None and load.active_blocks > threshold * total

    def select(
        self, candidates: Sequence[WorkerCandidate], exclude: Collection[int] = ()
    ) -> WorkerCandidate:
        """Pick a worker; raises ``LookupError`` with no candidates, ``BusyError`` when all
        are busy. ``exclude`` (workers that just failed this request) is avoided while any
        other candidate remains."""
        if not candidates:
            raise LookupError("no candidate workers")
        pool = [c for c in candidates if c.instance_id not in exclude] or list(candidates)
        free = [c for c in pool if not self.is_busy(c)]
        if not free:
            raise BusyError(
                f"all {len(pool)} workers are over the active KV blocks threshold "
                f"({self.busy_threshold:g})"
            )
        if len(free) == 1:
            return free[0]
        if self.mode is RouterMode.RANDOM:
            return self._rng.choice(free)
        if self.mode in (RouterMode.LEAST_LOADED, RouterMode.KV):
            loads = self.tracker.loads

            def key(c: WorkerCandidate) -> tuple[int, int]:
                load = loads.get(c.instance_id)
                return (load.active_requests, load.active_blocks) if load else (0, 0)

            best = min(key(c) for c in free)
            return self._rng.choice([c for c in free if key(c) == best])
        ordered = sorted(free, key=lambda c: c.instance_id)
        return ordered[next(self._rr) % len(ordered)]

    def dp_rank(self, candidate: WorkerCandidate) -> int:
        """A DP rank of the chosen worker (uniform; KV-aware ranks come with the KV router)."""
        if candidate.dp_size <= 1:
            return candidate.dp_start
        return candidate.dp_start + self._rng.randrange(candidate.dp_size)
