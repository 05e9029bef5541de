"""The OpenAI API as the processor accepts and emits it.

Requests are decoded with :func:`decode_request`, which turns every way a body can be wrong
(invalid JSON or UTF-8, wrong types, out-of-range values, inconsistent fields) into a
:class:`RequestError` (HTTP 400) naming the offending field in ``param``, as OpenAI does.
Unknown fields are ignored: clients send vendor extensions freely.

Responses follow OpenAI's shapes; errors are ``{"error": {"message", "type", "param",
"code"}}`` (:func:`error_body`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec

__all__ = [
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatDelta",
    "ChatLogprobs",
    "ChatMessage",
    "ChatResponseMessage",
    "ChatTokenLogprob",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "ContentPart",
    "ErrorDetail",
    "ErrorResponse",
    "ModelList",
    "ModelObject",
    "PromptTokensDetails",
    "RequestError",
    "StreamOptions",
    "TopLogprob",
    "Usage",
    "decode_request",
    "error_body",
    "error_type_for_status",
]

# Limits: every list and string a request can make the processor work through is bounded,
# so no single request costs more than a bounded amount of memory and CPU. OpenAI allows 4
# stop sequences; we are more generous.
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 1024  # characters per stop string
MAX_STOP_TOKEN_IDS = 1024
MAX_MESSAGES = 4096
MAX_PROMPTS = 1024  # prompts in one /v1/completions request
MAX_N = 128
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5

Role = Literal["system", "user", "assistant", "tool", "developer"]
# Token counts go on the wire as u32: larger values are refused here, not by the encoder.
PositiveInt = Annotated[int, msgspec.Meta(ge=1, le=2**32 - 1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
# -1 disables top-k; 0 is accepted as a synonym for -1 (see ``effective_top_k``).
TopK = Annotated[int, msgspec.Meta(ge=-1, le=2**31 - 1)]
MinP = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, msgspec.Meta(gt=0.0)]
N = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]
StopString = Annotated[str, msgspec.Meta(max_length=MAX_STOP_LENGTH)]
StopList = Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP_SEQUENCES)]
StopTokenIds = Annotated[list[TokenId], msgspec.Meta(max_length=MAX_STOP_TOKEN_IDS)]
ChatTopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=MAX_CHAT_TOP_LOGPROBS)]
CompletionLogprobsCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_COMPLETION_LOGPROBS)]


# --------------------------------------------------------------------------------------------
# Errors


class RequestError(Exception):
    """A request the processor refuses; ``status`` is the HTTP status to answer with."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        type_: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type_ or error_type_for_status(status)

    def to_body(self) -> bytes:
        return error_body(self.status, self.message, param=self.param, type_=self.type)

    def __repr__(self) -> str:
        return f"RequestError(status={self.status}, message={self.message!r}, param={self.param!r})"


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorDetail


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    501: "not_implemented_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_type_for_status(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status."""
    known = _ERROR_TYPES.get(status)
    if known is not None:
        return known
    return "server_error" if status >= 500 else "invalid_request_error"


_encoder = msgspec.json.Encoder()


def error_body(
    status: int, message: str, *, param: str | None = None, type_: str | None = None
) -> bytes:
    """The JSON body of an error response: ``{"error": {message, type, param, code}}``."""
    detail = ErrorDetail(
        message=message, type=type_ or error_type_for_status(status), param=param, code=status
    )
    return _encoder.encode(ErrorResponse(error=detail))


# --------------------------------------------------------------------------------------------
# Requests


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content. Only ``{"type": "text", "text": ...}`` is supported;
    other types decode but are rejected by the preprocessor."""

    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as one string: text parts joined by newlines; ``None`` is ``""``.

        Raises :class:`RequestError` for a non-text part."""
        content = self.content
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        texts: list[str] = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise RequestError(
                    f"Unsupported content part type {part.type!r}: only 'text' parts "
                    "(with a 'text' field) are supported",
                    param="messages",
                )
            texts.append(part.text)
        return "\n".join(texts)


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class _SamplingRequest(msgspec.Struct, kw_only=True):
    """Fields shared by chat and text completion requests."""

    model: str
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    n: N | None = None
    stop: StopString | StopList | None = None
    stop_token_ids: StopTokenIds | None = None
    ignore_eos: bool | None = None
    min_tokens: NonNegativeInt | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def check(self) -> None:
        """Cross-field validation, run by :func:`decode_request`."""
        if isinstance(self.stop, str) or self.stop is None:
            return
        for i, s in enumerate(self.stop):
            if not s:
                raise RequestError("Stop sequences must not be empty", param=f"stop[{i}]")

    def effective_top_k(self) -> int | None:
        """``top_k`` with 0 mapped to -1 (disabled), as the reference does."""
        return -1 if self.top_k == 0 else self.top_k

    def stop_list(self) -> list[str] | None:
        if self.stop is None:
            return None
        if isinstance(self.stop, str):
            return [self.stop] if self.stop else None
        return list(self.stop) or None

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_SamplingRequest, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = False
    top_logprobs: ChatTopLogprobs | None = None
    # Extra variables for the chat template (e.g. ``enable_thinking``).
    chat_template_kwargs: dict[str, Any] | None = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError(
                "'top_logprobs' requires 'logprobs' to be true", param="top_logprobs"
            )

    def effective_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the current name) or else ``max_tokens``."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class CompletionRequest(_SamplingRequest, kw_only=True):
    # A string, a list of strings, a list of token ids or a list of token id lists; msgspec
    # allows one list type in a union, so the shapes are checked by ``check``.
    prompt: str | list[Any]
    logprobs: CompletionLogprobsCount | None = None
    echo: bool = False
    suffix: str | None = None

    def check(self) -> None:
        super().check()
        if self.echo:
            raise RequestError("'echo' is not supported", param="echo")
        if self.suffix:
            raise RequestError("'suffix' is not supported", param="suffix")
        self.prompts()

    def effective_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: each a string or a list of token ids.

        Raises :class:`RequestError` for any other shape."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise RequestError("'prompt' must not be empty", param="prompt")
        if len(prompt) > MAX_PROMPTS and not _is_token_id(prompt[0]):
            raise RequestError(
                f"'prompt' holds {len(prompt)} prompts; at most {MAX_PROMPTS} are allowed",
                param="prompt",
            )
        first = prompt[0]
        if isinstance(first, str):
            if not all(isinstance(p, str) for p in prompt):
                raise RequestError(_PROMPT_SHAPE, param="prompt")
            return list(prompt)
        if _is_token_id(first):
            if not all(_is_token_id(t) for t in prompt):
                raise RequestError(_PROMPT_SHAPE, param="prompt")
            return [list(prompt)]
        if isinstance(first, list):
            out: list[str | list[int]] = []
            for i, p in enumerate(prompt):
                if not isinstance(p, list) or not all(_is_token_id(t) for t in p):
                    raise RequestError(_PROMPT_SHAPE, param=f"prompt[{i}]")
                out.append(list(p))
            return out
        raise RequestError(_PROMPT_SHAPE, param="prompt")


_PROMPT_SHAPE = (
    "'prompt' must be a string, a list of strings, a list of token ids (non-negative "
    "integers) or a list of lists of token ids"
)


def _is_token_id(value: Any) -> bool:
    return type(value) is int and 0 <= value <= 2**32 - 1


# --------------------------------------------------------------------------------------------
# Decoding

RequestT = TypeVar("RequestT", bound=msgspec.Struct)

_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_PATH_RE = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING_RE = re.compile(r"^Object missing required field `(?P<field>[^`]+)`")


def _param_from_path(path: str) -> str | None:
    path = path.lstrip(".")
    return path or None


def _validation_error(exc: msgspec.ValidationError) -> RequestError:
    text = str(exc)
    param: str | None = None
    match = _PATH_RE.search(text)
    if match is not None:
        text = text[: match.start()]
        param = _param_from_path(match.group("path"))
    missing = _MISSING_RE.match(text)
    if missing is not None:
        field = missing.group("field")
        param = f"{param}.{field}" if param else field
        return RequestError(f"Missing required field '{param}'", param=param)
    if param is None:
        return RequestError(f"Invalid request body: {text}")
    return RequestError(f"Invalid value for '{param}': {text}", param=param)


def decode_request(body: bytes, type_: type[RequestT]) -> RequestT:
    """Decode and validate a request body, or raise :class:`RequestError` (400)."""
    decoder = _decoders.get(type_)
    if decoder is None:
        decoder = _decoders[type_] = msgspec.json.Decoder(type_)
    try:
        # msgspec skips unknown fields without checking their UTF-8; the whole body must be.
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"Request body is not valid UTF-8: {exc.reason}") from None
    try:
        request: RequestT = decoder.decode(body)
    except RecursionError:
        raise RequestError("Request body is nested too deeply") from None
    except msgspec.ValidationError as exc:
        raise _validation_error(exc) from None
    except msgspec.DecodeError as exc:
        raise RequestError(f"Invalid JSON in request body: {exc}") from None
    except UnicodeDecodeError as exc:
        raise RequestError(f"Request body is not valid UTF-8: {exc.reason}") from None
    check = getattr(request, "check", None)
    if check is not None:
        check()
    return request


# --------------------------------------------------------------------------------------------
# Responses


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int = 0


class Usage(msgspec.Struct, kw_only=True, omit_defaults=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(msgspec.Struct, kw_only=True):
    content: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str | None = None
    reasoning_content: str | msgspec.UnsetType = msgspec.UNSET
    tool_calls: list[Any] | msgspec.UnsetType = msgspec.UNSET


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: ChatResponseMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatDelta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[Any] | None = None


class ChatChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class CompletionLogprobs(msgspec.Struct, kw_only=True):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = []


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


ChoiceT = TypeVar("ChoiceT")


class _Completion(msgspec.Struct, Generic[ChoiceT], kw_only=True):
    """The envelope every completion response and stream chunk shares."""

    id: str
    object: str
    created: int
    model: str
    choices: list[ChoiceT]
    # UNSET fields are left out of the JSON (a chunk carries usage only when asked to).
    usage: Usage | msgspec.UnsetType = msgspec.UNSET
    system_fingerprint: str | msgspec.UnsetType = msgspec.UNSET


class ChatCompletionResponse(_Completion[ChatChoice], kw_only=True):
    object: str = "chat.completion"


class ChatCompletionChunk(_Completion[ChatChunkChoice], kw_only=True):
    object: str = "chat.completion.chunk"


class CompletionResponse(_Completion[CompletionChoice], kw_only=True):
    object: str = "text_completion"


class CompletionChunk(CompletionResponse, kw_only=True):
    """A streamed piece of a text completion (same shape as the response)."""


class ModelObject(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = "sglmesh"


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelObject] = []
