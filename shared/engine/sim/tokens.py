"""Output tokens of the simulated engine: word-like, deterministic, fast.

Why word-like: the mesh detokenizes what engines produce, and a simulated answer that reads as
a stream of real words ("the", " server", ...) exercises incremental detokenization, stop
strings and SSE exactly like real output -- and is what a human watching a demo expects.
:class:`Vocabulary` therefore picks "ordinary" tokens from the model's ``tokenizer.json``
(read with plain ``json``; importing ``transformers`` would cost seconds and hundreds of MB).

Why deterministic, and on what: token ``i`` of a request is a pure function of
``(seed, hash(prompt token ids), i)``. It never depends on the request id, the DP rank, the
batch the request happened to share, retraction or timing, so

- a disaggregated prefill (token 0) + decode (tokens 1..) pair produces exactly the tokens one
  aggregated engine produces for the same seed;
- tests can assert exact outputs. (A migrated stream, re-sent with the tokens so far as part of
  its prompt, continues from a different hash, so its later tokens differ from an unmigrated
  run's -- as a sampled continuation on a real engine would.)

The seed rule (SGLang defaults ``temperature`` to 1.0):

- ``sampling_seed`` in the request wins;
- else, if the engine was started with a ``random_seed``, that seed;
- else, greedy requests (``temperature == 0``) use seed 0 -- greedy decoding is deterministic;
- else (sampling, no seed anywhere) a fresh random seed per request, so two identical sampled
  requests differ as they would on a real engine.

Speed: the stream is SplitMix64 evaluated at ``base + i * GAMMA`` -- random access, a handful of
integer operations per token, no hashing per token (``hashlib`` runs once per request, over the
prompt).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_MASK = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
# Domain separators so the length draw and logprob draws never reuse the token stream's words.
_LEN_SALT = 0x6C656E677468  # "length"
_LP_SALT = 0x6C6F6770726F62  # "logprob"

# A BPE (GPT-2/Llama-3 style, "Ġ") or SentencePiece ("▁") word-start marker followed by 2+
# ASCII letters: tokens that begin a new word and detokenize to " word".
_WORDLIKE = re.compile(r"^[\u0120\u2581][A-Za-z]{2,}$")
_LETTERS = re.compile(r"^[A-Za-z]{2,}$")

FALLBACK_ORDINARY = range(1000, 31000)
FALLBACK_EOS = 2


def _mix(z: int) -> int:
    """SplitMix64's finalizer."""
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def prompt_hash(input_ids: Sequence[int]) -> int:
    """A 64-bit digest of the prompt's token ids, stable across processes and Python builds
    (``hash()`` of a tuple is not guaranteed to be)."""
    try:
        data = array("Q", input_ids).tobytes()
    except (OverflowError, TypeError):
        data = json.dumps(list(input_ids)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


@dataclass(frozen=True, slots=True)
class Vocabulary:
    """The token ids the simulated engine emits, and its end-of-sequence ids."""

    ordinary: tuple[int, ...]
    eos_token_ids: tuple[int, ...] = (FALLBACK_EOS,)
    bos_token_id: int | None = None
    # Any special ids; never emitted as ordinary output.
    special: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if not self.ordinary:
            raise ValueError("a vocabulary needs at least one ordinary token")
        if not self.eos_token_ids:
            raise ValueError("a vocabulary needs at least one eos token id")

    @property
    def eos(self) -> int:
        """The id an early stop emits (the first eos id)."""
        return self.eos_token_ids[0]

    @classmethod
    def fallback(cls, eos_token_ids: Iterable[int] = (FALLBACK_EOS,)) -> Vocabulary:
        eos = tuple(eos_token_ids) or (FALLBACK_EOS,)
        ordinary = tuple(i for i in FALLBACK_ORDINARY if i not in eos)
        return cls(ordinary=ordinary, eos_token_ids=eos)

    @classmethod
    def from_model_dir(cls, path: str | Path | None) -> Vocabulary:
        """Reads ``tokenizer.json`` (if any) and eos/bos ids from ``config.json``,
        ``generation_config.json`` and ``tokenizer_config.json`` (whichever exist).

        Without a ``tokenizer.json`` the ordinary ids are 1000..30999 and eos comes from the
        configs, else 2.
        """
        if path is None:
            return cls.fallback()
        root = Path(path)
        config = _read_json(root / "config.json")
        gen_config = _read_json(root / "generation_config.json")
        tok_config = _read_json(root / "tokenizer_config.json")
        tokenizer = _read_json(root / "tokenizer.json")

        vocab: dict[str, int] = {}
        model = tokenizer.get("model")
        if isinstance(model, dict):
            raw_vocab = model.get("vocab")
            if isinstance(raw_vocab, dict):  # BPE / WordPiece: {token: id}
                vocab = {k: v for k, v in raw_vocab.items() if isinstance(v, int)}
            elif isinstance(raw_vocab, list):  # Unigram: [[piece, score], ...], id = index
                vocab = {
                    item[0]: i
                    for i, item in enumerate(raw_vocab)
                    if isinstance(item, list) and item and isinstance(item[0], str)
                }
        special: set[int] = set()
        for added in tokenizer.get("added_tokens") or []:
            if isinstance(added, dict) and isinstance(added.get("id"), int):
                special.add(added["id"])
                if isinstance(added.get("content"), str):
                    vocab.setdefault(added["content"], added["id"])

        eos: list[int] = []
        for source in (gen_config, config):
            eos.extend(_ids(source.get("eos_token_id")))
        eos_text = _token_text(tok_config.get("eos_token"))
        if eos_text is not None and eos_text in vocab:
            eos.append(vocab[eos_text])
        eos_ids = tuple(dict.fromkeys(eos)) or (FALLBACK_EOS,)

        bos: int | None = None
        for source in (gen_config, config):
            found = _ids(source.get("bos_token_id"))
            if found:
                bos = found[0]
                break
        if bos is None:
            bos_text = _token_text(tok_config.get("bos_token"))
            if bos_text is not None and bos_text in vocab:
                bos = vocab[bos_text]

        excluded = special | set(eos_ids) | ({bos} if bos is not None else set())
        if not vocab:
            fb = cls.fallback(eos_ids)
            return cls(
                ordinary=tuple(i for i in fb.ordinary if i not in excluded),
                eos_token_ids=eos_ids,
                bos_token_id=bos,
                special=frozenset(special),
            )
        ordinary = sorted(i for t, i in vocab.items() if _WORDLIKE.match(t) and i not in excluded)
        if not ordinary:  # e.g. a WordPiece vocabulary without word-start markers
            ordinary = sorted(
                i for t, i in vocab.items() if _LETTERS.match(t) and i not in excluded
            )
        if not ordinary:
            ordinary = sorted(i for i in vocab.values() if i not in excluded)
        return cls(
            ordinary=tuple(ordinary),
            eos_token_ids=eos_ids,
            bos_token_id=bos,
            special=frozenset(special),
        )


def resolve_seed(sampling_seed: int | None, temperature: float, engine_seed: int | None) -> int:
    """The request's generation seed; see the module docstring for the rule."""
    if sampling_seed is not None:
        return sampling_seed & _MASK
    if engine_seed is not None:
        return engine_seed & _MASK
    if temperature <= 0.0:
        return 0
    return random.getrandbits(64)


class TokenGenerator:
    """The output token stream of one request: ``token(i)`` for ``i = 0, 1, ...``.

    ``token(i)`` never returns an eos id unless it is the drawn early-stop position (see
    ``stop_at``); the scheduler decides what finishing means (``ignore_eos``, stop ids, ...).
    """

    __slots__ = ("_base", "_n", "_ordinary", "eos", "stop_at")

    def __init__(
        self,
        vocab: Vocabulary,
        *,
        seed: int,
        prompt_digest: int,
        output_len_mean: float = 0.0,
        min_new_tokens: int = 0,
        ignore_eos: bool = False,
    ) -> None:
        self._ordinary = vocab.ordinary
        self._n = len(vocab.ordinary)
        self._base = _mix((seed * _GAMMA ^ prompt_digest) & _MASK)
        self.eos = vocab.eos
        # The 0-based index of the early eos, or -1. SGLang masks eos while fewer than
        # ``min_new_tokens`` tokens exist, so it can come no earlier than index min_new_tokens.
        self.stop_at = -1
        if output_len_mean > 0 and not ignore_eos:
            u = (_mix((self._base ^ _LEN_SALT) & _MASK) >> 11) * (1.0 / (1 << 53))
            # Exponential with the given mean, rounded to a length >= 1.
            length = max(1, round(-output_len_mean * math.log(1.0 - u)))
            self.stop_at = max(length - 1, min_new_tokens)

    def token(self, i: int) -> int:
        if i == self.stop_at:
            return self.eos
        z = (self._base + (i + 1) * _GAMMA) & _MASK
        z = ((z ^ (z >> 30)) * _M1) & _MASK
        z = ((z ^ (z >> 27)) * _M2) & _MASK
        return self._ordinary[(z ^ (z >> 31)) % self._n]

    def alternative(self, i: int, attempt: int) -> int:
        """A different ordinary token for position ``i`` (used when the drawn one is a stop
        token that ``min_new_tokens`` forbids)."""
        z = _mix((self._base + (i + 1) * _GAMMA + attempt * _M2) & _MASK)
        return self._ordinary[z % self._n]

    def logprobs(
        self, i: int, token: int, top_k: int
    ) -> tuple[tuple[float, int, None], list[tuple[float, int, None]]]:
        """Fake but well-formed logprobs for position ``i``: the chosen token's entry and the
        ``top_k`` best alternatives (chosen token first), all <= 0 and summing to < 1 in
        probability."""
        z = _mix(((self._base ^ _LP_SALT) + i * _GAMMA) & _MASK)
        # p0 >= 0.4 keeps the chosen token first: the best alternative gets (1 - p0) / 2.
        p0 = 0.4 + 0.59 * ((z >> 11) * (1.0 / (1 << 53)))
        chosen = (math.log(p0), token, None)
        top: list[tuple[float, int, None]] = []
        if top_k > 0:
            top.append(chosen)
            rest = 1.0 - p0
            seen = {token}
            k = 1
            while len(top) < top_k and k < 4 * top_k + 8:
                alt = self._ordinary[_mix((z + k) & _MASK) % self._n]
                k += 1
                if alt in seen:
                    continue
                seen.add(alt)
                rest *= 0.5
                top.append((math.log(rest), alt, None))
        return chosen, top
