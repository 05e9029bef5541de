"""``SimEngine``: the simulated engine behind ``shared.engine.protocol.Engine``.

Why: the mesh must run end to end on a laptop and in CI, without a GPU, and still exercise
what production exercises -- continuous batching, prefix caching, KV events and load metrics
on SGLang's ZMQ sockets, disaggregated prefill/decode with a real KV transfer, SGLang-shaped
output streams. This class wires the parts together: one :class:`Scheduler` per DP rank (each
with its own radix cache and KV pool, KV-event publisher at the DP-offset endpoint and
load-metrics pusher), plus the bootstrap server (prefill mode) or KV receiver (decode mode),
shared by the ranks as in SGLang.

Choices where SGLang leaves a value to the hardware or to its own resolution:

- ``page_size`` None -> 16. SGLang resolves None per attention backend (1 for most, larger
  for some kernels); 16 is the KV block size KV-aware routing wants (one event per 16
  tokens instead of per token) and what deployments set explicitly.
- ``max_total_tokens`` None -> 400,000 per DP rank (roughly what 80 GB leave for Llama-3-8B's
  KV after weights and activations), rounded down to whole pages.
- ``context_length`` None -> ``config.json`` (``max_position_embeddings`` and friends), else
  8192.
- ``kv_bytes_per_token`` None -> layers x 2 x KV heads x head dim x 2 bytes from
  ``config.json``, else 131,072 (Llama-3-8B in bf16).
- ``metrics_endpoint``: None and ``enable_metrics`` off -> no load metrics; ``enable_metrics``
  without an endpoint -> an ``ipc://`` path under the temp dir (SGLang's own default is an
  ipc tempfile). Every rank's PUSH connects to the one endpoint, as in SGLang; a consumer
  binds the PULL there.
- ``bootstrap_host`` None (or a wildcard) -> the bootstrap server listens on all interfaces
  and advertises this host's address (``gethostbyname(gethostname())``, else 127.0.0.1).
- a prefill-mode request without bootstrap info runs its prefill and sends its KV nowhere,
  like one for ``FAKE_BOOTSTRAP_HOST``; a decode-mode request without it is a 400.

Requests are validated up front; a bad one ends its stream at once with
``{"type": "abort", "message": ..., "status_code": 400}`` as SGLang's validation does.
``sampling_params`` follow SGLang: a missing ``max_new_tokens`` means 128, an explicit None
means "up to the context length"; ``temperature`` defaults to 1.0 (see ``tokens.py`` for
what that means for the seed).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.engine.cpu.kv_events import KvEventsConfig, ZmqKvEventPublisher, ZmqKvMetricsPusher
from shared.engine.cpu.radix import RadixCache
from shared.engine.cpu.scheduler import Scheduler, SchedulerConfig, SimRequest
from shared.engine.cpu.transfer import BootstrapServer
from shared.engine.cpu.transfer import KvReceiver as TcpKvReceiver
from shared.engine.protocol import EngineInfo
from shared.engine.sim.cost import CostModel
from shared.engine.sim.tokens import TokenGenerator, Vocabulary, prompt_hash, resolve_seed

__all__ = ["DEFAULT_PAGE_SIZE", "SimConfig", "SimEngine"]

log = logging.getLogger(__name__)

DEFAULT_PAGE_SIZE = 16
DEFAULT_MAX_TOTAL_TOKENS = 400_000
DEFAULT_MAX_RUNNING_REQUESTS = 256
DEFAULT_CONTEXT_LENGTH = 8192
DEFAULT_KV_BYTES_PER_TOKEN = 131_072
DEFAULT_CHUNKED_PREFILL_SIZE = 8192
# SGLang's default when a request does not say.
DEFAULT_MAX_NEW_TOKENS = 128

_CONTEXT_KEYS = (
    "max_sequence_length",
    "seq_length",
    "max_seq_len",
    "model_max_length",
    "max_position_embeddings",
)
_instance_ids = itertools.count()


@dataclass(slots=True)
class SimConfig:
    """Everything a simulated engine needs; field names follow SGLang's ``ServerArgs``."""

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
    kv_bytes_per_token: int | None = None
    bootstrap_timeout: float = 300.0
    # SGLang's --kv-events-config JSON; None (or publisher "null") publishes nothing.
    kv_events_config: str | None = None
    enable_metrics: bool = False
    metrics_endpoint: str | None = None
    speedup_ratio: float = 1.0
    # > 0: requests stop early with eos after a drawn length of this mean.
    output_len_mean: float = 0.0
    random_seed: int | None = None
    decode_log_interval: int = 40
    cost: CostModel = field(default_factory=CostModel)

    def __post_init__(self) -> None:
        if self.dp_size < 1:
            raise ValueError("dp_size must be >= 1")
        if self.disaggregation_mode not in ("null", "prefill", "decode"):
            raise ValueError(
                f"disaggregation_mode must be null, prefill or decode, not "
                f"{self.disaggregation_mode!r}"
            )
        if self.speedup_ratio < 0:
            raise ValueError("speedup_ratio must be >= 0 (0 = no simulated delays)")
        if self.output_len_mean < 0:
            raise ValueError("output_len_mean must be >= 0")
        for name in ("page_size", "max_total_tokens", "max_running_requests", "context_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.kv_bytes_per_token is not None and self.kv_bytes_per_token < 1:
            raise ValueError("kv_bytes_per_token must be >= 1")


def _model_config(model_path: str) -> dict[str, Any]:
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


def _kv_bytes_per_token(config: dict[str, Any]) -> int:
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return DEFAULT_KV_BYTES_PER_TOKEN
    value = layers * 2 * kv_heads * head_dim * 2
    return value if value > 0 else DEFAULT_KV_BYTES_PER_TOKEN


def _advertised_host() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class _BadRequest(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _int_param(params: dict[str, Any], key: str, default: int) -> int:
    value = params.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadRequest(f"{key} must be an integer, got {value!r}")
    return value


class SimEngine:
    """The simulated SGLang engine (see the module docstring)."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        model_cfg = _model_config(config.model_path)
        self.page_size = config.page_size or DEFAULT_PAGE_SIZE
        requested = config.max_total_tokens or DEFAULT_MAX_TOTAL_TOKENS
        self.total_pages = requested // self.page_size
        if self.total_pages < 1:
            raise ValueError("max_total_tokens must hold at least one page")
        self.max_total_tokens = self.total_pages * self.page_size
        self.max_running_requests = config.max_running_requests or DEFAULT_MAX_RUNNING_REQUESTS
        self.context_length = config.context_length or _context_length(model_cfg)
        self.kv_bytes_per_token = config.kv_bytes_per_token or _kv_bytes_per_token(model_cfg)
        self.mode = config.disaggregation_mode
        self.events_config = (
            KvEventsConfig.parse(config.kv_events_config)
            if config.kv_events_config is not None
            else None
        )
        self.metrics_endpoint = config.metrics_endpoint
        if self.metrics_endpoint is None and config.enable_metrics:
            self.metrics_endpoint = "ipc://" + os.path.join(
                tempfile.gettempdir(), f"sglmesh-sim-metrics-{os.getpid()}-{next(_instance_ids)}"
            )
        self.vocab: Vocabulary = Vocabulary.fallback()
        self.schedulers: list[Scheduler] = []
        self.publishers: list[ZmqKvEventPublisher] = []
        self.pushers: list[ZmqKvMetricsPusher] = []
        self.bootstrap_server: BootstrapServer | None = None
        self.kv_receiver: TcpKvReceiver | None = None
        self.profiling = False
        self._started = False
        self._closed = False
        self.info = self._make_info()

    def _make_info(self) -> EngineInfo:
        cfg = self.config
        info = EngineInfo(
            engine="sim",
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
        # A path that is not a local directory (a hub id) reads nothing: the fallback vocabulary.
        self.vocab = await asyncio.to_thread(Vocabulary.from_model_dir, cfg.model_path or None)
        try:
            if self.mode == "prefill":
                server = BootstrapServer(
                    cfg.bootstrap_host or "0.0.0.0",
                    cfg.bootstrap_port,
                    kv_bytes_per_token=self.kv_bytes_per_token,
                    timeout=cfg.bootstrap_timeout,
                )
                await server.start()
                self.bootstrap_server = server
            elif self.mode == "decode":
                self.kv_receiver = TcpKvReceiver(
                    kv_bytes_per_token=self.kv_bytes_per_token, timeout=cfg.bootstrap_timeout
                )
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
                    speedup_ratio=cfg.speedup_ratio,
                    decode_log_interval=cfg.decode_log_interval,
                    cost=cfg.cost,
                    dp_rank=rank,
                )
                cache = RadixCache(self.page_size, self.total_pages, events=publisher is not None)
                scheduler = Scheduler(
                    sched_cfg,
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
            "simulated engine started: %s, mode %s, dp %d, page %d, %d KV tokens/rank, speedup %s",
            self.info.served_model_name,
            self.mode,
            cfg.dp_size,
            self.page_size,
            self.max_total_tokens,
            cfg.speedup_ratio,
        )

    async def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        for scheduler in self.schedulers:
            await scheduler.close()
        if self.bootstrap_server is not None:
            await self.bootstrap_server.close()
        if self.kv_receiver is not None:
            await self.kv_receiver.close()
        for publisher in self.publishers:
            await publisher.close()
        for pusher in self.pushers:
            pusher.close()

    # ----- generation -----

    def _pick_rank(self, data_parallel_rank: int | None, bootstrap_room: int | None) -> int:
        dp = self.config.dp_size
        if data_parallel_rank is not None:
            if not 0 <= data_parallel_rank < dp:
                raise _BadRequest(f"data_parallel_rank {data_parallel_rank} is not in [0, {dp})")
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
    ) -> SimRequest:
        if not isinstance(input_ids, list) or not input_ids:
            raise _BadRequest("input_ids must be a non-empty list of token ids")
        try:
            lo = min(input_ids)
            hi = max(input_ids)
        except TypeError:
            raise _BadRequest("input_ids must be integers") from None
        if not isinstance(lo, int) or lo < 0 or hi >= 2**32:
            raise _BadRequest("token ids must be integers in [0, 2**32)")
        params = sampling_params or {}
        n_prompt = len(input_ids)
        if n_prompt >= self.context_length:
            raise _BadRequest(
                f"the input ({n_prompt} tokens) is longer than the model's context length "
                f"({self.context_length} tokens)"
            )
        if "max_new_tokens" in params and params["max_new_tokens"] is None:
            max_new = self.context_length - n_prompt
        else:
            max_new = _int_param(params, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if max_new < 0:
            raise _BadRequest(f"max_new_tokens must be >= 0, got {max_new}")
        if n_prompt + max_new > self.context_length:
            raise _BadRequest(
                f"requested token count exceeds the model's maximum context length of "
                f"{self.context_length} tokens: {n_prompt + max_new} tokens requested "
                f"({n_prompt} in the input, {max_new} for the completion); reduce the input "
                "or max_new_tokens"
            )
        min_new = _int_param(params, "min_new_tokens", 0)
        if min_new < 0:
            raise _BadRequest(f"min_new_tokens must be >= 0, got {min_new}")
        if min_new > max_new:
            raise _BadRequest(
                f"min_new_tokens ({min_new}) must not exceed max_new_tokens ({max_new})"
            )
        n = _int_param(params, "n", 1)
        if n != 1:
            raise _BadRequest(f"the simulated engine generates one sequence per request (n={n})")
        temperature = params.get("temperature")
        if temperature is None:
            temperature = 1.0
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            raise _BadRequest(f"temperature must be a number, got {temperature!r}")
        if temperature < 0:
            raise _BadRequest(f"temperature must be >= 0, got {temperature}")
        seed = params.get("sampling_seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _BadRequest(f"sampling_seed must be an integer, got {seed!r}")
        stop = params.get("stop_token_ids") or []
        if not isinstance(stop, list | tuple | set | frozenset) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in stop
        ):
            raise _BadRequest("stop_token_ids must be a list of integers")
        ignore_eos = bool(params.get("ignore_eos", False))
        if not isinstance(top_logprobs_num, int) or top_logprobs_num < 0:
            raise _BadRequest("top_logprobs_num must be a non-negative integer")
        gen = TokenGenerator(
            self.vocab,
            seed=resolve_seed(seed, float(temperature), self.config.random_seed),
            prompt_digest=prompt_hash(input_ids),
            output_len_mean=self.config.output_len_mean,
            min_new_tokens=min_new,
            ignore_eos=ignore_eos,
        )
        if self.mode == "prefill":
            # A prefill leg samples exactly the first token. The generator above keeps the
            # request's own min_new_tokens, so its stream matches the decode leg's.
            max_new = 1
            min_new = min(min_new, 1)
        return SimRequest(
            rid=rid,
            input_ids=input_ids,
            gen=gen,
            max_new_tokens=max_new,
            min_new_tokens=min_new,
            ignore_eos=ignore_eos,
            stop_token_ids=frozenset(stop) | frozenset(self.vocab.eos_token_ids),
            return_logprob=return_logprob,
            top_logprobs_num=top_logprobs_num if return_logprob else 0,
            bootstrap_host=bootstrap_host,
            bootstrap_port=bootstrap_port,
            bootstrap_room=bootstrap_room,
        )

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
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream SGLang-shaped dicts (``output_ids`` increments); ``stream=False`` yields one
        dict with every output id. Closing the iterator early aborts the request."""
        if not self._started or self._closed:
            raise RuntimeError("the simulated engine is not running (call start() first)")
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
            )
        except _BadRequest as exc:
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
            "the simulated LLM engine does not compute embeddings; run the encode service "
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
        log.info("simulated engine: profiling started (nothing is recorded)")

    async def stop_profile(self) -> None:
        self.profiling = False
        log.info("simulated engine: profiling stopped")

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
