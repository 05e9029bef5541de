"""The encode service's metrics: batching and embedding figures beside the worker's own.

``sglmesh_worker_*`` (requests, errors, in flight by role ``embedding``) come from the shared
:class:`~shared.worker.metrics.WorkerMetrics`; this module adds what only an embedding worker
has: inputs and tokens embedded, forwards and their size (the batcher's effect is visible as
inputs per forward and padding), forward time, and the queue depth.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from shared.worker.metrics import WorkerMetrics

__all__ = ["EncodeMetrics"]

_MODEL = ["model"]
inputs_total = Counter(
    "sglmesh_embedding_inputs_total", "Inputs embedded (one vector each)", _MODEL
)
tokens_total = Counter("sglmesh_embedding_tokens_total", "Input tokens embedded", _MODEL)
padded_tokens_total = Counter(
    "sglmesh_embedding_padded_tokens_total",
    "Token positions computed, padding included (over tokens_total: the padding overhead)",
    _MODEL,
)
forwards_total = Counter("sglmesh_embedding_forwards_total", "Encoder forward passes", _MODEL)
batch_inputs = Histogram(
    "sglmesh_embedding_batch_inputs",
    "Inputs per forward pass (dynamic batching at work)",
    _MODEL,
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
forward_seconds = Histogram(
    "sglmesh_embedding_forward_seconds",
    "Seconds per forward pass",
    _MODEL,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
request_seconds = Histogram(
    "sglmesh_embedding_request_seconds",
    "Seconds from a request's arrival at the worker to its vectors (queue + forward)",
    _MODEL,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
queue_depth = Gauge("sglmesh_embedding_queue_inputs", "Inputs waiting for a forward pass", _MODEL)


class EncodeMetrics:
    """The handler's and the batcher's hooks, as Prometheus metrics for one model.

    ``worker`` takes the request hooks (the worker's own counters); None for a batcher-only
    instance, made before the worker's metrics exist."""

    def __init__(self, worker: WorkerMetrics | None, model: str) -> None:
        self._worker = worker
        self._inputs = inputs_total.labels(model)
        self._tokens = tokens_total.labels(model)
        self._padded = padded_tokens_total.labels(model)
        self._forwards = forwards_total.labels(model)
        self._batch = batch_inputs.labels(model)
        self._forward_s = forward_seconds.labels(model)
        self._request_s = request_seconds.labels(model)
        self._queue = queue_depth.labels(model)

    # -- handler -----------------------------------------------------------------------------

    def request_started(self, role: str) -> None:
        if self._worker is not None:
            self._worker.request_started(role)

    def request_finished(self, role: str, error_kind: str | None) -> None:
        if self._worker is not None:
            self._worker.request_finished(role, error_kind)

    def embedded(self, inputs: int, tokens: int, seconds: float) -> None:
        self._inputs.inc(inputs)
        self._tokens.inc(max(tokens, 0))
        self._request_s.observe(max(seconds, 0.0))

    # -- batcher -----------------------------------------------------------------------------

    def forward(self, inputs: int, tokens: int, padded: int, seconds: float) -> None:
        self._forwards.inc()
        self._batch.observe(inputs)
        self._padded.inc(padded)
        self._forward_s.observe(max(seconds, 0.0))

    def queued(self, depth: int) -> None:
        self._queue.set(depth)
