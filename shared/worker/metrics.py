"""Worker metrics: the mesh's own request counters, and SGLang's ``sglang:*`` families.

Why both: dashboards and autoscalers built for SGLang read ``sglang:*`` (running and queued
requests, KV usage, TTFT, throughput), and they must work whichever engine a worker runs. On
the real engine SGLang itself produces them (``--enable-metrics``): its scheduler processes
write them into ``PROMETHEUS_MULTIPROC_DIR``, which :func:`install_engine_metrics` merges into
``/metrics``. The CPU engines (torch and simulated) have no SGLang inside, so this module
produces the same names from them: gauges read from their schedulers at scrape time
(:class:`SchedulerCollector`), request counters and latency histograms from the worker's
request hooks (:class:`WorkerMetrics`). Label ``model_name`` (and ``dp_rank`` on the
per-scheduler gauges) as SGLang labels them.

The ``sglmesh_worker_*`` metrics exist for every engine. All metric objects are module-level
and labelled: prometheus-client refuses to register a name twice, and one process may hold
several workers (tests). The scheduler-fed ``sglang:*`` hook families are created unregistered
and join a registry only through :func:`install_engine_metrics`, so a real-SGLang worker
never exposes an empty duplicate of a family SGLang also writes.
"""

from __future__ import annotations

import collections
import glob
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from shared.engine.registry import engine_kind
from shared.histograms import observe_many

__all__ = [
    "GEN_THROUGHPUT_WINDOW",
    "HOOK_FAMILY_NAMES",
    "SCHEDULER_GAUGE_NAMES",
    "EngineMetrics",
    "SchedulerCollector",
    "SglangMultiProcessCollector",
    "WorkerHooks",
    "WorkerMetrics",
    "install_engine_metrics",
]

log = logging.getLogger(__name__)

# -- the mesh's own worker metrics (every engine) -------------------------------------------

requests_total = Counter(
    "sglmesh_worker_requests_total", "Generate requests a worker accepted, by role", ["role"]
)
errors_total = Counter(
    "sglmesh_worker_errors_total",
    "Generate requests a worker ended with an error, by role and error kind",
    ["role", "kind"],
)
inflight_requests = Gauge(
    "sglmesh_worker_inflight_requests", "Generate requests a worker is handling now", ["role"]
)
model_load_seconds = Gauge(
    "sglmesh_worker_model_load_seconds",
    "Seconds the worker took to start its engine and load the model",
    ["model"],
)

# -- SGLang's request families, produced for the simulated engine -----------------------------

# Wider at the low end than SGLang's own buckets: the simulation at high speedup answers in
# microseconds, and a histogram whose observations all land in the first bucket says nothing.
_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0,
    20.0, 40.0, 60.0, 120.0,
)  # fmt: skip
_ITL_BUCKETS = (
    0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.06, 0.08,
    0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 8.0,
)  # fmt: skip
_MODEL = ["model_name"]

sglang_ttft = Histogram(
    "sglang:time_to_first_token_seconds",
    "Histogram of time to first token in seconds",
    _MODEL,
    buckets=_TTFT_BUCKETS,
    registry=None,
)
sglang_itl = Histogram(
    "sglang:inter_token_latency_seconds",
    "Histogram of inter-token latency in seconds",
    _MODEL,
    buckets=_ITL_BUCKETS,
    registry=None,
)
sglang_prompt_tokens = Counter(
    "sglang:prompt_tokens_total", "Number of prefill tokens processed", _MODEL, registry=None
)
sglang_generation_tokens = Counter(
    "sglang:generation_tokens_total",
    "Number of generation tokens processed",
    _MODEL,
    registry=None,
)
sglang_cached_tokens = Counter(
    "sglang:cached_tokens_total",
    "Number of prompt tokens served from the prefix cache",
    _MODEL,
    registry=None,
)
sglang_num_requests = Counter(
    "sglang:num_requests_total", "Number of requests processed", _MODEL, registry=None
)

_HOOK_METRICS: tuple[Collector, ...] = (
    sglang_ttft,
    sglang_itl,
    sglang_prompt_tokens,
    sglang_generation_tokens,
    sglang_cached_tokens,
    sglang_num_requests,
)
# As they appear in the exposition (counters gain ``_total``).
HOOK_FAMILY_NAMES = (
    "sglang:time_to_first_token_seconds",
    "sglang:inter_token_latency_seconds",
    "sglang:prompt_tokens_total",
    "sglang:generation_tokens_total",
    "sglang:cached_tokens_total",
    "sglang:num_requests_total",
)


class WorkerHooks(Protocol):
    """What a request handler reports; :class:`WorkerMetrics` implements it."""

    def request_started(self, role: str) -> None: ...

    def request_finished(self, role: str, error_kind: str | None) -> None: ...

    def first_token(self, seconds: float) -> None: ...

    def inter_token(self, seconds: float) -> None: ...

    def tokens(self, prompt: int, cached: int, generated: int) -> None: ...


class WorkerMetrics:
    """The request hooks of one worker, recorded as Prometheus metrics.

    ``sglang_source`` is where the engine kind's ``sglang:*`` metrics come from
    (``EngineKind.metrics``): with ``"scheduler"`` the hooks also feed the ``sglang:*``
    request families; with ``"engine"`` SGLang records those itself, so only the
    ``sglmesh_worker_*`` metrics are touched.
    """

    def __init__(self, model_name: str, *, sglang_source: str = "scheduler") -> None:
        self.model_name = model_name
        self._feeds_sglang = sglang_source == "scheduler"
        self._ttft = sglang_ttft.labels(model_name)
        self._itl = sglang_itl.labels(model_name)
        self._itl_pending: list[float] = []
        self._prompt = sglang_prompt_tokens.labels(model_name)
        self._generated = sglang_generation_tokens.labels(model_name)
        self._cached = sglang_cached_tokens.labels(model_name)
        self._finished = sglang_num_requests.labels(model_name)

    def request_started(self, role: str) -> None:
        requests_total.labels(role).inc()
        inflight_requests.labels(role).inc()

    def request_finished(self, role: str, error_kind: str | None) -> None:
        if self._itl_pending:
            pending, self._itl_pending = self._itl_pending, []
            observe_many(self._itl, pending)
        inflight_requests.labels(role).dec()
        if error_kind is not None:
            errors_total.labels(role, error_kind).inc()
        if self._feeds_sglang:
            # SGLang counts every request that ends, aborted ones included.
            self._finished.inc()

    def first_token(self, seconds: float) -> None:
        if self._feeds_sglang:
            self._ttft.observe(max(seconds, 0.0))

    def inter_token(self, seconds: float) -> None:
        # Buffered, and observed when a request ends (observe_many: one update per bucket).
        if self._feeds_sglang:
            self._itl_pending.append(seconds if seconds > 0.0 else 0.0)

    def tokens(self, prompt: int, cached: int, generated: int) -> None:
        if not self._feeds_sglang:
            return
        # Counters only go up; a negative count is a caller's bug, not worth a crash.
        if prompt > 0:
            self._prompt.inc(prompt)
        if cached > 0:
            self._cached.inc(cached)
        if generated > 0:
            self._generated.inc(generated)

    def model_loaded(self, seconds: float) -> None:
        model_load_seconds.labels(self.model_name).set(seconds)


# -- scheduler gauges of the simulated engine ---------------------------------------------------

# gen_throughput averages over about this many seconds of wall time.
GEN_THROUGHPUT_WINDOW = 5.0

SCHEDULER_GAUGE_NAMES = (
    "sglang:num_running_reqs",
    "sglang:num_queue_reqs",
    "sglang:num_used_tokens",
    "sglang:token_usage",
    "sglang:cache_hit_rate",
    "sglang:gen_throughput",
    "sglang:max_total_num_tokens",
    "sglang:num_retracted_reqs",
)
_GAUGE_HELP = {
    "sglang:num_running_reqs": "The number of running requests",
    "sglang:num_queue_reqs": "The number of requests in the waiting queue",
    "sglang:num_used_tokens": "The number of KV cache tokens in use (not evictable)",
    "sglang:token_usage": "The KV cache token usage, 0 to 1",
    "sglang:cache_hit_rate": "The prefix cache hit rate: cached / prompt tokens prefilled so far",
    "sglang:gen_throughput": "The generation throughput in tokens/s over the last few seconds",
    "sglang:max_total_num_tokens": "The KV cache capacity in tokens",
    "sglang:num_retracted_reqs": "Requests retracted (KV pool full) in the last few seconds",
}
_GAUGE_LABELS = ["model_name", "dp_rank"]


@dataclass(slots=True)
class _Window:
    """Samples of one rank's cumulative counters, for rates over the last few seconds."""

    samples: collections.deque[tuple[float, int, int]] = field(default_factory=collections.deque)

    def rates(self, now: float, output_tokens: int, retractions: int) -> tuple[float, int]:
        """(tokens/s, retractions) since the newest sample at least a window old."""
        samples = self.samples
        samples.append((now, output_tokens, retractions))
        # Keep exactly one sample at or before the window's start as the baseline.
        start = now - GEN_THROUGHPUT_WINDOW
        while len(samples) > 2 and samples[1][0] <= start:
            samples.popleft()
        t0, tokens0, retract0 = samples[0]
        elapsed = now - t0
        rate = (output_tokens - tokens0) / elapsed if elapsed > 0 else 0.0
        return max(rate, 0.0), max(retractions - retract0, 0)


class SchedulerCollector(Collector):
    """SGLang's scheduler gauges, read from a CPU engine's schedulers at scrape time.

    One sample per DP rank. ``gen_throughput`` and ``num_retracted_reqs`` are rates: each
    scrape samples the cumulative counters, and the value covers the time since the newest
    sample at least :data:`GEN_THROUGHPUT_WINDOW` seconds old (since the collector was created,
    on the first scrapes).
    """

    def __init__(
        self, engine: Any, model_name: str, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self._clock = clock
        self._windows: dict[int, _Window] = {}
        # Scrapes may come from the server's thread pool (prometheus-client's own server).
        self._lock = threading.Lock()
        self._baseline()

    def _baseline(self) -> None:
        now = self._clock()
        for scheduler in self.engine.schedulers:
            if scheduler.dp_rank not in self._windows:
                window = self._windows[scheduler.dp_rank] = _Window()
                stats = scheduler.stats
                window.samples.append((now, stats.output_tokens, stats.retractions))

    def describe(self) -> Iterable[Metric]:
        # Without it a registry would run a real collection at registration.
        for name in SCHEDULER_GAUGE_NAMES:
            yield GaugeMetricFamily(name, _GAUGE_HELP[name], labels=_GAUGE_LABELS)

    def collect(self) -> Iterable[Metric]:
        families = {
            name: GaugeMetricFamily(name, _GAUGE_HELP[name], labels=_GAUGE_LABELS)
            for name in SCHEDULER_GAUGE_NAMES
        }
        with self._lock:
            self._baseline()  # ranks that started after this collector was made
            now = self._clock()
            for scheduler in self.engine.schedulers:
                labels = [self.model_name, str(scheduler.dp_rank)]
                cache = scheduler.cache
                page = cache.page_size
                total_tokens = cache.total_pages * page
                # Pages neither free nor evictable: requests' own KV plus locked prefixes.
                used_pages = cache.total_pages - cache.free_pages - cache.evictable_pages
                used_tokens = used_pages * page
                stats = scheduler.stats
                prompt = stats.prefill_tokens + stats.cached_prompt_tokens
                hit_rate = stats.cached_prompt_tokens / prompt if prompt else 0.0
                throughput, retracted = self._windows[scheduler.dp_rank].rates(
                    now, stats.output_tokens, stats.retractions
                )
                values = {
                    "sglang:num_running_reqs": scheduler.num_running,
                    "sglang:num_queue_reqs": scheduler.num_waiting,
                    "sglang:num_used_tokens": used_tokens,
                    "sglang:token_usage": used_tokens / total_tokens if total_tokens else 0.0,
                    "sglang:cache_hit_rate": hit_rate,
                    "sglang:gen_throughput": throughput,
                    "sglang:max_total_num_tokens": total_tokens,
                    "sglang:num_retracted_reqs": retracted,
                }
                for name, value in values.items():
                    families[name].add_metric(labels, float(value))
        yield from families.values()


class _SchedulerGroup(Collector):
    """Every CPU engine installed on one registry, as one set of families.

    A registry refuses two collectors that produce the same names; a process with two
    CPU workers (tests) needs both in one ``/metrics``.
    """

    def __init__(self) -> None:
        self.members: list[SchedulerCollector] = []

    def describe(self) -> Iterable[Metric]:
        for name in SCHEDULER_GAUGE_NAMES:
            yield GaugeMetricFamily(name, _GAUGE_HELP[name], labels=_GAUGE_LABELS)

    def collect(self) -> Iterable[Metric]:
        merged: dict[str, Metric] = {}
        for member in list(self.members):
            for family in member.collect():
                into = merged.get(family.name)
                if into is None:
                    merged[family.name] = family
                else:
                    into.samples.extend(family.samples)
        if not merged:
            yield from self.describe()
        yield from merged.values()


# -- SGLang's own metrics (real engine) ----------------------------------------------------------


def _own_pid_file(path: str, pid: int) -> bool:
    # Files are ``<type>_<pid>.db`` or ``gauge_<mode>_<pid>.db``.
    return os.path.basename(path)[: -len(".db")].rsplit("_", 1)[-1] == str(pid)


class SglangMultiProcessCollector(Collector):
    """The ``sglang:*`` families SGLang's subprocesses write into a multiprocess directory.

    Unlike prometheus-client's ``MultiProcessCollector`` on its own, it skips this process's
    files (what this process records is in the registry already, whichever value mode it
    runs in) and everything not named ``sglang:*`` (spawned subprocesses re-import the
    worker's modules and write empty copies of the mesh's metrics).
    """

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise ValueError(f"PROMETHEUS_MULTIPROC_DIR {path!r} is not a directory")
        self.path = path

    def describe(self) -> Iterable[Metric]:
        # Which families exist depends on what SGLang has written so far; describing none
        # keeps registration from reading (half-written) files.
        return []

    def collect(self) -> Iterable[Metric]:
        pid = os.getpid()
        files = [f for f in glob.glob(os.path.join(self.path, "*.db")) if not _own_pid_file(f, pid)]
        if not files:
            return
        try:
            metrics: Iterable[Metric] = MultiProcessCollector.merge(  # type: ignore[no-untyped-call]
                files, accumulate=True
            )
        except Exception:
            # A file half-written by a process that just started must not fail the scrape.
            log.warning("reading SGLang's multiprocess metrics failed", exc_info=True)
            return
        for metric in metrics:
            if metric.name.startswith("sglang:"):
                yield metric


# -- installation ------------------------------------------------------------------------------


class _RegistryState:
    def __init__(self) -> None:
        self.scheduler_group: _SchedulerGroup | None = None
        self.multiproc: SglangMultiProcessCollector | None = None
        self.multiproc_users = 0


_states: weakref.WeakKeyDictionary[CollectorRegistry, _RegistryState] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


class EngineMetrics:
    """What :func:`install_engine_metrics` put on a registry; :meth:`uninstall` takes it off."""

    def __init__(
        self,
        registry: CollectorRegistry,
        kind: str,
        collector: SchedulerCollector | SglangMultiProcessCollector | None,
    ) -> None:
        self.registry = registry
        self.kind = kind  # "scheduler", "engine" or "none"
        self.collector = collector
        self._installed = collector is not None

    @property
    def installed(self) -> bool:
        return self._installed

    def uninstall(self) -> None:
        if not self._installed:
            return
        self._installed = False
        with _states_lock:
            state = _states.get(self.registry)
            if state is None:
                return
            if isinstance(self.collector, SchedulerCollector) and state.scheduler_group is not None:
                group = state.scheduler_group
                if self.collector in group.members:
                    group.members.remove(self.collector)
                if not group.members:
                    self.registry.unregister(group)
                    for metric in _HOOK_METRICS:
                        self.registry.unregister(metric)
                    state.scheduler_group = None
            elif self.kind == "engine" and state.multiproc is not None:
                state.multiproc_users -= 1
                if state.multiproc_users <= 0:
                    self.registry.unregister(state.multiproc)
                    state.multiproc = None


def metrics_source(engine: Any) -> str:
    """Where ``engine``'s ``sglang:*`` metrics come from, by its kind's registry entry:
    ``"scheduler"``, ``"engine"``, or ``"none"`` for an engine of no registered kind."""
    info = getattr(engine, "info", None)
    name = getattr(info, "engine", None)
    if not isinstance(name, str):
        return "none"
    try:
        return engine_kind(name).metrics
    except ValueError:
        return "none"


def install_engine_metrics(
    engine: Any,
    model_name: str,
    registry: CollectorRegistry = REGISTRY,
    *,
    source: str | None = None,
) -> EngineMetrics:
    """Expose the engine's ``sglang:*`` metrics on ``registry``.

    ``source`` (default: :func:`metrics_source`) says where they come from. ``"scheduler"``
    (the CPU engines) gets a :class:`SchedulerCollector` plus the ``sglang:*`` request
    families its :class:`WorkerMetrics` hooks feed. ``"engine"`` (SGLang) gets SGLang's own
    families from ``PROMETHEUS_MULTIPROC_DIR`` when that is set (SGLang sets it with
    ``--enable-metrics``: call this after the engine started); otherwise there is nothing to
    add. Anything else gets nothing. Call :meth:`EngineMetrics.uninstall` to undo.
    """
    kind = metrics_source(engine) if source is None else source
    with _states_lock:
        state = _states.get(registry)
        if state is None:
            state = _states[registry] = _RegistryState()
        if kind == "scheduler":
            collector = SchedulerCollector(engine, model_name)
            if state.scheduler_group is None:
                group = _SchedulerGroup()
                registry.register(group)
                for metric in _HOOK_METRICS:
                    registry.register(metric)
                state.scheduler_group = group
            elif any(m.model_name == model_name for m in state.scheduler_group.members):
                log.warning(
                    "two CPU engines of one model on one registry: their "
                    "sglang:* gauges repeat the same labels",
                    extra={"model": model_name},
                )
            state.scheduler_group.members.append(collector)
            return EngineMetrics(registry, kind, collector)
        if kind == "engine":
            path = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
            if not path:
                log.info("PROMETHEUS_MULTIPROC_DIR is not set: no sglang:* metrics to relay")
                return EngineMetrics(registry, kind, None)
            if state.multiproc is None:
                multiproc = SglangMultiProcessCollector(path)
                registry.register(multiproc)
                state.multiproc = multiproc
            state.multiproc_users += 1
            return EngineMetrics(registry, kind, state.multiproc)
    return EngineMetrics(registry, "none", None)
