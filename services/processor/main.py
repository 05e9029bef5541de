"""``sglmesh processor`` / ``python -m services.processor``: the OpenAI-compatible ingress.

Start-up: join the mesh (NATS, etcd), watch model cards, serve HTTP. Models become servable
as their workers register; the process is ready (``/health``) once one is. SIGTERM: stop
taking requests (503, ``/health`` not ready), let in-flight ones finish within the grace
period, then leave.
"""

from __future__ import annotations

from pathlib import Path

from services.processor.app import ProcessorApp
from services.processor.args import ProcessorConfig, parse_processor_args
from services.processor.dispatch import Dispatcher
from services.processor.embeddings import EmbeddingDispatcher
from services.processor.images import ImageEncoder
from services.processor.kv_events_feed import KvEventsFeed
from services.processor.models import ModelRegistry
from shared.model import default_cache_dir
from shared.router import KvRouter, RouterMode
from shared.runtime import DistributedRuntime
from shared.runtime.service import Cleanup, ServiceMain, StartupError, run_service
from shared.runtime.system_server import SystemServer

__all__ = ["main", "start_processor"]


def start_processor(config: ProcessorConfig) -> ServiceMain:
    flags = config.flags

    async def start(runtime: DistributedRuntime, system: SystemServer | None) -> Cleanup:
        del system  # health and metrics are on the HTTP port
        router: KvRouter | None = None
        feed: KvEventsFeed | None = None
        if flags.router_mode is RouterMode.KV:
            router = KvRouter(config.kv_router, busy_threshold=flags.active_decode_blocks_threshold)
            feed = KvEventsFeed(runtime, on_events=router.apply_events, on_load=router.update_load)
            # Live events first, then each publisher's snapshot: a processor started after
            # the workers routes by their caches at once.
            await feed.start()

        embedder = EmbeddingDispatcher(migration_limit=flags.migration_limit)

        def worker_left(instance_id: int) -> None:
            embedder.forget(instance_id)
            images.tracker.forget(instance_id)
            if router is not None and feed is not None:
                router.remove_worker(instance_id)
                feed.forget(instance_id)

        registry = ModelRegistry(
            runtime,
            custom_template=flags.custom_jinja_template,
            model_roots=flags.model_root or (str(default_cache_dir()),),
            cache_dir=Path(flags.model_cache_dir or default_cache_dir()),
            on_worker_left=worker_left,
        )
        images = ImageEncoder(registry, config.images, migration_limit=flags.migration_limit)
        await registry.start()
        dispatcher = Dispatcher(
            mode=flags.router_mode,
            migration_limit=flags.migration_limit,
            busy_threshold=flags.active_decode_blocks_threshold,
            kv_router=router,
            runtime=runtime,
            migration_budget=flags.migration_budget,
        )
        app = ProcessorApp(flags, runtime, registry, dispatcher, embedder, images)
        try:
            await app.start()
        except OSError as exc:
            await registry.close()
            raise StartupError(
                f"cannot listen on {flags.http_host}:{flags.http_port} (--http-port): {exc}"
            ) from exc
        runtime.add_drain_hook(app.drain)

        async def cleanup() -> None:
            await app.close()
            await registry.close()
            if feed is not None:
                await feed.close()

        return cleanup

    return start


def main(argv: list[str] | None = None) -> int:
    config = parse_processor_args(argv)
    return run_service(config.mesh, start_processor(config), service="processor")
