"""The publisher's command line: mesh flags plus which engines to relay and how.

Every flag has an ``SGLMESH_*`` twin. ``--zmq-endpoint`` may be repeated; its variable
``SGLMESH_ZMQ_ENDPOINT`` holds several specs separated by ``;`` or newlines (a spec's own
fields are separated by commas).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.publisher.relay import RelaySettings
from services.publisher.sources import EngineSource, parse_static_sources, this_host
from shared.config import MeshConfig, add_mesh_args, mesh_config_from_namespace
from shared.flags import (
    Flag,
    FlagError,
    OneLineParser,
    add_flags,
    flag_values,
    float_converter,
    int_converter,
    parse_bool,
)

__all__ = ["PublisherConfig", "PublisherFlags", "parse_publisher_args"]

_ZMQ_ENV = "SGLMESH_ZMQ_ENDPOINT"


@dataclass(frozen=True)
class PublisherFlags:
    node: str = field(default_factory=this_host)
    discover: bool = True
    zmq_endpoints: tuple[str, ...] = ()
    replay_timeout: float = 2.0
    idle_check_interval: float = 5.0
    zmq_hwm: int = 100_000
    rebind_interval: float = 5.0
    static_sources: tuple[EngineSource, ...] = ()

    def relay_settings(self) -> RelaySettings:
        return RelaySettings(
            replay_timeout=self.replay_timeout,
            idle_check_interval=self.idle_check_interval or None,
            hwm=self.zmq_hwm,
            rebind_interval=self.rebind_interval,
        )


@dataclass(frozen=True)
class PublisherConfig:
    mesh: MeshConfig
    flags: PublisherFlags


def _node(text: str) -> str:
    value = text.strip()
    if not value:
        raise ValueError("expected a host name, or '*' for every host")
    return value


def _check_spec(text: str) -> str:
    parse_static_sources([text])
    return text.strip()


def _split_specs(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"[;\n]", text) if s.strip()]


_FLAGS: tuple[Flag, ...] = (
    Flag("node", _node, None, "NAME",
         "relay the engines whose instance records carry this host name ('*': every host)",
         default_text="this host's name"),
    Flag("discover", parse_bool, True, None,
         "find engines through the workers' instance records in etcd (--no-discover: only "
         "the --zmq-endpoint engines)"),
    Flag("replay_timeout", float_converter(0.0, strict=True), 2.0, "SECONDS",
         "how long a replay request to an engine may take"),
    Flag("idle_check_interval", float_converter(0.0), 5.0, "SECONDS",
         "ask a quiet engine's replay socket for missed batches this often (0: never)"),
    Flag("zmq_hwm", int_converter(0), 100_000, "N",
         "high-water mark of each KV-event subscription, in batches (0: unlimited)"),
    Flag("rebind_interval", float_converter(0.0, strict=True), 5.0, "SECONDS",
         "retry period for a metrics socket that cannot be bound or a relay that failed"),
)  # fmt: skip


def parse_publisher_args(
    argv: Sequence[str] | None = None,
    *,
    prog: str = "sglmesh publisher",
    env: Mapping[str, str] | None = None,
) -> PublisherConfig:
    """Parse the whole command line; bad input exits 2 with one line naming the flag."""
    environ: Mapping[str, str] = os.environ if env is None else env
    parser = OneLineParser(
        prog=prog,
        allow_abbrev=False,
        description="Relays every engine on this node: KV events (gaps filled from the "
        "engines' replay sockets) and load metrics from their ZMQ sockets to NATS "
        "({ns}.events.kv.<worker>, {ns}.events.load.<worker>); serves the engines' cache "
        "state on {ns}.publisher.kv_state; exports sglang:* and sglmesh_publisher_* metrics.",
    )
    add_mesh_args(parser)
    group = parser.add_argument_group("publisher")
    add_flags(group, _FLAGS)

    def spec(text: str) -> str:
        try:
            return _check_spec(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    group.add_argument(
        "--zmq-endpoint",
        dest="zmq_endpoint",
        action="append",
        type=spec,
        metavar="SPEC",
        help="relay an engine given by its sockets, one DP rank per flag (repeatable): "
        "worker_id=HEX,kv=tcp://HOST:PORT[,replay=tcp://HOST:PORT][,metrics=ADDRESS]"
        "[,dp_rank=N][,page_size=N][,topic=TOPIC] "
        f"(env: {_ZMQ_ENV}, specs separated by ';'; default: none)",
    )
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    mesh = mesh_config_from_namespace(ns, environ, parser=parser)
    try:
        values = flag_values(_FLAGS, ns, environ)
    except FlagError as exc:
        parser.error(str(exc))
    specs: list[str] = list(ns.zmq_endpoint or [])
    source = "--zmq-endpoint"
    if not specs and (environ.get(_ZMQ_ENV) or "").strip():
        specs = _split_specs(environ[_ZMQ_ENV])
        source = f"environment variable {_ZMQ_ENV}"
    try:
        static = parse_static_sources(specs)
    except ValueError as exc:
        parser.error(f"invalid {source}: {exc}")
    if values["node"] is None:
        values["node"] = this_host()
    if not values["discover"] and not static:
        parser.error("--no-discover leaves nothing to relay: give --zmq-endpoint")
    flags = PublisherFlags(**values, zmq_endpoints=tuple(specs), static_sources=tuple(static))
    return PublisherConfig(mesh=mesh, flags=flags)
