"""Running a service process: event loop, logging, runtime, system server, signals, drain.

Every long-running sglmesh process goes through :func:`run_service`, so they all shut down the
same way: SIGTERM or SIGINT -> leave discovery -> in-flight requests get the grace period ->
close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable

import uvloop

from shared.config import MeshConfig
from shared.logging import configure_logging
from shared.runtime.runtime import DistributedRuntime
from shared.runtime.system_server import SystemServer

log = logging.getLogger(__name__)


class StartupError(Exception):
    """A service could not start (engine, registration): one clear line, exit code 1."""


Cleanup = Callable[[], Awaitable[None]]
# A service's start function: serves its endpoints and may return a cleanup coroutine function
# that runs after the runtime drained (e.g. the engine's shutdown).
ServiceMain = Callable[[DistributedRuntime, SystemServer | None], Awaitable[Cleanup | None]]


async def serve(config: MeshConfig, main: ServiceMain) -> None:
    runtime = DistributedRuntime(config)
    await runtime.start()
    system: SystemServer | None = None
    if config.system_port is not None:
        system = SystemServer(runtime, config.system_host, config.system_port)
        await system.start()
        log.info("system server listening", extra={"port": system.port})
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        log.info("signal received", extra={"signal": signal.Signals(signum).name})
        runtime.request_shutdown()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    cleanup: Cleanup | None = None
    try:
        cleanup = await main(runtime, system)
        await runtime.shutdown_event.wait()
    finally:
        await runtime.shutdown()
        if cleanup is not None:
            await cleanup()
        if system is not None:
            await system.close()


def run_service(config: MeshConfig, main: ServiceMain, *, service: str) -> int:
    configure_logging(config.log_level, config.log_format, service=service)
    try:
        uvloop.run(serve(config, main))
    except (ConnectionError, StartupError) as exc:
        log.error(str(exc))
        return 1
    return 0
