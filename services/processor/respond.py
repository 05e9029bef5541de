"""From engine output to OpenAI responses: text, stop strings, finish reasons, usage, logprobs.

:class:`OutputAssembler` consumes batches of :class:`EngineOutput` (per prompt) and returns
:class:`Delta` items, one per choice that changed: the new text (incrementally detokenized,
with stop strings held back until decided), the finish reason when the choice ended, and
logprobs when asked for. The chat and completion renderers below turn deltas into stream
chunks or into the one non-streaming response, so both modes are built from the same stream.

Finish reasons: an EOS or stop token and a stop string are ``stop``; the token budget is
``length``. A matched stop token is not part of the text (SGLang trims it the same way). An
engine that ends a request with ``cancelled`` or ``error`` though nobody asked is an error
for the client (:class:`EngineFailure`), not a quiet end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from proto.openai import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    PromptTokensDetails,
    TopLogprob,
    Usage,
)
from proto.response import EngineOutput, FinishReason
from proto.tool_call import ToolCallDelta
from services.processor.chat_output import ChatOutputParser, ChatParsing
from services.processor.detokenize import IncrementalDetokenizer, StopStringMatcher
from services.processor.parsers.tool_base import assemble_tool_calls
from services.processor.preprocess import ModelPreprocessor

__all__ = [
    "Delta",
    "EngineFailure",
    "FastChunks",
    "OutputAssembler",
    "chat_chunk",
    "completion_chunk",
]

_json = msgspec.json.encode

_FINISH = {
    FinishReason.EOS: "stop",
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.CONTENT_FILTER: "content_filter",
}


class EngineFailure(Exception):
    """The engine ended a choice with ``cancelled`` or ``error``."""


@dataclass(slots=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass(slots=True)
class Delta:
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    first: bool = False
    # Chat with the card's parsers: ``text`` is then the content.
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass(slots=True)
class _Choice:
    detok: IncrementalDetokenizer
    matcher: StopStringMatcher | None
    tokens: int = 0
    finish_reason: str | None = None
    started: bool = False
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    parser: ChatOutputParser | None = None
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class OutputAssembler:
    """Per-request output state: one choice per engine stream.

    ``n > 1`` is served as ``n`` streams of one choice each (the processor fans the request
    out), so choice ``i`` is stream ``i`` and every engine output carries one choice.
    ``prompt_tokens`` counts each distinct prompt once, as OpenAI does for ``n > 1``.
    """

    def __init__(
        self,
        preprocessor: ModelPreprocessor,
        prompts: Sequence[Sequence[int]],
        *,
        prompt_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        logprobs: bool = False,
        keep_text: bool = False,
        cache_owners: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        include_stop: bool = False,
        echo: Sequence[str] | None = None,
        parsing: ChatParsing | None = None,
    ) -> None:
        self._pre = preprocessor
        self._tokenizer = preprocessor.tokenizer
        self._eos = frozenset(preprocessor.eos_token_ids)
        self._want_logprobs = logprobs
        self._keep = keep_text
        # include_stop: a matched stop string or user stop token stays in the text.
        self._include_stop = include_stop
        # echo: per stream, text that goes before its first output (the prompt).
        self._echo = list(echo) if echo is not None else None
        self.prompt_tokens = (
            sum(len(p) for p in prompts) if prompt_tokens is None else prompt_tokens
        )
        # Streams whose cache hit is reported (one per distinct prompt); default: all.
        self._cache_owners = frozenset(
            range(len(prompts)) if cache_owners is None else cache_owners
        )
        self.cached_tokens: dict[int, int] = {}
        self.choices: list[_Choice] = [
            _Choice(
                IncrementalDetokenizer(
                    self._tokenizer, prompt, skip_special_tokens=skip_special_tokens
                ),
                StopStringMatcher(stop, include_stop=include_stop) if stop else None,
            )
            for prompt in prompts
        ]
        self.parsing = parsing if parsing is not None and parsing.active else None
        if self.parsing is not None:
            for choice in self.choices:
                choice.parser = self.parsing.parser()
        self._open = len(self.choices)

    @property
    def done(self) -> bool:
        return self._open == 0

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def usage(self) -> Usage:
        completion = self.completion_tokens
        return Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
            prompt_tokens_details=PromptTokensDetails(
                cached_tokens=sum(self.cached_tokens.values())
            ),
        )

    def feed(self, index: int, batch: Sequence[EngineOutput]) -> list[Delta]:
        """Apply one batch of choice ``index``'s engine output; return what changed."""
        if self.choices[index].done:
            return []
        for out in batch:
            if out.completion_usage is not None:
                self._usage(index, out)
        if len(batch) == 1:
            out = batch[0]
            delta = self._apply(index, out.token_ids, out)
        else:
            delta = self._apply(index, [t for o in batch for t in o.token_ids], _merge(batch))
        return [delta] if delta is not None else []

    def finish_all(self) -> list[Delta]:
        """The streams ended: release held text of choices the engine left unfinished."""
        deltas = []
        for index, choice in enumerate(self.choices):
            if not choice.done:
                delta = self._finish_choice(index, choice, "stop", "")
                deltas.append(delta)
        return deltas

    # -- internals ---------------------------------------------------------------------------

    def _usage(self, index: int, out: EngineOutput) -> None:
        # The first report of a stream wins: after a migration the engine counts the
        # generated tokens it was resent as cached prompt.
        usage = out.completion_usage
        if usage is None or index in self.cached_tokens or index not in self._cache_owners:
            return
        details = usage.prompt_tokens_details
        self.cached_tokens[index] = (details.cached_tokens or 0) if details is not None else 0

    def _apply(self, index: int, token_ids: list[int], out: EngineOutput) -> Delta | None:
        choice = self.choices[index]
        if choice.done:
            return None
        choice.tokens += len(token_ids)
        reason = out.finish_reason
        text_ids = token_ids
        if reason is not None:
            if reason in (FinishReason.CANCELLED, FinishReason.ERROR):
                raise EngineFailure(
                    "the engine aborted the request"
                    if reason is FinishReason.CANCELLED
                    else "the engine failed the request"
                )
            last = token_ids[-1] if token_ids else None
            user_stop = last == out.stop_reason and not self._include_stop
            if (
                reason in (FinishReason.STOP, FinishReason.EOS)
                and last is not None
                and (user_stop or (last in self._eos and last != out.stop_reason))
            ):
                text_ids = token_ids[:-1]  # the matched stop token is not part of the text
        text = choice.detok.push(text_ids) if text_ids else ""
        logprobs = self._logprobs(token_ids, out) if self._want_logprobs else None
        if reason is not None:
            text += choice.detok.flush()
        finish: str | None = None
        if choice.matcher is not None:
            text, matched = choice.matcher.feed(text)
            if matched is not None:
                finish = "stop"
            elif reason is not None:
                text += choice.matcher.flush()
        if finish is None and reason is not None:
            finish = _FINISH.get(reason, "stop")
        if not text and finish is None and not logprobs:
            return None
        if finish is not None:
            return self._finish_choice(index, choice, finish, text, logprobs)
        delta = self._delta(index, choice, text, None, logprobs)
        if not (delta.text or delta.reasoning or delta.tool_calls or delta.logprobs):
            return None  # all held back by the parsers
        return delta

    def _finish_choice(
        self,
        index: int,
        choice: _Choice,
        finish: str,
        text: str,
        logprobs: list[TokenLogprob] | None = None,
    ) -> Delta:
        if not text:
            text = choice.detok.flush()
            if choice.matcher is not None:
                text, _ = choice.matcher.feed(text)
                text += choice.matcher.flush()
        choice.finish_reason = finish
        self._open -= 1
        return self._delta(index, choice, text, finish, logprobs)

    def _delta(
        self,
        index: int,
        choice: _Choice,
        text: str,
        finish: str | None,
        logprobs: list[TokenLogprob] | None,
    ) -> Delta:
        reasoning = ""
        calls: list[ToolCallDelta] = []
        if choice.parser is not None:
            piece = choice.parser.finish(text) if finish is not None else choice.parser.feed(text)
            text, reasoning, calls = piece.content, piece.reasoning, piece.tool_calls
            if finish == "stop" and choice.parser.calls_emitted:
                finish = choice.finish_reason = "tool_calls"
            if not (text or reasoning or calls or logprobs or finish is not None):
                # All held back by the parsers: an empty delta that _apply drops; the choice
                # has not started (its first real delta still carries the role).
                return Delta(index, "")
        first = not choice.started
        choice.started = True
        if first and self._echo is not None:
            text = self._echo[index] + text
        if self._keep:
            if text:
                choice.text.append(text)
            if reasoning:
                choice.reasoning.append(reasoning)
            choice.tool_calls.extend(calls)
            if logprobs:
                choice.logprobs.extend(logprobs)
        return Delta(index, text, finish, logprobs, first, reasoning, calls)

    def _logprobs(self, token_ids: list[int], out: EngineOutput) -> list[TokenLogprob] | None:
        if not out.log_probs:
            return None
        decode = self._tokenizer.decode
        tops = out.top_logprobs or []
        result = []
        for i, (tid, lp) in enumerate(zip(token_ids, out.log_probs, strict=False)):
            top = []
            if i < len(tops):
                top = [
                    (
                        t.token
                        if t.token and not t.token.startswith("token_id:")
                        else decode([t.token_id], skip_special_tokens=False),
                        t.logprob,
                    )
                    for t in tops[i]
                ]
            result.append(TokenLogprob(decode([tid], skip_special_tokens=False), lp, top))
        return result


def _merge(outs: Sequence[EngineOutput]) -> EngineOutput:
    last = outs[-1]
    log_probs = [lp for o in outs for lp in (o.log_probs or ())] or None
    tops = [t for o in outs for t in (o.top_logprobs or ())] or None
    return EngineOutput(
        token_ids=[t for o in outs for t in o.token_ids],
        index=last.index,
        finish_reason=last.finish_reason,
        stop_reason=last.stop_reason,
        log_probs=log_probs,
        top_logprobs=tops,
    )


# --------------------------------------------------------------------------------------------
# Rendering


def _chat_logprobs(items: list[TokenLogprob] | None) -> ChatLogprobs | None:
    if items is None:
        return None
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=it.token,
                logprob=it.logprob,
                bytes=list(it.token.encode()),
                top_logprobs=[
                    TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in it.top
                ],
            )
            for it in items
        ]
    )


def _completion_logprobs(
    items: list[TokenLogprob] | None, offset: int
) -> CompletionLogprobs | None:
    if items is None:
        return None
    offsets = []
    for it in items:
        offsets.append(offset)
        offset += len(it.token)
    return CompletionLogprobs(
        tokens=[it.token for it in items],
        token_logprobs=[it.logprob for it in items],
        top_logprobs=[dict(it.top) for it in items],
        text_offset=offsets,
    )


class FastChunks:
    """Pre-rendered SSE bytes for the most common event: one choice, new text only.

    Everything but the text is the same in every such event of a request, so the JSON is
    built once and the text spliced in (JSON-escaped by msgspec); other events go through
    the structs. The output is byte-identical to encoding the equivalent struct.
    """

    __slots__ = ("_parts",)

    def __init__(self, rid: str, created: int, model: str, *, chat: bool) -> None:
        self._parts = _fast_parts(rid, created, model, chat)

    def text(self, index: int, text: str) -> bytes:
        before, middle, after = self._parts
        return b"".join((before, str(index).encode(), middle, _json(text), after))


def _fast_parts(rid: str, created: int, model: str, chat: bool) -> tuple[bytes, bytes, bytes]:
    marker_index, marker_text = 987654321, "\x00MARKER\x00"
    if chat:
        chunk: ChatCompletionChunk | CompletionChunk = ChatCompletionChunk(
            id=rid,
            created=created,
            model=model,
            choices=[ChatChunkChoice(index=marker_index, delta=ChatDelta(content=marker_text))],
        )
    else:
        chunk = CompletionChunk(
            id=rid,
            created=created,
            model=model,
            choices=[CompletionChoice(index=marker_index, text=marker_text)],
        )
    encoded = b"data: " + _json(chunk) + b"\n\n"
    before, _, rest = encoded.partition(str(marker_index).encode())
    middle, _, after = rest.partition(_json(marker_text))
    return before, middle, after


def chat_chunk(
    rid: str, created: int, model: str, deltas: list[Delta], logprobs: bool
) -> ChatCompletionChunk:
    choices = []
    for d in deltas:
        choices.append(
            ChatChunkChoice(
                index=d.index,
                delta=ChatDelta(
                    role="assistant" if d.first else None,
                    content=d.text if d.text or not (d.reasoning or d.tool_calls) else None,
                    reasoning_content=d.reasoning or None,
                    tool_calls=list(d.tool_calls) or None,
                ),
                finish_reason=d.finish_reason,
                logprobs=_chat_logprobs(d.logprobs) if logprobs else None,
            )
        )
    return ChatCompletionChunk(id=rid, created=created, model=model, choices=choices)


def completion_chunk(
    rid: str, created: int, model: str, deltas: list[Delta], logprobs: bool, offsets: list[int]
) -> CompletionChunk:
    choices = []
    for d in deltas:
        lp = _completion_logprobs(d.logprobs, offsets[d.index]) if logprobs else None
        offsets[d.index] += len(d.text)
        choices.append(
            CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason, logprobs=lp)
        )
    return CompletionChunk(id=rid, created=created, model=model, choices=choices)


def chat_response(
    rid: str, created: int, model: str, assembler: OutputAssembler, logprobs: bool
) -> ChatCompletionResponse:
    choices = [
        ChatChoice(
            index=i,
            message=_chat_message(c, assembler.parsing),
            finish_reason=c.finish_reason,
            logprobs=_chat_logprobs(c.logprobs) if logprobs else None,
        )
        for i, c in enumerate(assembler.choices)
    ]
    return ChatCompletionResponse(
        id=rid, created=created, model=model, choices=choices, usage=assembler.usage()
    )


def _chat_message(choice: _Choice, parsing: ChatParsing | None) -> ChatResponseMessage:
    content = "".join(choice.text)
    message = ChatResponseMessage(content=content)
    if parsing is None:
        return message
    if choice.reasoning:
        message.reasoning_content = "".join(choice.reasoning)
    if choice.tool_calls:
        message.tool_calls = assemble_tool_calls(choice.tool_calls)
        message.content = content or None
    return message


def completion_response(
    rid: str, created: int, model: str, assembler: OutputAssembler, logprobs: bool
) -> CompletionResponse:
    choices = [
        CompletionChoice(
            index=i,
            text="".join(c.text),
            finish_reason=c.finish_reason,
            logprobs=_completion_logprobs(c.logprobs, 0) if logprobs else None,
        )
        for i, c in enumerate(assembler.choices)
    ]
    return CompletionResponse(
        id=rid, created=created, model=model, choices=choices, usage=assembler.usage()
    )
