"""Request and response mapping between the mesh's wire types and the engine's SGLang shape.

Why one module for both engines: the SGLang adapter and the simulated engine take the same
``async_generate`` keywords and stream the same dicts (``shared.engine.protocol``), so the
conversion from ``PreprocessedRequest`` and back to ``EngineOutput`` is written once, here,
and the worker runs unchanged on either engine.

The mapping follows the reference deployment's SGLang worker:

- sampling parameters keep ``max_new_tokens`` even when it is ``None`` (SGLang would
  otherwise cap the output at 128 tokens) and drop every other ``None``;
- ``stop_token_ids`` is the union of the user's stop tokens and the hidden ones (EOS
  variants the processor adds); only a user stop token is ever reported as ``stop_reason``;
- SGLang's finish types pass through (``stop``, ``length``), ``abort*`` becomes
  ``cancelled``. An EOS stays ``stop``: SGLang reports it as a matched stop token and the
  reference does not tell the two apart. An abort carrying an HTTP status is an error instead:
  400 is the client's fault (``InvalidRequestError``), 429/503 mean "busy, try another
  worker" (``OverloadedError``), anything else is an ``EngineError``;
- usage rides on the first chunk, on every chunk where the prompt or cached token count
  changes, and on the final chunk; the final chunk also reports the prefix-cache hit
  (``engine_data.kv_cache_hit``) for the KV router, except on a disaggregated decode leg (the
  prefill leg reports it) and for ``n > 1``;
- a prefill leg's tokens never reach the client (the decode leg streams them): its stream
  maps to one chunk, at the end, carrying only the cache hit -- nothing if it was cancelled.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from proto.plane import ErrorCode
from proto.request import BYPASS_REMOTE_PREFILL_ANNOTATION, PreprocessedRequest
from proto.response import (
    KV_CACHE_HIT_KEY,
    CompletionUsage,
    EngineOutput,
    FinishReason,
    PromptTokensDetails,
    TopLogprob,
)
from shared.multimodal import to_array
from shared.runtime.errors import InvalidRequestError, MeshError, OverloadedError

__all__ = [
    "DP_RANK_UNSET",
    "EngineError",
    "OutputMapper",
    "sampling_params",
    "to_generate_kwargs",
]

log = logging.getLogger(__name__)

# The reference's "no DP rank" sentinel (u32::MAX) in routing hints.
DP_RANK_UNSET = 2**32 - 1

_BUSY_STATUS = frozenset({429, 503})


class EngineError(MeshError):
    """The engine ended a request with an error that is not the client's fault."""

    code = ErrorCode.HANDLER_ERROR

    def __init__(
        self, message: str, *, status_code: int | None = None, err_type: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.err_type = err_type


# --------------------------------------------------------------------------------------------
# Request -> async_generate keywords


def _guided_decoding(req: PreprocessedRequest) -> dict[str, Any]:
    guide = req.sampling_options.guided_decoding
    if guide is None:
        return {}
    out: dict[str, Any] = {}
    if guide.json is not None:
        out["json_schema"] = guide.json if isinstance(guide.json, str) else json.dumps(guide.json)
    elif guide.regex is not None:
        out["regex"] = guide.regex
    elif guide.choice is not None:
        if not guide.choice:
            raise InvalidRequestError("guided_decoding.choice must list at least one choice")
        out["regex"] = "(" + "|".join(re.escape(c) for c in guide.choice) + ")"
    elif guide.grammar is not None:
        out["ebnf"] = guide.grammar
    elif guide.structural_tag is not None:
        tag = guide.structural_tag
        out["structural_tag"] = tag if isinstance(tag, str) else json.dumps(tag)
    return out


def _union(*lists: Sequence[int] | None) -> list[int]:
    seen: dict[int, None] = {}
    for ids in lists:
        for token in ids or ():
            seen.setdefault(token, None)
    return list(seen)


def sampling_params(
    req: PreprocessedRequest, *, skip_tokenizer_init: bool = False
) -> dict[str, Any]:
    """SGLang ``sampling_params`` for ``req`` (see the module docstring for the rules).

    With ``skip_tokenizer_init`` and ``min_tokens > 0`` the reference cannot rely on SGLang to
    hold EOS back (it has no tokenizer to know the EOS variants), so it turns ``ignore_eos``
    on and drops the stop tokens and the floor: the processor's detokenizer then enforces
    both. The simulated engine enforces ``min_new_tokens`` itself, so it never sets this.
    """
    stop = req.stop_conditions
    opts = req.sampling_options
    stop_ids = _union(stop.stop_token_ids, stop.stop_token_ids_hidden)
    params: dict[str, Any] = {
        "max_new_tokens": stop.max_tokens,
        "min_new_tokens": stop.min_tokens,
        "stop_token_ids": stop_ids or None,
        "ignore_eos": stop.ignore_eos,
        "n": opts.n,
        "temperature": opts.temperature,
        "top_p": opts.top_p,
        "top_k": opts.top_k,
        "min_p": opts.min_p,
        "presence_penalty": opts.presence_penalty,
        "frequency_penalty": opts.frequency_penalty,
        "repetition_penalty": opts.repetition_penalty,
        "sampling_seed": opts.seed,
        "logit_bias": dict(opts.logit_bias) if opts.logit_bias else None,
    }
    params.update(_guided_decoding(req))
    if skip_tokenizer_init and (stop.min_tokens or 0) > 0:
        params["ignore_eos"] = True
        params["stop_token_ids"] = None
        params["min_new_tokens"] = None
    return {k: v for k, v in params.items() if v is not None or k == "max_new_tokens"}


def to_generate_kwargs(
    req: PreprocessedRequest,
    *,
    rid: str,
    disaggregation_mode: str,
    dp_rank: int | None,
    skip_tokenizer_init: bool = False,
) -> dict[str, Any]:
    """The keywords for ``engine.async_generate(**kwargs)``, as the reference builds them.

    ``dp_rank`` is used when the request's routing hints carry none. Disaggregation rules
    are enforced here because they hold for both engines: a disaggregated leg serves
    ``n == 1`` only; a decode leg needs ``bootstrap_info`` and cannot honour the
    bypass-remote-prefill annotation; a prefill leg generates exactly one token. Violations
    raise ``InvalidRequestError``.
    """
    if disaggregation_mode not in ("null", "prefill", "decode"):
        raise ValueError(f"unknown disaggregation mode {disaggregation_mode!r}")
    if not req.token_ids:
        raise InvalidRequestError("token_ids must not be empty")
    params = sampling_params(req, skip_tokenizer_init=skip_tokenizer_init)
    if disaggregation_mode != "null" and params.get("n", 1) != 1:
        raise InvalidRequestError(f"disaggregated serving supports only n=1, got n={params['n']}")
    if disaggregation_mode == "decode":
        if req.has_annotation(BYPASS_REMOTE_PREFILL_ANNOTATION):
            raise InvalidRequestError(
                f"{BYPASS_REMOTE_PREFILL_ANNOTATION} is not supported: a disaggregated decode "
                "worker always takes its KV from a prefill worker"
            )
        if req.bootstrap_info is None:
            raise InvalidRequestError(
                "bootstrap_info is required on a disaggregated decode worker (the processor "
                "sends it with the request); is a prefill worker registered?"
            )
    if disaggregation_mode == "prefill":
        params["max_new_tokens"] = 1

    kwargs: dict[str, Any] = {
        "input_ids": list(req.token_ids),
        "sampling_params": params,
        "rid": rid,
        "stream": True,
    }

    out = req.output_options
    if out.logprobs is not None or out.prompt_logprobs is not None:
        kwargs["return_logprob"] = True
        kwargs["top_logprobs_num"] = max(out.logprobs or 0, out.prompt_logprobs or 0)
        if out.prompt_logprobs is not None:
            kwargs["logprob_start_len"] = 0

    if req.bootstrap_info is not None:
        kwargs["bootstrap_host"] = req.bootstrap_info.bootstrap_host
        kwargs["bootstrap_port"] = req.bootstrap_info.bootstrap_port
        kwargs["bootstrap_room"] = req.bootstrap_info.bootstrap_room

    if req.mm_items:
        kwargs.update(image_kwargs(req))

    rank = req.routing.dp_rank if req.routing is not None else None
    if rank is None or rank == DP_RANK_UNSET:
        rank = dp_rank
    if rank is not None and rank != DP_RANK_UNSET:
        kwargs["data_parallel_rank"] = rank
    return kwargs


def image_kwargs(req: PreprocessedRequest) -> dict[str, Any]:
    """The request's images as SGLang 0.5.23 takes precomputed embeddings: ``image_data`` is a
    list of exactly one ``{"format": "precomputed_embedding", "feature": ...}`` item (SGLang's
    ``validate_mm_data`` refuses more than one), the images' embeddings concatenated in prompt
    order (tokens x hidden), and ``mm_hashes`` one hex hash per image, which SGLang adopts as
    the items' hashes instead of hashing the features again."""
    items = req.mm_items or []
    for item in items:
        end = item.offset + item.length
        if end > len(req.token_ids) or item.embedding.shape[0] != item.length:
            raise InvalidRequestError(
                f"image {item.hash[:12]} claims prompt positions {item.offset}..{end} and "
                f"{item.embedding.shape[0]} embeddings for {item.length} positions"
            )
    hidden = {tuple(item.embedding.shape[1:]) for item in items}
    if len(hidden) != 1:
        raise InvalidRequestError(f"images of different embedding widths {sorted(hidden)}")
    feature = np.concatenate([to_array(item.embedding) for item in items]).astype(np.float32)
    return {
        "image_data": [{"format": "precomputed_embedding", "feature": feature}],
        "mm_hashes": [item.hash for item in items],
    }


# --------------------------------------------------------------------------------------------
# Stream item -> EngineOutput


def _top_logprobs(entries: Sequence[Any] | None) -> list[TopLogprob]:
    result: list[TopLogprob] = []
    for rank, entry in enumerate(entries or (), start=1):
        if entry is None:
            continue
        logprob, token_id = float(entry[0]), int(entry[1])
        text = entry[2] if len(entry) > 2 and entry[2] is not None else None
        token = text if isinstance(text, str) else f"token_id:{token_id}"
        result.append(TopLogprob(rank=rank, token_id=token_id, token=token, logprob=logprob))
    return result


def _prompt_logprobs(meta: Mapping[str, Any]) -> list[dict[str, Any] | None] | None:
    tokens = meta.get("input_token_logprobs")
    if not tokens:
        return None
    tops = meta.get("input_top_logprobs") or []
    result: list[dict[str, Any] | None] = []
    for i, entry in enumerate(tokens):
        if entry is None or entry[0] is None:
            result.append(None)  # the first prompt token has no logprob
            continue
        position: dict[str, Any] = {}
        candidates = [entry, *(tops[i] if i < len(tops) and tops[i] else [])]
        for cand in candidates:
            if cand is None or cand[0] is None:
                continue
            key = str(int(cand[1]))
            if key in position:
                continue
            item: dict[str, Any] = {"logprob": float(cand[0])}
            if len(cand) > 2 and isinstance(cand[2], str):
                item["decoded_token"] = cand[2]
            position[key] = item
        result.append(position)
    return result


@dataclass(slots=True)
class _ChoiceState:
    emitted: bool = False
    usage_key: tuple[int, int | None] | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class OutputMapper:
    """Converts one request's engine stream items into ``EngineOutput`` chunks.

    One mapper per request: it remembers, per choice index, whether anything was sent yet and
    which usage was reported last. ``map(item)`` returns ``None`` for an item with nothing to
    say (no new tokens, not final), which the caller skips.
    """

    def __init__(self, req: PreprocessedRequest, *, disaggregation_mode: str = "null") -> None:
        self._prefill = disaggregation_mode == "prefill"
        stop = req.stop_conditions
        self._user_stop = frozenset(stop.stop_token_ids or ())
        self._hidden_stop = frozenset(stop.stop_token_ids_hidden or ())
        self._want_logprobs = req.output_options.logprobs is not None
        self._want_prompt_logprobs = req.output_options.prompt_logprobs is not None
        n = req.sampling_options.n or 1
        self._report_cache_hit = disaggregation_mode != "decode" and n == 1
        self._choices: dict[int, _ChoiceState] = {}

    def map(self, item: Mapping[str, Any]) -> EngineOutput | None:
        meta: Mapping[str, Any] = item.get("meta_info") or {}
        index = int(item.get("index") or 0)
        state = self._choices.get(index)
        if state is None:
            state = self._choices[index] = _ChoiceState()
        token_ids = list(map(int, item.get("output_ids") or ()))
        raw_reason = meta.get("finish_reason")
        finished = raw_reason is not None

        if self._want_prompt_logprobs and state.prompt_logprobs is None:
            state.prompt_logprobs = _prompt_logprobs(meta)

        finish_reason: FinishReason | None = None
        stop_reason: str | int | list[int] | None = None
        if finished:
            finish_reason, stop_reason = self._finish(raw_reason)
            if finish_reason is FinishReason.CANCELLED:
                # SGLang's abort chunk repeats the last token under incremental streaming;
                # an abort never produces a new one.
                token_ids = []

        if self._prefill:
            return self._prefill_chunk(meta, finish_reason)
        if not token_ids and not finished:
            return None

        output = EngineOutput(token_ids=token_ids, index=index)
        if finished:
            output.finish_reason = finish_reason
            output.stop_reason = stop_reason

        if self._want_logprobs:
            entries = meta.get("output_token_logprobs") or []
            # Keep the lists aligned with this chunk's tokens (SGLang slices them per chunk
            # with incremental streaming output).
            entries = list(entries)[-len(token_ids) :] if token_ids else []
            if entries:
                output.log_probs = [float(e[0]) if e[0] is not None else 0.0 for e in entries]
                tops = list(meta.get("output_top_logprobs") or [])[-len(token_ids) :]
                if tops:
                    output.top_logprobs = [_top_logprobs(t) for t in tops]

        if "prompt_tokens" in meta:
            # Usage goes with the first chunk, the last, and any that changes the prompt's
            # figures; built only then (most chunks carry none).
            cached = meta.get("cached_tokens")
            key = (int(meta["prompt_tokens"]), None if cached is None else int(cached))
            if not state.emitted or finished or key != state.usage_key:
                output.completion_usage = self._usage(meta)
                state.usage_key = key

        if finished:
            engine_data: dict[str, Any] = {}
            if self._report_cache_hit and "prompt_tokens" in meta:
                engine_data[KV_CACHE_HIT_KEY] = {
                    "prompt_tokens": int(meta["prompt_tokens"]),
                    "reused_tokens": int(meta.get("cached_tokens") or 0),
                }
            if state.prompt_logprobs is not None:
                engine_data["prompt_logprobs"] = state.prompt_logprobs
            if engine_data:
                output.engine_data = engine_data

        state.emitted = True
        return output

    def _prefill_chunk(
        self, meta: Mapping[str, Any], finish_reason: FinishReason | None
    ) -> EngineOutput | None:
        if finish_reason is None or finish_reason is FinishReason.CANCELLED:
            return None
        if "prompt_tokens" not in meta:
            return None
        hit = {
            "prompt_tokens": int(meta["prompt_tokens"]),
            "reused_tokens": int(meta.get("cached_tokens") or 0),
        }
        return EngineOutput(token_ids=[], engine_data={KV_CACHE_HIT_KEY: hit})

    @staticmethod
    def _usage(meta: Mapping[str, Any]) -> CompletionUsage | None:
        if "prompt_tokens" not in meta:
            return None
        prompt = int(meta["prompt_tokens"])
        completion = int(meta.get("completion_tokens") or 0)
        cached = meta.get("cached_tokens")
        return CompletionUsage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=int(cached))
            if cached is not None
            else None,
        )

    def _finish(self, raw: Any) -> tuple[FinishReason, str | int | list[int] | None]:
        if isinstance(raw, str):  # some engines report the bare type
            raw = {"type": raw}
        if not isinstance(raw, Mapping):
            log.warning("unrecognised finish_reason %r from the engine; reporting stop", raw)
            return FinishReason.STOP, None
        kind = str(raw.get("type") or "")
        if kind.startswith("abort"):
            status = raw.get("status_code")
            if isinstance(status, int) or raw.get("err_type") is not None:
                self._raise_abort(raw)
            return FinishReason.CANCELLED, None
        if kind == "length":
            return FinishReason.LENGTH, None
        try:
            reason = FinishReason(kind)
        except ValueError:
            log.warning("unrecognised finish type %r from the engine; reporting stop", kind)
            reason = FinishReason.STOP
        return reason, self._stop_reason(raw.get("matched"))

    def _stop_reason(self, matched: Any) -> str | int | list[int] | None:
        if matched is None or isinstance(matched, bool):
            return None
        if isinstance(matched, str):
            return matched
        if isinstance(matched, int):
            # EOS and the processor's hidden stop tokens are not the user's stop reason.
            if matched in self._user_stop and matched not in self._hidden_stop:
                return matched
            return None
        if isinstance(matched, list | tuple) and all(isinstance(t, int) for t in matched):
            return [int(t) for t in matched]
        return None

    @staticmethod
    def _raise_abort(raw: Mapping[str, Any]) -> None:
        message = str(raw.get("message") or "the engine aborted the request")
        status = raw.get("status_code")
        err_type = raw.get("err_type")
        if status == 400:
            raise InvalidRequestError(message)
        if status in _BUSY_STATUS:
            raise OverloadedError(message)
        raise EngineError(
            message,
            status_code=status if isinstance(status, int) else None,
            err_type=str(err_type) if err_type is not None else None,
        )
