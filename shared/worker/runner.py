"""A worker's life: engine up, endpoints served, model registered, canary on, drain on SIGTERM.

The engine starts before the endpoint subscribes, so no request can reach a worker whose engine
is not ready. Shutdown follows the runtime's sequence (leave discovery, grace period, still
running requests end with a retryable ``shutting_down`` error so the processor can migrate
them), then the engine shuts down. A follower node of a multi-node engine (``--node-rank`` >= 1)
runs only its engine side: it serves and registers nothing and waits for SIGTERM.
"""

from __future__ import annotations

import logging
import time

from proto.request import PreprocessedRequest
from shared.config import EndpointId
from shared.engine.protocol import Engine
from shared.engine.registry import create_engine, engine_kind
from shared.runtime import DistributedRuntime
from shared.runtime.endpoint import ServedEndpoint
from shared.runtime.service import Cleanup, StartupError, run_service
from shared.runtime.system_server import SystemServer
from shared.worker.args import PREFILL, WorkerConfig
from shared.worker.engine_routes import register_engine_routes
from shared.worker.handlers import ClearKvBlocksHandler, DecodeHandler, PrefillHandler
from shared.worker.health import Canary, canary_payload
from shared.worker.metrics import WorkerMetrics, install_engine_metrics
from shared.worker.registration import instance_fields, model_card, register_model

log = logging.getLogger(__name__)


async def _start_engine(config: WorkerConfig) -> tuple[Engine, float]:
    try:
        engine = create_engine(config.engine)
        started = time.perf_counter()
        await engine.start()
    except Exception as exc:
        raise StartupError(f"the engine failed to start: {exc}") from exc
    return engine, time.perf_counter() - started


def _handler(engine: Engine, config: WorkerConfig, metrics: WorkerMetrics) -> object:
    args = config.engine
    kind = engine_kind(engine.info.engine)
    skip = args.skip_tokenizer_init and not kind.min_tokens_without_tokenizer
    if config.role == PREFILL:
        info = engine.info
        return PrefillHandler(
            engine,
            bootstrap_host=info.bootstrap_host or "127.0.0.1",
            bootstrap_port=info.bootstrap_port or args.disaggregation_bootstrap_port,
            dp_size=info.dp_size,
            skip_tokenizer_init=skip,
            metrics=metrics,
        )
    return DecodeHandler(
        engine,
        disaggregation_mode=args.disaggregation_mode,
        skip_tokenizer_init=skip,
        metrics=metrics,
    )


def worker_main(config: WorkerConfig) -> int:
    """Run the worker until SIGTERM/SIGINT; returns the process exit code."""

    async def start(runtime: DistributedRuntime, system: SystemServer | None) -> Cleanup:
        engine, load_seconds = await _start_engine(config)
        model = config.engine.model_name
        source = engine_kind(engine.info.engine).metrics
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

        handler = _handler(engine, config, metrics)
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
        if system is not None:
            register_engine_routes(system, engine, leave=leave, rejoin=rejoin)
        try:
            served = await runtime.endpoint(eid).serve(
                handler.generate,  # type: ignore[attr-defined]
                request_type=PreprocessedRequest,
                **instance_fields(engine.info, config),
            )
            clear = ClearKvBlocksHandler(engine)
            await runtime.endpoint(
                EndpointId(eid.namespace, eid.component, "clear_kv_blocks")
            ).serve(clear.generate, request_type=dict)
            card = model_card(engine.info, config, runtime.instance_id)
            await register_model(runtime, card)
        except Exception as exc:
            await engine.shutdown()
            raise StartupError(f"registration failed: {exc}") from exc

        if config.worker.health_check:
            canary = Canary(
                runtime,
                served,
                canary_payload(
                    config.role,
                    bos_token_id=card.bos_token_id,
                    bootstrap_port=engine.info.bootstrap_port,
                ),
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
