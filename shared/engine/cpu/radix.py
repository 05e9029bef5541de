"""The CPU engines' KV memory: a paged KV pool and SGLang's radix prefix cache.

Routers and load metrics see an engine's KV cache through SGLang's KV events and token usage,
so the bookkeeping behaves like SGLang 0.5.23's radix cache: which prefixes hit, what eviction
frees, and the exact event stream (block hashes from ``hashing.py``; one ``BlockStored`` per new
radix node, one ``BlockRemoved`` per evicted node, ``AllBlocksCleared`` on reset; consecutive
compatible events coalesced the way SGLang's ``KVCacheEventRecorder`` coalesces its queue;
``medium="GPU"`` as SGLang sets it). Pages are real ids (``0 .. total_pages - 1``): the torch
runner keeps each page's K and V at that index of its pool, and the tree, the requests' page
tables and the KV events all speak of the same pages.

Design, for speed and memory with hundreds of running requests:

- the tree is compressed: a node holds a run of whole pages as one ``bytes`` of uint32-LE
  tokens (also the exact bytes SGLang hashes), its pages' ids, int64 hashes (``array('q')``)
  and chained 32-byte digests (one ``bytes``), so matching is ``bytes.startswith`` in C;
- children are keyed by their first page's bytes;
- tokens may be any int sequence, but ``array('I')`` skips the per-int conversion that
  dominates a warm match of a long prompt (about 7 us instead of 26 us for 2048 tokens);
- eviction follows SGLang: whole least-recently-used unreferenced leaves, a parent becoming a
  leaf in turn; a lazy heap (one entry per leaf, re-keyed when popped stale) keeps it
  O(log n) per evicted node instead of a tree walk;
- like SGLang, a match that ends inside a node splits it so the match can be locked exactly;
  the node object keeps the suffix, so an earlier ``PrefixMatch`` stays valid.

Page ownership (``KvPool``): every page is free, owned by a running request (not in the tree),
or cached (in the tree, possibly shared and locked). A scheduler:

- on admission: ``m = cache.match_prefix(prompt)``; ``cache.lock(m)``; the request's page table
  starts with ``m.page_ids()``, then ``cache.alloc(n)`` pages for the uncached remainder
  (evicting unreferenced tree pages when the pool is short);
- while decoding: ``cache.alloc(1)`` whenever the sequence needs a new page;
- on finish (or to checkpoint a chunked prefill): ``m2 = cache.insert(tokens, page_table)``.
  The tree adopts the request's pages past what it already holds (``m2.new_pages`` of them);
  full pages the tree already held under other ids (a duplicate another request inserted
  meanwhile) stay the request's, to give back with ``cache.pool.free(ids)`` and replace by
  ``m2.page_ids()``; a trailing partial page is never cached. Then ``cache.unlock(m)`` (or lock
  ``m2`` first to keep going, as SGLang's checkpoint does).
"""

from __future__ import annotations

import heapq
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

from proto.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, StorageMedium
from shared.engine.cpu.hashing import DIGEST_SIZE, hash_page_run

__all__ = ["KvPool", "PrefixMatch", "RadixCache"]

_LITTLE = sys.byteorder == "little"


class KvPool:
    """Page ownership: ``free_pages + request_pages + cached_pages == total_pages``.

    ``alloc``/``free`` are the request side and hand out or take back page ids; the tree side
    moves with ``RadixCache.insert`` (request-owned to cached), eviction (cached to free) and
    reset (all cached to free). Free pages are reused most recently freed first.
    """

    __slots__ = ("_cached", "_free", "_requests", "total_pages")

    def __init__(self, total_pages: int) -> None:
        if total_pages < 0:
            raise ValueError("total_pages must be >= 0")
        self.total_pages = total_pages
        # A stack: ``alloc`` pops from the end, so a fresh pool hands out 0, 1, 2, ...
        self._free: list[int] = list(range(total_pages - 1, -1, -1))
        self._requests = 0
        self._cached = 0

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def request_pages(self) -> int:
        """Pages owned by running requests and not (yet) in the tree."""
        return self._requests

    @property
    def cached_pages(self) -> int:
        return self._cached

    def alloc(self, n: int) -> list[int] | None:
        """Give ``n`` free pages to a request; None (nothing taken) if fewer are free."""
        if n < 0:
            raise ValueError("cannot allocate a negative number of pages")
        free = self._free
        if n > len(free):
            return None
        if n == 0:
            return []
        pages = free[-n:]
        del free[-n:]
        pages.reverse()  # ascending on a fresh pool: neighbours in memory
        self._requests += n
        return pages

    def free(self, pages: Sequence[int]) -> None:
        """Return request-owned pages to the free list."""
        n = len(pages)
        if n > self._requests:
            raise ValueError(f"cannot free {n} pages: requests own {self._requests}")
        self._requests -= n
        self._free.extend(pages)

    def _into_tree(self, n: int, *, owned: bool = True) -> list[int] | None:
        """``n`` pages become cached. ``owned``: they were the requests' (their ids are the
        caller's); otherwise (warm-up, tests) they are taken from the free list and returned."""
        if owned:
            if n > self._requests:
                raise ValueError(f"cannot cache {n} pages: requests own {self._requests}")
            self._requests -= n
            self._cached += n
            return None
        if n > len(self._free):
            raise MemoryError(f"no room for {n} new cached pages")
        pages = self._free[-n:] if n else []
        if n:
            del self._free[-n:]
        self._cached += n
        return pages

    def _out_of_tree(self, pages: Sequence[int]) -> None:
        self._cached -= len(pages)
        self._free.extend(pages)


class _Node:
    """A run of whole pages on one radix path (the root holds none)."""

    __slots__ = (
        "access",
        "children",
        "digests",
        "hashes",
        "in_heap",
        "lock_ref",
        "pages",
        "parent",
        "tokens",
    )

    def __init__(
        self,
        parent: _Node | None,
        tokens: bytes,
        pages: list[int],
        hashes: array[int],
        digests: bytes,
        access: int,
    ) -> None:
        self.parent = parent
        self.children: dict[bytes, _Node] = {}
        self.tokens = tokens
        self.pages = pages
        self.hashes = hashes
        self.digests = digests
        self.lock_ref = 0
        self.access = access
        self.in_heap = False


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """A cached prefix: the radix node it ends at and its length in whole pages.

    Returned by ``match_prefix`` (the longest cached prefix) and ``insert`` (the whole inserted
    prefix); pass it to ``lock``/``unlock``. ``new_pages`` is, for ``insert``, how many pages
    the insert added to the tree (0 for a match).
    """

    node: _Node
    num_tokens: int
    num_pages: int
    new_pages: int = 0

    @property
    def last_block_hash(self) -> int | None:
        """Hash of the prefix's last page; None for an empty prefix."""
        return self.node.hashes[-1] if self.num_pages else None

    def page_ids(self) -> list[int]:
        """The ids of the prefix's pages, in order (a walk up the path)."""
        runs: list[list[int]] = []
        node: _Node | None = self.node
        while node is not None and node.pages:
            runs.append(node.pages)
            node = node.parent
        out: list[int] = []
        for run in reversed(runs):
            out.extend(run)
        return out


def _u32le(tokens: Sequence[int], n: int) -> bytes:
    if isinstance(tokens, array) and tokens.typecode == "I":
        # Already uint32: one copy instead of a per-int conversion (4x faster than a list).
        words = tokens[:n] if n < len(tokens) else tokens
    else:
        try:
            words = array("I", tokens[:n])
        except OverflowError:
            raise ValueError("token ids must fit in uint32") from None
    if not _LITTLE:
        words = array("I", words)
        words.byteswap()
    return words.tobytes()


def _token_list(data: bytes) -> list[int]:
    words = array("I")
    words.frombytes(data)
    if not _LITTLE:
        words.byteswap()
    return words.tolist()


class RadixCache:
    """SGLang's radix prefix cache over whole pages, with its KV events and a ``KvPool``.

    Synchronous and single-threaded: the scheduler owns it. ``events=False`` records nothing
    (SGLang without ``--kv-events-config``); ``medium`` is the events' storage medium.
    """

    def __init__(
        self,
        page_size: int,
        total_pages: int,
        *,
        events: bool = True,
        medium: str | None = StorageMedium.GPU.value,
    ) -> None:
        if page_size < 1:
            raise ValueError("page_size must be >= 1")
        self.page_size = page_size
        self.pool = KvPool(total_pages)
        self._page_bytes = 4 * page_size
        self._events_enabled = events
        self._medium = medium
        self._events: list[KVEvent] = []
        self._clock = 0
        self._heap_seq = 0
        self._heap: list[tuple[int, int, _Node]] = []
        self._protected = 0
        self._root = self._new_root()

    # ----- counters -----

    @property
    def total_pages(self) -> int:
        return self.pool.total_pages

    @property
    def cached_pages(self) -> int:
        """Pages in the tree."""
        return self.pool.cached_pages

    @property
    def cached_tokens(self) -> int:
        return self.pool.cached_pages * self.page_size

    @property
    def protected_pages(self) -> int:
        """Tree pages locked by at least one request."""
        return self._protected

    @property
    def evictable_pages(self) -> int:
        """Unlocked tree pages: all of them can be evicted (a locked node locks its path)."""
        return self.pool.cached_pages - self._protected

    @property
    def free_pages(self) -> int:
        return self.pool.free_pages

    @property
    def available_pages(self) -> int:
        """Pages ``alloc`` could hand out now, evicting if needed."""
        return self.pool.free_pages + self.evictable_pages

    # ----- lookup and insertion -----

    def match_prefix(self, tokens: Sequence[int]) -> PrefixMatch:
        """The longest cached prefix of ``tokens`` in whole pages; refreshes its LRU time."""
        n_pages = len(tokens) // self.page_size
        if n_pages == 0:
            return PrefixMatch(self._root, 0, 0)
        data = _u32le(tokens, n_pages * self.page_size)
        node, end = self._walk(data, self._tick())
        pages = end // self._page_bytes
        return PrefixMatch(node, pages * self.page_size, pages)

    def insert(self, tokens: Sequence[int], pages: Sequence[int] | None = None) -> PrefixMatch:
        """Cache the full pages of ``tokens`` (a trailing partial page is ignored).

        ``pages`` is the request's page table for those tokens (at least one id per full page):
        the tree adopts the ids of the pages it does not hold yet, which move from
        request-owned to cached in ``pool``. Without ``pages`` (warm-up, tests) new pages come
        from the free list. Returns the match of the whole inserted prefix, ``new_pages`` =
        pages added to the tree. Records one ``BlockStored`` for the new pages (coalesced with
        the previous event when it chains on).
        """
        n_pages = len(tokens) // self.page_size
        if n_pages == 0:
            return PrefixMatch(self._root, 0, 0)
        if pages is not None and len(pages) < n_pages:
            raise ValueError(f"{n_pages} full pages of tokens but only {len(pages)} page ids")
        data = _u32le(tokens, n_pages * self.page_size)
        now = self._tick()
        node, end = self._walk(data, now)
        if end == len(data):
            return PrefixMatch(node, n_pages * self.page_size, n_pages)

        rest = data[end:]
        new_pages = len(rest) // self._page_bytes
        if pages is None:
            ids = self.pool._into_tree(new_pages, owned=False)
            assert ids is not None
        else:
            ids = list(pages[n_pages - new_pages : n_pages])
            self.pool._into_tree(new_pages)
        is_root = node is self._root
        parent_digest = None if is_root else node.digests[-DIGEST_SIZE:]
        digests, hashes = hash_page_run(parent_digest, rest, self._page_bytes)
        leaf = _Node(node, rest, ids, hashes, digests, now)
        node.children[rest[: self._page_bytes]] = leaf
        self._push(leaf)
        if self._events_enabled:
            self._record_store(None if is_root else node.hashes[-1], leaf)
        return PrefixMatch(leaf, n_pages * self.page_size, n_pages, new_pages)

    def adopt(self, tokens: Sequence[int], table: list[int], held: int) -> PrefixMatch:
        """Cache a request's full pages: ``insert(tokens, table)``, then give back the
        request's copies of pages the tree already held and point ``table`` at the tree's.

        ``table`` is the request's page table (updated in place); its first ``held`` pages are
        already the tree's (the request's locked match). The request keeps ownership of the
        pages past the inserted prefix (a partial last page, room to grow).
        """
        done = self.insert(tokens, table)
        dup = done.num_pages - held - done.new_pages
        if dup > 0:
            self.pool.free(table[held : held + dup])
            table[: done.num_pages] = done.page_ids()
        return done

    def _walk(self, data: bytes, now: int) -> tuple[_Node, int]:
        """Follow ``data`` down the tree, splitting the node a partial match ends in.

        Returns the deepest node fully matched and the matched byte length.
        """
        pb = self._page_bytes
        node = self._root
        node.access = now
        off = 0
        end = len(data)
        while off < end:
            child = node.children.get(data[off : off + pb])
            if child is None:
                break
            child.access = now
            ctoks = child.tokens
            if data.startswith(ctoks, off):
                node = child
                off += len(ctoks)
                continue
            # The first page matched; binary search the longest run of equal pages.
            lo = 1
            hi = min(len(ctoks), end - off) // pb
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if data.startswith(ctoks[: mid * pb], off):
                    lo = mid
                else:
                    hi = mid - 1
            node = self._split(child, lo)
            off += lo * pb
            break
        return node, off

    def _split(self, child: _Node, pages: int) -> _Node:
        """Cut ``child`` after ``pages`` pages; the new node is the prefix, ``child`` keeps
        the suffix (so matches that end at ``child`` keep their meaning)."""
        cut = pages * self._page_bytes
        parent = child.parent
        assert parent is not None
        ctoks = child.tokens
        prefix = _Node(
            parent,
            ctoks[:cut],
            child.pages[:pages],
            child.hashes[:pages],
            child.digests[: pages * DIGEST_SIZE],
            child.access,
        )
        prefix.lock_ref = child.lock_ref
        parent.children[ctoks[: self._page_bytes]] = prefix
        child.tokens = ctoks[cut:]
        child.pages = child.pages[pages:]
        child.hashes = child.hashes[pages:]
        child.digests = child.digests[pages * DIGEST_SIZE :]
        child.parent = prefix
        prefix.children[child.tokens[: self._page_bytes]] = child
        return prefix

    # ----- reference counts -----

    def lock(self, match: PrefixMatch) -> None:
        """Protect the match's path from eviction (reference counted)."""
        node = match.node
        root = self._root
        self._check_cached(node)
        while node is not root:
            if node.lock_ref == 0:
                self._protected += len(node.hashes)
            node.lock_ref += 1
            parent = node.parent
            assert parent is not None
            node = parent

    def unlock(self, match: PrefixMatch) -> None:
        """Undo one ``lock`` of the same match."""
        node = match.node
        root = self._root
        self._check_cached(node)
        while node is not root:
            if node.lock_ref <= 0:
                raise ValueError("unlock without a matching lock")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._protected -= len(node.hashes)
                if not node.children:
                    self._push(node)
            parent = node.parent
            assert parent is not None
            node = parent

    # ----- eviction and allocation -----

    def evict(self, num_pages: int) -> int:
        """Evict least-recently-used unlocked leaves (whole nodes, as SGLang does) until at
        least ``num_pages`` pages are freed or nothing is evictable; returns pages freed."""
        freed = 0
        heap = self._heap
        pb = self._page_bytes
        root = self._root
        while freed < num_pages and heap:
            access, _, node = heapq.heappop(heap)
            node.in_heap = False
            parent = node.parent
            if parent is None or node.children or node.lock_ref:
                continue  # evicted, inner or locked now; re-pushed when it qualifies again
            if access != node.access:
                self._push(node)  # touched since it was pushed: re-key
                continue
            del parent.children[node.tokens[:pb]]
            node.parent = None
            freed += len(node.pages)
            self.pool._out_of_tree(node.pages)
            if self._events_enabled:
                self._enqueue(BlockRemoved(block_hashes=node.hashes.tolist(), medium=self._medium))
            if parent is not root and not parent.children and not parent.lock_ref:
                self._push(parent)
        return freed

    def alloc(self, num_pages: int) -> list[int] | None:
        """``pool.alloc``, evicting unlocked tree pages first when the pool is short.

        Returns None (and allocates nothing) if free plus evictable pages do not suffice;
        in that case nothing is evicted either.
        """
        short = num_pages - self.pool.free_pages
        if short > 0:
            if short > self.evictable_pages:
                return None
            self.evict(short)
        return self.pool.alloc(num_pages)

    def reset(self) -> None:
        """Drop the whole tree (SGLang's flush_cache: the caller makes sure nothing runs)."""
        stack = [self._root]
        while stack:
            node = stack.pop()
            self.pool._out_of_tree(node.pages)
            stack.extend(node.children.values())
        self._root = self._new_root()
        self._heap = []
        self._protected = 0
        if self._events_enabled:
            self._enqueue(AllBlocksCleared())

    # ----- events -----

    @property
    def has_events(self) -> bool:
        """Whether events wait for :meth:`take_events`."""
        return bool(self._events)

    def take_events(self) -> list[KVEvent]:
        """The events recorded since the last call (one scheduler step's batch)."""
        events = self._events
        self._events = []
        return events

    def block_hashes(self) -> set[int]:
        """Every page hash in the tree (a walk: for tests and diagnostics)."""
        out: set[int] = set()
        stack = [self._root]
        while stack:
            node = stack.pop()
            out.update(node.hashes)
            stack.extend(node.children.values())
        return out

    def pages(self) -> list[tuple[int, int | None, list[int]]]:
        """Every cached page as ``(block hash, parent block hash, token ids)``, parents before
        children (a walk: for introspection and tests)."""
        out: list[tuple[int, int | None, list[int]]] = []
        pb = self._page_bytes
        stack: list[tuple[_Node, int | None]] = [(self._root, None)]
        while stack:
            node, parent = stack.pop()
            for i, block_hash in enumerate(node.hashes):
                out.append((block_hash, parent, _token_list(node.tokens[i * pb : (i + 1) * pb])))
                parent = block_hash
            stack.extend((child, parent) for child in node.children.values())
        return out

    def _record_store(self, parent_hash: int | None, leaf: _Node) -> None:
        self._enqueue(
            BlockStored(
                block_hashes=leaf.hashes.tolist(),
                parent_block_hash=parent_hash,
                token_ids=_token_list(leaf.tokens),
                block_size=self.page_size,
                lora_id=None,
                medium=self._medium,
            )
        )

    def _enqueue(self, event: KVEvent) -> None:
        # SGLang's recorder merges an event into the queue tail when it continues it: removals
        # of the same medium, or a store whose parent is the tail store's last block.
        if self._events:
            tail = self._events[-1]
            if isinstance(event, BlockRemoved) and isinstance(tail, BlockRemoved):
                if tail.medium == event.medium:
                    tail.block_hashes.extend(event.block_hashes)
                    return
            elif (
                isinstance(event, BlockStored)
                and isinstance(tail, BlockStored)
                and tail.block_hashes
                and event.parent_block_hash == tail.block_hashes[-1]
                and tail.medium == event.medium
                and tail.lora_id == event.lora_id
                and tail.block_size == event.block_size
                and tail.cache_salt == event.cache_salt
                and tail.session_id == event.session_id
                and tail.lora_name == event.lora_name
            ):
                tail.block_hashes.extend(event.block_hashes)
                tail.token_ids.extend(event.token_ids)
                return
        self._events.append(event)

    # ----- internals -----

    def _tick(self) -> int:
        # A logical clock rather than wall time: deterministic LRU order, no ties in a step.
        self._clock += 1
        return self._clock

    def _check_cached(self, node: _Node) -> None:
        # Checked before touching any count, so a stale match (evicted, or from before a
        # reset) fails cleanly.
        top = node
        while top.parent is not None:
            top = top.parent
        if top is not self._root:
            raise ValueError("the matched prefix is no longer cached")

    def _push(self, node: _Node) -> None:
        if not node.in_heap:
            node.in_heap = True
            self._heap_seq += 1
            heapq.heappush(self._heap, (node.access, self._heap_seq, node))

    def _new_root(self) -> _Node:
        root = _Node(None, b"", [], array("q"), b"", 0)
        root.lock_ref = 1
        return root
