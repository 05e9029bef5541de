"""The SGLang adapter: the mesh's ``Engine`` protocol over an in-process ``sgl.Engine``.

Why an adapter and not ``sgl.Engine`` itself: the worker talks to one protocol for both
engines (``shared.engine.protocol``), and a few of SGLang's entry points do not fit an asyncio
worker as they are. ``Engine.flush_cache``, ``release_memory_occupation`` and friends drive
their own ``run_until_complete`` and fail inside a running loop, so the adapter awaits the
``TokenizerManager`` coroutines behind them instead; ``Engine`` has no ``abort_request``, so
aborts go through ``tokenizer_manager.abort_request``; and SGLang's ``ValueError`` ("bad
request") becomes the mesh's ``InvalidRequestError``.

sglang is imported lazily, in ``start()``: this module imports fine without it, and the
conformance test checks the keywords below against the installed SGLang source.

Start-up blocks the event loop while SGLang launches its scheduler processes and loads the
model, as the reference worker does: SGLang installs its crash handler (SIGQUIT from a dying
scheduler tears the process tree down) only from the main thread. Start the engine before
joining the mesh. SGLang also registers SIGTERM/SIGINT handlers on the loop the first time it
serves a request; the adapter captures those instead (``deferred_signal_handlers``) so the
worker's graceful shutdown stays in charge, and ``run_deferred_signal_handlers`` runs them
afterwards.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

from shared.engine.args import EngineArgs, kv_events_endpoints
from shared.engine.protocol import EngineInfo
from shared.multimodal import is_placeholder
from shared.runtime.errors import InvalidRequestError, OverloadedError

__all__ = [
    "EMBEDDING_REQUEST_FIELDS",
    "ENCODE_KWARGS",
    "GENERATE_KWARGS",
    "SglangEngine",
    "restore_image_tokens",
]

log = logging.getLogger(__name__)

# Every keyword the adapter may pass to ``sgl.Engine.async_generate`` / ``async_encode``. The
# conformance test asserts each one exists in the installed SGLang's signatures. The
# protocol's ``data_parallel_rank`` goes out as ``routed_dp_rank`` where SGLang has it (0.5.23
# deprecates the old name with a warning per request).
GENERATE_KWARGS = frozenset(
    {
        "input_ids",
        "sampling_params",
        "rid",
        "stream",
        "return_logprob",
        "top_logprobs_num",
        "logprob_start_len",
        "bootstrap_host",
        "bootstrap_port",
        "bootstrap_room",
        "routed_dp_rank",
        "data_parallel_rank",
        "disagg_prefill_dp_rank",
        "cache_salt",
        "image_data",
        "mm_hashes",
    }
)
ENCODE_KWARGS = frozenset({"prompt", "rid"})
# Fields of ``EmbeddingReqInput`` the adapter sets for token-id inputs (checked alike).
EMBEDDING_REQUEST_FIELDS = frozenset({"input_ids", "rid"})

_STARTUP_QUERY_TIMEOUT = 30.0


def _default_factory(server_args: Any) -> Any:
    import sglang

    return sglang.Engine(server_args=server_args)


def _bootstrap_host(args: EngineArgs) -> str:
    """The address a decode engine uses to reach this prefill engine's bootstrap server:
    ``SGLANG_HOST_IP``, else the host of ``--dist-init-addr``, else this host's address."""
    override = os.environ.get("SGLANG_HOST_IP", "").strip()
    if override:
        return override
    if args.dist_init_addr:
        host = args.dist_init_addr.rsplit(":", 1)[0].strip("[]")
        if host:
            return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class SglangEngine:
    """``Engine`` protocol over ``sgl.Engine(server_args=...)``.

    ``engine_factory`` builds the SGLang engine from the ``ServerArgs`` (default:
    ``sglang.Engine``); tests pass a stand-in.
    """

    def __init__(
        self,
        args: EngineArgs,
        *,
        engine_factory: Callable[[Any], Any] | None = None,
    ) -> None:
        if args.server_args is None:
            raise ValueError(
                "SglangEngine needs SGLang's ServerArgs: parse the command line with sglang "
                "installed (shared.engine.args.parse_engine_args)"
            )
        self.args = args
        self._factory = engine_factory or _default_factory
        self._engine: Any = None
        self._routed_dp_rank = True
        self.deferred_signal_handlers: list[tuple[int, Callable[..., Any], tuple[Any, ...]]] = []
        self.info = self._info_from_args()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self._engine is not None:
            return
        # SGLang's schedulers read the bootstrap timeout from the environment they inherit.
        os.environ["SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT"] = str(
            max(1, math.ceil(self.args.bootstrap_timeout))
        )
        self._engine = self._factory(self.args.server_args)
        try:
            params = inspect.signature(self._engine.async_generate).parameters
            self._routed_dp_rank = "routed_dp_rank" in params
        except (TypeError, ValueError):
            self._routed_dp_rank = True
        self._adopt_handle_loop()
        self.info = await self._info_from_engine()
        log.info(
            "sglang engine ready: model=%s page_size=%d max_total_tokens=%d mode=%s",
            self.info.model_path,
            self.info.page_size,
            self.info.max_total_tokens,
            self.info.disaggregation_mode,
        )

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            # Blocking: it waits (up to a minute) for the schedulers to release the GPU, and
            # ends every child process of this worker.
            await asyncio.to_thread(engine.shutdown)

    @property
    def engine(self) -> Any:
        """The underlying ``sgl.Engine`` (for routes the protocol does not cover)."""
        if self._engine is None:
            raise RuntimeError("the SGLang engine is not started")
        return self._engine

    @property
    def tokenizer_manager(self) -> Any:
        return self.engine.tokenizer_manager

    def _adopt_handle_loop(self) -> None:
        """Let SGLang start its response loop now, on our loop, keeping its SIGTERM/SIGINT
        handlers out of the loop (see the module docstring)."""
        create = getattr(self.tokenizer_manager, "auto_create_handle_loop", None)
        if create is None:
            return
        loop = asyncio.get_running_loop()
        original = loop.add_signal_handler
        # The worker may have wrapped it already (as the reference's shutdown code does).
        wrapped = "add_signal_handler" in getattr(loop, "__dict__", {})

        def capture(sig: int, callback: Callable[..., Any], *args: Any) -> None:
            if sig in (signal.SIGTERM, signal.SIGINT):
                self.deferred_signal_handlers.append((sig, callback, args))
                return
            original(sig, callback, *args)

        try:
            loop.add_signal_handler = capture  # type: ignore[method-assign,assignment]
        except (AttributeError, TypeError):
            log.warning("cannot intercept SGLang's signal handlers on %r", type(loop).__name__)
            create()
            return
        try:
            create()
        finally:
            if wrapped:
                loop.add_signal_handler = original  # type: ignore[method-assign]
            else:
                del loop.add_signal_handler

    def run_deferred_signal_handlers(self, sig: int) -> None:
        """Run SGLang's own handlers for ``sig`` (after the worker's graceful shutdown)."""
        for registered, callback, args in self.deferred_signal_handlers:
            if registered == sig:
                callback(*args)

    # -- info -------------------------------------------------------------------------------

    def _info_from_args(self) -> EngineInfo:
        a = self.args
        endpoints = kv_events_endpoints(a.kv_events_config, a.dp_size)
        prefill = a.disaggregation_mode == "prefill"
        return EngineInfo(
            engine="sglang",
            model_path=a.model_path,
            served_model_name=a.model_name,
            page_size=a.page_size or 1,
            max_total_tokens=a.max_total_tokens or 0,
            max_running_requests=a.max_running_requests or 0,
            max_prefill_tokens=a.max_prefill_tokens,
            context_length=a.context_length or 0,
            dp_size=a.dp_size,
            disaggregation_mode=a.disaggregation_mode,
            bootstrap_host=_bootstrap_host(a) if prefill else None,
            bootstrap_port=a.disaggregation_bootstrap_port if prefill else None,
            is_embedding=a.is_embedding,
            kv_events_endpoints=endpoints.endpoints,
            kv_events_replay_endpoints=endpoints.replay_endpoints,
            kv_events_topic=endpoints.topic,
        )

    async def _info_from_engine(self) -> EngineInfo:
        """What SGLang resolved at start-up (page size, KV pool, context length, ...)."""
        engine = self._engine
        sa = getattr(engine, "server_args", None) or self.args.server_args
        resolved: dict[str, Any] = {}
        resolved_dict = getattr(sa, "resolved_dict", None)
        if callable(resolved_dict):
            try:
                resolved = dict(resolved_dict())
            except Exception as exc:  # a view we cannot read is not fatal: fall back
                log.debug("resolved_dict() failed: %s", exc)

        def value(name: str) -> Any:
            got = resolved.get(name)
            return got if got is not None else getattr(sa, name, None)

        info = self._info_from_args()
        page_size = value("page_size") or info.page_size
        max_total = self._scheduler_info().get("max_total_num_tokens") or info.max_total_tokens
        max_running = value("max_running_requests") or await self._effective_max_running()
        context = (
            getattr(self.tokenizer_manager, "context_len", None)
            or value("context_length")
            or info.context_length
        )
        dp_size = value("dp_size") or info.dp_size
        metrics = None
        if self.args.enable_metrics and info.kv_events_endpoints:
            # SGLang pushes its load metrics only when metrics and KV events are both on;
            # the consumer binds this address.
            metrics = getattr(getattr(engine, "port_args", None), "metrics_ipc_name", None)
        endpoints = kv_events_endpoints(self.args.kv_events_config, int(dp_size))
        info.page_size = int(page_size)
        info.max_total_tokens = int(max_total)
        info.max_running_requests = int(max_running or 0)
        info.max_prefill_tokens = int(value("max_prefill_tokens") or info.max_prefill_tokens)
        info.context_length = int(context or 0)
        info.dp_size = int(dp_size)
        info.kv_events_endpoints = endpoints.endpoints
        info.kv_events_replay_endpoints = endpoints.replay_endpoints
        info.metrics_endpoint = metrics
        if info.disaggregation_mode == "prefill":
            info.bootstrap_port = int(
                value("disaggregation_bootstrap_port") or self.args.disaggregation_bootstrap_port
            )
        return info

    def _scheduler_info(self) -> dict[str, Any]:
        result = getattr(self._engine, "_scheduler_init_result", None)
        infos = getattr(result, "scheduler_infos", None)
        if infos:
            return dict(infos[0])
        legacy = getattr(self._engine, "scheduler_info", None)  # SGLang before 0.5.2x
        return dict(legacy) if isinstance(legacy, dict) else {}

    async def _effective_max_running(self) -> int:
        query = getattr(self.tokenizer_manager, "get_internal_state", None)
        if query is None:
            return 0
        try:
            states = await asyncio.wait_for(query(), _STARTUP_QUERY_TIMEOUT)
        except Exception as exc:  # informative only; registration copes with 0
            log.warning("cannot read SGLang's effective max running requests: %s", exc)
            return 0
        for state in states or ():
            found = state.get("effective_max_running_requests_per_dp")
            if found:
                return int(found)
        return 0

    # -- requests ---------------------------------------------------------------------------

    async def async_generate(
        self,
        *,
        input_ids: list[int],
        sampling_params: dict[str, Any],
        rid: str,
        stream: bool = True,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        logprob_start_len: int = -1,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | None = None,
        data_parallel_rank: int | None = None,
        **extra: Any,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream SGLang's output dicts for one request (``stream`` is always on)."""
        unknown = set(extra) - GENERATE_KWARGS
        if unknown:
            raise TypeError(f"async_generate got unsupported keywords {sorted(unknown)}")
        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "sampling_params": sampling_params,
            "rid": rid,
            "stream": True,
        }
        if return_logprob:
            kwargs["return_logprob"] = True
            kwargs["top_logprobs_num"] = top_logprobs_num
            if logprob_start_len >= 0:
                kwargs["logprob_start_len"] = logprob_start_len
        if bootstrap_host is not None:
            kwargs["bootstrap_host"] = bootstrap_host
            kwargs["bootstrap_port"] = bootstrap_port
            kwargs["bootstrap_room"] = bootstrap_room
        if data_parallel_rank is not None:
            rank_key = "routed_dp_rank" if self._routed_dp_rank else "data_parallel_rank"
            kwargs[rank_key] = data_parallel_rank
        kwargs.update({k: v for k, v in extra.items() if v is not None})
        if "image_data" in kwargs:
            kwargs["image_data"] = _torch_features(kwargs["image_data"])
            token = getattr(
                getattr(self.tokenizer_manager, "model_config", None), "image_token_id", None
            )
            if token is None:
                raise InvalidRequestError(
                    f"model {self.info.served_model_name!r} has no image token: it takes no images"
                )
            kwargs["input_ids"] = restore_image_tokens(input_ids, int(token))

        finished = False
        try:
            try:
                stream_iter = await self.engine.async_generate(**kwargs)
            except ValueError as exc:
                raise InvalidRequestError(str(exc)) from exc
            while True:
                try:
                    item = await stream_iter.__anext__()
                except StopAsyncIteration:
                    break
                except ValueError as exc:
                    raise InvalidRequestError(str(exc)) from exc
                except Exception as exc:
                    _raise_http_exception(exc)
                    raise
                if (item.get("meta_info") or {}).get("finish_reason") is not None:
                    finished = True
                yield item
            finished = True
        finally:
            if not finished and self._engine is not None:
                # The consumer went away (client cancel, shutdown): free the engine's slot.
                self.abort_request(rid)

    async def async_encode(
        self,
        *,
        prompt: str | list[str] | None = None,
        input_ids: list[list[int]] | None = None,
        rid: str | None = None,
    ) -> list[dict[str, Any]]:
        """Embed texts (``prompt``) or token id lists (``input_ids``): one dict per input,
        each with ``embedding`` and ``meta_info`` as SGLang returns them.

        Each input gets the request id ``{rid}-{i}``, as the reference's batches do, so a
        caller that goes away (the task is cancelled) aborts them in the engine."""
        if (prompt is None) == (input_ids is None):
            raise InvalidRequestError("give exactly one of prompt and input_ids")
        count = 1 if isinstance(prompt, str) else len(prompt or input_ids or [])
        rids: list[str] | None = None
        if rid is not None:
            rids = [f"{rid}-{i}" for i in range(count)]
        try:
            if prompt is not None:
                kwargs: dict[str, Any] = {"prompt": prompt}
                if rids is not None:
                    kwargs["rid"] = rids[0] if isinstance(prompt, str) else rids
                result = await self.engine.async_encode(**kwargs)
            else:
                from sglang.srt.managers.io_struct import EmbeddingReqInput

                request = EmbeddingReqInput(input_ids=input_ids, rid=rids)
                result = await self.tokenizer_manager.generate_request(request, None).__anext__()
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from exc
        except asyncio.CancelledError:
            for one_rid in rids or ():
                self.abort_request(one_rid)
            raise
        if isinstance(result, dict):
            return [result]
        return list(result)

    def abort_request(self, rid: str) -> None:
        if self._engine is None or not rid:
            return
        self.tokenizer_manager.abort_request(rid=rid, abort_all=False)

    def num_active_requests(self) -> int:
        if self._engine is None:
            return 0
        return len(getattr(self.tokenizer_manager, "rid_to_state", None) or ())

    # -- control ----------------------------------------------------------------------------

    async def flush_cache(self) -> bool:
        """Drop the prefix cache. SGLang refuses (``False``) while requests are running."""
        result = await self.tokenizer_manager.flush_cache()
        return bool(getattr(result, "success", result))

    async def pause_generation(self, mode: str = "abort") -> None:
        """Stop scheduling. ``mode`` as SGLang's: ``abort`` (in-flight requests end),
        ``retract`` (they wait, KV dropped) or ``in_place`` (they wait with their KV)."""
        from sglang.srt.managers.io_struct import PauseGenerationReqInput

        await self.tokenizer_manager.pause_generation(PauseGenerationReqInput(mode=mode))

    async def continue_generation(self) -> None:
        from sglang.srt.managers.io_struct import ContinueGenerationReqInput

        await self.tokenizer_manager.continue_generation(ContinueGenerationReqInput())

    async def release_memory_occupation(self, tags: list[str] | None = None) -> None:
        """Free GPU memory (``tags``: ``weights``, ``kv_cache``; default both)."""
        from sglang.srt.managers.io_struct import ReleaseMemoryOccupationReqInput

        await self.tokenizer_manager.release_memory_occupation(
            ReleaseMemoryOccupationReqInput(tags=tags), None
        )

    async def resume_memory_occupation(self, tags: list[str] | None = None) -> None:
        from sglang.srt.managers.io_struct import ResumeMemoryOccupationReqInput

        await self.tokenizer_manager.resume_memory_occupation(
            ResumeMemoryOccupationReqInput(tags=tags), None
        )

    async def start_profile(self, **options: Any) -> None:
        """Start the torch profiler; ``options`` are SGLang's ``ProfileReq`` fields
        (``output_dir``, ``num_steps``, ``activities``, ...)."""
        request = None
        if options:
            from sglang.srt.managers.io_struct import ProfileReq

            request = ProfileReq(**options)
        await self.tokenizer_manager.start_profile(request)

    async def stop_profile(self) -> None:
        await self.tokenizer_manager.stop_profile()


def _raise_http_exception(exc: Exception) -> None:
    """SGLang raises ``fastapi.HTTPException`` for some refusals; map it by status code."""
    status = getattr(exc, "status_code", None)
    if not isinstance(status, int):
        return
    detail = str(getattr(exc, "detail", "") or exc)
    if status == 400:
        raise InvalidRequestError(detail) from exc
    if status in (429, 503):
        raise OverloadedError(detail) from exc


def restore_image_tokens(input_ids: list[int], image_token_id: int) -> list[int]:
    """The mesh's prompt with each image position back to the model's image token.

    The processor fills an image's positions with placeholder ids derived from its hash (so
    the KV router and the simulator see the image); SGLang derives its own pad values from
    ``mm_hashes`` and finds the image's positions by the model's image token
    (``ModelConfig.image_token_id``), so that is what it must be given."""
    return [image_token_id if is_placeholder(t) else t for t in input_ids]


def _torch_features(image_data: Any) -> Any:
    """SGLang's scheduler takes a ``precomputed_embedding`` item's ``feature`` as a torch
    tensor (``mm_schedule`` checks ``isinstance(..., torch.Tensor)``); the mapping builds
    numpy arrays, so the conversion happens here, where torch is installed."""
    import torch

    out = []
    for item in image_data:
        if isinstance(item, dict) and not isinstance(item.get("feature"), torch.Tensor):
            item = {**item, "feature": torch.from_numpy(item["feature"].copy())}
        out.append(item)
    return out
