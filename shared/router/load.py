"""What the processor itself has in flight on each worker.

The router needs a load figure the moment it decides, and the engines' own metrics arrive
later (and only with a publisher). So every routed request is counted here from the decision
until its stream ends: active requests, and the KV blocks its prompt and output occupy
(``ceil(tokens / block_size)``, grown as tokens stream). When the publisher's load metrics
arrive (issue 6), they are combined with these counts, never replaced by them: a metric is a
snapshot of the past, these counts are the present.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["ActiveRequest", "LoadTracker", "WorkerLoad"]


@dataclass(slots=True)
class WorkerLoad:
    """Load the processor has placed on one worker instance (all its DP ranks)."""

    active_requests: int = 0
    active_blocks: int = 0
    # Prompt tokens of requests that have not produced their first token yet.
    active_prefill_tokens: int = 0
    routed_total: int = 0


@dataclass(slots=True, eq=False)
class ActiveRequest:
    """One request's share of a worker's load; ``finish`` gives it back exactly once."""

    tracker: LoadTracker
    instance_id: int
    block_size: int
    tokens: int
    blocks: int
    prefill_tokens: int
    done: bool = field(default=False)

    def add_tokens(self, count: int) -> None:
        """Count ``count`` generated tokens: the first ones end the prefill phase."""
        if self.done or count <= 0:
            return
        load = self.tracker.loads.get(self.instance_id)
        if load is None:
            return
        if self.prefill_tokens:
            load.active_prefill_tokens -= self.prefill_tokens
            self.prefill_tokens = 0
        self.tokens += count
        blocks = -(-self.tokens // self.block_size)
        load.active_blocks += blocks - self.blocks
        self.blocks = blocks

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        load = self.tracker.loads.get(self.instance_id)
        if load is None:
            return
        load.active_requests -= 1
        load.active_blocks -= self.blocks
        load.active_prefill_tokens -= self.prefill_tokens


class LoadTracker:
    def __init__(self) -> None:
        self.loads: dict[int, WorkerLoad] = {}

    def load(self, instance_id: int) -> WorkerLoad:
        load = self.loads.get(instance_id)
        if load is None:
            load = self.loads[instance_id] = WorkerLoad()
        return load

    def begin(self, instance_id: int, prompt_tokens: int, block_size: int) -> ActiveRequest:
        block_size = max(block_size, 1)
        load = self.load(instance_id)
        blocks = -(-prompt_tokens // block_size)
        load.active_requests += 1
        load.active_blocks += blocks
        load.active_prefill_tokens += prompt_tokens
        load.routed_total += 1
        return ActiveRequest(self, instance_id, block_size, prompt_tokens, blocks, prompt_tokens)

    def forget(self, instance_id: int) -> None:
        """The worker left: its requests are gone (or migrating, and counted elsewhere)."""
        self.loads.pop(instance_id, None)
