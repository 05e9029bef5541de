"""A generate request inside a CPU engine, and its sampling parameters as SGLang takes them.

Why one parser for both runners: a worker's callers cannot know which CPU runner serves them,
so a request is validated the same way whichever runs it (SGLang's field names, defaults and
ranges, as ``sglang/srt/sampling/sampling_params.py`` checks them), and a field an engine
cannot honour is refused by name (:meth:`ModelRunner.unsupported`), never silently dropped.

SGLang's defaults: a missing ``max_new_tokens`` means 128 and an explicit None "up to the
context length"; ``temperature`` 1.0; ``top_k`` -1 (off); ``top_p`` 1.0; ``min_p`` 0;
penalties off. The seed rule: ``sampling_seed`` wins, else the engine's ``--random-seed``,
else greedy requests use 0 and sampled ones a fresh random seed, so two identical sampled
requests differ as on any real engine while greedy decoding stays deterministic.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from shared.engine.cpu.output import OutputChannel

if TYPE_CHECKING:
    from shared.engine.cpu.radix import PrefixMatch

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "GUIDED_KEYS",
    "BadRequest",
    "Req",
    "SamplingParams",
    "TokenLogprob",
    "parse_sampling_params",
]

# SGLang's default when a request does not say.
DEFAULT_MAX_NEW_TOKENS: Final = 128
# SGLang's guided-decoding keys (one per request).
GUIDED_KEYS: Final = ("json_schema", "regex", "ebnf", "structural_tag")
_MASK64 = (1 << 64) - 1

# Request states.
WAITING: Final = 0
PREFILLING: Final = 1
DECODING: Final = 2
RECEIVING: Final = 3  # decode mode: waiting for the KV from prefill
READY: Final = 4  # decode mode: KV arrived, waiting for a running slot
SENDING: Final = 5  # prefill mode: prefill done, KV being sent
DONE: Final = 6

# ``(logprob of the chosen token, [(logprob, token id), ...] best first or None)``.
TokenLogprob = tuple[float, list[tuple[float, int]] | None]


class BadRequest(Exception):
    """The request is invalid: it ends at once with an abort carrying status 400."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(slots=True)
class SamplingParams:
    """What decides a request's tokens, validated (see :func:`parse_sampling_params`)."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int = 0
    # The user's stop ids plus the model's eos ids: every token that ends the request (unless
    # ``ignore_eos``, which, as in SGLang, disables every token-based stop).
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    logit_bias: dict[int, float] | None = None
    # Guided decoding (``json_schema``, ``regex``, ...), as given; a runner refuses what it
    # cannot enforce.
    guided: dict[str, str] = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0 or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return bool(
            self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
        )


def _number(params: Mapping[str, Any], key: str, default: float) -> float:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{key} must be a finite number, got {value!r}")
    return float(value)


def _integer(params: Mapping[str, Any], key: str, default: int) -> int:
    value = params.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer, got {value!r}")
    return value


def _token_ids(value: Any, key: str) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list | tuple | set | frozenset) or not all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    ):
        raise BadRequest(f"{key} must be a list of integers")
    return list(value)


def _logit_bias(value: Any, vocab_size: int | None) -> dict[int, float] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise BadRequest("logit_bias must be a map from token id to bias")
    out: dict[int, float] = {}
    for key, bias in value.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise BadRequest(f"logit_bias key {key!r} is not a token id") from None
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise BadRequest(f"logit_bias token id {token} is outside the vocabulary")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not math.isfinite(bias):
            raise BadRequest(f"logit_bias for token {token} must be a finite number")
        out[token] = float(bias)
    return out or None


def parse_sampling_params(
    params: Mapping[str, Any] | None,
    *,
    prompt_len: int,
    context_length: int,
    eos_token_ids: Iterable[int] = (),
    engine_seed: int | None = None,
    vocab_size: int | None = None,
) -> SamplingParams:
    """SGLang ``sampling_params`` -> :class:`SamplingParams`; raises :class:`BadRequest`."""
    params = params or {}
    if prompt_len >= context_length:
        raise BadRequest(
            f"the input ({prompt_len} tokens) is longer than the model's context length "
            f"({context_length} tokens)"
        )
    if "max_new_tokens" in params and params["max_new_tokens"] is None:
        max_new = context_length - prompt_len
    else:
        max_new = _integer(params, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if max_new < 0:
        raise BadRequest(f"max_new_tokens must be >= 0, got {max_new}")
    if prompt_len + max_new > context_length:
        raise BadRequest(
            f"requested token count exceeds the model's maximum context length of "
            f"{context_length} tokens: {prompt_len + max_new} tokens requested "
            f"({prompt_len} in the input, {max_new} for the completion); reduce the input "
            "or max_new_tokens"
        )
    min_new = _integer(params, "min_new_tokens", 0)
    if min_new < 0:
        raise BadRequest(f"min_new_tokens must be >= 0, got {min_new}")
    if min_new > max_new:
        raise BadRequest(f"min_new_tokens ({min_new}) must not exceed max_new_tokens ({max_new})")
    n = _integer(params, "n", 1)
    if n != 1:
        raise BadRequest(f"a CPU engine generates one sequence per request (n={n})")
    temperature = _number(params, "temperature", 1.0)
    if temperature < 0:
        raise BadRequest(f"temperature must be >= 0, got {temperature:g}")
    top_p = _number(params, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], got {top_p:g}")
    top_k = _integer(params, "top_k", -1)
    if top_k < 1 and top_k != -1:
        raise BadRequest(f"top_k must be -1 (off) or at least 1, got {top_k}")
    min_p = _number(params, "min_p", 0.0)
    if not 0.0 <= min_p <= 1.0:
        raise BadRequest(f"min_p must be in [0, 1], got {min_p:g}")
    frequency = _number(params, "frequency_penalty", 0.0)
    presence = _number(params, "presence_penalty", 0.0)
    for key, value in (("frequency_penalty", frequency), ("presence_penalty", presence)):
        if not -2.0 <= value <= 2.0:
            raise BadRequest(f"{key} must be in [-2, 2], got {value:g}")
    repetition = _number(params, "repetition_penalty", 1.0)
    if not 0.0 < repetition <= 2.0:
        raise BadRequest(f"repetition_penalty must be in (0, 2], got {repetition:g}")
    seed = params.get("sampling_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise BadRequest(f"sampling_seed must be an integer, got {seed!r}")
    stop = _token_ids(params.get("stop_token_ids"), "stop_token_ids")
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in stop):
        raise BadRequest("stop_token_ids must be token ids inside the vocabulary")
    guided = {k: params[k] for k in GUIDED_KEYS if params.get(k) is not None}
    if len(guided) > 1:
        raise BadRequest(f"at most one of {', '.join(GUIDED_KEYS)} may be set")
    for key, value in guided.items():
        if not isinstance(value, str):
            raise BadRequest(f"{key} must be a string")
    return SamplingParams(
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        frequency_penalty=frequency,
        presence_penalty=presence,
        repetition_penalty=repetition,
        seed=_resolve_seed(seed, temperature, engine_seed),
        stop_token_ids=frozenset(stop) | frozenset(eos_token_ids),
        ignore_eos=bool(params.get("ignore_eos", False)),
        logit_bias=_logit_bias(params.get("logit_bias"), vocab_size),
        guided=guided,
    )


def _resolve_seed(sampling_seed: int | None, temperature: float, engine_seed: int | None) -> int:
    if sampling_seed is not None:
        return sampling_seed & _MASK64
    if engine_seed is not None:
        return engine_seed & _MASK64
    if temperature <= 0.0:
        return 0
    return random.getrandbits(64)


class Req:
    """A generate request inside the scheduler (built by the engine, which validated it).

    KV: ``page_table`` lists the request's pages in sequence order; its first ``locked_pages``
    belong to the radix tree (the locked ``match``), the rest to the request. ``kv_len`` tokens
    of ``fill`` (prompt, plus output so far after a retraction) have their KV computed.
    """

    __slots__ = (
        "admit_seq",
        "bootstrap_host",
        "bootstrap_port",
        "bootstrap_room",
        "cached_tokens",
        "channel",
        "fill",
        "first_logprob",
        "first_token",
        "grammar",
        "ignore_eos",
        "input_ids",
        "kv_len",
        "locked_pages",
        "match",
        "max_new_tokens",
        "min_new_tokens",
        "output_ids",
        "page_table",
        "prompt_len",
        "retractions",
        "return_logprob",
        "rid",
        "runner_state",
        "sampling",
        "state",
        "stop_ids",
        "target",
        "task",
        "top_logprobs_num",
    )

    def __init__(
        self,
        *,
        rid: str,
        input_ids: list[int],
        sampling: SamplingParams,
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | None = None,
    ) -> None:
        self.rid = rid
        self.input_ids = input_ids
        self.prompt_len = len(input_ids)
        self.sampling = sampling
        self.max_new_tokens = sampling.max_new_tokens
        self.min_new_tokens = sampling.min_new_tokens
        self.stop_ids = sampling.stop_token_ids
        self.ignore_eos = sampling.ignore_eos
        self.return_logprob = return_logprob
        self.top_logprobs_num = top_logprobs_num if return_logprob else 0
        self.bootstrap_host = bootstrap_host
        self.bootstrap_port = bootstrap_port
        self.bootstrap_room = bootstrap_room
        self.output_ids: list[int] = []
        self.channel = OutputChannel()
        self.state = WAITING
        self.match: PrefixMatch | None = None
        self.locked_pages = 0
        self.page_table: list[int] = []
        self.kv_len = 0
        # The token sequence being prefilled and its length (prompt + outputs so far).
        self.fill: list[int] = input_ids
        self.target = 0
        self.cached_tokens = -1  # -1: not admitted yet
        self.admit_seq = 0
        # Decode mode: the token (and its logprob) the prefill engine sampled; prefill mode:
        # the token sampled after the prompt, sent with the KV.
        self.first_token: int | None = None
        self.first_logprob: TokenLogprob | None = None
        self.task: asyncio.Task[None] | None = None
        self.retractions = 0
        # Whatever the model runner keeps per request (a token generator, penalty counts).
        self.runner_state: Any = None
        # Guided decoding: the matcher the engine prepared before submitting (torch engine).
        self.grammar: Any = None

    @property
    def finished(self) -> bool:
        return self.state == DONE
