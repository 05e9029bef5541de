"""``sglmesh publisher`` / ``python -m services.publisher``: one per node, relaying its engines.

Start-up: join the mesh (NATS, etcd), find the node's engines (the workers' instance records
in etcd, and ``--zmq-endpoint``), relay each one's KV events and load metrics to NATS
(``{ns}.events.kv.<worker>``, ``{ns}.events.load.<worker>``), serve the engines' cache state
on ``{ns}.publisher.kv_state``, and export ``sglang:*`` and ``sglmesh_publisher_*`` on the
system port. SIGTERM: leave discovery, stop relaying, close.

Modules: ``sources`` (which engines), ``relay`` (one engine's sockets), ``state`` (the cache
table), ``metrics`` (Prometheus), ``supervisor`` (the relays and the state dump), ``args``.
"""

from __future__ import annotations

from services.publisher.args import PublisherConfig, parse_publisher_args
from services.publisher.supervisor import Supervisor
from shared.runtime import DistributedRuntime
from shared.runtime.service import Cleanup, ServiceMain, run_service
from shared.runtime.system_server import SystemServer

__all__ = ["main", "start_publisher"]


def start_publisher(config: PublisherConfig) -> ServiceMain:
    async def start(runtime: DistributedRuntime, system: SystemServer | None) -> Cleanup:
        del system  # /health, /live and /metrics are the system server's own
        supervisor = Supervisor(runtime, config.flags)
        await supervisor.start()
        runtime.add_drain_hook(supervisor.drain)
        return supervisor.close

    return start


def main(argv: list[str] | None = None) -> int:
    config = parse_publisher_args(argv)
    return run_service(config.mesh, start_publisher(config), service="publisher")
