"""The KV-aware router's cost model, sampling, load accounting and flags
(shared/router/kv_router.py), with real indexes fed real KV events."""

from __future__ import annotations

import argparse
import math
import random
from collections import Counter

import pytest

from proto.kv_events import AllBlocksCleared, BlockStored
from proto.metrics import KvEventsMessage, LoadMetrics
from shared.flags import add_flags, flag_values
from shared.router import (
    KV_ROUTER_FLAGS,
    BusyError,
    KvIndex,
    KvRouter,
    KvRouterConfig,
    LoadTracker,
    RouteDecision,
    WorkerCandidate,
    block_hashes,
    kv_router_config,
)
from shared.router.kv_router import DEFAULT_PREFILL_LOAD_SCALE

BS = 4
PROMPT = list(range(1000, 1040))  # 10 blocks of 4


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def events(worker_id: int, blocks: int, *, dp_rank: int = 0, seq: int = 0) -> KvEventsMessage:
    """``worker_id`` caches the first ``blocks`` blocks of PROMPT (engine ids are arbitrary)."""
    stored = BlockStored(
        block_hashes=[worker_id * 1000 + i for i in range(blocks)],
        parent_block_hash=None,
        token_ids=PROMPT[: blocks * BS],
        block_size=BS,
        lora_id=None,
    )
    return KvEventsMessage(worker_id=worker_id, dp_rank=dp_rank, seq=seq, ts=0.0, events=[stored])


def metrics(worker_id: int, used: int, *, dp_rank: int = 0, total: int = 0) -> LoadMetrics:
    return LoadMetrics(
        worker_id=worker_id, dp_rank=dp_rank, kv_used_blocks=used, kv_total_blocks=total, ts=0.0
    )


W1, W2, W3 = (WorkerCandidate(i, total_kv_blocks=100) for i in (1, 2, 3))


def test_the_reference_cost_example() -> None:
    # Prefill 10 blocks each; overlaps 2/5/8; decode 10/5/9 -> costs 18/10/11 -> worker 2.
    router = KvRouter(rng=random.Random(0))
    for wid, overlap, decode in [(1, 2, 10), (2, 5, 5), (3, 8, 9)]:
        router.apply_events(events(wid, overlap))
        router.update_load(metrics(wid, decode))
    costs = router.costs([W1, W2, W3], PROMPT, block_size=BS)
    assert [(c.overlap_blocks, c.prefill_blocks, c.decode_blocks) for c in costs] == [
        (2, 8, 10),
        (5, 5, 5),
        (8, 2, 9),
    ]
    assert [c.cost for c in costs] == [18, 10, 11]
    assert router.select([W1, W2, W3], PROMPT, block_size=BS) == RouteDecision(2, 0, 5)
    # Precomputed hashes give the same answer.
    hashes = block_hashes(PROMPT, BS)
    decision = router.select([W1, W2, W3], hashes=hashes, prompt_tokens=40, block_size=BS)
    assert decision == (2, 0, 5)


def test_weights_scale_the_terms() -> None:
    config = KvRouterConfig(
        overlap_score_credit=0.5, prefill_load_scale=2.0, decode_active_request_weight=3.0
    )
    router = KvRouter(config)
    router.apply_events(events(1, 4))
    router.update_load(LoadMetrics(worker_id=1, kv_used_blocks=7, num_running=2, ts=0.0))
    [cost] = router.costs([W1], PROMPT, block_size=BS)
    # 2 * (10 - 0.5 * 4) + 7 + 3 * 2
    assert (cost.prefill_blocks, cost.active_requests, cost.cost) == (8, 2, 29)


def test_without_events_routing_is_load_only() -> None:
    router = KvRouter(rng=random.Random(1))
    assert router.prompt_hashes(PROMPT, BS) == []  # nothing indexed: no hashing at all
    picks = []
    for _ in range(8):
        decision = router.select([W1, W2, W3, WorkerCandidate(4)], PROMPT, block_size=BS)
        router.begin(decision, len(PROMPT), BS)  # charged at once, before any metric
        picks.append(decision.instance_id)
    assert Counter(picks) == {1: 2, 2: 2, 3: 2, 4: 2}


def test_kv_events_can_be_turned_off() -> None:
    index = KvIndex()
    index.apply_message(events(3, 10))
    router = KvRouter(KvRouterConfig(use_kv_events=False), index=index, rng=random.Random(2))
    router.apply_events(events(2, 10))  # ignored
    assert index.blocks((2, 0)) == set()
    assert {c.overlap_blocks for c in router.costs([W1, W2, W3], PROMPT, block_size=BS)} == {0}
    assert router.prompt_hashes(PROMPT, BS) == []


def test_only_candidate_ranks_are_matched() -> None:
    router = KvRouter(rng=random.Random(12))
    router.apply_events(events(9, 10))  # another model's worker, or one being drained
    router.apply_events(events(1, 3, dp_rank=1))
    costs = router.costs([W1, W2], PROMPT, block_size=BS)
    assert [(c.instance_id, c.dp_rank, c.overlap_blocks) for c in costs] == [(1, 0, 0), (2, 0, 0)]
    two_ranks = WorkerCandidate(1, dp_size=2)
    assert router.select([two_ranks, W2], PROMPT, block_size=BS) == (1, 1, 3)


def test_ties_are_drawn_at_random() -> None:
    router = KvRouter(rng=random.Random(3))
    router.apply_events(events(1, 3))
    router.apply_events(events(2, 3))
    picks = Counter(router.select([W1, W2, W3], PROMPT, block_size=BS)[0] for _ in range(200))
    assert set(picks) == {1, 2} and min(picks.values()) > 60


def test_temperature_samples_by_softmax_over_normalized_costs() -> None:
    router = KvRouter(KvRouterConfig(temperature=0.5), rng=random.Random(4))
    for wid, overlap in [(1, 10), (2, 5)]:  # costs 0, 5, 10 -> normalized 0, 0.5, 1
        router.apply_events(events(wid, overlap))
    assert [c.cost for c in router.costs([W1, W2, W3], PROMPT, block_size=BS)] == [0, 5, 10]
    n = 20_000
    picks = Counter(router.select([W1, W2, W3], PROMPT, block_size=BS)[0] for _ in range(n))
    weights = [math.exp(-z / 0.5) for z in (0.0, 0.5, 1.0)]
    for wid, weight in zip((1, 2, 3), weights, strict=True):
        expected = weight / sum(weights)
        assert abs(picks[wid] / n - expected) < 0.015, (wid, picks)
    # The temperature is relative to the spread: scaling every cost draws the same picks.
    scaled = KvRouter(
        KvRouterConfig(temperature=0.5, prefill_load_scale=10.0),
        index=router.index,
        rng=random.Random(4),
    )
    assert [c.cost for c in scaled.costs([W1, W2, W3], PROMPT, block_size=BS)] == [0, 50, 100]
    again = KvRouter(KvRouterConfig(temperature=0.5), index=router.index, rng=random.Random(4))
    assert [scaled.select([W1, W2, W3], PROMPT, block_size=BS) for _ in range(200)] == [
        again.select([W1, W2, W3], PROMPT, block_size=BS) for _ in range(200)
    ]


def test_temperature_zero_is_greedy_and_equal_costs_are_uniform() -> None:
    router = KvRouter(KvRouterConfig(temperature=2.0), rng=random.Random(5))
    picks = Counter(router.select([W1, W2], PROMPT, block_size=BS)[0] for _ in range(400))
    assert min(picks.values()) > 150
    greedy = KvRouter(rng=random.Random(5))
    greedy.apply_events(events(2, 1))
    assert {greedy.select([W1, W2], PROMPT, block_size=BS)[0] for _ in range(50)} == {2}


def test_excluded_workers_are_avoided_while_others_remain() -> None:
    router = KvRouter(rng=random.Random(6))
    router.apply_events(events(1, 10))
    assert router.select([W1, W2, W3], PROMPT, block_size=BS, exclude={1}).instance_id in {2, 3}
    assert router.select([W1], PROMPT, block_size=BS, exclude={1}).instance_id == 1
    with pytest.raises(LookupError):
        router.select([], PROMPT, block_size=BS)


def test_busy_ranks_are_skipped_and_all_busy_raises() -> None:
    tracker = LoadTracker()
    router = KvRouter(tracker=tracker, busy_threshold=0.5, rng=random.Random(7))
    router.apply_events(events(1, 10))  # the cache says worker 1...
    router.begin(RouteDecision(1, 0, 0), 51 * BS, BS)  # ...but 51 of its 100 blocks are busy
    assert router.is_busy(W1) and not router.is_busy(W2)
    assert router.select([W1, W2], PROMPT, block_size=BS).instance_id == 2
    router.begin(RouteDecision(2, 0, 0), 60 * BS, BS)
    with pytest.raises(BusyError, match=r"0\.5"):
        router.select([W1, W2], PROMPT, block_size=BS)
    # A reported pool size wins over the registered one; an unknown size is never busy.
    router.update_load(metrics(2, 60, total=1000))
    assert router.select([W1, W2], PROMPT, block_size=BS).instance_id == 2
    assert not router.is_busy(WorkerCandidate(9)) and not KvRouter().is_busy(W1)


def test_dp_ranks_are_routed_and_charged_separately() -> None:
    tracker = LoadTracker()
    router = KvRouter(tracker=tracker, rng=random.Random(8))
    worker = WorkerCandidate(5, dp_size=2, dp_start=2)
    router.apply_events(events(5, 6, dp_rank=3))
    decision = router.select([worker], PROMPT, block_size=BS)
    assert decision == (5, 3, 6)
    active = router.begin(decision, len(PROMPT), BS)
    rank = tracker.rank_loads[(5, 3)]
    # All 10 prompt blocks are held; only the 16 uncached tokens are pending prefill.
    assert (rank.active_requests, rank.active_blocks, rank.active_prefill_tokens) == (1, 10, 16)
    assert tracker.loads[5].active_blocks == 10 and (5, 2) not in tracker.rank_loads
    active.add_tokens(1)  # the first token ends the prefill
    assert rank.active_prefill_tokens == 0 and tracker.loads[5].active_prefill_tokens == 0
    active.add_tokens(3)  # 44 tokens: 11 blocks
    assert rank.active_blocks == 11
    active.finish()
    assert (rank.active_requests, rank.active_blocks, rank.active_prefill_tokens) == (0, 0, 0)
    assert tracker.loads[5].active_requests == 0


def test_pending_prefill_counts_against_a_rank() -> None:
    router = KvRouter(rng=random.Random(9))
    busy = router.begin(RouteDecision(1, 0, 0), 400, BS)  # 100 blocks of prefill pending
    [c1, c2] = router.costs([W1, W2], PROMPT, block_size=BS)
    assert (c1.prefill_blocks, c1.decode_blocks, c1.cost) == (110, 100, 210)
    assert c2.cost == 10
    busy.add_tokens(1)
    assert router.costs([W1], PROMPT, block_size=BS)[0].prefill_blocks == 10


def test_reported_load_is_moved_by_the_routers_own_changes_and_expires() -> None:
    clock = Clock()
    router = KvRouter(KvRouterConfig(metrics_ttl=5.0), clock=clock)
    first = router.begin(RouteDecision(1, 0, 0), 8 * BS, BS)  # tracked: 8 blocks
    router.update_load(metrics(1, 30))  # the engine also serves others: 30 in all
    assert router.costs([W1], hashes=(), block_size=BS)[0].decode_blocks == 30
    second = router.begin(RouteDecision(1, 0, 0), 4 * BS, BS)  # +4 since the report
    assert router.costs([W1], hashes=(), block_size=BS)[0].decode_blocks == 34
    first.finish()  # -8
    assert router.costs([W1], hashes=(), block_size=BS)[0].decode_blocks == 26
    router.update_load(metrics(1, 0))  # a report behind the router: its own count wins
    assert router.costs([W1], hashes=(), block_size=BS)[0].decode_blocks == 4
    router.update_load(metrics(1, 50))
    clock.now += 6  # the report went stale: the router's own count only
    assert router.costs([W1], hashes=(), block_size=BS)[0].decode_blocks == 4
    second.finish()


def test_a_leaving_worker_is_purged() -> None:
    tracker = LoadTracker()
    router = KvRouter(tracker=tracker, rng=random.Random(10))
    router.apply_events(events(1, 10))
    router.apply_events(events(1, 10, dp_rank=1))
    router.apply_events(events(2, 2))
    router.update_load(metrics(1, 90))
    active = router.begin(RouteDecision(1, 1, 10), len(PROMPT), BS)
    router.remove_worker(1)
    assert router.index.workers() == [(2, 0)]
    assert 1 not in tracker.loads and (1, 1) not in tracker.rank_loads
    # Should it come back under the same id, it starts clean.
    costs = router.costs([WorkerCandidate(1, dp_size=2)], PROMPT, block_size=BS)
    assert [(c.overlap_blocks, c.decode_blocks) for c in costs] == [(0, 0), (0, 0)]
    active.finish()  # late: ignored
    assert 1 not in tracker.loads


def test_all_blocks_cleared_and_unknown_parents_leave_no_overlap() -> None:
    router = KvRouter(rng=random.Random(11))
    router.apply_events(events(1, 10))
    router.apply_events(events(2, 10))
    router.apply_events(
        KvEventsMessage(worker_id=1, dp_rank=0, seq=1, ts=0.0, events=[AllBlocksCleared()])
    )
    orphan = BlockStored(
        block_hashes=[77],
        parent_block_hash=12345,  # never stored
        token_ids=PROMPT[:BS],
        block_size=BS,
        lora_id=None,
    )
    router.apply_events(KvEventsMessage(worker_id=3, dp_rank=0, seq=0, ts=0.0, events=[orphan]))
    overlaps = [c.overlap_blocks for c in router.costs([W1, W2, W3], PROMPT, block_size=BS)]
    assert overlaps == [0, 10, 0]
    assert router.index.stats.unknown_parent_events == 1


def test_prompt_arguments_are_checked() -> None:
    router = KvRouter()
    with pytest.raises(TypeError):
        router.select([W1], block_size=BS)
    with pytest.raises(ValueError):
        router.select([W1], PROMPT, block_size=0)
    with pytest.raises(ValueError):
        KvRouterConfig(temperature=-1.0)
    with pytest.raises(ValueError):
        KvRouterConfig(prefill_load_scale=math.inf)


def test_flags_and_their_environment_twins() -> None:
    parser = argparse.ArgumentParser()
    add_flags(parser, KV_ROUTER_FLAGS)
    # The flag's default weighs prefill more than the library's (reference) default.
    assert kv_router_config(flag_values(KV_ROUTER_FLAGS, parser.parse_args([]), {})) == (
        KvRouterConfig(prefill_load_scale=DEFAULT_PREFILL_LOAD_SCALE)
    )
    ns = parser.parse_args(
        ["--no-router-kv-events", "--router-temperature", "0.7", "--router-prefill-load-scale=2"]
    )
    env = {
        "DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT": "0.5",
        "SGLMESH_ROUTER_DECODE_ACTIVE_REQUEST_WEIGHT": "3",
        "DYN_ROUTER_TEMPERATURE": "9",  # the flag wins
    }
    config = kv_router_config(flag_values(KV_ROUTER_FLAGS, ns, env))
    assert config == KvRouterConfig(
        overlap_score_credit=0.5,
        prefill_load_scale=2.0,
        temperature=0.7,
        decode_active_request_weight=3.0,
        use_kv_events=False,
    )
    env_only = flag_values(
        KV_ROUTER_FLAGS, parser.parse_args([]), {"DYN_ROUTER_USE_KV_EVENTS": "0"}
    )
    assert not kv_router_config(env_only).use_kv_events
    with pytest.raises(SystemExit):
        parser.parse_args(["--router-temperature", "-1"])
