"""Prometheus metrics of the request plane, shared by every runtime in the process.

They live at module level because prometheus-client refuses to register a name twice, and one
process may hold several runtimes (tests, benchmarks). Labels keep endpoints apart.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Request-plane hops on loopback are sub-millisecond; the default buckets start at 5 ms.
_LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

requests_total = Counter(
    "sglmesh_endpoint_requests_total", "Requests accepted by an endpoint", ["endpoint"]
)
errors_total = Counter(
    "sglmesh_endpoint_errors_total",
    "Requests an endpoint ended with an error, by error code",
    ["endpoint", "code"],
)
inflight_requests = Gauge(
    "sglmesh_endpoint_inflight_requests", "Requests an endpoint is handling now", ["endpoint"]
)
request_duration = Histogram(
    "sglmesh_endpoint_request_duration_seconds",
    "Time from accepting a request to its last frame",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
)
cancellations_total = Counter(
    "sglmesh_endpoint_cancellations_total", "Requests cancelled by their caller", ["endpoint"]
)
client_requests_total = Counter(
    "sglmesh_client_requests_total", "Requests sent through the request plane", ["endpoint"]
)
client_errors_total = Counter(
    "sglmesh_client_errors_total",
    "Client-side request failures, by error code",
    ["endpoint", "code"],
)
client_ack_latency = Histogram(
    "sglmesh_client_ack_latency_seconds",
    "Request-plane round trip: from publishing a request to the responder's acknowledgement",
    ["endpoint"],
    buckets=_LATENCY_BUCKETS,
)
lease_regrants_total = Counter(
    "sglmesh_etcd_lease_regrants_total", "Times the process lost its etcd lease and re-granted it"
)
nats_reconnects_total = Counter("sglmesh_nats_reconnects_total", "NATS reconnections")
reregistrations_total = Counter(
    "sglmesh_etcd_reregistrations_total",
    "Times a registered key was found missing or changed while the lease lived, and rewritten",
)
client_quarantines_total = Counter(
    "sglmesh_client_quarantines_total",
    "Instances taken out of routing because they were found dead while their lease lived",
    ["endpoint"],
)
response_fallbacks_total = Counter(
    "sglmesh_response_fallbacks_total",
    "Times a responder could not reach a caller's response server and answered over NATS",
)
response_connections = Gauge(
    "sglmesh_response_connections",
    "Open direct response connections, by side (caller: accepted; responder: opened)",
    ["side"],
)
