"""Engine load metrics and KV events, as the engine emits them and as the mesh republishes them.

``KvMetrics`` is SGLang's per-scheduler load report. Despite their names its ``kv_*_blocks``
fields count **tokens**; :meth:`LoadMetrics.from_kv_metrics` converts to blocks. SGLang sends
it pickled by default; with msgpack IPC it is msgspec-encoded as a tagged positional array
``["KvMetrics", request_active_slots, ...]``, which :class:`SglangKvMetrics` decodes. A pickle
of SGLang's class rebuilds as ``msgspec._core.rebuild(cls, {field: value})``, so a restricted
unpickler can map :data:`SGLANG_KV_METRICS_CLASS` to :class:`KvMetrics`; keep the field names.

``LoadMetrics`` and ``KvEventsMessage`` are the publisher's normalized forms on NATS
(``{ns}.events.load.{instance_id}`` and ``{ns}.events.kv.{instance_id}``): stamped with the
worker id and DP rank, in blocks, so the router needs no engine-specific knowledge.
``KvStateRequest``/``KvStateSnapshot`` are the publisher's state dump
(``{ns}.publisher.kv_state``), which a consumer that starts late applies before the live
batches; a ``KvEventsMessage`` with ``seq`` -1 is the publisher's reset marker (the engine
restarted and numbers its batches from 0 again; its events clear the cache).
"""

from __future__ import annotations

import msgspec

from proto.kv_events import BlockStored, KVEvent

# (module, qualname) of SGLang's class inside its pickles.
SGLANG_KV_METRICS_CLASS = (
    "sglang.srt.managers.scheduler_components.kv_events_publisher",
    "KvMetrics",
)


class KvMetrics(msgspec.Struct, kw_only=True):
    # Running requests and the engine's max running requests.
    request_active_slots: int = 0
    request_total_slots: int = 0
    # In tokens: int(token_usage * max_total_num_tokens) and max_total_num_tokens.
    kv_active_blocks: int = 0
    kv_total_blocks: int = 0
    num_requests_waiting: int = 0
    gpu_cache_usage_perc: float = 0.0
    gpu_prefix_cache_hit_rate: float = 0.0
    data_parallel_rank: int = 0


class SglangKvMetrics(KvMetrics, tag="KvMetrics", array_like=True):
    """SGLang's exact msgpack encoding of :class:`KvMetrics`."""


class LoadMetrics(msgspec.Struct, omit_defaults=True, kw_only=True):
    worker_id: int
    dp_rank: int = 0
    kv_used_blocks: int = 0
    kv_total_blocks: int = 0
    num_running: int = 0
    num_waiting: int = 0
    max_running: int = 0
    cache_usage: float = 0.0
    prefix_hit_rate: float = 0.0
    ts: float

    @classmethod
    def from_kv_metrics(
        cls, m: KvMetrics, *, worker_id: int, page_size: int, ts: float
    ) -> LoadMetrics:
        """Normalize an SGLang report; ``page_size`` is the engine's KV block size in tokens.

        Token counts round up to blocks, as the reference does for both fields.
        """
        if page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {page_size}")
        return cls(
            worker_id=worker_id,
            dp_rank=m.data_parallel_rank,
            kv_used_blocks=-(-m.kv_active_blocks // page_size),
            kv_total_blocks=-(-m.kv_total_blocks // page_size),
            num_running=m.request_active_slots,
            num_waiting=m.num_requests_waiting,
            max_running=m.request_total_slots,
            cache_usage=m.gpu_cache_usage_perc,
            prefix_hit_rate=m.gpu_prefix_cache_hit_rate,
            ts=ts,
        )


class KvEventsMessage(msgspec.Struct, kw_only=True):
    worker_id: int
    dp_rank: int
    # The engine publisher's sequence number for this batch, for gap detection.
    seq: int
    ts: float
    events: list[KVEvent]


class KvStateRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Ask a publisher (``{ns}.publisher.kv_state``) for the engines' current caches.

    ``worker_ids`` None: every engine it relays; else only those (unknown ids are skipped).
    """

    worker_ids: list[int] | None = None


class KvStateSnapshot(msgspec.Struct, kw_only=True):
    """One (worker, DP rank)'s cache as the publisher's relayed events describe it.

    Applying ``events`` in order to an empty cache rebuilds it: ``BlockStored`` events whose
    parents come before their children. ``seq`` is the last engine batch the state includes
    (-1: none yet); a consumer then applies relayed batches with a higher ``seq`` only.

    A large cache is split over consecutive snapshots with the same worker, rank and ``seq``:
    ``part`` counts from 0 (part 0 starts from an empty cache, the others add to it) and
    ``last`` marks the final one. Keeping each part small keeps every response frame well
    below NATS' payload limit.
    """

    worker_id: int
    dp_rank: int
    seq: int
    events: list[BlockStored]
    part: int = 0
    last: bool = True


# Where the publisher serves its state dump: ``{ns}.publisher.kv_state``.
KV_STATE_COMPONENT = "publisher"
KV_STATE_ENDPOINT = "kv_state"


def kv_events_subject(namespace: str, worker_id: int) -> str:
    """The NATS subject of a worker's relayed KV events (``KvEventsMessage``)."""
    return f"{namespace}.events.kv.{worker_id:x}"


def load_metrics_subject(namespace: str, worker_id: int) -> str:
    """The NATS subject of a worker's relayed load reports (``LoadMetrics``)."""
    return f"{namespace}.events.load.{worker_id:x}"
