"""Which KV blocks each engine holds, rebuilt from its KV events: the KV router's prefix index.

Keys are worker keys ``(worker_id, dp_rank)``: every DP rank is its own scheduler with its own
radix cache. Blocks are identified by the mesh's chained hash (``shared/router/hashing.py``),
computed from the ``token_ids`` each ``BlockStored`` carries, so a request prompt hashed the
same way can be looked up directly. The engines' own block hashes are kept only per worker, to
find a stored block's parent and to apply ``BlockRemoved``.

Layout, chosen so a lookup costs O(request blocks) whatever the index holds:

- ``owners``: mesh hash -> bitmask of worker *slots* (a small int per worker key). A chained
  hash names a whole prefix, so this flat dict is the prefix tree; testing "which workers
  hold block i" is one dict lookup and one integer AND, with no per-worker Python work.
  :meth:`KvIndex.find_matches` walks the request's hashes ANDing masks and stops when no
  worker is left, recording each worker's depth as its bit drops out;
- per worker: engine hash -> mesh hash. Hash collisions between different workers' engine
  hashes are harmless since the map is per worker. When two engine hashes of one worker map
  to the same mesh hash (a LoRA namespace the salt does not distinguish, or an engine hash
  reused), an extra-reference counter keeps the bit until the last one is removed; such cases
  are rare, so the common case stores nothing beyond the engine map;
- per worker, also the set of mesh hashes it holds. Once a walk is down to one worker (a
  conversation continued where it was cached: the deep part of most long prompts), it
  continues in that set instead of the global map: a table a fraction of the size, whose
  cold lookups miss the CPU cache less (a cold deep walk is ~25% faster; the benchmark
  ``bench/router_decision.py`` measures the whole decision);
- a slot is freed when its worker leaves (after all its bits are cleared) and reused.

Memory: about 200 bytes per indexed block (engine map entry, set entry, a share of the global
map, the ints; measured by tracemalloc with the benchmark's workload), so 16 workers x 100k
blocks take about 330 MB -- the price of applying removals exactly and walking fast.

Correctness choices:

- A ``BlockStored`` whose parent this worker's map does not know (events lost, or history
  from before the router started that no publisher could supply) is *skipped* and counted. Indexing
  it as a root would hash its tokens as if they started the prompt, so a request that begins
  with those tokens would be told they are cached when the real prefix differs: a false hit.
  Skipping only under-reports, which costs at most a cache miss; its descendants are skipped
  in turn (their parent is now unknown too), and new roots are indexed normally, so the
  index recovers as the engine's cache turns over.
- A store of an engine hash already indexed with the same mesh hash is idempotent (counted as
  a duplicate); with a different mesh hash the old mapping is replaced.
- Removing an unknown engine hash is ignored and counted (its store was skipped or lost).
- Only the GPU tier is indexed (``medium`` None or ``"GPU"``): a host-tier copy of a block
  does not spare its prefill the way a device hit does, and mixing tiers under one engine
  hash would let one tier's removal erase the other's store. Other media are counted.
- ``BlockStored.block_size`` is used as is: requests must be hashed with the engine's page
  size (the model card's ``kv_cache_block_size``), otherwise nothing matches (no false hits).
- Sequence numbers (:meth:`KvIndex.apply_message`) are only counted. Ordering is the
  consumer feed's job (``services/processor/kv_events_feed.py``): it drops duplicates, holds
  a worker's batches across a gap while it fetches that worker's state from the publishers, and
  delivers that state as one batch ``[AllBlocksCleared, BlockStored...]`` (parents first),
  which this index applies like any other. A gap nobody can fill has no safe repair here
  short of forgetting the worker, which would under-report far more than the lost events.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import repeat

from proto.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, StorageMedium
from proto.metrics import KvEventsMessage
from shared.router.hashing import block_hashes, namespace_salt

__all__ = ["KvIndex", "KvIndexStats", "WorkerKey"]

WorkerKey = tuple[int, int]
"""``(worker_id, dp_rank)``."""

_INDEXED_MEDIA = (None, StorageMedium.GPU.value)


@dataclass(slots=True)
class KvIndexStats:
    """Counters for metrics and tests; blocks are counted, not events, except where named."""

    stored_blocks: int = 0
    removed_blocks: int = 0
    cleared_workers: int = 0
    removed_workers: int = 0
    # BlockStored events skipped because their parent is unknown, and the blocks they held.
    unknown_parent_events: int = 0
    unknown_parent_blocks: int = 0
    unknown_removes: int = 0
    duplicate_stores: int = 0
    # BlockStored events whose token_ids do not cover their block_hashes.
    malformed_events: int = 0
    other_medium_events: int = 0
    # KvEventsMessage sequence numbers: skipped ahead (events lost), or not increasing.
    seq_gaps: int = 0
    seq_regressions: int = 0


class _Worker:
    __slots__ = ("bit", "dups", "engine", "key", "last_seq", "mesh", "slot")

    def __init__(self, key: WorkerKey, slot: int) -> None:
        self.key = key
        self.slot = slot
        self.bit = 1 << slot
        # Engine block hash -> mesh hash.
        self.engine: dict[int, int] = {}
        # The mesh hashes this worker holds (its bit in ``owners``), for single-worker walks.
        self.mesh: set[int] = set()
        # Mesh hash -> references beyond the first (several engine hashes, one mesh hash).
        self.dups: dict[int, int] = {}
        self.last_seq: int | None = None


class KvIndex:
    """The prefix index over all workers' cached blocks. Synchronous; one event loop owns it."""

    def __init__(self) -> None:
        self._owners: dict[int, int] = {}
        self._workers: dict[WorkerKey, _Worker] = {}
        self._slots: list[_Worker | None] = []
        self._free_slots: list[int] = []
        self.stats = KvIndexStats()

    # ----- events -----

    def apply_message(self, message: KvEventsMessage) -> None:
        """Apply one relayed batch, counting sequence anomalies per worker key (see the module
        doc); ``seq`` -1 is a publisher's reset marker (the engine restarted: its events
        clear the cache, and numbering starts again from 0)."""
        worker = self._worker(message.worker_id, message.dp_rank)
        seq = message.seq
        last = worker.last_seq
        if seq >= 0 and last is not None:
            if seq > last + 1:
                self.stats.seq_gaps += 1
            elif seq <= last:
                self.stats.seq_regressions += 1
        worker.last_seq = seq
        self._apply(worker, message.events)

    def apply(self, worker_id: int, dp_rank: int, events: Iterable[KVEvent]) -> None:
        """Apply one worker key's events, in order."""
        self._apply(self._worker(worker_id, dp_rank), events)

    def _apply(self, worker: _Worker, events: Iterable[KVEvent]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                self._store(worker, event)
            elif isinstance(event, BlockRemoved):
                self._remove(worker, event)
            elif isinstance(event, AllBlocksCleared):
                self._clear(worker)
                self.stats.cleared_workers += 1

    def _store(self, worker: _Worker, event: BlockStored) -> None:
        stats = self.stats
        if event.medium not in _INDEXED_MEDIA:
            stats.other_medium_events += 1
            return
        engine_hashes = event.block_hashes
        size = event.block_size
        if size < 1 or len(event.token_ids) != len(engine_hashes) * size:
            stats.malformed_events += 1
            return
        engine = worker.engine
        if event.parent_block_hash is None:
            mesh = block_hashes(
                event.token_ids, size, salt=namespace_salt(event.lora_name, event.cache_salt)
            )
        else:
            parent = engine.get(event.parent_block_hash)
            if parent is None:
                stats.unknown_parent_events += 1
                stats.unknown_parent_blocks += len(engine_hashes)
                return
            mesh = block_hashes(event.token_ids, size, parent=parent)
        owners = self._owners
        bit = worker.bit
        dups = worker.dups
        held = worker.mesh
        for eh, mh in zip(engine_hashes, mesh, strict=True):
            old = engine.get(eh)
            if old is not None:
                if old == mh:
                    stats.duplicate_stores += 1
                    continue
                self._unref(worker, old)
            engine[eh] = mh
            mask = owners.get(mh, 0)
            if mask & bit:
                dups[mh] = dups.get(mh, 0) + 1
            else:
                owners[mh] = mask | bit
                held.add(mh)
            stats.stored_blocks += 1

    def _remove(self, worker: _Worker, event: BlockRemoved) -> None:
        stats = self.stats
        if event.medium not in _INDEXED_MEDIA:
            stats.other_medium_events += 1
            return
        engine = worker.engine
        for eh in event.block_hashes:
            mh = engine.pop(eh, None)
            if mh is None:
                stats.unknown_removes += 1
            else:
                self._unref(worker, mh)
                stats.removed_blocks += 1

    def _unref(self, worker: _Worker, mh: int) -> None:
        dups = worker.dups
        extra = dups.get(mh)
        if extra:
            if extra == 1:
                del dups[mh]
            else:
                dups[mh] = extra - 1
            return
        worker.mesh.discard(mh)
        owners = self._owners
        mask = owners.get(mh, 0) & ~worker.bit
        if mask:
            owners[mh] = mask
        else:
            owners.pop(mh, None)

    def _clear(self, worker: _Worker) -> None:
        owners = self._owners
        keep = ~worker.bit
        for mh in worker.mesh:
            mask = owners.get(mh)
            if mask is None:
                continue
            mask &= keep
            if mask:
                owners[mh] = mask
            else:
                del owners[mh]
        worker.engine.clear()
        worker.mesh.clear()
        worker.dups.clear()

    # ----- workers -----

    def _worker(self, worker_id: int, dp_rank: int) -> _Worker:
        key = (worker_id, dp_rank)
        worker = self._workers.get(key)
        if worker is None:
            if self._free_slots:
                slot = self._free_slots.pop()
            else:
                slot = len(self._slots)
                self._slots.append(None)
            worker = self._workers[key] = self._slots[slot] = _Worker(key, slot)
        return worker

    def clear_worker(self, worker_id: int, dp_rank: int) -> None:
        """Forget one worker key's blocks (what ``AllBlocksCleared`` does)."""
        worker = self._workers.get((worker_id, dp_rank))
        if worker is not None:
            self._clear(worker)

    def remove_worker(self, worker_id: int) -> None:
        """The worker left discovery: drop all its DP ranks. O(its blocks)."""
        for key in [k for k in self._workers if k[0] == worker_id]:
            worker = self._workers.pop(key)
            self._clear(worker)
            self._slots[worker.slot] = None
            self._free_slots.append(worker.slot)
            self.stats.removed_workers += 1

    def workers(self) -> list[WorkerKey]:
        return list(self._workers)

    # ----- queries -----

    def find_matches(
        self, hashes: Iterable[int], keys: Iterable[WorkerKey] | None = None
    ) -> dict[WorkerKey, int]:
        """Per worker key, how many *leading* blocks of ``hashes`` it holds (only keys with at
        least one). ``keys`` restricts the answer (and the walk) to those workers.

        Cost: one lookup per block until no worker matches any more, plus O(workers) when
        each drops out. ``hashes`` may be lazy (``iter_block_hashes``): it is consumed only as
        far as some worker still matches.
        """
        it = iter(hashes)
        first = next(it, None)
        if first is None:
            return {}
        owners = self._owners
        active = owners.get(first, 0)
        if keys is not None:
            wanted = 0
            workers = self._workers
            for key in keys:
                worker = workers.get(key)
                if worker is not None:
                    wanted |= worker.bit
            active &= wanted
        scores: dict[WorkerKey, int] = {}
        if not active:
            return scores
        depth = 1
        if active & (active - 1):
            # Several workers: AND their masks, one lookup per block (map() looks up in C).
            for found in map(owners.get, it, repeat(0)):
                mask = active & found
                if mask != active:
                    self._score(active ^ mask, depth, scores)
                    active = mask
                    if not active:
                        return scores
                    if not active & (active - 1):
                        depth += 1
                        break
                depth += 1
            else:
                self._score(active, depth, scores)
                return scores
        # One worker left (typically deep in its own conversation): its own set is a fraction
        # of the global map, so a cold walk misses the CPU cache about half as often.
        worker = self._slots[active.bit_length() - 1]
        if worker is None:  # cannot happen: a freed slot's bits are all cleared
            return scores
        for held in map(worker.mesh.__contains__, it):
            if not held:
                break
            depth += 1
        scores[worker.key] = depth
        return scores

    def _score(self, bits: int, depth: int, scores: dict[WorkerKey, int]) -> None:
        slots = self._slots
        while bits:
            low = bits & -bits
            worker = slots[low.bit_length() - 1]
            if worker is not None:
                scores[worker.key] = depth
            bits ^= low

    def blocks(self, key: WorkerKey) -> set[int]:
        """The mesh hashes one worker key holds (a copy: for tests and diagnostics)."""
        worker = self._workers.get(key)
        return set(worker.mesh) if worker is not None else set()

    def num_blocks(self, key: WorkerKey | None = None) -> int:
        """Engine blocks indexed for one worker key, or for all of them."""
        if key is None:
            return sum(len(w.engine) for w in self._workers.values())
        worker = self._workers.get(key)
        return len(worker.engine) if worker is not None else 0

    def num_hashes(self) -> int:
        """Distinct mesh hashes held by any worker (shared prefixes count once)."""
        return len(self._owners)

    @property
    def empty(self) -> bool:
        """Nothing indexed: the router then skips hashing the prompt."""
        return not self._owners
