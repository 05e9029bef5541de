"""Worker metrics: the request hooks' counters and histograms, the simulated engine's
``sglang:*`` gauges read at scrape time, installation on a registry and its undoing, and the
relay of SGLang's multiprocess files."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key

from shared.engine.cpu.scheduler import SchedulerStats
from shared.engine.protocol import EngineInfo
from shared.engine.sim.engine import SimConfig, SimEngine
from shared.model import make_test_tokenizer
from shared.worker import metrics
from shared.worker.metrics import (
    HOOK_FAMILY_NAMES,
    SCHEDULER_GAUGE_NAMES,
    SchedulerCollector,
    SglangMultiProcessCollector,
    WorkerMetrics,
    install_engine_metrics,
)

MODEL = "unit-metrics-model"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_test_tokenizer(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
async def engine(model_dir: Path) -> AsyncIterator[SimEngine]:
    eng = SimEngine(
        SimConfig(
            model_path=str(model_dir),
            served_model_name=MODEL,
            speedup_ratio=0,
            page_size=4,
            max_total_tokens=4096,
            random_seed=7,
        )
    )
    await eng.start()
    try:
        yield eng
    finally:
        await eng.shutdown()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    value = registry.get_sample_value(name, labels)
    assert value is not None, f"no sample {name}{labels}"
    return value


async def run(engine: SimEngine, hooks: WorkerMetrics, rid: str, prompt: list[int]) -> None:
    """What a handler does around one request, feeding the hooks from the engine's stream."""
    hooks.request_started("aggregated")
    generated = 0
    meta: dict[str, int] = {}
    async for item in engine.async_generate(
        input_ids=prompt,
        sampling_params={"max_new_tokens": 5, "ignore_eos": True, "temperature": 0.0},
        rid=rid,
    ):
        if generated == 0:
            hooks.first_token(0.01)
        else:
            hooks.inter_token(0.002)
        generated += len(item["output_ids"])
        meta = item["meta_info"]
    hooks.tokens(meta["prompt_tokens"], meta["cached_tokens"], generated)
    hooks.request_finished("aggregated", None)


async def test_hooks_and_collector_after_a_few_requests(engine: SimEngine) -> None:
    registry = CollectorRegistry()
    installed = install_engine_metrics(engine, MODEL, registry)
    assert installed.kind == "scheduler" and installed.installed
    hooks = WorkerMetrics(MODEL, sglang_source="scheduler")
    hooks.model_loaded(1.5)
    before_requests = REGISTRY.get_sample_value(
        "sglmesh_worker_requests_total", {"role": "aggregated"}
    )

    prompt = list(range(10, 42))  # 32 tokens: 8 pages of 4
    for i in range(3):
        await run(engine, hooks, f"r{i}", prompt)
    hooks.request_started("aggregated")
    hooks.request_finished("aggregated", "engine_error")

    # The mesh's own metrics, on the default registry.
    requests = REGISTRY.get_sample_value("sglmesh_worker_requests_total", {"role": "aggregated"})
    assert requests is not None and requests - (before_requests or 0) == 4
    assert sample(REGISTRY, "sglmesh_worker_inflight_requests", role="aggregated") == 0
    assert sample(REGISTRY, "sglmesh_worker_errors_total", role="aggregated", kind="engine_error")
    assert sample(REGISTRY, "sglmesh_worker_model_load_seconds", model=MODEL) == 1.5

    # SGLang's request families, fed by the hooks.
    assert sample(registry, "sglang:num_requests_total", model_name=MODEL) == 4
    assert sample(registry, "sglang:prompt_tokens_total", model_name=MODEL) == 96
    assert sample(registry, "sglang:generation_tokens_total", model_name=MODEL) == 15
    # The second and third requests find all but the last page cached.
    assert sample(registry, "sglang:cached_tokens_total", model_name=MODEL) == 2 * 28
    assert sample(registry, "sglang:time_to_first_token_seconds_count", model_name=MODEL) == 3
    assert sample(registry, "sglang:inter_token_latency_seconds_count", model_name=MODEL) >= 3
    ttft_sum = sample(registry, "sglang:time_to_first_token_seconds_sum", model_name=MODEL)
    assert ttft_sum == pytest.approx(0.03)

    # The scheduler gauges, read at scrape time.
    rank = {"model_name": MODEL, "dp_rank": "0"}
    assert sample(registry, "sglang:num_running_reqs", **rank) == 0
    assert sample(registry, "sglang:num_queue_reqs", **rank) == 0
    assert sample(registry, "sglang:max_total_num_tokens", **rank) == 4096
    assert sample(registry, "sglang:num_used_tokens", **rank) == 0  # idle: all evictable
    assert sample(registry, "sglang:token_usage", **rank) == 0
    assert sample(registry, "sglang:cache_hit_rate", **rank) == pytest.approx(56 / 96)
    assert sample(registry, "sglang:gen_throughput", **rank) > 0
    assert sample(registry, "sglang:num_retracted_reqs", **rank) == 0

    text = generate_latest(registry).decode()
    for name in (*SCHEDULER_GAUGE_NAMES, *HOOK_FAMILY_NAMES):
        assert f"# TYPE {name.removesuffix('_total')}" in text, name
        assert f"\n{name}" in text, name
    mesh_text = generate_latest(REGISTRY).decode()
    for name in (
        "sglmesh_worker_requests_total",
        "sglmesh_worker_errors_total",
        "sglmesh_worker_inflight_requests",
        "sglmesh_worker_model_load_seconds",
    ):
        assert f"\n{name}{{" in mesh_text, name

    installed.uninstall()
    assert not installed.installed
    assert "sglang:" not in generate_latest(registry).decode()


async def test_gauges_while_requests_run(engine: SimEngine) -> None:
    collector = SchedulerCollector(engine, MODEL)
    registry = CollectorRegistry()
    registry.register(collector)
    rank = {"model_name": MODEL, "dp_rank": "0"}
    await engine.pause_generation()
    streams = [
        engine.async_generate(
            input_ids=[100 + i] * 40, sampling_params={"max_new_tokens": 500}, rid=f"p{i}"
        )
        for i in range(3)
    ]
    tasks = [asyncio.ensure_future(anext(s)) for s in streams]
    await asyncio.sleep(0.01)
    assert sample(registry, "sglang:num_queue_reqs", **rank) == 3
    assert sample(registry, "sglang:num_running_reqs", **rank) == 0
    await engine.continue_generation()
    await asyncio.gather(*tasks)
    # Each has its first token, and holds its KV until it finishes.
    assert sample(registry, "sglang:num_running_reqs", **rank) == 3
    assert sample(registry, "sglang:num_queue_reqs", **rank) == 0
    used = sample(registry, "sglang:num_used_tokens", **rank)
    assert used >= 3 * 40
    assert sample(registry, "sglang:token_usage", **rank) == pytest.approx(used / 4096)
    for s in streams:
        await s.aclose()  # type: ignore[attr-defined]
    assert sample(registry, "sglang:num_running_reqs", **rank) == 0
    assert sample(registry, "sglang:num_used_tokens", **rank) == 0


def test_gen_throughput_window() -> None:
    now = [100.0]

    class FakeCache:
        page_size = 4
        total_pages = 10
        free_pages = 10
        evictable_pages = 0

    class FakeScheduler:
        dp_rank = 0
        num_running = 0
        num_waiting = 0
        stats = SchedulerStats()
        cache = FakeCache()

    class FakeEngine:
        schedulers = [FakeScheduler()]

    collector = SchedulerCollector(FakeEngine(), "m", clock=lambda: now[0])  # type: ignore[arg-type]
    registry = CollectorRegistry()
    registry.register(collector)
    labels = {"model_name": "m", "dp_rank": "0"}
    now[0] = 102.0
    FakeScheduler.stats.output_tokens = 200
    assert sample(registry, "sglang:gen_throughput", **labels) == pytest.approx(100.0)
    now[0] = 110.0
    FakeScheduler.stats.output_tokens = 1000
    FakeScheduler.stats.retractions = 2
    # Baseline: the newest sample at least 5 s old (t=102).
    assert sample(registry, "sglang:gen_throughput", **labels) == pytest.approx(100.0)
    assert sample(registry, "sglang:num_retracted_reqs", **labels) == 2
    now[0] = 116.0  # idle since t=110
    assert sample(registry, "sglang:gen_throughput", **labels) == 0.0
    assert sample(registry, "sglang:num_retracted_reqs", **labels) == 0


async def test_hooks_of_the_real_engine_leave_the_sglang_families_alone() -> None:
    hooks = WorkerMetrics("unit-real-engine", sglang_source="engine")
    hooks.request_started("decode")
    hooks.first_token(0.5)
    hooks.tokens(10, 2, 3)
    hooks.request_finished("decode", None)
    registry = CollectorRegistry()
    for metric in ("sglang:prompt_tokens_total", "sglang:num_requests_total"):
        assert registry.get_sample_value(metric, {"model_name": "unit-real-engine"}) is None
    assert metrics.sglang_prompt_tokens.labels("unit-real-engine")._value.get() == 0
    assert sample(REGISTRY, "sglmesh_worker_inflight_requests", role="decode") == 0


async def test_two_simulated_engines_share_one_registry(model_dir: Path) -> None:
    registry = CollectorRegistry()
    engines = []
    handles = []
    for name in ("unit-a", "unit-b"):
        eng = SimEngine(SimConfig(model_path=str(model_dir), speedup_ratio=0, dp_size=2))
        await eng.start()
        engines.append(eng)
        handles.append(install_engine_metrics(eng, name, registry))
    try:
        for name in ("unit-a", "unit-b"):
            for rank in ("0", "1"):
                labels = {"model_name": name, "dp_rank": rank}
                assert registry.get_sample_value("sglang:num_running_reqs", labels) == 0
        handles[0].uninstall()
        assert (
            registry.get_sample_value(
                "sglang:num_running_reqs", {"model_name": "unit-a", "dp_rank": "0"}
            )
            is None
        )
        assert (
            registry.get_sample_value(
                "sglang:num_running_reqs", {"model_name": "unit-b", "dp_rank": "1"}
            )
            == 0
        )
        handles[1].uninstall()
        assert "sglang:" not in generate_latest(registry).decode()
        # Installing again after a full uninstall works (nothing left registered).
        again = install_engine_metrics(engines[0], "unit-a", registry)
        again.uninstall()
    finally:
        for eng in engines:
            await eng.shutdown()


def test_unknown_engine_gets_nothing() -> None:
    registry = CollectorRegistry()
    handle = install_engine_metrics(object(), "x", registry)
    assert handle.kind == "none" and not handle.installed
    handle.uninstall()


def test_sglang_engine_relays_multiprocess_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The files as SGLang's scheduler process writes them (another pid), plus one of this
    # process (its values are in the registry already) and a non-sglang family (a spawned
    # subprocess re-importing the worker's modules).
    def write(file: str, family: str, labels: dict[str, str], value: float) -> None:
        db = MmapedDict(str(tmp_path / file))  # type: ignore[no-untyped-call]
        key = mmap_key(family, f"{family}_total", list(labels), list(labels.values()), "help")
        db.write_value(key, value, 0.0)  # type: ignore[no-untyped-call]
        db.close()  # type: ignore[no-untyped-call]

    write("counter_4242.db", "sglang:num_requests", {"model_name": "real"}, 7)
    write("counter_4243.db", "sglmesh_worker_requests", {"role": "decode"}, 1)
    write(f"counter_{os.getpid()}.db", "sglang:own", {}, 1)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))

    class SglangEngine:  # found by its kind's registry entry; the real adapter needs sglang
        info = EngineInfo(
            engine="sglang",
            model_path="m",
            served_model_name="real",
            page_size=1,
            max_total_tokens=1,
            max_running_requests=1,
            max_prefill_tokens=1,
            context_length=1,
        )

    registry = CollectorRegistry()
    handle = install_engine_metrics(SglangEngine(), "real", registry)
    assert handle.kind == "engine" and isinstance(handle.collector, SglangMultiProcessCollector)
    assert registry.get_sample_value("sglang:num_requests_total", {"model_name": "real"}) == 7
    text = generate_latest(registry).decode()
    assert "sglmesh_worker_requests" not in text
    assert "sglang:own" not in text
    # A second worker on the registry shares the collector; it goes with the last one.
    second = install_engine_metrics(SglangEngine(), "real", registry)
    handle.uninstall()
    assert registry.get_sample_value("sglang:num_requests_total", {"model_name": "real"}) == 7
    second.uninstall()
    assert registry.get_sample_value("sglang:num_requests_total", {"model_name": "real"}) is None

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    nothing = install_engine_metrics(SglangEngine(), "real", registry)
    assert nothing.kind == "engine" and not nothing.installed
