"""``CpuEngine``: the engine behind ``shared.engine.protocol.Engine`` on a CPU, for any runner.

Why: the mesh must run end to end on a laptop and in CI, without a GPU, and still exercise what
production exercises -- continuous batching, prefix caching, KV events and load metrics on
SGLang's ZMQ sockets, disaggregated prefill/decode with a real KV transfer, SGLang-shaped output
streams. This class wires the parts together: one :class:`Scheduler` per DP rank (each with its
own radix cache, KV pool and model runner, KV-event publisher at the DP-offset endpoint and
load-metrics pusher), plus the bootstrap server (prefill mode) or KV receiver (decode mode),
shared by the ranks as in SGLang. Subclasses say which model runs: ``SimEngine``
(``shared/engine/sim``) and ``TorchEngine`` (``shared/engine/pytorch``).

Choices where SGLang leaves a value to the hardware or to its own resolution:

- ``page_size`` None -> 16. SGLang resolves None per attention backend (1 for most, larger
  for some kernels); 16 is the KV block size KV-aware routing wants (one event per 16
  tokens instead of per token) and what deployments set explicitly.
- ``max_total_tokens`` None -> the subclass's default (``default_max_total_tokens``), rounded
  down to whole pages.
- ``context_length`` None -> ``config.json`` (``max_position_embeddings`` and friends), else
  8192.
- ``metrics_endpoint``: None and ``enable_metrics`` off -> no load metrics; ``enable_metrics``
  without an endpoint -> an ``ipc://`` path under the temp dir (SGLang's own default is an
  ipc tempfile). Every rank's PUSH connects to the one endpoint, as in SGLang; a consumer
  binds the PULL there.
- ``bootstrap_host`` None (or a wildcard) -> the bootstrap server listens on all interfaces
  and advertises this host's address (``gethostbyname(gethostname())``, else 127.0.0.1).
- a prefill-mode request without bootstrap info runs its prefill and sends its KV nowhere,
  like one for ``FAKE_BOOTSTRAP_HOST``; a decode-mode request without it is a 400.

Requests are validated up front (``request.py``); a bad one ends its stream at once with
``{"type": "abort", "message": ..., "status_code": 400}`` as SGLang's validation does.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.engine.cpu.kv_events import KvEventsConfig, ZmqKvEventPublisher, ZmqKvMetricsPusher
from shared.engine.cpu.radix import RadixCache
from shared.engine.cpu.request import BadRequest, Req, parse_sampling_params
from shared.engine.cpu.runner import ModelRunner
from shared.engine.cpu.scheduler import Scheduler, SchedulerConfig
from shared.engine.cpu.transfer import BootstrapServer
from shared.engine.cpu.transfer import KvReceiver as TcpKvReceiver
from shared.engine.protocol import EngineInfo
from shared.multimodal import is_placeholder, pad_values

if TYPE_CHECKING:
    from shared.engine.args import EngineArgs

__all__ = ["DEFAULT_PAGE_SIZE", "CpuConfig", "CpuEngine", "cpu_config_fields", "model_config"]

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 16
DEFAULT_MAX_RUNNING_REQUESTS = 256
DEFAULT_CONTEXT_LENGTH = 8192
DEFAULT_CHUNKED_PREFILL_SIZE = 8192

_CONTEXT_KEYS = (
    "max_sequence_length",
    "seq_length",
    "max_seq_len",
    "model_max_length",
    "max_position_embeddings",
)
_instance_ids = itertools.count()


@dataclass(slots=True, kw_only=True)
class CpuConfig:
    """What every CPU engine needs; field names follow SGLang's ``ServerArgs``."""

    model_path: str = ""
    served_model_name: str | None = None
    page_size: int | None = None
    max_total_tokens: int | None = None
    max_running_requests: int | None = None
    max_prefill_tokens: int = 16384
    # None: SGLang's default (8192); <= 0 (SGLang: -1) disables chunked prefill.
    chunked_prefill_size: int | None = 8192
    context_length: int | None = None
    dp_size: int = 1
    disaggregation_mode: str = "null"
    bootstrap_host: str | None = None
    # 0: any free port (tests); SGLang's default is 8998.
    bootstrap_port: int = 8998
    bootstrap_timeout: float = 300.0
    # SGLang's --kv-events-config JSON; None (or publisher "null") publishes nothing.
    kv_events_config: str | None = None
    enable_metrics: bool = False
    metrics_endpoint: str | None = None
    random_seed: int | None = None
    decode_log_interval: int = 40

    def __post_init__(self) -> None:
        if self.dp_size < 1:
            raise ValueError("dp_size must be >= 1")
        if self.disaggregation_mode not in ("null", "prefill", "decode"):
            raise ValueError(
                f"disaggregation_mode must be null, prefill or decode, not "
                f"{self.disaggregation_mode!r}"
            )
        for name in ("page_size", "max_total_tokens", "max_running_requests", "context_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")


def cpu_config_fields(args: EngineArgs) -> dict[str, Any]:
    """The :class:`CpuConfig` fields of an SGLang command line (``EngineArgs``)."""
    return {
        "model_path": args.model_path,
        "served_model_name": args.model_name,
        "page_size": args.page_size,
        "max_total_tokens": args.max_total_tokens,
        "max_running_requests": args.max_running_requests,
        "max_prefill_tokens": args.max_prefill_tokens,
        "chunked_prefill_size": args.chunked_prefill_size,
        "context_length": args.context_length,
        "dp_size": args.dp_size,
        "disaggregation_mode": args.disaggregation_mode,
        "bootstrap_port": args.disaggregation_bootstrap_port,
        "bootstrap_timeout": args.bootstrap_timeout,
        "kv_events_config": args.kv_events_config,
        "enable_metrics": args.enable_metrics,
        "random_seed": args.random_seed,
        "decode_log_interval": args.decode_log_interval,
    }


def model_config(model_path: str) -> dict[str, Any]:
    """``config.json`` of a model directory (the text model's, for multimodal configs), or
    ``{}`` when there is none or it does not parse."""
    path = Path(model_path) / "config.json" if model_path else None
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    # Multimodal configs nest the language model's.
    text = data.get("text_config")
    if isinstance(text, dict):
        return {**data, **text}
    return data


def _context_length(config: dict[str, Any]) -> int:
    for key in _CONTEXT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_CONTEXT_LENGTH


def _advertised_host() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class CpuEngine:
    """A CPU engine (see the module docstring). Subclasses provide the model:

    - ``kind``: the engine's name in ``EngineInfo.engine`` and logs;
    - ``default_max_total_tokens``: the KV pool size per rank when the command line gives none;
    - :meth:`_load` (awaited once by :meth:`start`, before any scheduler runs): read the model;
    - :meth:`_make_runner`: one :class:`ModelRunner` per DP rank;
    - ``eos_token_ids`` and ``vocab_size`` for validating requests.
    """

    kind = "cpu"
    # Image embeddings in the prompt (``image_data``): the simulator takes them; the torch
    # runner serves a text-only model and refuses them.
    accepts_images = False
    default_max_total_tokens = 400_000

    def __init__(self, config: CpuConfig) -> None:
        self.config = config
        self.model_config = model_config(config.model_path)
        self.page_size = config.page_size or DEFAULT_PAGE_SIZE
        requested = config.max_total_tokens or self.default_max_total_tokens
        self.total_pages = requested // self.page_size
        if self.total_pages < 1:
            raise ValueError("max_total_tokens must hold at least one page")
        self.max_total_tokens = self.total_pages * self.page_size
        self.max_running_requests = config.max_running_requests or DEFAULT_MAX_RUNNING_REQUESTS
        self.context_length = config.context_length or _context_length(self.model_config)
        self.mode = config.disaggregation_mode
        self.events_config = (
            KvEventsConfig.parse(config.kv_events_config)
            if config.kv_events_config is not None
            else None
        )
        self.metrics_endpoint = config.metrics_endpoint
        # The load-metrics socket lives in a private directory (0700: no other local user
        # can read the engine's load), removed again on shutdown.
        self._socket_dir: str | None = None
        if self.metrics_endpoint is None and config.enable_metrics:
            self._socket_dir = tempfile.mkdtemp(prefix=f"sglmesh-{self.kind}-")
            self.metrics_endpoint = "ipc://" + os.path.join(
                self._socket_dir, f"metrics-{os.getpid()}-{next(_instance_ids)}"
            )
        self.eos_token_ids: tuple[int, ...] = ()
        self.vocab_size: int | None = None
        self.schedulers: list[Scheduler] = []
        self.runners: list[ModelRunner] = []
        self.publishers: list[ZmqKvEventPublisher] = []
        self.pushers: list[ZmqKvMetricsPusher] = []
        self.bootstrap_server: BootstrapServer | None = None
        self.kv_receiver: TcpKvReceiver | None = None
        self.profiling = False
        self._started = False
        self._closed = False
        self.info = self._make_info()

    # ----- what a subclass provides -----

    async def _load(self) -> None:
        """Read the model (tokens, weights) before the schedulers start."""

    def _make_runner(self, rank: int) -> ModelRunner:
        raise NotImplementedError

    def _describe(self) -> str:
        """What the start-up log line says about the model."""
        return ""

    async def _prepare(self, req: Req) -> None:
        """Per-request work before the scheduler sees ``req`` (compiling its grammar); raises
        :class:`BadRequest`."""

    # ----- info -----

    def _make_info(self) -> EngineInfo:
        cfg = self.config
        info = EngineInfo(
            engine=self.kind,
            model_path=cfg.model_path,
            served_model_name=cfg.served_model_name or cfg.model_path,
            page_size=self.page_size,
            max_total_tokens=self.max_total_tokens,
            max_running_requests=self.max_running_requests,
            max_prefill_tokens=cfg.max_prefill_tokens,
            context_length=self.context_length,
            dp_size=cfg.dp_size,
            disaggregation_mode=self.mode,
            metrics_endpoint=self.metrics_endpoint,
        )
        if self.events_config is not None and self.events_config.publisher == "zmq":
            info.kv_events_topic = self.events_config.topic
            if self.publishers:
                info.kv_events_endpoints = [
                    p.connect_address or p.endpoint for p in self.publishers
                ]
                info.kv_events_replay_endpoints = [
                    p.replay_connect_address or "" for p in self.publishers if p.replay_endpoint
                ]
        if self.bootstrap_server is not None:
            host = cfg.bootstrap_host
            # A wildcard is where to listen, not an address a decode engine can dial.
            if host is None or host in ("", "0.0.0.0", "::", "[::]"):
                host = _advertised_host()
            info.bootstrap_host = host
            info.bootstrap_port = self.bootstrap_server.port
        return info

    # ----- lifecycle -----

    async def start(self) -> None:
        if self._started:
            return
        self._started = True
        cfg = self.config
        try:
            await self._load()
            if self.mode == "prefill":
                server = BootstrapServer(
                    cfg.bootstrap_host or "0.0.0.0",
                    cfg.bootstrap_port,
                    timeout=cfg.bootstrap_timeout,
                )
                await server.start()
                self.bootstrap_server = server
            elif self.mode == "decode":
                self.kv_receiver = TcpKvReceiver(timeout=cfg.bootstrap_timeout)
            publish = self.events_config is not None and self.events_config.publisher == "zmq"
            for rank in range(cfg.dp_size):
                publisher = None
                if publish:
                    assert self.events_config is not None
                    publisher = ZmqKvEventPublisher(self.events_config, rank)
                    publisher.start()
                    self.publishers.append(publisher)
                pusher = None
                if self.metrics_endpoint is not None:
                    pusher = ZmqKvMetricsPusher(self.metrics_endpoint)
                    pusher.start()
                    self.pushers.append(pusher)
                sched_cfg = SchedulerConfig(
                    page_size=self.page_size,
                    max_total_tokens=self.max_total_tokens,
                    max_running_requests=self.max_running_requests,
                    max_prefill_tokens=cfg.max_prefill_tokens,
                    chunked_prefill_size=(
                        DEFAULT_CHUNKED_PREFILL_SIZE
                        if cfg.chunked_prefill_size is None
                        else cfg.chunked_prefill_size
                    ),
                    disaggregation_mode=self.mode,
                    decode_log_interval=cfg.decode_log_interval,
                    dp_rank=rank,
                )
                runner = self._make_runner(rank)
                self.runners.append(runner)
                cache = RadixCache(self.page_size, self.total_pages, events=publisher is not None)
                scheduler = Scheduler(
                    sched_cfg,
                    runner,
                    cache=cache,
                    event_sink=publisher,
                    metrics_sink=pusher,
                    kv_sender=self.bootstrap_server,
                    kv_receiver=self.kv_receiver,
                )
                scheduler.start()
                self.schedulers.append(scheduler)
        except BaseException:
            await self.shutdown()
            raise
        self.info = self._make_info()
        log.info(
            "%s engine started: %s%s, mode %s, dp %d, page %d, %d KV tokens/rank",
            self.kind,
            self.info.served_model_name,
            self._describe(),
            self.mode,
            cfg.dp_size,
            self.page_size,
            self.max_total_tokens,
        )

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for scheduler in self.schedulers:
            await scheduler.close()
        for runner in self.runners:
            await runner.close()
        if self.bootstrap_server is not None:
            await self.bootstrap_server.close()
        if self.kv_receiver is not None:
            await self.kv_receiver.close()
        for publisher in self.publishers:
            await publisher.close()
        for pusher in self.pushers:
            pusher.close()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)

    # ----- generation -----

    def _pick_rank(self, data_parallel_rank: int | None, bootstrap_room: int | None) -> int:
        dp = self.config.dp_size
        if data_parallel_rank is not None:
            if not 0 <= data_parallel_rank < dp:
                raise BadRequest(f"data_parallel_rank {data_parallel_rank} is not in [0, {dp})")
            return data_parallel_rank
        if bootstrap_room is not None:
            return bootstrap_room % dp
        return min(range(dp), key=lambda r: self.schedulers[r].load)

    def _build(
        self,
        *,
        input_ids: list[int],
        sampling_params: dict[str, Any],
        rid: str,
        return_logprob: bool,
        top_logprobs_num: int,
        bootstrap_host: str | None,
        bootstrap_port: int | None,
        bootstrap_room: int | None,
        image_data: Any = None,
        mm_hashes: Any = None,
    ) -> Req:
        if not isinstance(input_ids, list) or not input_ids:
            raise BadRequest("input_ids must be a non-empty list of token ids")
        text_ids = input_ids
        if image_data is not None or mm_hashes is not None:
            text_ids = self._check_images(input_ids, image_data, mm_hashes)
        try:
            lo = min(input_ids)
            hi = max(text_ids) if text_ids else 0
        except TypeError:
            raise BadRequest("input_ids must be integers") from None
        if not isinstance(lo, int) or lo < 0 or max(input_ids) >= 2**32:
            raise BadRequest("token ids must be integers in [0, 2**32)")
        if text_ids is input_ids and is_placeholder(hi):
            raise BadRequest(
                f"token id {hi} is an image placeholder, but the request carries no image_data"
            )
        if self.vocab_size is not None and hi >= self.vocab_size:
            raise BadRequest(
                f"token id {hi} is outside the model's vocabulary ({self.vocab_size} tokens)"
            )
        if not isinstance(top_logprobs_num, int) or top_logprobs_num < 0:
            raise BadRequest("top_logprobs_num must be a non-negative integer")
        sampling = parse_sampling_params(
            sampling_params,
            prompt_len=len(input_ids),
            context_length=self.context_length,
            eos_token_ids=self.eos_token_ids,
            engine_seed=self.config.random_seed,
            vocab_size=self.vocab_size,
        )
        req = Req(
            rid=rid,
            input_ids=input_ids,
            sampling=sampling,
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num,
            bootstrap_host=bootstrap_host,
            bootstrap_port=bootstrap_port,
            bootstrap_room=bootstrap_room,
        )
        if self.mode == "prefill":
            # A prefill leg samples exactly the first token; ``sampling`` keeps the request's
            # own floor, so the token matches what an aggregated engine samples first.
            req.max_new_tokens = 1
            req.min_new_tokens = min(req.min_new_tokens, 1)
        return req

    def _check_images(self, input_ids: list[int], image_data: Any, mm_hashes: Any) -> list[int]:
        """Images the SGLang way: ``image_data`` is one ``precomputed_embedding`` item (the
        images' embeddings concatenated, tokens x hidden), ``mm_hashes`` one hex hash per
        image, and each image's positions in ``input_ids`` hold its placeholder values
        (``shared.multimodal``). Returns the text tokens; raises BadRequest otherwise."""
        if not self.accepts_images:
            raise BadRequest(
                f"the {self.kind} engine serves a text-only model: image inputs are refused"
            )
        items = image_data if isinstance(image_data, list) else [image_data]
        if len(items) != 1 or not isinstance(items[0], dict):
            raise BadRequest("image_data must be one precomputed_embedding item")
        item = items[0]
        feature: Any = item.get("feature")
        if item.get("format") != "precomputed_embedding" or getattr(feature, "ndim", 0) != 2:
            raise BadRequest("image_data must be {format: precomputed_embedding, feature: 2-D}")
        if not isinstance(mm_hashes, list) or not mm_hashes:
            raise BadRequest("mm_hashes must list one hash per image")
        allowed: set[int] = set()
        for h in mm_hashes:
            try:
                allowed.update(pad_values(h))
            except (TypeError, ValueError):
                raise BadRequest(f"mm_hashes holds {h!r}, not a hex hash") from None
        placeholders = [t for t in input_ids if isinstance(t, int) and is_placeholder(t)]
        if len(placeholders) != feature.shape[0]:
            raise BadRequest(
                f"the prompt holds {len(placeholders)} image positions but the embeddings "
                f"cover {feature.shape[0]}"
            )
        if not set(placeholders) <= allowed:
            raise BadRequest("the prompt's image positions do not match mm_hashes")
        return [t for t in input_ids if not (isinstance(t, int) and is_placeholder(t))]

    async def async_generate(
        self,
        *,
        input_ids: list[int],
        sampling_params: dict[str, Any],
        rid: str,
        stream: bool = True,
        image_data: Any = None,
        mm_hashes: Any = None,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        logprob_start_len: int = -1,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | None = None,
        data_parallel_rank: int | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream SGLang-shaped dicts (``output_ids`` increments); ``stream=False`` yields one
        dict with every output id. Closing the iterator early aborts the request."""
        if not self._started or self._closed:
            raise RuntimeError(f"the {self.kind} engine is not running (call start() first)")
        try:
            rank = self._pick_rank(data_parallel_rank, bootstrap_room)
            req = self._build(
                input_ids=input_ids,
                sampling_params=sampling_params,
                rid=rid,
                return_logprob=return_logprob,
                top_logprobs_num=top_logprobs_num,
                bootstrap_host=bootstrap_host,
                bootstrap_port=bootstrap_port,
                bootstrap_room=bootstrap_room,
                image_data=image_data,
                mm_hashes=mm_hashes,
            )
            await self._prepare(req)
        except BadRequest as exc:
            n_prompt = len(input_ids) if isinstance(input_ids, list) else 0
            yield {
                "text": "",
                "output_ids": [],
                "index": 0,
                "meta_info": {
                    "id": rid,
                    "finish_reason": {
                        "type": "abort",
                        "message": exc.message,
                        "status_code": 400,
                    },
                    "prompt_tokens": n_prompt,
                    "completion_tokens": 0,
                    "cached_tokens": 0,
                },
            }
            return
        scheduler = self.schedulers[rank]
        scheduler.submit(req)
        try:
            if stream:
                async for item in req.channel:
                    yield item
                return
            last: dict[str, Any] | None = None
            ids: list[int] = []
            lps: list[Any] = []
            tops: list[Any] = []
            async for item in req.channel:
                ids.extend(item["output_ids"])
                meta = item["meta_info"]
                lps.extend(meta.get("output_token_logprobs", ()))
                tops.extend(meta.get("output_top_logprobs", ()))
                last = item
            assert last is not None
            last["output_ids"] = ids
            if return_logprob:
                last["meta_info"]["output_token_logprobs"] = lps
                if top_logprobs_num > 0:
                    last["meta_info"]["output_top_logprobs"] = tops
            yield last
        finally:
            if not req.finished:
                scheduler.abort(rid, "the client stopped reading the stream")

    async def async_encode(
        self, *, prompt: str | list[str] | None = None, input_ids: list[list[int]] | None = None
    ) -> list[dict[str, Any]]:
        raise NotImplementedError(
            f"the {self.kind} LLM engine does not compute embeddings; run the encode service "
            "(its embedding engine) for /v1/embeddings"
        )

    # ----- control -----

    def abort_request(self, rid: str) -> None:
        for scheduler in self.schedulers:
            if scheduler.abort(rid):
                return

    async def flush_cache(self) -> bool:
        """Drop every rank's prefix cache; False (nothing flushed) while requests run."""
        if not all(s.is_idle for s in self.schedulers):
            return False
        return all([s.flush() for s in self.schedulers])

    async def pause_generation(self) -> None:
        for scheduler in self.schedulers:
            scheduler.pause()

    async def continue_generation(self) -> None:
        for scheduler in self.schedulers:
            scheduler.resume()

    async def release_memory_occupation(self) -> None:
        for scheduler in self.schedulers:
            scheduler.release_memory()

    async def resume_memory_occupation(self) -> None:
        for scheduler in self.schedulers:
            scheduler.resume_memory()

    async def start_profile(self) -> None:
        self.profiling = True
        log.info("%s engine: profiling started (nothing is recorded)", self.kind)

    async def stop_profile(self) -> None:
        self.profiling = False
        log.info("%s engine: profiling stopped", self.kind)

    def num_active_requests(self) -> int:
        return sum(s.load for s in self.schedulers)

    def kv_cache_contents(self) -> dict[str, Any]:
        """What every rank's radix cache holds, page by page (``GET /engine/kv_cache``):
        ``{"page_size", "dp_ranks": [{"dp_rank", "pages": [{"block_hash",
        "parent_block_hash", "token_ids"}, ...]}]}``, parents before children, block hashes
        as the KV events carry them."""
        return {
            "page_size": self.page_size,
            "dp_ranks": [
                {
                    "dp_rank": rank,
                    "pages": [
                        {"block_hash": h, "parent_block_hash": p, "token_ids": tokens}
                        for h, p, tokens in scheduler.cache.pages()
                    ],
                }
                for rank, scheduler in enumerate(self.schedulers)
            ],
        }
