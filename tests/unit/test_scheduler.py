"""The CPU scheduler driven directly with the simulated runner: batching, chunked prefill,
prefix reuse, finish conditions, retraction, determinism, pause/flush, timing and load metrics.

Everything runs with ``speedup_ratio=0`` (no sleeping) unless timing is the point.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

import pytest

from proto.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from proto.metrics import KvMetrics
from shared.engine.cpu.output import OutputChannel
from shared.engine.cpu.request import Req, SamplingParams
from shared.engine.cpu.scheduler import Scheduler, SchedulerConfig
from shared.engine.sim.cost import CostModel
from shared.engine.sim.runner import SimRunner
from shared.engine.sim.tokens import Vocabulary

VOCAB = Vocabulary(ordinary=tuple(range(100, 600)), eos_token_ids=(2,))


class EventSink:
    def __init__(self) -> None:
        self.batches: list[list[KVEvent]] = []

    def publish(self, events: list[KVEvent]) -> None:
        self.batches.append(list(events))

    @property
    def events(self) -> list[KVEvent]:
        return [e for batch in self.batches for e in batch]


class MetricsSink:
    def __init__(self) -> None:
        self.reports: list[KvMetrics] = []

    def publish(self, metrics: KvMetrics) -> None:
        self.reports.append(metrics)


def make_scheduler(**overrides: Any) -> tuple[Scheduler, EventSink, MetricsSink]:
    events = EventSink()
    metrics = MetricsSink()
    runner = SimRunner(
        VOCAB,
        speedup_ratio=overrides.pop("speedup_ratio", 0.0),
        cost=overrides.pop("cost", None),
        output_len_mean=overrides.pop("output_len_mean", 0.0),
    )
    # Publication on every step unless a test is about coalescing it.
    cfg: dict[str, Any] = {"page_size": 16, "max_total_tokens": 65536, "publish_interval": 0.0}
    cfg.update(overrides)
    sched = Scheduler(SchedulerConfig(**cfg), runner, event_sink=events, metrics_sink=metrics)
    sched.start()
    return sched, events, metrics


def make_request(
    rid: str,
    prompt: list[int],
    *,
    max_new_tokens: int = 16,
    min_new_tokens: int = 0,
    ignore_eos: bool = False,
    stop: Iterable[int] = (),
    seed: int = 0,
    return_logprob: bool = False,
    top_logprobs_num: int = 0,
) -> Req:
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        seed=seed,
        stop_token_ids=frozenset(stop) | frozenset(VOCAB.eos_token_ids),
        ignore_eos=ignore_eos,
    )
    return Req(
        rid=rid,
        input_ids=prompt,
        sampling=sampling,
        return_logprob=return_logprob,
        top_logprobs_num=top_logprobs_num,
    )


async def collect(channel: OutputChannel) -> tuple[list[int], dict[str, Any], int]:
    """(output ids, final meta_info, number of items)."""
    ids: list[int] = []
    meta: dict[str, Any] = {}
    items = 0
    async for item in channel:
        assert set(item) == {"text", "output_ids", "index", "meta_info"}
        ids.extend(item["output_ids"])
        meta = item["meta_info"]
        items += 1
    return ids, meta, items


def prompt(n: int, start: int = 1000) -> list[int]:
    return list(range(start, start + n))


async def run_all(sched: Scheduler, reqs: list[Req]) -> list[tuple[list[int], dict[str, Any]]]:
    for req in reqs:
        sched.submit(req)
    results = await asyncio.gather(*(collect(r.channel) for r in reqs))
    return [(ids, meta) for ids, meta, _ in results]


def check_pool(sched: Scheduler) -> None:
    pool = sched.cache.pool
    assert pool.free_pages + pool.request_pages + pool.cached_pages == pool.total_pages
    if sched.is_idle:
        assert pool.request_pages == 0
        assert sched.cache.protected_pages == 0


async def test_stream_shape_and_length_finish() -> None:
    sched, _, _ = make_scheduler()
    req = make_request("a", prompt(40), max_new_tokens=5)
    sched.submit(req)
    items = [item async for item in req.channel]
    assert [len(i["output_ids"]) for i in items] == [1] * 5
    for n, item in enumerate(items, 1):
        meta = item["meta_info"]
        assert item["text"] == "" and item["index"] == 0
        assert meta["id"] == "a" and meta["prompt_tokens"] == 40
        assert meta["completion_tokens"] == n and meta["cached_tokens"] == 0
        assert meta["finish_reason"] == (None if n < 5 else {"type": "length", "length": 5})
    assert all(100 <= t < 600 for i in items for t in i["output_ids"])
    check_pool(sched)
    await sched.close()


async def test_continuous_batching_respects_max_running() -> None:
    sched, _, _ = make_scheduler(max_running_requests=4)
    reqs = [make_request(f"r{i}", prompt(20, 1000 + 50 * i), max_new_tokens=8) for i in range(10)]
    results = await run_all(sched, reqs)
    assert all(len(ids) == 8 for ids, _ in results)
    assert sched.stats.max_running == 4
    # Continuous batching: later requests join as earlier ones finish, so far fewer steps than
    # running the 10 one after another (10 x 8) or in rigid waves of 4 with idle slots.
    assert sched.stats.steps < 10 * 8 / 2
    check_pool(sched)
    await sched.close()


async def test_chunked_prefill_splits_long_prompts() -> None:
    sched, _, _ = make_scheduler(chunked_prefill_size=64, max_prefill_tokens=1000)
    req = make_request("long", prompt(300), max_new_tokens=1)
    await run_all(sched, [req])
    assert sched.stats.prefill_steps == 5  # ceil(300 / 64)
    assert sched.stats.prefill_tokens == 300

    # max_prefill_tokens bounds a step too.
    sched2, _, _ = make_scheduler(chunked_prefill_size=8192, max_prefill_tokens=100)
    await run_all(sched2, [make_request("long", prompt(300), max_new_tokens=1)])
    assert sched2.stats.prefill_steps == 3
    await sched.close()
    await sched2.close()


async def test_chunked_prefill_runs_alongside_decode() -> None:
    sched, _, _ = make_scheduler(chunked_prefill_size=32)
    short = make_request("short", prompt(10), max_new_tokens=20, ignore_eos=True)
    long = make_request("long", prompt(320, 5000), max_new_tokens=1)
    sched.submit(short)
    await asyncio.sleep(0)
    sched.submit(long)
    (ids_s, _), (ids_l, _) = await asyncio.gather(
        *(asyncio.ensure_future(_pair(r)) for r in (short, long))
    )
    assert len(ids_s) == 20 and len(ids_l) == 1
    # The long prompt's 10 chunks ran in steps that also decoded the short request.
    assert sched.stats.steps < 10 + 20
    await sched.close()


async def _pair(req: Req) -> tuple[list[int], dict[str, Any]]:
    ids, meta, _ = await collect(req.channel)
    return ids, meta


async def test_shared_prefix_is_cached_and_cheaper() -> None:
    cost = CostModel()
    sched, events, _ = make_scheduler(page_size=16, cost=cost)
    shared = prompt(512, 7000)
    # One output token: the whole request is its prefill step.
    first = make_request("first", [*shared, *prompt(37, 20000)], max_new_tokens=1)
    await run_all(sched, [first])
    first_s = sched.stats.forward_seconds
    second = make_request("second", [*shared, *prompt(37, 30000)], max_new_tokens=1)
    [(_, meta)] = await run_all(sched, [second])
    second_s = sched.stats.forward_seconds - first_s
    assert meta["cached_tokens"] >= 512 - 16
    assert first.cached_tokens == 0
    # The cost model charged the second prefill only for its uncached tokens.
    assert first_s == pytest.approx(cost.prefill_time(549, 549))
    uncached = 549 - meta["cached_tokens"]
    assert second_s == pytest.approx(cost.prefill_time(uncached, 549))
    assert second_s < first_s / 4
    stored = [e for e in events.events if isinstance(e, BlockStored)]
    assert sum(len(e.block_hashes) for e in stored) == len(sched.cache.block_hashes())
    check_pool(sched)
    await sched.close()


async def test_identical_prompt_never_fully_cached() -> None:
    sched, _, _ = make_scheduler(page_size=16)
    p = prompt(64)
    await run_all(sched, [make_request("a", p, max_new_tokens=2)])
    [(_, meta)] = await run_all(sched, [make_request("b", p, max_new_tokens=2)])
    # 64 tokens are 4 whole cached pages, but one token must be computed: 3 pages hit.
    assert meta["cached_tokens"] == 48
    await sched.close()


async def test_eos_min_new_tokens_and_ignore_eos() -> None:
    sched3, _, _ = make_scheduler(output_len_mean=3)
    sched, _, _ = make_scheduler(output_len_mean=1)
    p = prompt(30)
    early = make_request("early", p, max_new_tokens=500)
    floor = make_request("floor", p, max_new_tokens=500, min_new_tokens=12)
    ignored = make_request("ign", p, max_new_tokens=40, ignore_eos=True)
    [(ids_e, meta_e)] = await run_all(sched3, [early])
    (ids_f, meta_f), (ids_i, meta_i) = await run_all(sched, [floor, ignored])
    await sched3.close()
    assert meta_e["finish_reason"] == {"type": "stop", "matched": 2}
    assert ids_e[-1] == 2 and 2 not in ids_e[:-1] and len(ids_e) < 500
    assert meta_f["finish_reason"] == {"type": "stop", "matched": 2}
    assert len(ids_f) >= 13 and 2 not in ids_f[:-1]
    assert meta_i["finish_reason"] == {"type": "length", "length": 40}
    assert len(ids_i) == 40 and 2 not in ids_i
    await sched.close()


async def test_stop_token_ids_and_min_new_tokens() -> None:
    sched, _, _ = make_scheduler()
    p = prompt(30)
    probe = make_request("probe", p, max_new_tokens=10)
    [(ref, _)] = await run_all(sched, [probe])
    stop_tok = ref[3]
    stopped = make_request("stop", p, max_new_tokens=10, stop=[stop_tok])
    masked = make_request("masked", p, max_new_tokens=10, stop=[stop_tok], min_new_tokens=6)
    ignored = make_request("ign", p, max_new_tokens=10, stop=[stop_tok], ignore_eos=True)
    (ids_s, meta_s), (ids_m, _), (ids_i, meta_i) = await run_all(sched, [stopped, masked, ignored])
    first = ref.index(stop_tok)
    assert ids_s == ref[: first + 1]
    assert meta_s["finish_reason"] == {"type": "stop", "matched": stop_tok}
    # Before min_new_tokens the stop token is masked: something else is drawn there.
    assert stop_tok not in ids_m[:6]
    assert ids_m[first] != stop_tok
    # SGLang's ignore_eos turns off every token-based stop.
    assert ids_i == ref and meta_i["finish_reason"] == {"type": "length", "length": 10}
    await sched.close()


async def test_abort_waiting_and_running() -> None:
    sched, _, _ = make_scheduler(max_running_requests=1)
    running = make_request("run", prompt(20), max_new_tokens=10_000, ignore_eos=True)
    waiting = make_request("wait", prompt(20, 3000), max_new_tokens=5)
    sched.submit(running)
    sched.submit(waiting)
    got: list[int] = []

    async def read_some() -> dict[str, Any]:
        async for item in running.channel:
            got.extend(item["output_ids"])
            if item["meta_info"]["finish_reason"] is not None:
                return dict(item["meta_info"])
            if len(got) >= 5:
                assert sched.abort("wait")
                assert sched.abort("run", "client went away")
        raise AssertionError("no final item")

    meta = await read_some()
    assert meta["finish_reason"] == {"type": "abort", "message": "client went away"}
    ids_w, meta_w, _ = await collect(waiting.channel)
    assert ids_w == [] and meta_w["finish_reason"]["type"] == "abort"
    assert not sched.abort("run")  # already gone
    assert sched.is_idle
    check_pool(sched)
    await sched.close()


async def test_retraction_when_kv_runs_out() -> None:
    kwargs: dict[str, Any] = {"page_size": 4, "init_new_token_ratio": 0.0}
    reqs_spec = [(f"r{i}", prompt(8, 1000 + 100 * i)) for i in range(4)]
    # Reference: plenty of memory.
    big, _, _ = make_scheduler(max_total_tokens=4096, **kwargs)
    ref = await run_all(
        big, [make_request(r, p, max_new_tokens=40, ignore_eos=True) for r, p in reqs_spec]
    )
    # 4 x 48 tokens do not fit in 64: decode must retract, and everything still completes.
    tiny, _, metrics = make_scheduler(max_total_tokens=64, **kwargs)
    got = await run_all(
        tiny, [make_request(r, p, max_new_tokens=40, ignore_eos=True) for r, p in reqs_spec]
    )
    assert tiny.stats.retractions > 0
    assert [ids for ids, _ in got] == [ids for ids, _ in ref]
    assert all(meta["finish_reason"] == {"type": "length", "length": 40} for _, meta in got)
    assert all(m.kv_active_blocks <= 64 for m in metrics.reports)
    check_pool(tiny)
    await big.close()
    await tiny.close()


async def test_prompt_larger_than_pool_is_rejected() -> None:
    sched, _, _ = make_scheduler(page_size=4, max_total_tokens=32)
    [(ids, meta)] = await run_all(sched, [make_request("big", prompt(40))])
    assert ids == []
    assert meta["finish_reason"]["type"] == "abort"
    assert meta["finish_reason"]["status_code"] == 400
    await sched.close()


async def test_deterministic_regardless_of_batch_and_rank() -> None:
    p = prompt(50, 4242)
    alone, _, _ = make_scheduler()
    [(ref, _)] = await run_all(alone, [make_request("x", p, max_new_tokens=30, seed=7)])
    crowd, _, _ = make_scheduler(dp_rank=3, max_running_requests=5)
    others = [make_request(f"o{i}", prompt(50, 100 * i), max_new_tokens=30) for i in range(12)]
    target = make_request("other-id", p, max_new_tokens=30, seed=7)
    results = await run_all(crowd, [*others[:6], target, *others[6:]])
    assert results[6][0] == ref
    # A different seed gives a different stream.
    [(diff, _)] = await run_all(alone, [make_request("y", p, max_new_tokens=30, seed=8)])
    assert diff != ref
    await alone.close()
    await crowd.close()


async def test_logprobs_are_well_formed() -> None:
    sched, _, _ = make_scheduler()
    req = make_request("lp", prompt(20), max_new_tokens=6, return_logprob=True, top_logprobs_num=3)
    sched.submit(req)
    n = 0
    async for item in req.channel:
        meta = item["meta_info"]
        lps = meta["output_token_logprobs"]
        tops = meta["output_top_logprobs"]
        assert len(lps) == len(tops) == len(item["output_ids"])
        for (lp, tok, text), top, out in zip(lps, tops, item["output_ids"], strict=True):
            assert tok == out and text is None and lp <= 0
            assert len(top) == 3 and top[0][1] == tok
            assert [t[0] for t in top] == sorted((t[0] for t in top), reverse=True)
            assert sum(2.718281828 ** t[0] for t in top) <= 1.0
        n += len(item["output_ids"])
    assert n == 6
    await sched.close()


async def test_pause_and_resume() -> None:
    sched, _, _ = make_scheduler()
    sched.pause()
    req = make_request("p", prompt(20), max_new_tokens=5)
    sched.submit(req)
    task = asyncio.ensure_future(collect(req.channel))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not task.done() and req.output_ids == []
    assert sched.num_waiting == 1
    sched.resume()
    ids, _meta, _ = await task
    assert len(ids) == 5
    await sched.close()


async def test_flush_only_when_idle() -> None:
    sched, events, _ = make_scheduler()
    await run_all(sched, [make_request("a", prompt(100), max_new_tokens=3)])
    assert sched.cache.cached_pages > 0
    req = make_request("b", prompt(100, 5000), max_new_tokens=10_000, ignore_eos=True)
    sched.submit(req)
    assert not sched.flush()
    sched.abort("b")
    await collect(req.channel)
    assert sched.flush()
    assert sched.cache.cached_pages == 0
    assert isinstance(events.batches[-1][-1], AllBlocksCleared)
    check_pool(sched)
    await sched.close()


async def test_release_memory_refuses_work_until_resumed() -> None:
    sched, events, _ = make_scheduler()
    await run_all(sched, [make_request("a", prompt(64), max_new_tokens=2)])
    sched.release_memory()
    assert sched.cache.cached_pages == 0
    assert isinstance(events.events[-1], AllBlocksCleared)
    [(ids, meta)] = await run_all(sched, [make_request("b", prompt(10))])
    assert ids == [] and meta["finish_reason"]["type"] == "abort"
    sched.resume_memory()
    [(ids, _)] = await run_all(sched, [make_request("c", prompt(10), max_new_tokens=3)])
    assert len(ids) == 3
    await sched.close()


async def test_eviction_publishes_block_removed() -> None:
    sched, events, _ = make_scheduler(page_size=4, max_total_tokens=64)
    for i in range(6):
        await run_all(sched, [make_request(f"r{i}", prompt(24, 1000 * (i + 1)), max_new_tokens=2)])
    assert any(isinstance(e, BlockRemoved) for e in events.events)
    check_pool(sched)
    await sched.close()


async def test_wall_time_follows_cost_model() -> None:
    cost = CostModel.fixed(prefill_per_token_s=0.0, decode_step_s=0.01)
    sched, _, _ = make_scheduler(speedup_ratio=1.0, cost=cost)
    req = make_request("t", prompt(10), max_new_tokens=21)
    t0 = time.perf_counter()
    await run_all(sched, [req])
    elapsed = time.perf_counter() - t0
    # 20 decode steps of 10 ms (the first token comes from the prefill, which costs 0).
    assert sched.stats.forward_seconds == pytest.approx(0.2)
    assert 0.18 < elapsed < 0.5
    # speedup 4: a quarter of the wall time.
    fast, _, _ = make_scheduler(speedup_ratio=4.0, cost=cost)
    t0 = time.perf_counter()
    await run_all(fast, [make_request("t", prompt(10), max_new_tokens=21)])
    assert 0.045 < time.perf_counter() - t0 < 0.3
    await sched.close()
    await fast.close()


async def test_load_metrics_track_running_waiting_and_kv() -> None:
    sched, _, metrics = make_scheduler(
        max_running_requests=4, decode_log_interval=2, dp_rank=1, max_total_tokens=8192
    )
    reqs = [make_request(f"r{i}", prompt(64, 100 * i), max_new_tokens=12) for i in range(10)]
    await run_all(sched, reqs)
    reports = metrics.reports
    assert reports
    busy = [m for m in reports if m.request_active_slots == 4]
    assert busy and any(m.num_requests_waiting > 0 for m in busy)
    assert all(m.request_total_slots == 4 and m.kv_total_blocks == 8192 for m in reports)
    assert all(m.data_parallel_rank == 1 for m in reports)
    peak = max(reports, key=lambda m: m.kv_active_blocks)
    # 4 running requests hold at least their prompts: 4 x 64 tokens.
    assert peak.kv_active_blocks >= 4 * 64
    assert peak.gpu_cache_usage_perc == pytest.approx(peak.kv_active_blocks / 8192, abs=1e-3)
    await asyncio.sleep(0)
    last = reports[-1]  # the idle report
    assert last.request_active_slots == 0 and last.num_requests_waiting == 0
    assert last.kv_active_blocks == 0  # finished requests' pages are cached but evictable
    await sched.close()


async def test_close_ends_open_streams() -> None:
    sched, _, _ = make_scheduler()
    req = make_request("c", prompt(10), max_new_tokens=10_000, ignore_eos=True)
    sched.submit(req)
    await asyncio.sleep(0)
    await sched.close()
    _ids, meta, _ = await collect(req.channel)
    assert meta["finish_reason"]["type"] == "abort"


async def test_max_new_tokens_zero_is_prefill_only() -> None:
    sched, _, _ = make_scheduler()
    [(ids, meta)] = await run_all(sched, [make_request("z", prompt(40), max_new_tokens=0)])
    assert ids == [] and meta["finish_reason"] == {"type": "length", "length": 0}
    assert meta["completion_tokens"] == 0
    assert sched.stats.prefill_tokens == 40
    check_pool(sched)
    await sched.close()


def stored_hashes(sink: EventSink) -> list[int]:
    return [h for e in sink.events if isinstance(e, BlockStored) for h in e.block_hashes]


async def test_publications_are_coalesced_while_busy_and_flushed_when_idle() -> None:
    reqs = [make_request(f"r{i}", prompt(160, 1000 * (i + 1)), max_new_tokens=8) for i in range(4)]
    # Chunked prefill stores a page per step: every step publishes a batch and a report.
    each, each_events, each_metrics = make_scheduler(publish_interval=0.0, chunked_prefill_size=16)
    await run_all(each, reqs)
    await asyncio.sleep(0)
    steps = each.stats.steps
    assert len(each_events.batches) > 20
    # Coalesced: nothing while busy after the first step, the rest soon after going idle.
    reqs = [make_request(f"r{i}", prompt(160, 1000 * (i + 1)), max_new_tokens=8) for i in range(4)]
    slow, slow_events, slow_metrics = make_scheduler(publish_interval=0.3, chunked_prefill_size=16)
    started = time.monotonic()
    await run_all(slow, reqs)
    assert time.monotonic() - started < 0.3
    assert len(slow_events.batches) <= 1  # the first step's
    await asyncio.sleep(0.4)  # idle: the rest once the interval has passed
    assert slow.stats.steps == steps
    assert len(slow_events.batches) <= 3
    # The same blocks stored, in the same order (the cache merges a chain's stores taken at once).
    assert stored_hashes(slow_events) == stored_hashes(each_events)
    assert len(slow_metrics.reports) < len(each_metrics.reports)
    assert slow_metrics.reports[-1].request_active_slots == 0  # the idle report
    await each.close()
    await slow.close()
