"""Timing model of the simulated engine: how long a scheduler step would take on a GPU.

Why a model at all: the mesh's routing, batching and backpressure only behave realistically
when engines are slow in the right places -- prefill proportional to *uncached* prompt tokens
(so prefix-cache hits pay off, which is what KV-aware routing exploits) and decode bounded
below by reading the weights once per step, growing with batch size and with the KV read.

The defaults approximate Llama-3-8B in bf16 on one H100 SXM, derived from first principles:

- hardware: ~989 TFLOP/s dense bf16, ~3.35 TB/s HBM3; a served model reaches roughly 55% of
  peak compute (``~5.4e14`` FLOP/s effective) and ~90% of peak bandwidth on weight reads, ~70%
  on the scattered paged-KV reads;
- model: 8.0e9 parameters -> ~16 GB of weights; a forward costs ~2 FLOPs per parameter per
  token (1.6e10 FLOP/token); KV per token = 32 layers x 2 (K, V) x 8 KV heads x 128 dims x 2
  bytes = 128 KiB.

Prefill (compute bound):

- ``prefill_per_token_s`` = 1.6e10 / 5.4e14 ~= 30 us per uncached token (~33k tokens/s);
- ``prefill_attention_s`` per (query token x context token) pair: causal attention costs
  ~4 x layers x d_model = 4 x 32 x 4096 ~= 5.2e5 FLOP per pair -> ~1e-9 s at the same
  utilization; a chunk of ``n`` new tokens ending at context length ``c`` attends to about
  ``n x (c - n/2)`` pairs;
- ``prefill_overhead_s`` = 3 ms per prefill step for scheduling, kernel launches and
  sampling.

Decode (memory bound):

- ``decode_floor_s`` = 16 GB / (3.35 TB/s x 0.9) ~= 5 ms: every step reads all weights once;
- ``decode_per_request_s`` = 30 us: the 1.6e10 FLOP of one more token plus its share of
  sampling and bookkeeping, which dominates once the batch is large;
- ``decode_per_kv_token_s`` = 128 KiB / (3.35 TB/s x 0.7) ~= 56 ns per KV token in the batch.

So one decode step with 256 requests of 1k context costs ~5 + 7.7 + 14.7 ~= 27 ms (~9.5k
output tokens/s), and a 1k-token uncached prompt ~34 ms -- the order of magnitude SGLang
reaches for this model on this GPU. The scheduler divides every duration by its
``speedup_ratio``; a ratio of 0 means "do not sleep at all".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CostModel:
    """Seconds per scheduler step; see the module docstring for where each default comes from."""

    prefill_overhead_s: float = 3e-3
    prefill_per_token_s: float = 3.0e-5
    prefill_attention_s: float = 1.0e-9
    decode_floor_s: float = 5e-3
    decode_per_request_s: float = 3.0e-5
    decode_per_kv_token_s: float = 5.6e-8

    def __post_init__(self) -> None:
        for name in (
            "prefill_overhead_s",
            "prefill_per_token_s",
            "prefill_attention_s",
            "decode_floor_s",
            "decode_per_request_s",
            "decode_per_kv_token_s",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"CostModel.{name} must be >= 0")

    def prefill_time(self, uncached_tokens: int, context_tokens: int) -> float:
        """Seconds to prefill ``uncached_tokens`` new tokens whose sequence ends at
        ``context_tokens`` (cached prefix + already prefilled chunks + these tokens).

        Zero new tokens cost nothing: a step without prefill work pays no prefill overhead.
        """
        if uncached_tokens <= 0:
            return 0.0
        # Causal attention: the new tokens see on average the context before them plus half
        # of themselves.
        pairs = uncached_tokens * max(0.0, context_tokens - uncached_tokens / 2)
        return (
            self.prefill_overhead_s
            + uncached_tokens * self.prefill_per_token_s
            + pairs * self.prefill_attention_s
        )

    def chunk_time(self, uncached_tokens: int, context_tokens: int) -> float:
        """The variable part of :meth:`prefill_time` (no per-step overhead), for charging the
        share of a multi-request prefill step to one request."""
        if uncached_tokens <= 0:
            return 0.0
        pairs = uncached_tokens * max(0.0, context_tokens - uncached_tokens / 2)
        return uncached_tokens * self.prefill_per_token_s + pairs * self.prefill_attention_s

    def decode_time(self, batch_size: int, kv_tokens: int) -> float:
        """Seconds for one decode step of ``batch_size`` requests holding ``kv_tokens`` KV
        tokens in total (prompt + generated so far)."""
        if batch_size <= 0:
            return 0.0
        return (
            self.decode_floor_s
            + batch_size * self.decode_per_request_s
            + kv_tokens * self.decode_per_kv_token_s
        )

    @classmethod
    def fixed(cls, *, prefill_per_token_s: float = 0.0, decode_step_s: float = 0.0) -> CostModel:
        """A flat model (no overheads, no context terms): handy for tests and for replaying a
        measured per-token cost."""
        return cls(
            prefill_overhead_s=0.0,
            prefill_per_token_s=prefill_per_token_s,
            prefill_attention_s=0.0,
            decode_floor_s=decode_step_s,
            decode_per_request_s=0.0,
            decode_per_kv_token_s=0.0,
        )
