"""The processor's Prometheus metrics (``sglmesh_processor_*``), on its HTTP port's /metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_PREFIX = "sglmesh_processor"

# Seconds: from sub-millisecond (simulated engine) to long generations.
_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DURATION = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_TOKENS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 131072)

requests = Counter(
    f"{_PREFIX}_requests",
    "HTTP requests by model, endpoint and status code",
    ["model", "endpoint", "status"],
)
inflight = Gauge(f"{_PREFIX}_inflight_requests", "requests being served now", ["model"])
time_to_first_token = Histogram(
    f"{_PREFIX}_time_to_first_token_seconds",
    "from the request's arrival to its first generated text",
    ["model"],
    buckets=_LATENCY,
)
inter_token_latency = Histogram(
    f"{_PREFIX}_inter_token_latency_seconds",
    "gap between output writes divided by the tokens they carry",
    ["model"],
    buckets=_LATENCY,
)
request_duration = Histogram(
    f"{_PREFIX}_request_duration_seconds",
    "from the request's arrival to its last byte",
    ["model", "endpoint"],
    buckets=_DURATION,
)
input_tokens = Histogram(
    f"{_PREFIX}_input_tokens", "prompt tokens per request", ["model"], buckets=_TOKENS
)
output_tokens = Histogram(
    f"{_PREFIX}_output_tokens", "generated tokens per request", ["model"], buckets=_TOKENS
)
cached_tokens = Counter(
    f"{_PREFIX}_cached_prompt_tokens", "prompt tokens the engines found in their prefix cache",
    ["model"],
)  # fmt: skip
migrations = Counter(
    f"{_PREFIX}_migrations",
    "worker streams resent to another worker, by the error that ended them",
    ["model", "reason"],
)
routing_decisions = Counter(
    f"{_PREFIX}_routing_decisions",
    "requests (or request legs) sent to each worker instance",
    ["model", "role", "instance"],
)
rejected = Counter(f"{_PREFIX}_rejected", "requests refused before routing, by reason", ["reason"])
client_disconnects = Counter(
    f"{_PREFIX}_client_disconnects", "requests whose client went away before the end", ["model"]
)
kv_overlap = Histogram(
    f"{_PREFIX}_kv_overlap_ratio",
    "share of the prompt the KV router expected the chosen worker to have cached",
    ["model"],
    buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0),
)
ignored_fields = Counter(
    f"{_PREFIX}_ignored_fields",
    "request fields ignored as no standard's (vendor extras), by name; names past the first "
    "64 distinct ones count as 'other'",
    ["field"],
)
image_cache = Counter(
    f"{_PREFIX}_image_cache",
    "images by what the embedding cache did: hit, miss (encoded), shared (a call in flight)",
    ["result"],
)
