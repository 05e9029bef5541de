"""Guided decoding for the torch engine: per-request grammar matchers and token bitmasks.

A request's ``json_schema``, ``regex``, ``ebnf`` (GBNF, as SGLang takes it) or
``structural_tag`` is compiled once per (kind, spec) into a bounded LRU, then each request gets
its own matcher. Every step, a guided row's logits are masked to the tokens its grammar allows
(before sampling, so greedy, sampled and logprobs all see the same distribution); eos is
allowed only where the grammar is complete, and once it is complete nothing but eos is. JSON
is laid out as ``json.dumps`` lays it out (``{"a": 1, "b": [2, 3]}``): with free whitespace a
small model was seen to spend its budget on newlines before closing the object.

Backends are a registry (:data:`BACKENDS`). The one here is llguidance, chosen by measurement
on SmolLM2's tokenizer (``bench/grammar_backends.py``, ``bench/results/grammar_backends.json``;
three schemas, a valid document walked token by token): a step's mask (compute and apply)
0.07-0.20 ms against xgrammar's 0.15-0.22 ms, a cold compile 1.1-1.8 ms against 0.8-25 ms,
and no dependencies (xgrammar's wheel declares torch and triton). xgrammar wins on a repeated
schema (0.01-0.05 ms from its cache against llguidance's 0.5-0.9 ms for a new matcher), which
is per request, not per token. llguidance's one-time cost is its token trie (~0.3 s, on the
first guided request). Its own ``apply_token_bitmask_inplace`` goes through ``torch.compile``
(seconds on first use, and a C compiler); :func:`apply_bitmask` is plain numpy instead.

Compiling runs on the engine's grammar thread, never the model thread, and before the request
reaches the scheduler: an invalid spec is a :class:`GrammarError` (the engine answers 400).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "GrammarBackend",
    "GrammarError",
    "GrammarState",
    "LlguidanceBackend",
    "apply_bitmask",
    "make_backend",
]

log = logging.getLogger(__name__)

DEFAULT_BACKEND = "llguidance"
DEFAULT_CACHE_SIZE = 256
# JSON laid out as json.dumps does (xgrammar's layout without any_whitespace): free whitespace
# lets a small model spend its whole budget on newlines and indentation before the object ends.
_JSON_LAYOUT: Any = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


class GrammarError(Exception):
    """The request's grammar is invalid or not supported (a 400)."""


class Matcher(Protocol):
    """One request's position in its grammar."""

    def consume(self, token: int) -> bool: ...

    def rollback(self, num_tokens: int) -> bool: ...

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (one bit per token id)."""
        ...

    def failed(self) -> str | None:
        """Why the matcher is stuck (a token it could not accept), or None."""
        ...


class GrammarBackend(Protocol):
    kinds: frozenset[str]

    def matcher(self, kind: str, spec: str) -> Matcher:
        """A fresh matcher for ``spec``; raises :class:`GrammarError`."""
        ...

    def cache_info(self) -> tuple[int, int]:
        """(compilations, cache hits) so far."""
        ...


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


# Added to a logit by its token's bit: -inf where the grammar forbids it, 0 where it allows.
_PENALTY = np.array([-np.inf, 0.0], dtype=np.float32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set to -inf every logit whose bit is 0, in place (``logits`` [rows, vocab] float32,
    contiguous; ``bitmask`` [rows, words] int32, token ``t`` at bit ``t % 32`` of word
    ``t // 32``).

    Branch-free on purpose: numpy unpacks the bits (little-endian words, so the bytes' little
    bit order is the tokens' order), looks each bit's penalty up and adds it. A boolean
    ``masked_fill_`` costs ~3x more on a mask that alternates often (measured: 16 rows of
    SmolLM2's 49,152 tokens, ~3 ms against ~1 ms on one core).
    """
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        raise ValueError("apply_bitmask needs contiguous float32 logits")
    vocab = logits.shape[1]
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, count=vocab, bitorder="little")
    view = logits.numpy()
    np.add(view, np.take(_PENALTY, bits), out=view)


class GrammarState:
    """A request's matcher and how many of its output tokens the matcher has consumed.

    The scheduler owns ``output_ids``; the runner catches the matcher up on the tokens it has
    not seen (a token the prefill engine sampled, the one sampled last step) before each mask,
    and rolls it back if the output ever shrinks, so retraction, disaggregation and migration
    need nothing of their own. Touched only on the model thread once the request runs.
    """

    __slots__ = ("consumed", "error", "matcher")

    def __init__(self, matcher: Matcher) -> None:
        self.matcher = matcher
        self.consumed = 0
        self.error: str | None = None

    def sync(self, output_ids: Sequence[int], total: int) -> None:
        """``output_ids`` are the request's whole output (a copy the plan took), ``total`` its
        length then. Sliced here, on the mask thread, against what the matcher has really
        consumed: a plan built before the previous mask ran must not feed a token twice."""
        if total < self.consumed:
            self.matcher.rollback(self.consumed - total)
            self.consumed = total
            return
        for token in output_ids[self.consumed : total]:
            if self.error is None and not self.matcher.consume(token):
                self.error = self.matcher.failed() or f"token {token} does not fit the grammar"
                log.warning("guided decoding stopped following its grammar: %s", self.error)
            self.consumed += 1

    def fill(self, bitmask: torch.Tensor, row: int, stop_ids: Sequence[int]) -> str | None:
        """Write the row's allowed tokens; returns why the request cannot go on (its matcher
        is stuck: a token it could not take, or nothing allowed), else None. A stuck row is
        masked to the stop tokens so sampling stays defined; the caller ends the request."""
        if self.error is None:
            self.matcher.fill(bitmask, row)
            if bool((bitmask[row] != 0).any()):
                return None
            self.error = self.matcher.failed() or "no token fits the grammar here"
        bitmask[row] = 0
        for token in stop_ids:
            bitmask[row, token // 32] |= _bit(token % 32)
        return f"guided decoding could not continue: {_one_line(self.error)}"


def _bit(i: int) -> int:
    return (1 << i) - (1 << 32) if i == 31 else 1 << i


class _LlgMatcher:
    __slots__ = ("_m",)

    def __init__(self, matcher: Any) -> None:
        self._m = matcher

    def consume(self, token: int) -> bool:
        return bool(self._m.consume_token(token))

    def rollback(self, num_tokens: int) -> bool:
        return bool(self._m.rollback(num_tokens))

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        v = bitmask[row]
        self._m.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

    def failed(self) -> str | None:
        return str(self._m.get_error()) if self._m.is_error() else None


def _structural_tag(spec: str) -> str:
    """SGLang's ``structural_tag`` (``{"structures": [{"begin", "schema", "end"}],
    "triggers": [...]}``) as an llguidance Lark grammar: free text, and JSON that follows
    its schema after each begin tag."""
    from llguidance import StructTag

    try:
        tag = json.loads(spec)
    except ValueError as exc:
        raise GrammarError(f"structural_tag is not JSON: {exc}") from None
    structures = tag.get("structures") if isinstance(tag, dict) else None
    triggers = tag.get("triggers") if isinstance(tag, dict) else None
    if not isinstance(structures, list) or not structures or not isinstance(triggers, list):
        raise GrammarError(
            'structural_tag must be {"type": "structural_tag", "structures": [{"begin", '
            '"schema", "end"}, ...], "triggers": [...]}'
        )
    tags = []
    for item in structures:
        if not isinstance(item, dict) or not all(
            isinstance(item.get(k), str) for k in ("begin", "end")
        ):
            raise GrammarError("each structural_tag structure needs string begin and end")
        begin = item["begin"]
        trigger = next((t for t in triggers if isinstance(t, str) and begin.startswith(t)), None)
        if not trigger:
            raise GrammarError(f"no structural_tag trigger starts the begin tag {begin!r}")
        schema = item.get("schema", {})
        if not isinstance(schema, dict):
            raise GrammarError("a structural_tag schema must be a JSON object")
        tags.append(StructTag(trigger=trigger, begin=begin, grammar=schema, end=item["end"]))
    return str(StructTag.to_grammar(tags))


class LlguidanceBackend:
    """llguidance (the module docstring says why); grammars cached by (kind, spec)."""

    kinds = frozenset({"json_schema", "regex", "ebnf", "structural_tag"})

    def __init__(
        self,
        tokenizer_path: str,
        vocab_size: int,
        eos_token_ids: Sequence[int],
        cache_size: int = DEFAULT_CACHE_SIZE,
    ) -> None:
        self._path = tokenizer_path
        self._vocab = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: Any = None
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.compiled = 0
        self.hits = 0

    def _llg_tokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance.hf
            from transformers import AutoTokenizer

            hf: Any = AutoTokenizer.from_pretrained(self._path, local_files_only=True)
            eos: int | list[int] | None = self._eos or None
            self._tokenizer = llguidance.hf.from_tokenizer(hf, n_vocab=self._vocab, eos_token=eos)
        return self._tokenizer

    def compile(self, kind: str, spec: str) -> str:
        """The validated grammar for ``spec`` (cached); raises :class:`GrammarError`."""
        key = (kind, spec)
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return grammar
        grammar = self._build(kind, spec)
        with self._lock:
            self.compiled += 1
            self._cache[key] = grammar
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def _build(self, kind: str, spec: str) -> str:
        from llguidance import LLMatcher
        from llguidance.gbnf_to_lark import any_to_lark

        builders: dict[str, Callable[[str], str]] = {
            "json_schema": lambda text: LLMatcher.grammar_from_json_schema(
                text, overrides=_JSON_LAYOUT
            ),
            "regex": LLMatcher.grammar_from_regex,
            "ebnf": lambda text: LLMatcher.grammar_from_lark(any_to_lark(text)),
            "structural_tag": lambda text: LLMatcher.grammar_from_lark(_structural_tag(text)),
        }
        build = builders.get(kind)
        if build is None:
            raise GrammarError(f"guided decoding by {kind} is not supported")
        try:
            grammar = build(spec)
            problem = LLMatcher.validate_grammar(grammar, self._llg_tokenizer())
        except GrammarError:
            raise
        except Exception as exc:  # the converters raise anything on a bad spec
            problem = str(exc) or type(exc).__name__
        if problem:
            raise GrammarError(f"invalid {kind}: {_one_line(problem)}")
        return grammar

    def matcher(self, kind: str, spec: str) -> Matcher:
        from llguidance import LLMatcher

        grammar = self.compile(kind, spec)
        m = LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if m.is_error():
            raise GrammarError(f"invalid {kind}: {_one_line(m.get_error())}")
        return _LlgMatcher(m)

    def cache_info(self) -> tuple[int, int]:
        return self.compiled, self.hits


def _one_line(message: str, limit: int = 300) -> str:
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


BACKENDS: dict[str, Callable[[str, int, Sequence[int]], GrammarBackend]] = {
    "llguidance": LlguidanceBackend,
}


def make_backend(
    name: str, tokenizer_path: str, vocab_size: int, eos_token_ids: Sequence[int]
) -> GrammarBackend:
    factory = BACKENDS.get(name)
    if factory is None:
        raise ValueError(f"unknown grammar backend {name!r} (known: {', '.join(BACKENDS)})")
    return factory(tokenizer_path, vocab_size, eos_token_ids)
