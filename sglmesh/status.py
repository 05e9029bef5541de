"""``sglmesh status``: the live mesh in one table -- who serves what, and how loaded it is.

Instances and models come from etcd (what the processor would see). Load, KV usage, prefix hit
rate and the age of each worker's last KV event come from the publishers
(``{ns}.publisher.status``); with no publisher running those columns read ``-``. ``--json``
prints the same data for scripts; ``--watch`` redraws every few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import uvloop

from proto.discovery import InstanceRecord, ModelCard, models_prefix
from proto.status import EngineStatus, PublisherStatusRequest
from shared.config import MeshConfig, add_mesh_args, mesh_config_from_namespace
from shared.flags import Flag, FlagError, OneLineParser, add_flags, flag_values, float_converter
from shared.logging import configure_logging
from shared.runtime import DistributedRuntime, MeshError

__all__ = ["collect", "main", "render_table"]

_FLAGS = (
    Flag("watch", float_converter(0.5), None, "SECONDS",
         "redraw every SECONDS until interrupted (unset: print once)"),
    Flag("timeout", float_converter(0.1), 3.0, "SECONDS",
         "how long to wait for etcd, NATS and the publishers"),
)  # fmt: skip


async def _publisher_status(runtime: DistributedRuntime, timeout: float) -> list[EngineStatus]:
    client = await runtime.client("publisher", "status")
    out: list[EngineStatus] = []
    try:
        for iid in client.instance_ids():
            try:
                async with asyncio.timeout(timeout):
                    stream = await client.generate(
                        PublisherStatusRequest(), instance_id=iid, response_type=EngineStatus
                    )
                    async for item in stream:
                        out.append(msgspec.structs.replace(item, publisher_id=iid))
            except (MeshError, TimeoutError):
                continue
    finally:
        await client.close()
    return out


async def collect(runtime: DistributedRuntime, timeout: float) -> dict[str, Any]:
    """A snapshot of the mesh as plain data (what ``--json`` prints)."""
    ns = runtime.config.namespace
    etcd = runtime.etcd.client
    instances: dict[int, dict[str, Any]] = {}
    decode_record = msgspec.msgpack.Decoder(InstanceRecord).decode
    for kv in await etcd.get_prefix(f"/{ns}/instances/".encode()):
        try:
            record = decode_record(kv.value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        entry = instances.setdefault(
            record.instance_id,
            {
                "instance_id": f"{record.instance_id:x}",
                "component": record.component,
                "endpoints": [],
                "role": record.worker_type.value if record.worker_type else record.component,
                "model": record.model,
                "host": record.host,
                "pid": record.pid,
                "age_s": round(time.time() - record.started_at, 1),
                "state": record.metadata.get("state", "ready"),
                "total_kv_blocks": (
                    record.runtime_config.total_kv_blocks if record.runtime_config else None
                ),
                "engines": [],
            },
        )
        entry["endpoints"].append(record.endpoint)
        # A process serves several endpoints; the one with a worker type names its role.
        if record.worker_type is not None:
            entry["role"] = record.worker_type.value
            entry["model"] = record.model or entry["model"]
            if record.runtime_config is not None:
                entry["total_kv_blocks"] = record.runtime_config.total_kv_blocks
    models: dict[str, dict[str, Any]] = {}
    decode_card = msgspec.msgpack.Decoder(ModelCard).decode
    for kv in await etcd.get_prefix(models_prefix(ns).encode()):
        try:
            card = decode_card(kv.value)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        model = models.setdefault(card.name, {"name": card.name, "workers": {}})
        role = card.worker_type.value
        model["workers"][role] = model["workers"].get(role, 0) + 1
    now = time.time()
    for status in await _publisher_status(runtime, timeout):
        inst = instances.get(status.worker_id)
        if inst is None:
            continue
        load = status.load
        inst["engines"].append(
            {
                "dp_rank": status.dp_rank,
                "running": load.num_running if load else None,
                "waiting": load.num_waiting if load else None,
                "kv_used_blocks": load.kv_used_blocks if load else None,
                "kv_total_blocks": load.kv_total_blocks if load else None,
                "prefix_hit_rate": load.prefix_hit_rate if load else None,
                "cached_blocks": status.cached_blocks,
                "events_relayed": status.events_relayed,
                "last_event_age_s": (
                    round(now - status.last_event_ts, 1) if status.last_event_ts else None
                ),
            }
        )
    for model in models.values():
        workers = model["workers"]
        model["servable"] = (
            bool(workers.get("aggregated"))
            or (bool(workers.get("prefill")) and bool(workers.get("decode")))
            or bool(workers.get("embedding"))
            # An image encoder serves the processor's image path.
            or bool(workers.get("encode"))
        )
    return {
        "namespace": ns,
        "time": now,
        "models": sorted(models.values(), key=lambda m: m["name"]),
        "instances": sorted(
            instances.values(), key=lambda i: (str(i["model"]), i["role"], i["instance_id"])
        ),
    }


def _cell(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def render_table(snapshot: Mapping[str, Any]) -> str:
    lines = [f"namespace {snapshot['namespace']}"]
    if not snapshot["models"]:
        lines.append("no models registered")
    for model in snapshot["models"]:
        workers = ", ".join(f"{n} {role}" for role, n in sorted(model["workers"].items()))
        state = "servable" if model["servable"] else "NOT servable"
        lines.append(f"model {model['name']}: {workers} ({state})")
    header = ("INSTANCE", "ROLE", "MODEL", "HOST", "PID", "AGE", "STATE", "DP", "RUN", "WAIT",
              "KV USED", "HIT", "CACHED", "LAST EVENT")  # fmt: skip
    rows: list[Sequence[str]] = [header]
    for inst in snapshot["instances"]:
        base = [inst["instance_id"], str(inst["role"]), str(inst["model"] or "-"), inst["host"],
                str(inst["pid"]), f"{inst['age_s']:.0f}s", inst["state"]]  # fmt: skip
        engines = inst["engines"] or [None]
        for engine in engines:
            if engine is None:
                rows.append([*base, "-", "-", "-", "-", "-", "-", "-"])
                continue
            used, total = engine["kv_used_blocks"], engine["kv_total_blocks"]
            kv = "-" if used is None or not total else f"{used}/{total} ({used / total:.0%})"
            rows.append([
                *base, str(engine["dp_rank"]), _cell(engine["running"]),
                _cell(engine["waiting"]), kv, _cell(engine["prefix_hit_rate"], "{:.0%}"),
                str(engine["cached_blocks"]), _cell(engine["last_event_age_s"], "{}s ago"),
            ])  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines.append("")
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if len(rows) == 1:
        lines.append("(no instances)")
    return "\n".join(lines)


async def _run(config: MeshConfig, watch: float | None, as_json: bool, timeout: float) -> int:
    runtime = DistributedRuntime(config)
    try:
        await runtime.start(connect_timeout=timeout)
    except ConnectionError as exc:
        print(f"sglmesh status: {exc}", file=sys.stderr)
        return 1
    try:
        while True:
            snapshot = await collect(runtime, timeout)
            if as_json:
                print(json.dumps(snapshot, indent=2))
            else:
                if watch is not None:
                    print("\033[2J\033[H", end="")
                print(render_table(snapshot))
            if watch is None:
                return 0
            await asyncio.sleep(watch)
    finally:
        # A viewer serves nothing: nothing to drain, and it must not linger on the way out.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                await runtime.shutdown(grace=0)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
        prog="sglmesh status", description="Show the live mesh: instances, models and load."
    )
    add_mesh_args(parser)
    add_flags(parser.add_argument_group("status"), _FLAGS)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ns = parser.parse_args(argv)
    # An operator's view of the mesh `sglmesh run` started here: its admin credentials,
    # unless credentials were given some other way.
    local = Path(os.environ.get("SGLMESH_RUN_DIR") or ".run") / "credentials" / "admin.env"
    given = ns.credentials or any(
        os.environ.get(v) for v in ("SGLMESH_CREDENTIALS", "SGLMESH_NATS_USER", "SGLMESH_ETCD_USER")
    )
    if not given and local.is_file():
        ns.credentials = str(local)
    config = mesh_config_from_namespace(ns, parser=parser)
    try:
        values = flag_values(_FLAGS, ns)
    except FlagError as exc:
        parser.error(str(exc))
    # The runtime logs its start and stop at info; a viewer shows only problems.
    configure_logging("warning", "text", service="status")
    try:
        return uvloop.run(_run(config, values["watch"], ns.json, values["timeout"]))
    except KeyboardInterrupt:
        return 0
