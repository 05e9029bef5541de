"""A simulated engine in its own process, reachable over the request plane (test harness).

``python -m tests.integration.engine_host --endpoint ns.comp.generate --sim-config JSON``
serves ``ns.comp.generate`` (request: ``async_generate`` keyword arguments; response: SGLang
stream dicts) and ``ns.comp.stats`` (KV page accounting per dp rank). Prints
``READY <instance hex> <bootstrap port>``. The worker service replaces this in production.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from typing import Any

from shared.config import EndpointId, parse_mesh_args
from shared.engine.sim.engine import SimConfig, SimEngine
from shared.runtime import Context, DistributedRuntime
from shared.runtime.service import Cleanup, run_service
from shared.runtime.system_server import SystemServer


def main(argv: list[str] | None = None) -> int:
    config, rest = parse_mesh_args(argv, prog="engine_host")
    parser = argparse.ArgumentParser(prog="engine_host")
    parser.add_argument("--sim-config", required=True, help="SimConfig fields as JSON")
    args = parser.parse_args(rest)
    if config.endpoint is None:
        raise SystemExit("engine_host: --endpoint is required")
    generate_id = config.endpoint
    stats_id = EndpointId(generate_id.namespace, generate_id.component, "stats")
    engine = SimEngine(SimConfig(**json.loads(args.sim_config)))

    async def generate(request: dict[str, Any], ctx: Context) -> AsyncIterator[dict[str, Any]]:
        stream = engine.async_generate(**request)
        try:
            async for out in stream:
                yield out
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def stats(request: Any, ctx: Context) -> AsyncIterator[list[dict[str, int]]]:
        yield [
            {
                "request_pages": s.cache.pool.request_pages,
                "cached_pages": s.cache.pool.cached_pages,
                "free_pages": s.cache.pool.free_pages,
                "running": s.num_running,
                "waiting": s.num_waiting,
            }
            for s in engine.schedulers
        ]

    async def start(runtime: DistributedRuntime, system: SystemServer | None) -> Cleanup:
        await engine.start()
        await runtime.endpoint(generate_id).serve(generate)
        await runtime.endpoint(stats_id).serve(stats)
        port = engine.info.bootstrap_port or 0
        print(f"READY {runtime.instance_id:x} {port}", flush=True)
        return engine.shutdown

    return run_service(config, start, service="engine-host")


if __name__ == "__main__":
    raise SystemExit(main())
