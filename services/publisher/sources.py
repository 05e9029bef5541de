"""Which engines the publisher relays: discovered from the workers' instance records, or given.

Discovery watches every instance record of the namespace (``/{ns}/instances/``, all
components). A worker process writes several records (one per endpoint); those with ``zmq``
set describe its engine. Records are deduplicated by instance id, and kept when their
``host`` is this publisher's node (``--node``, by default this host's name, which is what
workers write; ``*`` keeps every host). A record that disappears takes its engine with it.

Static sources (``--zmq-endpoint``) name an engine's sockets directly, one DP rank per spec::

    worker_id=HEX,kv=tcp://host:5557[,replay=tcp://host:5558][,metrics=ipc:///tmp/m]
        [,dp_rank=0][,page_size=16][,topic=...]

``worker_id`` is hexadecimal (an optional ``0x`` prefix is accepted), as instance ids are
written everywhere in the mesh; specs with the same ``worker_id`` are one engine's ranks.

Addresses: a worker advertises a wildcard bind as loopback (``tcp://127.0.0.1:5557``), which
only works on its own host. For a record from another host (``--node '*'``), loopback TCP
addresses are dialled at the record's ``host`` instead, and ``ipc://`` KV sockets are skipped
(they exist on that host's filesystem only). The metrics socket is *bound* by the consumer,
so the publisher binds it only for engines on its own host (and for static sources).
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass

from proto.discovery import InstanceRecord
from shared.runtime.discovery import PrefixWatcher
from shared.runtime.etcd import EtcdSession

__all__ = [
    "ALL_NODES",
    "EngineSource",
    "RankSockets",
    "SourceWatcher",
    "dial_address",
    "parse_static_sources",
    "source_from_record",
]

log = logging.getLogger(__name__)

ALL_NODES = "*"
_LOOPBACK = re.compile(r"^tcp://(127\.\d+\.\d+\.\d+|localhost|\[::1\]):(\d+)$")
_SPEC_KEYS = ("worker_id", "kv", "replay", "metrics", "dp_rank", "page_size", "topic")


@dataclass(frozen=True, slots=True)
class RankSockets:
    """One publisher (DP) rank: its KV-event PUB address and replay ROUTER address."""

    dp_rank: int
    kv_events: str
    replay: str | None = None


@dataclass(frozen=True, slots=True)
class EngineSource:
    """One engine (a worker instance) to relay: its ranks' sockets and its metrics socket."""

    worker_id: int
    ranks: tuple[RankSockets, ...]
    # Where to bind the PULL the engine pushes load metrics to; None: no load metrics.
    metrics: str | None
    # KV block size in tokens, to turn the engine's token counts into blocks.
    page_size: int
    topic: str = ""
    host: str = ""
    static: bool = False


def this_host() -> str:
    """The name workers on this host write into their records."""
    return socket.gethostname()


def dial_address(endpoint: str, record_host: str, local: bool) -> str | None:
    """The address to dial for a socket a worker advertises; None when it cannot be reached
    from here (an ipc path on another host)."""
    if local:
        return endpoint
    if endpoint.startswith(("ipc://", "inproc://")):
        return None
    match = _LOOPBACK.match(endpoint)
    if match and record_host:
        host = f"[{record_host}]" if ":" in record_host else record_host
        return f"tcp://{host}:{match.group(2)}"
    return endpoint


def source_from_record(record: InstanceRecord, *, local_host: str) -> EngineSource | None:
    """The engine a record describes, as dialled from ``local_host``; None without sockets."""
    zmq = record.zmq
    if zmq is None or not (zmq.kv_events or zmq.metrics):
        return None
    local = record.host == local_host
    rc = record.runtime_config
    start = rc.data_parallel_start_rank if rc is not None else 0
    page_size = (rc.kv_cache_block_size if rc is not None else None) or 1
    ranks: list[RankSockets] = []
    for i, endpoint in enumerate(zmq.kv_events):
        kv = dial_address(endpoint, record.host, local)
        if kv is None:
            log.warning(
                "kv events socket of a remote engine is not reachable from here",
                extra={"worker_id": f"{record.instance_id:x}", "endpoint": endpoint},
            )
            continue
        replay = zmq.kv_events_replay[i] if i < len(zmq.kv_events_replay) else ""
        ranks.append(
            RankSockets(start + i, kv, dial_address(replay, record.host, local) if replay else None)
        )
    metrics = zmq.metrics if local else None
    if zmq.metrics and not local:
        log.info(
            "load metrics of an engine on another host are left to that host's publisher",
            extra={"worker_id": f"{record.instance_id:x}", "host": record.host},
        )
    if not ranks and metrics is None:
        return None
    return EngineSource(
        worker_id=record.instance_id,
        ranks=tuple(ranks),
        metrics=metrics,
        page_size=page_size,
        topic=record.metadata.get("kv_events_topic", ""),
        host=record.host,
    )


def _parse_spec(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not value.strip():
            raise ValueError(f"expected key=value, got {item!r} in {text!r}")
        if key not in _SPEC_KEYS:
            raise ValueError(f"unknown key {key!r} in {text!r}; known: {', '.join(_SPEC_KEYS)}")
        if key in fields:
            raise ValueError(f"{key} given twice in {text!r}")
        fields[key] = value.strip()
    if "worker_id" not in fields:
        raise ValueError(f"worker_id is required in {text!r}")
    if "kv" not in fields and "metrics" not in fields:
        raise ValueError(f"give kv=... and/or metrics=... in {text!r}")
    return fields


def _number(fields: dict[str, str], key: str, default: int) -> int:
    raw = fields.get(key)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{key} must be an integer, got {raw!r}") from None
    return value


def parse_static_sources(specs: list[str]) -> list[EngineSource]:
    """``--zmq-endpoint`` specs as engines (specs sharing a ``worker_id`` are its ranks).

    Raises ``ValueError`` naming the offending spec.
    """
    grouped: dict[int, list[dict[str, str]]] = {}
    for spec in specs:
        fields = _parse_spec(spec)
        raw_id = fields["worker_id"].lower().removeprefix("0x")
        try:
            worker_id = int(raw_id, 16)
        except ValueError:
            raise ValueError(
                f"worker_id must be hexadecimal, got {fields['worker_id']!r}"
            ) from None
        if not 0 < worker_id < 2**63:
            raise ValueError(f"worker_id must be in [1, 2**63), got {fields['worker_id']!r}")
        grouped.setdefault(worker_id, []).append(fields)
    sources: list[EngineSource] = []
    for worker_id, entries in grouped.items():
        ranks: list[RankSockets] = []
        metrics = {e["metrics"] for e in entries if "metrics" in e}
        page_sizes = {_number(e, "page_size", 0) for e in entries} - {0}
        topics = {e.get("topic", "") for e in entries}
        who = f"worker_id {worker_id:x}"
        if len(metrics) > 1:
            raise ValueError(f"{who}: one metrics socket per engine, got {sorted(metrics)}")
        if len(page_sizes) > 1:
            raise ValueError(f"{who}: conflicting page sizes {sorted(page_sizes)}")
        if len(topics) > 1:
            raise ValueError(f"{who}: conflicting topics {sorted(topics)}")
        for entry in entries:
            if "kv" not in entry:
                continue
            rank = _number(entry, "dp_rank", 0)
            if rank < 0:
                raise ValueError(f"{who}: dp_rank must be >= 0, got {rank}")
            if any(r.dp_rank == rank for r in ranks):
                raise ValueError(f"{who}: dp_rank {rank} given twice")
            ranks.append(RankSockets(rank, entry["kv"], entry.get("replay")))
        page_size = page_sizes.pop() if page_sizes else 1
        if page_size < 1:
            raise ValueError(f"{who}: page_size must be >= 1, got {page_size}")
        sources.append(
            EngineSource(
                worker_id=worker_id,
                ranks=tuple(sorted(ranks, key=lambda r: r.dp_rank)),
                metrics=metrics.pop() if metrics else None,
                page_size=page_size,
                topic=topics.pop(),
                host=this_host(),
                static=True,
            )
        )
    return sources


class SourceWatcher:
    """The engines on one node, live from etcd: calls ``on_change(sources)`` after every
    change with the whole current set, by worker id."""

    def __init__(
        self,
        session: EtcdSession,
        namespace: str,
        *,
        node: str,
        on_change: Callable[[dict[int, EngineSource]], None],
        local_host: str | None = None,
    ) -> None:
        self.node = node
        self.local_host = this_host() if local_host is None else local_host
        self._on_change = on_change
        self._watcher: PrefixWatcher[InstanceRecord] = PrefixWatcher(
            session, f"/{namespace}/instances/", InstanceRecord
        )
        self._watcher.on_put(self._changed)
        self._watcher.on_delete(self._changed)
        self.sources: dict[int, EngineSource] = {}

    def matches(self, record: InstanceRecord) -> bool:
        return self.node == ALL_NODES or record.host == self.node

    def current(self) -> dict[int, EngineSource]:
        out: dict[int, EngineSource] = {}
        # Sorted keys: with several records per instance, the same one wins every time.
        for _, record in sorted(self._watcher.items.items()):
            if record.instance_id in out or record.zmq is None or not self.matches(record):
                continue
            source = source_from_record(record, local_host=self.local_host)
            if source is not None:
                out[record.instance_id] = source
        return out

    def _changed(self, key: str, record: InstanceRecord) -> None:
        del key, record
        sources = self.current()
        if sources != self.sources:
            self.sources = sources
            self._on_change(sources)

    async def start(self) -> None:
        await self._watcher.start()
        self.sources = self.current()
        self._on_change(self.sources)

    async def close(self) -> None:
        await self._watcher.close()
