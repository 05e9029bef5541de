"""The KV router's block hashes and prefix index (shared/router/hashing.py, kv_index.py).

The property test drives the simulated engine's radix cache (SGLang's exact event stream) and
checks that the index rebuilt from its events holds exactly what the cache holds.
"""

from __future__ import annotations

import random
import struct
import time
from array import array
from collections.abc import Sequence

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from proto.metrics import KvEventsMessage
from shared.engine.cpu.radix import RadixCache, _Node
from shared.router.hashing import ROOT_SEED, block_hashes, iter_block_hashes, namespace_salt
from shared.router.kv_index import KvIndex, WorkerKey

# ----- helpers -----


def ref_hashes(tokens: Sequence[int], block_size: int, seed: int = ROOT_SEED) -> list[int]:
    """The documented algorithm, spelled out with struct: xxh3_64 of each full block as uint32
    little-endian, seeded by the previous block's hash."""
    out = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        block = tokens[start : start + block_size]
        seed = xxhash.xxh3_64_intdigest(struct.pack(f"<{block_size}I", *block), seed)
        out.append(seed)
    return out


def stored(
    engine_hashes: Sequence[int],
    tokens: Sequence[int],
    parent: int | None,
    block_size: int = 2,
    **extra: str | None,
) -> BlockStored:
    return BlockStored(
        block_hashes=list(engine_hashes),
        parent_block_hash=parent,
        token_ids=list(tokens),
        block_size=block_size,
        lora_id=None,
        **extra,
    )


def removed(*engine_hashes: int) -> BlockRemoved:
    return BlockRemoved(block_hashes=list(engine_hashes))


# Three blocks of two tokens: engine hashes 11, 12, 13 (any ids: the index never reads them).
PATH = [1, 2, 3, 4, 5, 6]
MESH = block_hashes(PATH, 2)


# ----- hashing -----


def test_hashes_chain_full_blocks_like_the_reference() -> None:
    tokens = list(range(100, 137))  # 4 full blocks of 8 and a partial one
    assert block_hashes(tokens, 8) == ref_hashes(tokens, 8)
    assert len(block_hashes(tokens, 8)) == 4
    assert block_hashes(tokens[:7], 8) == []
    # Unsigned 64-bit, and a block's hash depends on everything before it.
    assert all(0 <= h < 2**64 for h in block_hashes(tokens, 8))
    assert block_hashes([9, *tokens[1:]], 8)[3] != block_hashes(tokens, 8)[3]


def test_parent_continues_a_chain_and_inputs_agree() -> None:
    tokens = [random.Random(1).randrange(200_000) for _ in range(64)]
    whole = block_hashes(tokens, 4)
    assert block_hashes(tokens[16:], 4, parent=whole[3]) == whole[4:]
    assert block_hashes(array("I", tokens), 4) == whole
    assert block_hashes(tuple(tokens), 4) == whole


def test_lazy_hashes_equal_the_eager_ones() -> None:
    tokens = list(range(5000, 5000 + 16 * 100 + 7))
    for first in (1, 3, 32, 1000):
        for salt in (0, namespace_salt("x")):
            lazy = list(iter_block_hashes(tokens, 16, salt=salt, first_chunk=first))
            assert lazy == block_hashes(tokens, 16, salt=salt)
    assert list(iter_block_hashes(tokens[:15], 16)) == []
    with pytest.raises(ValueError):
        iter_block_hashes(tokens, 0)


def test_salt_separates_namespaces() -> None:
    tokens = list(range(32))
    base = block_hashes(tokens, 16)
    assert namespace_salt() == 0 and block_hashes(tokens, 16, salt=0) == base
    salts = {namespace_salt("a"), namespace_salt(None, "a"), namespace_salt("", None)}
    salts |= {namespace_salt(None, ""), namespace_salt("a", "a")}
    assert len(salts) == 5 and 0 not in salts
    assert block_hashes(tokens, 16, salt=namespace_salt("a"))[0] not in base
    with pytest.raises(ValueError):
        block_hashes(tokens, 16, salt=-1)


def test_wide_and_invalid_tokens() -> None:
    wide = [1, 2, 2**40, 3]
    hashes = block_hashes(wide, 2)
    # The narrow block hashes as usual; the wide one as 0xff + uint64 LE, as SGLang does.
    first = xxhash.xxh3_64_intdigest(struct.pack("<2I", 1, 2), ROOT_SEED)
    second = xxhash.xxh3_64_intdigest(b"\xff" + struct.pack("<2Q", 2**40, 3), first)
    assert hashes == [first, second]
    with pytest.raises(ValueError):
        block_hashes([1, -2], 2)
    with pytest.raises(ValueError):
        block_hashes([1, 2], 0)


def test_hashing_a_128k_prompt_takes_a_few_ms() -> None:
    tokens = [random.Random(2).randrange(150_000) for _ in range(128 * 1024)]
    best = min(_timed(lambda: block_hashes(tokens, 16)) for _ in range(5))
    print(f"128k tokens, 16 per block: {best * 1e3:.2f} ms")
    assert best < 0.05  # ~2 ms on a slow core; generous for loaded CI machines


def _timed(fn: object) -> float:
    assert callable(fn)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# ----- index -----


def test_store_match_and_remove() -> None:
    index = KvIndex()
    assert index.empty and index.find_matches(MESH) == {}
    index.apply(1, 0, [stored([11, 12], PATH[:4], None)])
    index.apply(1, 0, [stored([13], PATH[4:], 12)])  # chained through the parent's engine hash
    index.apply(2, 0, [stored([21], PATH[:2], None)])
    assert index.blocks((1, 0)) == set(MESH)
    assert index.find_matches(MESH) == {(1, 0): 3, (2, 0): 1}
    assert index.find_matches(MESH[:2]) == {(1, 0): 2, (2, 0): 1}
    assert index.find_matches(block_hashes([1, 2, 9, 9], 2)) == {(1, 0): 1, (2, 0): 1}
    assert index.find_matches(MESH, keys=[(2, 0), (7, 0)]) == {(2, 0): 1}
    # A lazy prompt is consumed only while some worker still matches.
    lazy = iter([*MESH, 42, 43])
    assert index.find_matches(lazy) == {(1, 0): 3, (2, 0): 1}
    assert list(lazy) == [43]
    index.apply(1, 0, [removed(13)])
    assert index.find_matches(MESH) == {(1, 0): 2, (2, 0): 1}
    assert index.num_blocks() == 3 and index.num_hashes() == 2
    assert index.stats.stored_blocks == 4 and index.stats.removed_blocks == 1


def test_matching_stops_at_the_first_missing_block() -> None:
    index = KvIndex()
    index.apply(1, 0, [stored([11, 12, 13], PATH, None)])
    # Not how an engine evicts (leaves first), but a lost event could leave such a gap.
    index.apply(1, 0, [removed(12)])
    assert index.find_matches(MESH) == {(1, 0): 1}
    index.apply(2, 0, [stored([11, 12, 13], PATH, None)])
    assert index.find_matches(MESH) == {(1, 0): 1, (2, 0): 3}


def test_unknown_parent_is_skipped_with_its_descendants() -> None:
    index = KvIndex()
    # The store of block 11 was lost: 12 and 13 cannot be placed, and hashing them as a
    # root would claim the prompt [3, 4, 5, 6] is cached.
    index.apply(1, 0, [stored([12], PATH[2:4], 11), stored([13], PATH[4:], 12)])
    assert index.blocks((1, 0)) == set()
    assert index.find_matches(block_hashes(PATH[2:], 2)) == {}
    assert (index.stats.unknown_parent_events, index.stats.unknown_parent_blocks) == (2, 2)
    index.apply(1, 0, [removed(13, 12)])  # their later eviction is ignored, and counted
    assert index.stats.unknown_removes == 2
    index.apply(1, 0, [stored([11, 12], PATH[:4], None)])  # a new root is indexed normally
    assert index.find_matches(MESH) == {(1, 0): 2}


def test_duplicate_stores_and_shared_mesh_hashes() -> None:
    index = KvIndex()
    index.apply(1, 0, [stored([11, 12], PATH[:4], None)])
    index.apply(1, 0, [stored([11, 12], PATH[:4], None)])  # replayed: idempotent
    assert index.stats.duplicate_stores == 2 and index.num_blocks((1, 0)) == 2
    index.apply(1, 0, [removed(11, 12)])
    assert index.empty
    # Two engine hashes for the same content (say, a LoRA namespace the event does not
    # name): the block stays until both are removed.
    index.apply(1, 0, [stored([11], PATH[:2], None), stored([91], PATH[:2], None)])
    index.apply(1, 0, [removed(11)])
    assert index.find_matches(MESH) == {(1, 0): 1}
    index.apply(1, 0, [removed(91)])
    assert index.empty
    # An engine hash re-stored with other content replaces its old mapping.
    index.apply(1, 0, [stored([11], PATH[:2], None), stored([11], [7, 7], None)])
    assert index.blocks((1, 0)) == set(block_hashes([7, 7], 2))


def test_namespaces_media_and_malformed_events() -> None:
    index = KvIndex()
    index.apply(1, 0, [stored([11], PATH[:2], None, lora_name="adapter")])
    assert index.find_matches(MESH) == {}
    assert index.find_matches(block_hashes(PATH, 2, salt=namespace_salt("adapter"))) == {(1, 0): 1}
    index.apply(1, 0, [stored([12], PATH[:2], None, medium="CPU_PINNED")])
    index.apply(1, 0, [BlockRemoved(block_hashes=[11], medium="CPU_PINNED")])
    assert index.stats.other_medium_events == 2 and index.num_blocks((1, 0)) == 1
    index.apply(1, 0, [stored([13, 14], PATH[:3], None)])  # 3 tokens for 2 blocks of 2
    assert index.stats.malformed_events == 1 and index.num_blocks((1, 0)) == 1


def test_all_blocks_cleared_clears_one_worker_key() -> None:
    index = KvIndex()
    for key in [(1, 0), (1, 1), (2, 0)]:
        index.apply(*key, [stored([11, 12, 13], PATH, None)])
    index.apply(1, 1, [AllBlocksCleared()])
    assert index.find_matches(MESH) == {(1, 0): 3, (2, 0): 3}
    assert index.blocks((1, 1)) == set() and index.stats.cleared_workers == 1


def test_a_leaving_worker_is_purged_on_every_rank() -> None:
    index = KvIndex()
    for key in [(1, 0), (1, 1), (2, 0)]:
        index.apply(*key, [stored([11, 12], PATH[:4], None)])
    index.apply(1, 0, [stored([13], PATH[4:], 12)])
    index.remove_worker(1)
    assert index.workers() == [(2, 0)]
    assert index.find_matches(MESH) == {(2, 0): 2}
    assert index.num_hashes() == 2 and index.stats.removed_workers == 2
    # The freed slots are reused by newcomers without inheriting anything.
    index.apply(3, 0, [stored([31], [8, 8], None)])
    index.apply(4, 0, [stored([41], [9, 9], None)])
    assert index.find_matches(MESH) == {(2, 0): 2}
    assert index.find_matches(block_hashes([8, 8], 2)) == {(3, 0): 1}
    index.remove_worker(99)  # unknown: nothing happens


def test_sequence_numbers_are_counted() -> None:
    index = KvIndex()

    def message(seq: int, events: list[KVEvent]) -> KvEventsMessage:
        return KvEventsMessage(worker_id=1, dp_rank=0, seq=seq, ts=0.0, events=events)

    index.apply_message(message(0, [stored([11], PATH[:2], None)]))
    index.apply_message(message(1, [stored([12], PATH[2:4], 11)]))
    index.apply_message(message(5, []))
    index.apply_message(message(5, []))
    assert (index.stats.seq_gaps, index.stats.seq_regressions) == (1, 1)
    assert index.find_matches(MESH) == {(1, 0): 2}
    # A publisher's reset marker (the engine restarted), then its batches from 0 again.
    index.apply_message(message(-1, [AllBlocksCleared()]))
    index.apply_message(message(0, [stored([11], PATH[:2], None)]))
    assert (index.stats.seq_gaps, index.stats.seq_regressions) == (1, 1)
    assert index.find_matches(MESH) == {(1, 0): 1}


# ----- property: the index mirrors the simulated engine's radix caches -----

KEYS: list[WorkerKey] = [(1, 0), (1, 1), (2, 0)]


def cached_paths(cache: RadixCache) -> list[list[int]]:
    """Every node's full token path (root to the node's end) in the cache."""
    paths = []
    stack: list[tuple[_Node, bytes]] = [(cache._root, b"")]
    while stack:
        node, prefix = stack.pop()
        path = prefix + node.tokens
        if node.tokens:
            words = array("I")
            words.frombytes(path)
            paths.append(words.tolist())
        stack.extend((child, path) for child in node.children.values())
    return paths


def expected_blocks(cache: RadixCache) -> set[int]:
    out: set[int] = set()
    for path in cached_paths(cache):
        out.update(block_hashes(path, cache.page_size))
    return out


def insert(cache: RadixCache, tokens: list[int]) -> None:
    """A request's life as the scheduler runs it: match, lock, allocate the rest (evicting),
    insert on finish, free what the tree did not take, unlock."""
    m = cache.match_prefix(tokens)
    cache.lock(m)
    need = len(tokens) // cache.page_size - m.num_pages
    own = cache.alloc(need)
    if own is not None:
        cache.adopt(tokens, [*m.page_ids(), *own], m.num_pages)
    cache.unlock(m)


# Small alphabets and a few stems make prompts share prefixes, split nodes and collide.
token_lists = st.lists(st.integers(0, 3), min_size=0, max_size=32)
no_tokens: st.SearchStrategy[list[int]] = st.just([])
_insert = st.tuples(st.just("insert"), st.sampled_from(KEYS), st.integers(0, 3), token_lists)
_evict = st.tuples(st.just("evict"), st.sampled_from(KEYS), st.integers(1, 8), no_tokens)
# Weighted by repetition: mostly inserts (which evict when the pool is short), rare resets.
operations = st.one_of(
    _insert,
    _insert,
    _insert,
    _evict,
    st.tuples(st.just("flush"), st.sampled_from(KEYS), st.just(0), no_tokens),
    st.tuples(st.just("match"), st.sampled_from(KEYS), st.integers(0, 3), token_lists),
    st.tuples(st.just("reset"), st.sampled_from(KEYS), st.just(0), no_tokens),
)
STEMS = [[], [0, 1, 2, 3, 0, 1], [3, 3, 3, 3], [0, 1, 2, 3, 2, 2, 2, 2]]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    page=st.sampled_from([1, 2, 4]),
    pages=st.lists(st.integers(2, 12), min_size=3, max_size=3),
    ops=st.lists(operations, min_size=20, max_size=80),
)
def test_index_mirrors_the_engine_caches(
    page: int, pages: list[int], ops: list[tuple[str, WorkerKey, int, list[int]]]
) -> None:
    caches = {key: RadixCache(page, n) for key, n in zip(KEYS, pages, strict=True)}
    index = KvIndex()

    def flush(key: WorkerKey) -> None:
        index.apply(*key, caches[key].take_events())
        assert index.blocks(key) == expected_blocks(caches[key])
        assert index.num_blocks(key) == caches[key].cached_pages

    for op, key, arg, tokens in ops:
        cache = caches[key]
        if op == "insert":
            insert(cache, STEMS[arg] + tokens)
        elif op == "evict":
            cache.evict(arg)
        elif op == "reset":
            cache.reset()
        elif op == "flush":
            flush(key)
        else:  # every flushed worker's overlap is what its cache would match
            for k in KEYS:
                flush(k)
            prompt = STEMS[arg] + tokens
            matches = index.find_matches(block_hashes(prompt, page))
            for k in KEYS:
                assert matches.get(k, 0) == caches[k].match_prefix(prompt).num_pages
    for key in KEYS:
        flush(key)
    assert index.stats.unknown_parent_events == 0 and index.stats.unknown_removes == 0

    # Worker 1 leaves: only worker 2's blocks remain, and nothing still names worker 1.
    index.remove_worker(1)
    survivor = expected_blocks(caches[(2, 0)])
    assert index.num_hashes() == len(survivor)
    for path in cached_paths(caches[(1, 0)]) + cached_paths(caches[(1, 1)]):
        assert set(index.find_matches(block_hashes(path, page))) <= {(2, 0)}
