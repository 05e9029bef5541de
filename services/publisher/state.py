"""Every relayed engine's KV cache, as its events describe it: the publisher's state dump.

Why the publisher keeps it: a consumer that starts after the engines (a processor restarted
mid-workload, or scaled out) must not wait for the caches to turn over before it can route
by them. It asks a publisher for this table (``{ns}.publisher.kv_state``), applies it, then
follows the live events from the snapshot's sequence number on.

Per ``(worker_id, dp_rank)`` the table maps each engine block hash to its parent's hash, its
tokens and the attributes its ``BlockStored`` carried (block size, medium, LoRA, cache salt),
plus the last engine batch applied (``seq``). ``BlockStored`` adds, ``BlockRemoved`` drops,
``AllBlocksCleared`` empties. Nothing is interpreted beyond that: a snapshot, applied in order
to an empty cache, gives a consumer exactly what it would have built from every event.

Snapshots come out parents first (a consumer such as the KV index skips a block whose parent
it does not know) and coalesced as SGLang coalesces its own events: a run of blocks chained
parent to child with the same attributes is one ``BlockStored``. A snapshot is split into
parts of at most ``max_part_tokens`` tokens so each response frame stays far below NATS'
payload limit.

Memory: a block costs about 200 bytes (its tokens as ``array('I')``, the dict entries), so a
400k-token pool in 16-token pages is about 5 MB per DP rank.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from proto.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from proto.metrics import KvStateSnapshot

__all__ = ["DEFAULT_PART_TOKENS", "CacheState", "EngineCache", "WorkerKey"]

WorkerKey = tuple[int, int]
"""``(worker_id, dp_rank)``."""

# 16k tokens: under 100 KB of msgpack per part even with 32-bit token ids.
DEFAULT_PART_TOKENS = 16_384


class _Attrs(NamedTuple):
    """What a ``BlockStored`` says about all its blocks besides hashes and tokens."""

    block_size: int
    lora_id: int | None
    medium: str | None
    cache_salt: str | None
    session_id: str | None
    lora_name: str | None


class _Block:
    __slots__ = ("attrs", "parent", "tokens")

    def __init__(self, parent: int | None, tokens: array[int] | list[int], attrs: _Attrs) -> None:
        self.parent = parent
        self.tokens = tokens
        self.attrs = attrs


def _pack(tokens: Sequence[int]) -> array[int] | list[int]:
    try:
        return array("I", tokens)
    except (OverflowError, TypeError):
        return list(tokens)  # ids beyond uint32 (or not ints): kept as they came


def _split(event: BlockStored) -> list[Sequence[int]]:
    """The tokens of each block of a (possibly coalesced) ``BlockStored``."""
    n = len(event.block_hashes)
    tokens = event.token_ids
    size = len(tokens) // n if n and len(tokens) % n == 0 else event.block_size
    return [tokens[i * size : (i + 1) * size] for i in range(n)]


class EngineCache:
    """One scheduler's cache: engine block hash -> block, in the order blocks were stored."""

    __slots__ = ("blocks", "seq")

    def __init__(self) -> None:
        self.blocks: dict[int, _Block] = {}
        # The last engine batch applied; -1 before the first.
        self.seq = -1

    def apply(self, seq: int, events: Iterable[KVEvent]) -> None:
        blocks = self.blocks
        for event in events:
            if isinstance(event, BlockStored):
                attrs = _Attrs(
                    event.block_size,
                    event.lora_id,
                    event.medium,
                    event.cache_salt,
                    event.session_id,
                    event.lora_name,
                )
                parent = event.parent_block_hash
                for block_hash, tokens in zip(event.block_hashes, _split(event), strict=True):
                    blocks[block_hash] = _Block(parent, _pack(tokens), attrs)
                    parent = block_hash
            elif isinstance(event, BlockRemoved):
                for block_hash in event.block_hashes:
                    blocks.pop(block_hash, None)
            elif isinstance(event, AllBlocksCleared):
                blocks.clear()
        self.seq = seq

    def clear(self) -> None:
        self.blocks.clear()
        self.seq = -1

    def _parents_first(self) -> list[int]:
        """Every block hash, each after its parent (when the parent is cached)."""
        blocks = self.blocks
        order: list[int] = []
        placed: set[int] = set()
        for start in blocks:
            if start in placed:
                continue
            chain: list[int] = []
            seen: set[int] = set()
            current: int | None = start
            # Climb to the first ancestor already placed (or uncached); `seen` breaks a cycle
            # that only corrupt events could create.
            while current is not None and current in blocks and current not in placed:
                if current in seen:
                    break
                seen.add(current)
                chain.append(current)
                current = blocks[current].parent
            chain.reverse()
            order.extend(chain)
            placed.update(chain)
        return order

    def snapshot_events(self, max_event_tokens: int = DEFAULT_PART_TOKENS) -> list[BlockStored]:
        """``BlockStored`` events that rebuild this cache, parents first, coalesced."""
        blocks = self.blocks
        out: list[BlockStored] = []
        tail: BlockStored | None = None
        tail_attrs: _Attrs | None = None
        for block_hash in self._parents_first():
            block = blocks[block_hash]
            attrs = block.attrs
            if (
                tail is not None
                and attrs == tail_attrs
                and block.parent == tail.block_hashes[-1]
                and len(tail.token_ids) + len(block.tokens) <= max_event_tokens
            ):
                tail.block_hashes.append(block_hash)
                tail.token_ids.extend(block.tokens)
                continue
            tail = BlockStored(
                block_hashes=[block_hash],
                parent_block_hash=block.parent,
                token_ids=list(block.tokens),
                block_size=attrs.block_size,
                lora_id=attrs.lora_id,
                medium=attrs.medium,
                cache_salt=attrs.cache_salt,
                session_id=attrs.session_id,
                lora_name=attrs.lora_name,
            )
            tail_attrs = attrs
            out.append(tail)
        return out


class CacheState:
    """The caches of every relayed engine, by ``(worker_id, dp_rank)``. Synchronous: the
    relays apply to it and the snapshot handler reads it on one event loop, so a snapshot is
    always a consistent cut at its ``seq``."""

    def __init__(self) -> None:
        self.caches: dict[WorkerKey, EngineCache] = {}

    def cache(self, worker_id: int, dp_rank: int) -> EngineCache:
        key = (worker_id, dp_rank)
        cache = self.caches.get(key)
        if cache is None:
            cache = self.caches[key] = EngineCache()
        return cache

    def apply(self, worker_id: int, dp_rank: int, seq: int, events: Iterable[KVEvent]) -> None:
        self.cache(worker_id, dp_rank).apply(seq, events)

    def reset(self, worker_id: int, dp_rank: int) -> None:
        """The engine restarted: it has nothing cached and numbers its batches from 0."""
        self.cache(worker_id, dp_rank).clear()

    def drop_worker(self, worker_id: int) -> None:
        for key in [k for k in self.caches if k[0] == worker_id]:
            del self.caches[key]

    def block_hashes(self, worker_id: int, dp_rank: int) -> set[int]:
        """The engine block hashes cached on one scheduler (tests, diagnostics)."""
        cache = self.caches.get((worker_id, dp_rank))
        return set(cache.blocks) if cache is not None else set()

    def num_blocks(self) -> int:
        return sum(len(c.blocks) for c in self.caches.values())

    def snapshot(
        self,
        worker_ids: Iterable[int] | None = None,
        *,
        max_part_tokens: int = DEFAULT_PART_TOKENS,
    ) -> list[KvStateSnapshot]:
        """Every wanted (worker, rank)'s cache, in parts (see :class:`KvStateSnapshot`).

        A rank with an empty cache still gets one (empty) part, so a consumer learns that
        it is empty and from which ``seq`` to follow.
        """
        if max_part_tokens < 1:
            raise ValueError(f"max_part_tokens must be >= 1, got {max_part_tokens}")
        wanted = None if worker_ids is None else set(worker_ids)
        out: list[KvStateSnapshot] = []
        for (worker_id, dp_rank), cache in sorted(self.caches.items()):
            if wanted is not None and worker_id not in wanted:
                continue
            parts: list[list[BlockStored]] = [[]]
            tokens = 0
            for event in cache.snapshot_events(max_part_tokens):
                size = len(event.token_ids)
                if parts[-1] and tokens + size > max_part_tokens:
                    parts.append([])
                    tokens = 0
                parts[-1].append(event)
                tokens += size
            for i, events in enumerate(parts):
                out.append(
                    KvStateSnapshot(
                        worker_id=worker_id,
                        dp_rank=dp_rank,
                        seq=cache.seq,
                        events=events,
                        part=i,
                        last=i == len(parts) - 1,
                    )
                )
        return out
