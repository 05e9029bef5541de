"""The publisher's cache table: events in, the engine's cache out, and snapshots that rebuild it."""

from __future__ import annotations

import random

import msgspec
import pytest

from proto.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from proto.metrics import KvStateSnapshot
from services.publisher.state import CacheState, EngineCache
from shared.engine.cpu.radix import RadixCache
from shared.router.hashing import block_hashes
from shared.router.kv_index import KvIndex

PAGE = 4


def store(hashes: list[int], parent: int | None, tokens: list[int], **extra: object) -> BlockStored:
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=tokens,
        block_size=PAGE,
        lora_id=None,
        medium="GPU",
        **extra,  # type: ignore[arg-type]
    )


def rebuilt(events: list[BlockStored]) -> EngineCache:
    cache = EngineCache()
    cache.apply(0, events)
    return cache


def contents(cache: EngineCache) -> dict[int, tuple[int | None, list[int]]]:
    return {h: (b.parent, list(b.tokens)) for h, b in cache.blocks.items()}


def random_workload(seed: int, steps: int = 300) -> tuple[RadixCache, list[list[KVEvent]]]:
    """A real radix cache under inserts, evictions and a flush; its events per step."""
    rng = random.Random(seed)
    cache = RadixCache(PAGE, total_pages=48)
    prefixes = [[rng.randrange(1, 500) for _ in range(rng.randrange(4, 24))] for _ in range(6)]
    batches: list[list[KVEvent]] = []
    for step in range(steps):
        prompt = rng.choice(prefixes) + [rng.randrange(1, 500) for _ in range(rng.randrange(0, 20))]
        match = cache.match_prefix(prompt)
        cache.lock(match)
        own = cache.alloc(len(prompt) // PAGE - match.num_pages)  # evicts LRU pages when short
        if own is not None:
            cache.adopt(prompt, [*match.page_ids(), *own], match.num_pages)
        cache.unlock(match)
        if step == steps // 2:
            cache.reset()
        batches.append(cache.take_events())
    return cache, [b for b in batches if b]


def test_stores_removes_and_clears_track_the_cache() -> None:
    cache = EngineCache()
    cache.apply(0, [store([1, 2], None, list(range(8)))])
    cache.apply(1, [store([3], 2, [8, 9, 10, 11]), store([4], 1, [20, 21, 22, 23])])
    assert contents(cache) == {
        1: (None, [0, 1, 2, 3]),
        2: (1, [4, 5, 6, 7]),
        3: (2, [8, 9, 10, 11]),
        4: (1, [20, 21, 22, 23]),
    }
    assert cache.seq == 1
    cache.apply(2, [BlockRemoved(block_hashes=[3, 4])])
    assert set(cache.blocks) == {1, 2}
    cache.apply(3, [AllBlocksCleared(), store([5], None, [1, 1, 1, 1])])
    assert set(cache.blocks) == {5} and cache.seq == 3


def test_snapshot_puts_parents_first_and_coalesces_chains() -> None:
    cache = EngineCache()
    # Stored out of order: a child is re-stored after its parent was re-stored.
    cache.apply(0, [store([1, 2, 3], None, list(range(12)))])
    cache.apply(1, [store([10], 3, [7] * 4), BlockRemoved(block_hashes=[10])])
    cache.apply(2, [store([11], 3, [8] * 4), store([12], 2, [9] * 4)])
    cache.blocks[1] = cache.blocks.pop(1)  # the root now comes last in insertion order
    events = cache.snapshot_events()
    seen: set[int] = set()
    for event in events:
        assert event.parent_block_hash is None or event.parent_block_hash in seen
        seen.update(event.block_hashes)
        assert len(event.token_ids) == len(event.block_hashes) * PAGE
    assert seen == {1, 2, 3, 11, 12}
    assert [e.block_hashes for e in events] == [[1, 2, 3, 11], [12]]
    assert contents(rebuilt(events)) == contents(cache)


def test_attributes_survive_and_split_runs() -> None:
    cache = EngineCache()
    cache.apply(0, [store([1], None, [1] * 4), store([2], 1, [2] * 4, lora_name="a")])
    events = cache.snapshot_events()
    assert [(e.block_hashes, e.lora_name) for e in events] == [([1], None), ([2], "a")]


def test_parts_are_bounded_and_reassemble() -> None:
    state = CacheState()
    tokens = list(range(4 * 50))
    state.apply(7, 0, 41, [store(list(range(100, 150)), None, tokens)])
    state.apply(7, 1, 3, [])
    state.apply(8, 0, 5, [store([1], None, [0] * 4)])
    parts = state.snapshot([7], max_part_tokens=32)
    rank0 = [p for p in parts if p.dp_rank == 0]
    assert [p.part for p in rank0] == list(range(len(rank0))) and len(rank0) == 7
    assert [p.last for p in rank0] == [False] * 6 + [True]
    assert all(sum(len(e.token_ids) for e in p.events) <= 32 for p in rank0)
    assert {p.seq for p in rank0} == {41}
    events = [e for p in rank0 for e in p.events]
    assert contents(rebuilt(events)) == contents(state.caches[(7, 0)])
    # An empty rank still answers, so a consumer knows where to follow from.
    (empty,) = [p for p in parts if p.dp_rank == 1]
    assert (empty.seq, empty.events, empty.last) == (3, [], True)
    assert {p.worker_id for p in state.snapshot()} == {7, 8}
    # Every part encodes as the wire struct.
    for part in parts:
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(part), type=KvStateSnapshot) == part


def test_orphans_and_cycles_do_not_break_a_snapshot() -> None:
    cache = EngineCache()
    cache.apply(0, [store([5], 99, [1] * 4), store([6], 7, [2] * 4), store([7], 6, [3] * 4)])
    events = cache.snapshot_events()
    assert {h for e in events for h in e.block_hashes} == {5, 6, 7}


def test_reset_and_drop() -> None:
    state = CacheState()
    state.apply(1, 0, 4, [store([1], None, [1] * 4)])
    state.apply(1, 1, 2, [store([2], None, [1] * 4)])
    state.apply(2, 0, 9, [store([3], None, [1] * 4)])
    state.reset(1, 0)
    assert state.block_hashes(1, 0) == set() and state.caches[(1, 0)].seq == -1
    state.drop_worker(1)
    assert set(state.caches) == {(2, 0)} and state.num_blocks() == 1


@pytest.mark.parametrize("seed", range(5))
def test_a_random_workload_rebuilds_the_engine_cache_and_its_index(seed: int) -> None:
    radix, batches = random_workload(seed)
    assert any(isinstance(e, BlockRemoved) for b in batches for e in b)
    state = CacheState()
    live = KvIndex()
    for seq, events in enumerate(batches):
        state.apply(1, 0, seq, events)
        live.apply(1, 0, events)
    assert state.block_hashes(1, 0) == radix.block_hashes()
    # What the table says matches the radix tree page by page.
    pages = {h: (p, tokens) for h, p, tokens in radix.pages()}
    assert contents(state.caches[(1, 0)]) == pages
    # A consumer that starts from the snapshot indexes exactly what one that saw every event
    # indexes, and that is the engine's cache hashed the router's way.
    late = KvIndex()
    for part in state.snapshot(max_part_tokens=16):
        late.apply(part.worker_id, part.dp_rank, part.events)
    expected: dict[int, int] = {}
    for h, parent, tokens in radix.pages():
        chain = None if parent is None else expected[parent]
        (expected[h],) = block_hashes(tokens, PAGE, parent=chain)
    assert late.blocks((1, 0)) == live.blocks((1, 0)) == set(expected.values())
