"""The engine protocol every worker drives: the shape of ``sgl.Engine``.

Both engines implement it: the SGLang adapter (``sgl.Engine`` on a GPU) and the simulated
engine (CPU). Their streams are dicts in SGLang's own output shape, so the conversion to
``EngineOutput`` (``shared.engine.mapping``) is written once and the layers above run unchanged
on either engine:

    {"text": "", "output_ids": [new ids only], "index": 0,
     "meta_info": {"id": rid, "finish_reason": None | {"type": "stop", "matched": id|str}
                   | {"type": "length", "length": n} | {"type": "abort", "message": str},
                   "prompt_tokens": n, "completion_tokens": n, "cached_tokens": n,
                   "output_token_logprobs": [(logprob, token_id, None), ...]  # if asked
                   "output_top_logprobs": [[(logprob, token_id, None), ...], ...]}}
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import msgspec


class EngineInfo(msgspec.Struct, kw_only=True):
    """What registration and routing need to know about a running engine."""

    engine: str  # "sglang" | "sim"
    model_path: str
    served_model_name: str
    page_size: int
    max_total_tokens: int  # KV pool size, per dp rank
    max_running_requests: int
    max_prefill_tokens: int
    context_length: int
    dp_size: int = 1
    disaggregation_mode: str = "null"  # "null" | "prefill" | "decode"
    bootstrap_host: str | None = None
    bootstrap_port: int | None = None
    is_embedding: bool = False
    # ZMQ endpoints a publisher connects to (one per dp rank for KV events and replay).
    kv_events_endpoints: list[str] = []
    kv_events_replay_endpoints: list[str] = []
    kv_events_topic: str = ""
    metrics_endpoint: str | None = None


class Engine(Protocol):
    info: EngineInfo

    async def start(self) -> None: ...

    def async_generate(
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
    ) -> AsyncIterator[dict[str, Any]]: ...

    async def async_encode(
        self, *, prompt: str | list[str] | None = None, input_ids: list[list[int]] | None = None
    ) -> list[dict[str, Any]]: ...

    def abort_request(self, rid: str) -> None: ...

    async def flush_cache(self) -> bool: ...

    async def pause_generation(self) -> None: ...

    async def continue_generation(self) -> None: ...

    async def release_memory_occupation(self) -> None: ...

    async def resume_memory_occupation(self) -> None: ...

    async def start_profile(self) -> None: ...

    async def stop_profile(self) -> None: ...

    def num_active_requests(self) -> int: ...

    async def shutdown(self) -> None: ...
