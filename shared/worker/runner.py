"""A worker's life: engine up, endpoints served, model registered, canary on, drain on SIGTERM.

Every worker service (decode, prefill, encode) runs this same life; what differs is a
:class:`WorkerRole` the service passes in: its handler, its request type, its model card, its
health-canary probe, and whether it has a KV cache to clear and engine routes to offer. So the
services own their role code and share the lifecycle.

The engine starts before the endpoint subscribes, so no request can reach a worker whose engine
is not ready. Shutdown follows the runtime's sequence (leave discovery, grace period, still
running requests end with a retryable ``shutting_down`` error so the processor can migrate
them), then the engine shuts down. A follower node of a multi-node engine (``--node-rank`` >= 1)
runs only its engine side: it serves and registers nothing and waits for SIGTERM.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast

from proto.discovery import ModelCard
from proto.request import PreprocessedRequest
from shared.config import EndpointId
from shared.engine.args import EngineArgs
from shared.engine.protocol import Engine, EngineInfo
from shared.engine.registry import create_engine
from shared.runtime import DistributedRuntime
from shared.runtime.endpoint import Coalesce, Context, ServedEndpoint
from shared.runtime.service import Cleanup, StartupError, run_service
from shared.runtime.system_server import SystemServer
from shared.worker.args import WorkerConfig
from shared.worker.coalesce import coalesce_outputs
from shared.worker.engine_routes import register_engine_routes
from shared.worker.handlers import ClearKvBlocksHandler
from shared.worker.health import Canary, CanaryProbe, canary_payload, generate_probe
from shared.worker.metrics import WorkerMetrics, install_engine_metrics, metrics_source
from shared.worker.registration import (
    instance_fields,
    model_card,
    register_model,
    with_model_files,
)

__all__ = ["Handler", "WorkerRole", "llm_role", "worker_main"]

log = logging.getLogger(__name__)


class Handler(Protocol):
    """A worker's ``generate``: an async generator of response chunks per request."""

    def generate(self, request: Any, ctx: Context) -> AsyncIterator[Any]: ...


class WorkerEngine(Protocol):
    """What the lifecycle itself needs of an engine (an LLM ``Engine`` or an encoder)."""

    info: EngineInfo

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...


E = TypeVar("E", bound=WorkerEngine)


@dataclass(frozen=True)
class WorkerRole(Generic[E]):
    """What one worker service brings to the shared lifecycle."""

    create_engine: Callable[[EngineArgs], E]
    # The endpoint's handler, built once the engine runs.
    handler: Callable[[E, WorkerConfig, WorkerMetrics], Handler]
    request_type: Any
    # The health canary's probe for this worker (given its card), or None for no canary.
    canary: Callable[[E, WorkerConfig, ModelCard], CanaryProbe] | None
    card: Callable[[E, WorkerConfig, int], ModelCard]
    instance_fields: Callable[[E, WorkerConfig], dict[str, Any]]
    # ``{ns}.{component}.clear_kv_blocks`` and the ``/engine/*`` routes: only for an
    # ``Engine`` (the LLM protocol), which has a KV cache and the control methods.
    clear_kv_blocks: bool = True
    engine_routes: bool = True
    # Merges a stream's chunks that wait for the same frame (see ``Coalesce``).
    coalesce: Coalesce | None = None


def _llm_canary(engine: Engine, config: WorkerConfig, card: ModelCard) -> CanaryProbe:
    return generate_probe(
        canary_payload(
            config.role, bos_token_id=card.bos_token_id, bootstrap_port=engine.info.bootstrap_port
        )
    )


def llm_role(
    handler: Callable[[Engine, WorkerConfig, WorkerMetrics], Handler],
) -> WorkerRole[Engine]:
    """An LLM worker (aggregated, decode or prefill) with ``handler``."""
    return WorkerRole(
        create_engine=create_engine,
        handler=handler,
        request_type=PreprocessedRequest,
        canary=_llm_canary,
        card=lambda engine, config, iid: model_card(engine.info, config, iid),
        instance_fields=lambda engine, config: instance_fields(engine.info, config),
        coalesce=coalesce_outputs,
    )


async def _start_engine(config: WorkerConfig, role: WorkerRole[E]) -> tuple[E, float]:
    try:
        engine = role.create_engine(config.engine)
        started = time.perf_counter()
        await engine.start()
    except Exception as exc:
        raise StartupError(f"the engine failed to start: {exc}") from exc
    return engine, time.perf_counter() - started


def worker_main(config: WorkerConfig, role: WorkerRole[E]) -> int:
    """Run the worker until SIGTERM/SIGINT; returns the process exit code."""

    async def start(runtime: DistributedRuntime, system: SystemServer | None) -> Cleanup:
        engine, load_seconds = await _start_engine(config, role)
        model = config.engine.model_name
        source = metrics_source(engine)
        metrics = WorkerMetrics(model, sglang_source=source)
        metrics.model_loaded(load_seconds)
        install_engine_metrics(engine, model, source=source)
        log.info(
            "engine ready",
            extra={"engine": engine.info.engine, "model": model, "load_s": round(load_seconds, 3)},
        )
        if config.engine.node_rank >= 1:
            log.info(
                "follower node: engine only, serving nothing",
                extra={"node_rank": config.engine.node_rank},
            )
            return engine.shutdown

        handler = role.handler(engine, config, metrics)
        eid = config.endpoint
        served: ServedEndpoint | None = None
        canary: Canary | None = None

        async def leave() -> None:
            if canary is not None:
                canary.suspend()
            if served is not None:
                await served.unregister()

        async def rejoin() -> None:
            if served is not None:
                await served.register()
            if canary is not None:
                canary.resume()

        # Before the endpoint is served: once /health says ready, the routes answer too.
        if system is not None and role.engine_routes:
            register_engine_routes(system, cast(Engine, engine), leave=leave, rejoin=rejoin)
        try:
            served = await runtime.endpoint(eid).serve(
                handler.generate,
                request_type=role.request_type,
                coalesce=role.coalesce,
                **role.instance_fields(engine, config),
            )
            if role.clear_kv_blocks:
                clear = ClearKvBlocksHandler(cast(Engine, engine))
                await runtime.endpoint(
                    EndpointId(eid.namespace, eid.component, "clear_kv_blocks")
                ).serve(clear.generate, request_type=dict)
            card = await with_model_files(runtime, role.card(engine, config, runtime.instance_id))
            await register_model(runtime, card)
        except Exception as exc:
            await engine.shutdown()
            raise StartupError(f"registration failed: {exc}") from exc

        if config.worker.health_check and role.canary is not None:
            canary = Canary(
                runtime,
                served,
                role.canary(engine, config, card),
                wait_time=config.worker.canary_wait_time,
                timeout=config.worker.health_check_timeout,
            )
            canary.start()

        log.info(
            "worker serving",
            extra={"role": config.role, "endpoint": str(eid), "model": model,
                   "instance_id": f"{runtime.instance_id:x}"},
        )  # fmt: skip

        async def cleanup() -> None:
            if canary is not None:
                await canary.close()
            await engine.shutdown()

        return cleanup

    return run_service(config.mesh, start, service=f"worker-{config.role}")
