"""Load tracking and worker selection (shared/router)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from shared.router import BusyError, LoadTracker, RouterMode, Selector, WorkerCandidate
from shared.router.bootstrap import MAX_BOOTSTRAP_ROOM, choose_bootstrap_room

A, B, C = (
    WorkerCandidate(1, total_kv_blocks=100),
    WorkerCandidate(2, total_kv_blocks=100),
    WorkerCandidate(3, total_kv_blocks=100),
)


def test_load_follows_a_request_from_prompt_to_finish() -> None:
    tracker = LoadTracker()
    req = tracker.begin(1, prompt_tokens=33, block_size=16)
    load = tracker.load(1)
    assert (load.active_requests, load.active_blocks, load.active_prefill_tokens) == (1, 3, 33)
    req.add_tokens(1)  # the first token ends the prefill; 34 tokens still fit in 3 blocks
    assert (load.active_blocks, load.active_prefill_tokens) == (3, 0)
    req.add_tokens(15)  # 49 tokens: 4 blocks
    assert load.active_blocks == 4
    req.finish()
    req.finish()  # exactly once
    assert (load.active_requests, load.active_blocks, load.active_prefill_tokens) == (0, 0, 0)
    assert load.routed_total == 1


def test_forgotten_worker_ignores_late_updates() -> None:
    tracker = LoadTracker()
    req = tracker.begin(7, 10, 16)
    tracker.forget(7)
    req.add_tokens(5)
    req.finish()
    assert 7 not in tracker.loads


def test_round_robin_cycles_in_instance_order() -> None:
    sel = Selector(RouterMode.ROUND_ROBIN, LoadTracker())
    picks = [sel.select([C, A, B]).instance_id for _ in range(6)]
    assert picks == [1, 2, 3, 1, 2, 3]


def test_random_spreads() -> None:
    sel = Selector(RouterMode.RANDOM, LoadTracker(), rng=random.Random(1))
    counts = Counter(sel.select([A, B, C]).instance_id for _ in range(300))
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 60


def test_least_loaded_prefers_fewest_requests_then_blocks() -> None:
    tracker = LoadTracker()
    sel = Selector(RouterMode.LEAST_LOADED, tracker, rng=random.Random(0))
    tracker.begin(1, 16, 16)
    tracker.begin(2, 160, 16)
    assert sel.select([A, B, C]).instance_id == 3
    tracker.begin(3, 320, 16)
    # All have one request: fewest blocks wins.
    assert sel.select([A, B, C]).instance_id == 1


def test_excluded_workers_are_avoided_while_others_remain() -> None:
    sel = Selector(RouterMode.ROUND_ROBIN, LoadTracker())
    assert {sel.select([A, B], exclude={1}).instance_id for _ in range(4)} == {2}
    assert sel.select([A], exclude={1}).instance_id == 1  # nothing else: better than failing


def test_busy_workers_are_skipped_and_all_busy_raises() -> None:
    tracker = LoadTracker()
    sel = Selector(RouterMode.ROUND_ROBIN, tracker, busy_threshold=0.5)
    tracker.begin(1, 51 * 16, 16)  # 51 of 100 blocks
    assert not sel.is_busy(B) and sel.is_busy(A)
    assert {sel.select([A, B]).instance_id for _ in range(4)} == {2}
    tracker.begin(2, 60 * 16, 16)
    with pytest.raises(BusyError, match=r"0\.5"):
        sel.select([A, B])
    # Unknown pool size: never busy.
    assert not sel.is_busy(WorkerCandidate(1))


def test_no_candidates() -> None:
    with pytest.raises(LookupError):
        Selector(RouterMode.RANDOM, LoadTracker()).select([])


def test_dp_rank_is_within_the_workers_ranks() -> None:
    sel = Selector(RouterMode.RANDOM, LoadTracker(), rng=random.Random(3))
    ranks = {sel.dp_rank(WorkerCandidate(1, dp_size=4, dp_start=4)) for _ in range(100)}
    assert ranks == {4, 5, 6, 7}
    assert sel.dp_rank(WorkerCandidate(1)) == 0


def test_bootstrap_room_lands_on_the_rank() -> None:
    for _ in range(100):
        room = choose_bootstrap_room(2, 4)
        assert 0 <= room <= MAX_BOOTSTRAP_ROOM and room % 4 == 2


def test_shared_prefix_blocks_count_once() -> None:
    tracker = LoadTracker()
    prefix = (11, 12, 13)
    a = tracker.begin(1, 3 * 16 + 5, 16, dp_rank=0, hashes=prefix)
    b = tracker.begin(1, 3 * 16 + 9, 16, dp_rank=0, hashes=prefix)
    load, rank = tracker.load(1), tracker.rank_load(1, 0)
    # Three shared prefix blocks once, plus each request's partial last block.
    assert load.active_blocks == rank.active_blocks == 3 + 1 + 1
    b.add_tokens(7)  # 3*16 + 16 tokens: still one private block
    assert load.active_blocks == 5
    b.add_tokens(1)  # a second private block
    assert load.active_blocks == 6
    a.finish()
    assert load.active_blocks == 3 + 2 and load.shared == dict.fromkeys(prefix, 1)
    b.finish()
    assert (load.active_blocks, load.shared, rank.active_blocks) == (0, {}, 0)
