"""What a publisher reports about the engines it relays, for ``sglmesh status``."""

from __future__ import annotations

import msgspec

from proto.metrics import LoadMetrics


class PublisherStatusRequest(msgspec.Struct, kw_only=True):
    worker_ids: list[int] | None = None


class EngineStatus(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One engine DP rank as its publisher sees it."""

    worker_id: int
    dp_rank: int = 0
    # The last load report, if any arrived yet.
    load: LoadMetrics | None = None
    # Wall-clock time of the last KV event batch (the engine's timestamp), if any.
    last_event_ts: float | None = None
    events_relayed: int = 0
    cached_blocks: int = 0
    publisher_id: int = 0
