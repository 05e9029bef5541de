"""One streamed chunk of a generate response: worker -> processor.

Mirrors the reference's ``LLMEngineOutput``. Workers send token ids only; the processor owns
detokenization, so ``text`` stays unset on the token path. Defaults are omitted on the wire,
which keeps the common chunk (a few new token ids) to a handful of bytes.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec


class TopLogprob(msgspec.Struct, omit_defaults=True, kw_only=True):
    rank: int
    token_id: int
    token: str | None = None
    logprob: float


class PromptTokensDetails(msgspec.Struct, omit_defaults=True, kw_only=True):
    cached_tokens: int | None = None


class CompletionUsage(msgspec.Struct, omit_defaults=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class FinishReason(enum.StrEnum):
    EOS = "eos"
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"
    CONTENT_FILTER = "content_filter"
    ERROR = "error"

    @classmethod
    def _missing_(cls, value: object) -> FinishReason | None:
        # The reference accepts SGLang's "abort" (and its variants) as an alias of cancelled.
        if isinstance(value, str) and value.startswith("abort"):
            return cls.CANCELLED
        return None


class KvCacheHit(msgspec.Struct, kw_only=True):
    """``engine_data["kv_cache_hit"]`` on a final chunk: how much of the prompt the engine found
    cached. The router reads it to learn how good its KV guess was."""

    prompt_tokens: int
    reused_tokens: int


# Key of :class:`KvCacheHit` inside ``EngineOutput.engine_data``.
KV_CACHE_HIT_KEY = "kv_cache_hit"


class EngineOutput(msgspec.Struct, omit_defaults=True, kw_only=True):
    token_ids: list[int] = []
    # Which of the ``n`` choices this chunk belongs to.
    index: int = 0
    text: str | None = None
    finish_reason: FinishReason | None = None
    # What matched: a stop string, a stop token id, or a stop token sequence.
    stop_reason: str | int | list[int] | None = None
    log_probs: list[float] | None = None
    top_logprobs: list[list[TopLogprob]] | None = None
    cum_log_probs: float | None = None
    completion_usage: CompletionUsage | None = None
    # A prefill worker's bootstrap info (host, port, room) for the decode leg.
    disaggregated_params: dict[str, Any] | None = None
    engine_data: dict[str, Any] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def kv_cache_hit(self) -> KvCacheHit | None:
        """The engine's prefix-cache hit report, if this chunk carries a valid one."""
        if not self.engine_data or KV_CACHE_HIT_KEY not in self.engine_data:
            return None
        try:
            return msgspec.convert(self.engine_data[KV_CACHE_HIT_KEY], KvCacheHit)
        except msgspec.ValidationError:
            return None
