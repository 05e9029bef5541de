"""What the processor itself has in flight on each worker.

The router needs a load figure the moment it decides, and the engines' own metrics arrive
later (and only with a publisher). So every routed request is counted here from the decision
until its stream ends: active requests, and the KV blocks its prompt and output occupy
(``ceil(tokens / block_size)``, grown as tokens stream). When the publisher's load metrics
arrive (issue 6), they are combined with these counts, never replaced by them: a metric is a
snapshot of the past, these counts are the present.

Requests begun with a ``dp_rank`` (the KV router places each on one rank) are also counted per
``(instance_id, dp_rank)`` in ``rank_loads``: each DP rank is a scheduler with its own KV pool
and queue, so the KV router compares ranks, not instances. ``loads`` keeps the per-instance
totals either way, so the load-only selectors and the busy check see every request. With
``cached_tokens`` (the prefix the router expects the engine to reuse), only the uncached rest
counts as pending prefill work.

Shared prefixes count once. A request begun with its prompt's block ``hashes`` (chained, so a
hash names a whole prefix) holds a reference on each of those blocks in its worker's table;
a block adds to ``active_blocks`` only while some request references it, as the engine's
radix cache stores it only once. Without this, a worker serving many requests of one popular
prefix looks many times fuller than it is, and the KV router sends that prefix's next
request elsewhere, to a worker that must prefill it again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ActiveRequest", "LoadTracker", "WorkerLoad"]


@dataclass(slots=True)
class WorkerLoad:
    """Load the processor has placed on one worker instance (all its DP ranks)."""

    active_requests: int = 0
    active_blocks: int = 0
    # Prompt tokens (minus the expected cache hit) of requests that have not produced their
    # first token yet.
    active_prefill_tokens: int = 0
    routed_total: int = 0
    # Prompt block hash -> requests in flight that hold it.
    shared: dict[int, int] = field(default_factory=dict)

    def acquire(self, hashes: tuple[int, ...]) -> None:
        shared = self.shared
        for h in hashes:
            count = shared.get(h, 0)
            if not count:
                self.active_blocks += 1
            shared[h] = count + 1

    def release(self, hashes: tuple[int, ...]) -> None:
        shared = self.shared
        for h in hashes:
            count = shared.get(h, 0)
            if count <= 1:
                if count:
                    del shared[h]
                    self.active_blocks -= 1
            else:
                shared[h] = count - 1


@dataclass(slots=True, eq=False)
class ActiveRequest:
    """One request's share of a worker's load; ``finish`` gives it back exactly once."""

    tracker: LoadTracker
    instance_id: int
    block_size: int
    tokens: int
    blocks: int
    prefill_tokens: int
    dp_rank: int | None = None
    # The prompt's full-block hashes, counted through the workers' shared tables; ``blocks``
    # counts only the rest (a partial last prompt block and the output).
    hashes: tuple[int, ...] = ()
    done: bool = field(default=False)

    def _targets(self) -> list[WorkerLoad]:
        # The instance's totals and, for a ranked request, its rank's; either may be gone
        # (``LoadTracker.forget``), and then late updates are dropped.
        tracker = self.tracker
        out = []
        load = tracker.loads.get(self.instance_id)
        if load is not None:
            out.append(load)
        if self.dp_rank is not None:
            rank_load = tracker.rank_loads.get((self.instance_id, self.dp_rank))
            if rank_load is not None:
                out.append(rank_load)
        return out

    def add_tokens(self, count: int) -> None:
        """Count ``count`` generated tokens: the first ones end the prefill phase."""
        if self.done or count <= 0:
            return
        targets = self._targets()
        prefill = self.prefill_tokens
        self.prefill_tokens = 0
        self.tokens += count
        blocks = -(-self.tokens // self.block_size) - len(self.hashes)
        grown = blocks - self.blocks
        self.blocks = blocks
        for load in targets:
            load.active_prefill_tokens -= prefill
            load.active_blocks += grown

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        for load in self._targets():
            load.active_requests -= 1
            load.active_blocks -= self.blocks
            load.active_prefill_tokens -= self.prefill_tokens
            if self.hashes:
                load.release(self.hashes)


class LoadTracker:
    def __init__(self) -> None:
        self.loads: dict[int, WorkerLoad] = {}
        self.rank_loads: dict[tuple[int, int], WorkerLoad] = {}

    def load(self, instance_id: int) -> WorkerLoad:
        load = self.loads.get(instance_id)
        if load is None:
            load = self.loads[instance_id] = WorkerLoad()
        return load

    def rank_load(self, instance_id: int, dp_rank: int) -> WorkerLoad:
        key = (instance_id, dp_rank)
        load = self.rank_loads.get(key)
        if load is None:
            load = self.rank_loads[key] = WorkerLoad()
        return load

    def begin(
        self,
        instance_id: int,
        prompt_tokens: int,
        block_size: int,
        *,
        dp_rank: int | None = None,
        cached_tokens: int = 0,
        hashes: tuple[int, ...] = (),
    ) -> ActiveRequest:
        """Count a request routed to ``instance_id`` (and ``dp_rank``, if given) until its
        ``finish``; ``cached_tokens`` of its prompt are expected to be served from cache."""
        block_size = max(block_size, 1)
        hashes = tuple(hashes[: prompt_tokens // block_size])
        blocks = -(-prompt_tokens // block_size) - len(hashes)
        prefill = max(prompt_tokens - max(cached_tokens, 0), 0)
        targets = [self.load(instance_id)]
        if dp_rank is not None:
            targets.append(self.rank_load(instance_id, dp_rank))
        for load in targets:
            load.active_requests += 1
            load.active_blocks += blocks
            load.active_prefill_tokens += prefill
            load.routed_total += 1
            if hashes:
                load.acquire(hashes)
        return ActiveRequest(
            self, instance_id, block_size, prompt_tokens, blocks, prefill, dp_rank, hashes
        )

    def forget(self, instance_id: int) -> None:
        """The worker left: its requests are gone (or migrating, and counted elsewhere)."""
        self.loads.pop(instance_id, None)
        for key in [k for k in self.rank_loads if k[0] == instance_id]:
            del self.rank_loads[key]
