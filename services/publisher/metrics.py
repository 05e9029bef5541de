"""The publisher's Prometheus metrics: the engines' ``sglang:*`` load gauges and its own.

``sglang:*`` gauges, labelled ``worker_id`` (hex, as everywhere in the mesh) and ``dp_rank``,
carry the last ``KvMetrics`` report of each scheduler the publisher relays. They come from a
collector that reads the relays at scrape time, so a worker that leaves takes its label sets
with it, and the collector joins a registry only when a publisher runs (:func:`install`):
the worker process exports ``sglang:*`` names too, and prometheus-client refuses one name
twice in a registry (tests import both into one process).

``sglmesh_publisher_*`` are the relay's own counters, module-level like the runtime's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proto.metrics import KvMetrics

__all__ = [
    "SGLANG_GAUGES",
    "LoadCollector",
    "batches_lost_total",
    "batches_relayed_total",
    "engine_restarts_total",
    "event_lag_seconds",
    "events_relayed_total",
    "gaps_recovered_total",
    "install",
    "load_reports_total",
    "publish_errors_total",
    "snapshots_served_total",
    "sources",
    "undecodable_total",
]

events_relayed_total = Counter(
    "sglmesh_publisher_events_relayed_total",
    "KV events (BlockStored, BlockRemoved, AllBlocksCleared) republished on NATS",
)
batches_relayed_total = Counter(
    "sglmesh_publisher_batches_relayed_total", "Engine KV event batches republished on NATS"
)
gaps_recovered_total = Counter(
    "sglmesh_publisher_gaps_recovered_total",
    "Sequence gaps in an engine's KV events filled from its replay socket",
)
batches_lost_total = Counter(
    "sglmesh_publisher_batches_lost_total",
    "Engine KV event batches never obtained (no replay socket, or no longer in its buffer)",
)
engine_restarts_total = Counter(
    "sglmesh_publisher_engine_restarts_total",
    "Engines seen numbering their KV event batches from 0 again (restarted)",
)
event_lag_seconds = Histogram(
    "sglmesh_publisher_event_lag_seconds",
    "From the engine stamping a KV event batch to its republication (replayed batches too)",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
             10.0, 30.0, 60.0),
)  # fmt: skip
sources = Gauge("sglmesh_publisher_sources", "Engines (worker instances) being relayed")
load_reports_total = Counter(
    "sglmesh_publisher_load_reports_total", "Engine load reports (KvMetrics) republished on NATS"
)
undecodable_total = Counter(
    "sglmesh_publisher_undecodable_total",
    "Engine messages that did not decode (or were refused), by socket",
    ["socket"],
)
publish_errors_total = Counter(
    "sglmesh_publisher_publish_errors_total", "NATS publishes that failed, by kind", ["kind"]
)
snapshots_served_total = Counter(
    "sglmesh_publisher_snapshots_served_total", "State dumps served on publisher.kv_state"
)

# name -> (help, the KvMetrics field it shows). Names and help follow SGLang's own gauges.
SGLANG_GAUGES: dict[str, tuple[str, Callable[[KvMetrics], float]]] = {
    "sglang:num_running_reqs": (
        "The number of running requests",
        lambda m: m.request_active_slots,
    ),
    "sglang:num_queue_reqs": (
        "The number of requests in the waiting queue",
        lambda m: m.num_requests_waiting,
    ),
    "sglang:max_running_requests": (
        "The maximum number of running requests",
        lambda m: m.request_total_slots,
    ),
    "sglang:num_used_tokens": (
        "The number of KV cache tokens in use",
        lambda m: m.kv_active_blocks,
    ),
    "sglang:max_total_num_tokens": (
        "The KV cache capacity in tokens",
        lambda m: m.kv_total_blocks,
    ),
    "sglang:token_usage": ("The KV cache token usage, 0 to 1", lambda m: m.gpu_cache_usage_perc),
    "sglang:cache_hit_rate": (
        "The prefix cache hit rate",
        lambda m: m.gpu_prefix_cache_hit_rate,
    ),
}
_LABELS = ("worker_id", "dp_rank")

LoadSource = Callable[[], Iterable[tuple[int, int, KvMetrics]]]
"""Yields ``(worker_id, dp_rank, last report)`` for every scheduler relayed now."""


class LoadCollector(Collector):
    """``sglang:*`` gauges from the relays' last load reports, read at scrape time."""

    def __init__(self, loads: LoadSource) -> None:
        self._loads = loads

    def describe(self) -> Iterable[Metric]:
        for name, (help_text, _) in SGLANG_GAUGES.items():
            yield GaugeMetricFamily(name, help_text, labels=_LABELS)

    def collect(self) -> Iterator[Metric]:
        families = {
            name: (GaugeMetricFamily(name, help_text, labels=_LABELS), value)
            for name, (help_text, value) in SGLANG_GAUGES.items()
        }
        for worker_id, dp_rank, report in sorted(self._loads(), key=lambda t: (t[0], t[1])):
            labels = [f"{worker_id:x}", str(dp_rank)]
            for family, value in families.values():
                family.add_metric(labels, float(value(report)))
        for family, _ in families.values():
            yield family


def install(loads: LoadSource, registry: CollectorRegistry = REGISTRY) -> Callable[[], None]:
    """Register a :class:`LoadCollector`; returns the function that unregisters it."""
    collector = LoadCollector(loads)
    registry.register(collector)
    return lambda: registry.unregister(collector)
