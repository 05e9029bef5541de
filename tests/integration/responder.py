"""A responder process for chaos tests: serves a streaming endpoint through the real runtime.

Run as ``python -m tests.integration.responder --endpoint ns.comp.ep [mesh flags]``; prints
``READY <instance id hex>`` once it serves. Requests are ``{"n": chunks, "delay": seconds}``;
each chunk is ``{"i": index, "pid": pid}``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from shared.config import parse_mesh_args
from shared.runtime import Context, DistributedRuntime
from shared.runtime.service import run_service
from shared.runtime.system_server import SystemServer


async def handler(request: dict[str, Any], ctx: Context) -> AsyncIterator[dict[str, int]]:
    delay = float(request.get("delay", 0.0))
    for i in range(int(request.get("n", 1))):
        if delay:
            await asyncio.sleep(delay)
        yield {"i": i, "pid": os.getpid()}


def main(argv: list[str] | None = None) -> int:
    config, _ = parse_mesh_args(argv, prog="responder")
    if config.endpoint is None:
        raise SystemExit("responder: --endpoint is required")
    endpoint = config.endpoint

    async def start(runtime: DistributedRuntime, system: SystemServer | None) -> None:
        await runtime.endpoint(endpoint).serve(handler)
        print(f"READY {runtime.instance_id:x}", flush=True)

    return run_service(config, start, service="test-responder")


if __name__ == "__main__":
    raise SystemExit(main())
