"""KvEventsFeed's ordering rules, driven directly: duplicates, gaps, re-syncs, resets.

The NATS and request-plane halves are exercised end to end in
tests/integration/test_publisher.py; here the snapshot fetch is replaced so each rule is
checked deterministically.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import cast

from proto.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from proto.metrics import KvEventsMessage
from services.processor.kv_events_feed import KvEventsFeed, _Snapshot
from shared.runtime import DistributedRuntime

W = 0x77


def msg(seq: int, worker: int = W, rank: int = 0) -> KvEventsMessage:
    return KvEventsMessage(
        worker_id=worker, dp_rank=rank, seq=seq, ts=0.0, events=[BlockRemoved(block_hashes=[seq])]
    )


def snapshot_events() -> list[BlockStored]:
    return [
        BlockStored(
            block_hashes=[1], parent_block_hash=None, token_ids=[1] * 4, block_size=4, lora_id=None
        )
    ]


class Harness:
    def __init__(self, snapshots: dict[tuple[int, int], _Snapshot] | None = None) -> None:
        runtime = SimpleNamespace(config=SimpleNamespace(namespace="ns"))
        self.seen: list[KvEventsMessage] = []
        self.feed = KvEventsFeed(
            cast(DistributedRuntime, runtime), self.seen.append, resync_interval=0.2
        )
        self.snapshots = snapshots or {}
        self.fetches: list[list[int] | None] = []

        async def fetch(worker_ids: list[int] | None) -> dict[tuple[int, int], _Snapshot]:
            self.fetches.append(worker_ids)
            return {
                k: _Snapshot(s.seq, list(s.events), True)
                for k, s in self.snapshots.items()
                if worker_ids is None or k[0] in worker_ids
            }

        self.feed._fetch = fetch  # type: ignore[method-assign]

    def seqs(self) -> list[int]:
        return [m.seq for m in self.seen]

    async def settle(self) -> None:
        for _ in range(50):
            if not self.feed._tasks:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("re-sync did not finish")


async def test_in_order_batches_apply_and_duplicates_drop() -> None:
    h = Harness()
    await h.feed._sync(None)
    for seq in (0, 1, 1, 2, 0, 3):
        h.feed._on_kv(msg(seq))
    assert h.seqs() == [0, 1, 2, 3]
    assert h.feed.stats.duplicates == 2 and h.feed.last_seq(W, 0) == 3
    # A publisher that restarted replays everything: all duplicates.
    for seq in range(4):
        h.feed._on_kv(msg(seq))
    assert h.seqs() == [0, 1, 2, 3] and h.feed.stats.duplicates == 6


async def test_start_holds_live_batches_until_the_snapshot_is_applied() -> None:
    h = Harness({(W, 0): _Snapshot(5, snapshot_events(), True)})
    h.feed._syncing_all = True
    for seq in (7, 4, 6, 5):  # arrived while the snapshot was being fetched
        h.feed._on_kv(msg(seq))
    assert h.seen == []
    await h.feed._sync(None)
    h.feed._syncing_all = False
    h.feed._release(None)
    snap = h.seen[0]
    assert snap.seq == 5 and snap.events == [AllBlocksCleared(), *snapshot_events()]
    assert h.seqs() == [5, 6, 7]


async def test_a_gap_resyncs_that_worker_and_applies_what_follows() -> None:
    h = Harness()
    await h.feed._sync(None)
    h.feed._on_kv(msg(0))
    h.feed._on_kv(msg(1, worker=0x88))
    h.snapshots[(W, 0)] = _Snapshot(3, snapshot_events(), True)
    h.feed._on_kv(msg(4))  # 1..3 never came
    h.feed._on_kv(msg(5))
    h.feed._on_kv(msg(2, worker=0x88))  # another worker is not held up
    await h.settle()
    assert [W] in h.fetches and [0x88] in h.fetches
    mine = [m for m in h.seen if m.worker_id == W]
    assert [m.seq for m in mine] == [0, 3, 4, 5]
    assert mine[1].events[0] == AllBlocksCleared()  # the snapshot replaced W's state
    assert h.feed.stats.gaps == 2  # W's jump, and 0x88 starting mid-history
    # 0x88 had no snapshot anywhere: its batches are applied from where they start.
    assert [m.seq for m in h.seen if m.worker_id == 0x88] == [1, 2]
    assert h.feed.stats.accepted_gaps == 1


async def test_reset_marker_starts_the_numbering_again() -> None:
    h = Harness()
    await h.feed._sync(None)
    for seq in (0, 1, 2):
        h.feed._on_kv(msg(seq))
    reset = KvEventsMessage(worker_id=W, dp_rank=0, seq=-1, ts=0.0, events=[AllBlocksCleared()])
    h.feed._on_kv(reset)
    h.feed._on_kv(msg(0))
    h.feed._on_kv(msg(1))
    assert h.seqs() == [0, 1, 2, -1, 0, 1] and h.feed.stats.resets == 1


async def test_forget_makes_a_returning_worker_new() -> None:
    h = Harness()
    await h.feed._sync(None)
    h.feed._on_kv(msg(0))
    h.feed._on_kv(msg(1))
    h.feed.forget(W)
    h.feed._on_kv(msg(0))  # its history relayed again
    assert h.seqs() == [0, 1, 0]


async def test_resyncs_of_one_worker_are_spaced() -> None:
    h = Harness({(W, 0): _Snapshot(0, [], True)})
    await h.feed._sync(None)
    loop = asyncio.get_running_loop()
    h.feed._on_kv(msg(2))
    await h.settle()
    first = loop.time()
    h.feed._on_kv(msg(9))
    await h.settle()
    assert loop.time() - first >= 0.15  # resync_interval 0.2, less the settle polling
    assert len(h.fetches) == 3
    # Neither snapshot (seq 0 each time) closed the gap: each gap was re-synced once, then
    # its batch applied as it was.
    assert h.seqs() == [0, 0, 2, 0, 9] and h.feed.stats.accepted_gaps == 2


async def test_an_absurd_sequence_number_is_never_adopted() -> None:
    # A forged batch numbered 3e15 once made the feed drop every real batch as a duplicate.
    h = Harness({(W, 0): _Snapshot(2, snapshot_events(), True)})
    await h.feed._sync(None)
    h.feed._on_kv(msg(3))
    h.snapshots[(W, 0)] = _Snapshot(3, snapshot_events(), True)  # the publisher's view now
    h.feed._on_kv(msg(3 * 10**15))
    await h.settle()
    h.feed._on_kv(msg(4))
    h.feed._on_kv(msg(5))
    assert 3 * 10**15 not in h.seqs()
    assert h.seqs()[-2:] == [4, 5] and h.feed.last_seq(W, 0) == 5
    assert h.feed.stats.absurd == 1 and [W] in h.fetches  # and the worker was re-synced


async def test_an_absurd_first_batch_is_dropped_after_the_snapshot() -> None:
    # Unknown to the feed when it arrives: held, re-synced, then judged against the snapshot.
    h = Harness({(W, 0): _Snapshot(7, snapshot_events(), True)})
    h.feed._syncing_all = True
    h.feed._on_kv(msg(3 * 10**15))
    await h.feed._sync(None)
    h.feed._syncing_all = False
    h.feed._release(None)
    h.feed._on_kv(msg(8))
    assert h.seqs() == [7, 8] and h.feed.stats.absurd == 1
