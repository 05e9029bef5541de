"""The OpenAI API as the processor accepts and emits it.

Requests are decoded with :func:`decode_request`, which turns every way a body can be wrong
(invalid JSON or UTF-8, wrong types, out-of-range values, inconsistent fields) into a
:class:`RequestError` (HTTP 400) naming the offending field in ``param``, as OpenAI does.
Fields that OpenAI defines but the processor does not implement are not declared here: the
processor refuses them by name (``services/processor/fields.py``); fields nobody defines are
skipped by the decoder and reported by the processor (a warning and a counter), since clients
send vendor extensions freely.

Besides OpenAI's fields the requests take SGLang's and vLLM's common extras (``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``,
``skip_special_tokens``, ``include_stop_str_in_output``, guided decoding by ``json_schema``,
``regex``, ``ebnf``, ``structural_tag`` or vLLM's ``guided_*``); each carries a description in
the OpenAPI schema.

Responses follow OpenAI's shapes; errors are ``{"error": {"message", "type", "param",
"code"}}`` (:func:`error_body`).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec

from proto.request import GuidedDecodingOptions

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
    "JsonSchemaFormat",
    "ModelList",
    "ModelObject",
    "PromptTokensDetails",
    "RequestError",
    "ResponseFormat",
    "ResponseFormatJsonObject",
    "ResponseFormatJsonSchema",
    "ResponseFormatText",
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
MAX_LOGIT_BIAS = 1024  # entries in one logit_bias map
LogitBiasValue = Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]
LogitBias = Annotated[
    dict[str, LogitBiasValue],
    msgspec.Meta(
        max_length=MAX_LOGIT_BIAS,
        description="Token id (as a string) -> bias in [-100, 100] added to its logit.",
    ),
]


def _doc(text: str) -> msgspec.Meta:
    """The OpenAPI description of a non-OpenAI extra field."""
    return msgspec.Meta(description=f"Extra (SGLang/vLLM): {text}")


XTopK = Annotated[TopK, _doc("sample from the k most likely tokens; -1 or 0: all")]
XMinP = Annotated[MinP, _doc("drop tokens less likely than min_p times the top one")]
XRepetitionPenalty = Annotated[
    RepetitionPenalty, _doc("divide the logits of tokens already seen (1: off)")
]
XStopTokenIds = Annotated[StopTokenIds, _doc("token ids that end the output")]
XIgnoreEos = Annotated[bool, _doc("keep generating past EOS")]
XMinTokens = Annotated[NonNegativeInt, _doc("no stop (EOS, stop tokens) before this many")]
XSkipSpecial = Annotated[bool, _doc("leave special tokens out of the text (default true)")]
XSpacesBetween = Annotated[
    bool,
    _doc(
        "false (what fast tokenizers do) is served; true is refused when special tokens are "
        "kept in the text"
    ),
]
XIncludeStop = Annotated[
    bool, _doc("keep the matched stop string (or stop token) at the end of the text")
]
XRegex = Annotated[str, _doc("constrain the output to this regular expression")]
XEbnf = Annotated[str, _doc("constrain the output to this EBNF grammar")]
XStructuralTag = Annotated[str | dict[str, Any], _doc("SGLang structural tag for the output")]
XGuidedJson = Annotated[str | dict[str, Any], _doc("vLLM's name: a JSON schema the output follows")]
XGuidedRegex = Annotated[str, _doc("vLLM's name for regex")]
XGuidedChoice = Annotated[
    list[str], msgspec.Meta(min_length=1, max_length=1024), _doc("vLLM: one of these strings")
]
XGuidedGrammar = Annotated[str, _doc("vLLM's name for ebnf")]
XJsonSchema = Annotated[str, _doc("SGLang: a JSON schema (as a string) the output follows")]
XNoStopTrim = Annotated[bool, _doc("SGLang's name for include_stop_str_in_output")]


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


class ImageUrl(msgspec.Struct, kw_only=True):
    """``{"url": ..., "detail": ...}`` of an ``image_url`` part: a ``data:`` URL (PNG, JPEG,
    WebP) or an ``http(s)`` URL the processor fetches. ``detail`` is accepted; the encoder
    sees every image at its one input size whatever it says."""

    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(msgspec.Struct, kw_only=True):
    """One part of a message's content: ``{"type": "text", "text": ...}`` or
    ``{"type": "image_url", "image_url": {"url": ...}}``. Other types decode but are
    rejected by the preprocessor."""

    type: str
    text: str | None = None
    image_url: ImageUrl | None = None


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None

    def image_parts(self) -> list[tuple[int, ImageUrl]]:
        """``(part index, image_url)`` of every image part, in order."""
        if not isinstance(self.content, list):
            return []
        return [
            (j, part.image_url)
            for j, part in enumerate(self.content)
            if part.type == "image_url" and part.image_url is not None
        ]

    def text(self, image_marker: str | None = None) -> str:
        """The content as one string: text parts joined by newlines; ``None`` is ``""``.

        An image part becomes ``image_marker`` (the preprocessor's placeholder); without one,
        or for any other non-text part, :class:`RequestError` is raised."""
        content = self.content
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        texts: list[str] = []
        for part in content:
            if part.type == "image_url" and part.image_url is not None and image_marker:
                texts.append(image_marker)
                continue
            if part.type != "text" or part.text is None:
                raise RequestError(
                    f"Unsupported content part type {part.type!r}: only 'text' and "
                    "'image_url' parts (with their 'text' or 'image_url' field) are supported",
                    param="messages",
                )
            texts.append(part.text)
        return "\n".join(texts)


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class ResponseFormatText(msgspec.Struct, kw_only=True, tag="text", tag_field="type"):
    """Free text (the default)."""


class ResponseFormatJsonObject(msgspec.Struct, kw_only=True, tag="json_object", tag_field="type"):
    """Any JSON object."""


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(max_length=256)] = "response"
    description: str | None = None
    # The schema must be a JSON object; absent, any JSON object is accepted.
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    # The output always follows the schema (the engine enforces it): strict or not.
    strict: bool | None = None


class ResponseFormatJsonSchema(msgspec.Struct, kw_only=True, tag="json_schema", tag_field="type"):
    """JSON that follows ``json_schema.schema``."""

    json_schema: JsonSchemaFormat


ResponseFormat = ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema

# What ``{"type": "json_object"}`` asks for, as a schema (SGLang does the same).
_ANY_OBJECT: dict[str, Any] = {"type": "object"}

# Extra constraint fields -> the GuidedDecodingOptions field they fill.
_GUIDE_FIELDS = (
    ("json_schema", "json"),
    ("regex", "regex"),
    ("ebnf", "grammar"),
    ("structural_tag", "structural_tag"),
    ("guided_json", "json"),
    ("guided_regex", "regex"),
    ("guided_choice", "choice"),
    ("guided_grammar", "grammar"),
)


def _json_text(text: str, param: str) -> Any:
    """A JSON schema given as a string: parsed, and it must be an object."""
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError as exc:
        raise RequestError(f"'{param}' is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, dict):
        raise RequestError(f"'{param}' must be a JSON object (a JSON schema)", param=param)
    return value


class _SamplingRequest(msgspec.Struct, kw_only=True):
    """Fields shared by chat and text completion requests."""

    model: str
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: XTopK | None = None
    min_p: XMinP | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: XRepetitionPenalty | None = None
    seed: Seed | None = None
    n: N | None = None
    stop: StopString | StopList | None = None
    stop_token_ids: XStopTokenIds | None = None
    ignore_eos: XIgnoreEos | None = None
    min_tokens: XMinTokens | None = None
    logit_bias: LogitBias | None = None
    skip_special_tokens: XSkipSpecial = True
    spaces_between_special_tokens: XSpacesBetween | None = None
    include_stop_str_in_output: XIncludeStop = False
    response_format: ResponseFormat | None = None
    no_stop_trim: XNoStopTrim = False
    json_schema: XJsonSchema | None = None
    regex: XRegex | None = None
    ebnf: XEbnf | None = None
    structural_tag: XStructuralTag | None = None
    guided_json: XGuidedJson | None = None
    guided_regex: XGuidedRegex | None = None
    guided_choice: XGuidedChoice | None = None
    guided_grammar: XGuidedGrammar | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def check(self) -> None:
        """Cross-field validation, run by :func:`decode_request`."""
        self.guide()  # at most one constraint, each well formed
        if self.spaces_between_special_tokens and not self.skip_special_tokens:
            raise RequestError(
                "'spaces_between_special_tokens': true is not supported with "
                "'skip_special_tokens': false (special tokens are joined to the text as the "
                "tokenizer decodes them)",
                param="spaces_between_special_tokens",
            )
        if isinstance(self.stop, str) or self.stop is None:
            return
        for i, s in enumerate(self.stop):
            if not s:
                raise RequestError("Stop sequences must not be empty", param=f"stop[{i}]")

    def keep_stop(self) -> bool:
        """Whether a matched stop string or stop token stays in the text."""
        return self.include_stop_str_in_output or self.no_stop_trim

    def guide(self) -> GuidedDecodingOptions | None:
        """The constrained-decoding request for the engine, or None.

        Raises :class:`RequestError` when more than one constraint is given."""
        chosen: list[tuple[str, GuidedDecodingOptions]] = []
        fmt = self.response_format
        if isinstance(fmt, ResponseFormatJsonObject):
            chosen.append(("response_format", GuidedDecodingOptions(json=_ANY_OBJECT)))
        elif isinstance(fmt, ResponseFormatJsonSchema):
            schema = fmt.json_schema.schema_
            guide = GuidedDecodingOptions(json=_ANY_OBJECT if schema is None else schema)
            chosen.append(("response_format", guide))
        for name, kind in _GUIDE_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if kind == "json" and isinstance(value, str):
                value = _json_text(value, name)
            chosen.append((name, GuidedDecodingOptions(**{kind: value})))
        if len(chosen) > 1:
            names = ", ".join(f"'{n}'" for n, _ in chosen)
            raise RequestError(
                f"At most one output constraint may be given; got {names}",
                param=chosen[1][0],
            )
        return chosen[0][1] if chosen else None

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
    # Served only for a model whose card names a tool-call parser
    # (``services/processor/chat_output.py`` checks them against the card).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None

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
    best_of: N | None = None

    def check(self) -> None:
        super().check()
        if self.echo and self.logprobs is not None:
            # The engines return no prompt logprobs: echoing the prompt without them would
            # hand back a logprobs object that silently leaves the prompt out.
            raise RequestError(
                "'echo' with 'logprobs' is not supported: the engines do not return prompt "
                "logprobs",
                param="echo",
            )
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise RequestError(
                "'best_of' other than 'n' is not supported (every generated choice is returned)",
                param="best_of",
            )
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
    path = path.lstrip(".").replace("[...]", "")
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
