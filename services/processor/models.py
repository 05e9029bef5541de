"""Which models the processor can serve right now, learned from the workers' model cards.

Workers write a :class:`~proto.discovery.ModelCard` under their etcd lease; this module
watches them. A model is *servable* when its preprocessor (tokenizer and chat template) is
loaded and its workers satisfy their needs: at least one aggregated worker, or at least one
prefill and one decode worker (with both kinds present the disaggregated pair is used), or,
for an embedding model, at least one embedding worker.

A card that lists its model files (``ModelCard.files``) is loaded from them: from the card's
local paths when they lie under ``--model-root`` and hold the very same bytes, else fetched by
hash through etcd into ``--model-cache-dir`` (``shared/model_files.py``), so a processor needs
no model volume. A card with a new ``mdc_sum`` (the files' hash) is a changed model: its
preprocessor is loaded again, from newly fetched files.

Model names are remembered after their last worker leaves, so a request for a model that was
served a moment ago gets 503 ("no workers"), not 404 ("no such model").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from proto.discovery import EmbeddingInfo, InstanceRecord, ModelCard, WorkerType, models_prefix
from proto.multimodal import VisionInfo
from proto.openai import RequestError
from services.processor.preprocess import ModelPreprocessor, PreprocessorLoadError
from shared.config import parse_endpoint
from shared.model_files import (
    ModelFilesError,
    card_file_sources,
    fetch_model_files,
    file_matches,
)
from shared.router import WorkerCandidate
from shared.runtime import Client, DistributedRuntime
from shared.runtime.discovery import PrefixWatcher

__all__ = ["ModelRegistry", "ServedModel", "WorkerPool"]

log = logging.getLogger(__name__)

_LOAD_FAILED = "its tokenizer or chat template could not be loaded (see the processor's log)"
_SERVING_TYPES = (
    WorkerType.AGGREGATED,
    WorkerType.DECODE,
    WorkerType.PREFILL,
    WorkerType.EMBEDDING,
)


@dataclass
class WorkerPool:
    """One role's workers for one model, behind one endpoint client."""

    role: WorkerType
    endpoint: str
    cards: dict[int, ModelCard] = field(default_factory=dict)
    client: Client | None = None

    def candidates(self) -> list[WorkerCandidate]:
        """Workers with a card for this model *and* a live instance record."""
        if self.client is None:
            return []
        records = self.client.records()
        out = []
        for iid in self.cards:
            record = records.get(iid)
            if record is not None:
                out.append(_candidate(record))
        return out

    def record(self, instance_id: int) -> InstanceRecord | None:
        if self.client is None:
            return None
        return self.client.records().get(instance_id)


def _candidate(record: InstanceRecord) -> WorkerCandidate:
    rc = record.runtime_config
    if rc is None:
        return WorkerCandidate(record.instance_id)
    return WorkerCandidate(
        record.instance_id,
        total_kv_blocks=rc.total_kv_blocks,
        dp_size=rc.data_parallel_size,
        dp_start=rc.data_parallel_start_rank,
    )


@dataclass
class ServedModel:
    name: str
    pools: dict[WorkerType, WorkerPool] = field(default_factory=dict)
    preprocessor: ModelPreprocessor | None = None
    load_error: str | None = None
    created: int = 0
    # The mdc_sum (files' hash) the preprocessor was loaded for.
    files_sum: str | None = None

    @property
    def cards(self) -> list[ModelCard]:
        return [card for pool in self.pools.values() for card in pool.cards.values()]

    def pool(self, role: WorkerType) -> WorkerPool | None:
        pool = self.pools.get(role)
        return pool if pool is not None and pool.cards and pool.client is not None else None

    @property
    def disaggregated(self) -> bool:
        return (
            self.pool(WorkerType.PREFILL) is not None and self.pool(WorkerType.DECODE) is not None
        )

    @property
    def is_embedding(self) -> bool:
        """An embedding model: served on ``/v1/embeddings``, never on chat or completions."""
        return WorkerType.EMBEDDING in self.pools or any(
            card.embedding is not None for card in self.cards
        )

    @property
    def embedding(self) -> EmbeddingInfo | None:
        """The embedding facts of the model's cards (the first worker's)."""
        return next((c.embedding for c in self.cards if c.embedding is not None), None)

    @property
    def servable(self) -> bool:
        if self.preprocessor is None:
            return False
        if self.pool(WorkerType.EMBEDDING) is not None:
            return self.embedding is not None
        return self.disaggregated or self.pool(WorkerType.AGGREGATED) is not None

    def unavailable_reason(self) -> str:
        if self.load_error is not None:
            return f"model {self.name!r} cannot be served: {self.load_error}"
        if self.preprocessor is None and self.cards:
            return f"model {self.name!r} is still loading"
        if self.pool(WorkerType.DECODE) is not None:
            return f"model {self.name!r} has decode workers but no prefill worker"
        if self.pool(WorkerType.PREFILL) is not None:
            return f"model {self.name!r} has prefill workers but no decode worker"
        return f"no workers are serving model {self.name!r} right now"


class ModelRegistry:
    def __init__(
        self,
        runtime: DistributedRuntime,
        *,
        custom_template: str | None = None,
        model_roots: Sequence[str] | None = None,
        cache_dir: Path | None = None,
        on_worker_left: Callable[[int], None] | None = None,
    ) -> None:
        self._on_worker_left = on_worker_left
        self._model_roots = model_roots
        self._cache_dir = cache_dir
        self._runtime = runtime
        self._custom_template = custom_template
        self._watcher: PrefixWatcher[ModelCard] = PrefixWatcher(
            runtime.etcd, models_prefix(runtime.config.namespace), ModelCard
        )
        self._watcher.on_put(self._on_put)
        self._watcher.on_delete(self._on_delete)
        self.models: dict[str, ServedModel] = {}
        # Image encoders by model name (not served on the API).
        self.encoders: dict[str, ServedModel] = {}
        # Served name (or alias) -> canonical name; kept after the model leaves.
        self._names: dict[str, str] = {}
        self._clients: dict[str, Client] = {}
        self._pending: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        # Cards arrive in bursts (a whole deployment starting): one client per endpoint and one
        # tokenizer load per model, however many cards race for them.
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._watcher.start()

    async def close(self) -> None:
        await self._watcher.close()
        for task in list(self._pending):
            task.cancel()

    # -- queries -------------------------------------------------------------------------------

    def servable(self) -> list[ServedModel]:
        return [m for m in self.models.values() if m.servable]

    def served_names(self) -> list[tuple[str, ServedModel]]:
        """Every name (canonical and alias) of every servable model."""
        out: list[tuple[str, ServedModel]] = []
        for model in self.servable():
            names = {model.name}
            for card in model.cards:
                names.update(card.aliases)
            out.extend((name, model) for name in sorted(names))
        return out

    def lookup(self, name: str) -> ServedModel:
        """The servable model called ``name``; RequestError 404 if unknown, 503 if it has no
        usable workers now."""
        canonical = self._names.get(name)
        if canonical is None:
            raise RequestError(
                f"The model {name!r} does not exist",
                status=404,
                param="model",
            )
        model = self.models.get(canonical)
        if model is None:
            raise RequestError(f"no workers are serving model {name!r} right now", status=503)
        if not model.servable:
            raise RequestError(model.unavailable_reason(), status=503)
        return model

    async def wait_servable(self, name: str, timeout: float) -> ServedModel:
        async with asyncio.timeout(timeout):
            while True:
                model = self.models.get(self._names.get(name, name))
                if model is not None and model.servable:
                    return model
                self._changed.clear()
                await self._changed.wait()

    # -- watch callbacks -----------------------------------------------------------------------

    def image_encoder(self) -> tuple[WorkerPool, VisionInfo] | None:
        """An image encoder's pool (with a client and live cards) and what it takes; the
        first by name when several encoder models run (one is the usual mesh)."""
        for name in sorted(self.encoders):
            pool = self.encoders[name].pool(WorkerType.ENCODE)
            if pool is None:
                continue
            vision = next((c.vision for c in pool.cards.values() if c.vision), None)
            if vision is not None:
                return pool, vision
        return None

    def _on_put(self, key: str, card: ModelCard) -> None:
        if card.worker_type is WorkerType.ENCODE and card.vision is not None:
            # Image encoders serve the processor's image path, not the API.
            encoder = self.encoders.setdefault(card.name, ServedModel(card.name))
            found = encoder.pools.setdefault(
                WorkerType.ENCODE, WorkerPool(WorkerType.ENCODE, card.endpoint)
            )
            found.cards[card.instance_id] = card
            self._spawn(self._encoder_client(found, card))
            return
        if card.worker_type not in _SERVING_TYPES:
            return
        model = self.models.get(card.name)
        if model is None:
            model = self.models[card.name] = ServedModel(
                card.name, created=int(self._runtime.started_at)
            )
        for name in card.served_names:
            self._names[name] = card.name
        pool = model.pools.get(card.worker_type)
        if pool is None:
            pool = model.pools[card.worker_type] = WorkerPool(card.worker_type, card.endpoint)
        pool.cards[card.instance_id] = card
        self._spawn(self._complete(model, pool, card))
        self._changed.set()

    async def _encoder_client(self, pool: WorkerPool, card: ModelCard) -> None:
        try:
            async with self._lock:
                if pool.client is None:
                    pool.client = await self._client(card.endpoint or pool.endpoint)
        except Exception:
            log.exception("cannot reach image encoder", extra={"model": card.name})
        self._changed.set()

    def _on_delete(self, key: str, card: ModelCard) -> None:
        if card.worker_type is WorkerType.ENCODE and card.name in self.encoders:
            encoder = self.encoders[card.name]
            if self._on_worker_left is not None:
                self._on_worker_left(card.instance_id)
            pool = encoder.pools.get(WorkerType.ENCODE)
            if pool is not None:
                pool.cards.pop(card.instance_id, None)
            self._changed.set()
            return
        model = self.models.get(card.name)
        if model is None:
            return
        if self._on_worker_left is not None:
            self._on_worker_left(card.instance_id)
        pool = model.pools.get(card.worker_type)
        if pool is not None:
            pool.cards.pop(card.instance_id, None)
            if not pool.cards:
                del model.pools[card.worker_type]
        if not model.pools:
            log.info("model left: no workers", extra={"model": card.name})
            del self.models[card.name]
        self._changed.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _complete(self, model: ServedModel, pool: WorkerPool, card: ModelCard) -> None:
        """Load what the new card needs: the endpoint client and the preprocessor."""
        try:
            async with self._lock:
                await self._load(model, pool, card)
        except (PreprocessorLoadError, ModelFilesError) as exc:
            # The detail (file paths) goes to the log; clients get a reason without it.
            model.load_error = _LOAD_FAILED
            model.preprocessor = None
            log.error("cannot load model", extra={"model": model.name, "error": str(exc)})
        except Exception:
            log.exception("preparing model failed", extra={"model": model.name})
            model.load_error = _LOAD_FAILED
            model.preprocessor = None
        self._changed.set()

    async def _load(self, model: ServedModel, pool: WorkerPool, card: ModelCard) -> None:
        if pool.client is None:
            pool.client = await self._client(card.endpoint or pool.endpoint)
        changed = card.mdc_sum != model.files_sum
        if changed or (model.preprocessor is None and model.load_error is None):
            model.files_sum, model.load_error = card.mdc_sum, None
            card, roots = await self._model_files(card)
            model.preprocessor = await asyncio.to_thread(
                ModelPreprocessor.from_card,
                card,
                custom_template=self._template_text(),
                roots=roots,
            )
            log.info(
                "model servable" if model.servable else "model loaded",
                extra={
                    "model": model.name,
                    "context_length": model.preprocessor.context_length,
                },
            )

    async def _model_files(self, card: ModelCard) -> tuple[ModelCard, Sequence[str] | None]:
        """The card to load the preprocessor from, and the roots its paths must lie under:
        the card itself when it lists no files or its local files match them; else a copy
        pointing into the fetched cache directory, confined to that directory."""
        if not card.files or await asyncio.to_thread(self._local_files_match, card):
            return card, self._model_roots
        if self._cache_dir is None:
            raise ModelFilesError("no --model-cache-dir to fetch the model's files into")
        directory, fetched = await fetch_model_files(
            self._runtime.etcd.client, self._runtime.config.namespace, card.files, self._cache_dir
        )
        log.info(
            "model files fetched through the mesh" if fetched else "model files cached",
            extra={"model": card.name, "files": len(card.files), "fetched": fetched,
                   "directory": str(directory)},
        )  # fmt: skip
        names = {ref.name for ref in card.files}

        def cached(name: str) -> str | None:
            return str(directory / name) if name in names else None

        local = msgspec.structs.replace(
            card,
            model_path=str(directory),
            tokenizer_path=str(directory),
            chat_template_path=cached("chat_template.jinja"),
            custom_template_path=cached("custom_chat_template.jinja"),
        )
        return local, (str(directory),)

    def _local_files_match(self, card: ModelCard) -> bool:
        """Whether every listed file is on this machine, under the model roots, unchanged."""
        roots = [Path(root).resolve() for root in self._model_roots or ()]
        paths = dict(card_file_sources(card))
        for ref in card.files:
            path = paths.get(ref.name)
            if path is None:
                return False
            real = path.resolve()
            confined = self._model_roots is None or any(real.is_relative_to(r) for r in roots)
            if not confined or not file_matches(real, ref):
                return False
        return True

    async def _client(self, endpoint: str) -> Client:
        client = self._clients.get(endpoint)
        if client is None:
            client = await self._runtime.client(parse_endpoint(endpoint))
            self._clients[endpoint] = client
        return client

    def _template_text(self) -> str | None:
        if self._custom_template is None:
            return None
        with open(self._custom_template, encoding="utf-8") as f:
            return f.read()
