"""Embedding requests and responses: the OpenAI ``/v1/embeddings`` body, and the processor <->
encode-worker messages.

``input`` is one of: a string, a list of strings, one token list, or a list of token lists.
msgspec unions allow a single array type, so the wire type is a list of
``str | int | list[int]`` and ``__post_init__`` insists that the list is homogeneous.
HTTP responses keep their default fields on the wire because OpenAI clients expect
``"object"`` to be present.

Between the processor and a worker the inputs travel as token ids (the processor tokenizes,
checks limits and counts usage, as it does for chat), or as text for callers without a
tokenizer (the worker's health canary). Vectors come back as raw little-endian float32 bytes,
which is exactly what OpenAI's ``base64`` encoding wraps: a ``base64`` answer is one encode,
a ``float`` answer one unpack, and msgpack carries bytes without any inflation.
"""

from __future__ import annotations

from typing import Annotated, Literal, cast

import msgspec

from proto.request import TokenId

EncodingFormat = Literal["float", "base64"]
Dimensions = Annotated[int, msgspec.Meta(ge=1)]
EmbeddingInput = str | list[str | TokenId | list[TokenId]]
# ``truncate_prompt_tokens``: keep at most this many tokens of each input (special tokens
# included), or -1 for the model's limit. SGLang's and vLLM's name for it.
TruncateTokens = Annotated[int, msgspec.Meta(ge=-1)]


class EmbeddingRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    model: str
    input: EmbeddingInput
    user: str | None = None
    dimensions: Dimensions | None = None
    encoding_format: EncodingFormat = "float"
    truncate_prompt_tokens: TruncateTokens | None = None

    def __post_init__(self) -> None:
        if self.truncate_prompt_tokens == 0:
            raise ValueError("truncate_prompt_tokens must be -1 (the model's limit) or >= 1")
        if isinstance(self.input, str):
            return
        if not self.input:
            raise ValueError("input must not be empty")
        first = self.input[0]
        kind = str if isinstance(first, str) else int if isinstance(first, int) else list
        if not all(isinstance(item, kind) for item in self.input):
            raise ValueError("input must be all strings, all token ids or all token lists")
        if kind is list and not all(self.input):
            raise ValueError("input token lists must not be empty")

    def texts(self) -> list[str] | None:
        """The inputs as a batch of strings, or None when the input is tokens."""
        if isinstance(self.input, str):
            return [self.input]
        if isinstance(self.input[0], str):
            return cast(list[str], self.input)
        return None

    def token_batches(self) -> list[list[int]] | None:
        """The inputs as a batch of token lists, or None when the input is text."""
        if isinstance(self.input, str) or isinstance(self.input[0], str):
            return None
        if isinstance(self.input[0], int):
            return [cast(list[int], self.input)]
        return cast(list[list[int]], self.input)


class PreprocessedEmbeddingRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Processor -> encode worker: one batch of inputs, as token ids or as text (exactly one).

    ``dimensions`` asks for Matryoshka truncation (cut, then re-normalised) where the model
    allows it."""

    token_ids: list[list[TokenId]] = []
    texts: list[str] = []
    model: str = ""
    dimensions: Dimensions | None = None

    def __post_init__(self) -> None:
        if bool(self.token_ids) == bool(self.texts):
            raise ValueError("give exactly one of token_ids and texts, and not an empty one")

    def __len__(self) -> int:
        return len(self.token_ids) or len(self.texts)


class EmbeddingOutput(msgspec.Struct, kw_only=True, array_like=True):
    """Encode worker -> processor: the vectors of ``index``, ``index + 1``, ... of the request.

    A worker streams a large batch in several of these, each a bounded number of bytes."""

    index: int
    # One per input: little-endian float32, ``dimensions * 4`` bytes.
    embeddings: list[bytes]
    # Tokens these inputs held (what ``usage.prompt_tokens`` counts).
    prompt_tokens: int


class EmbeddingData(msgspec.Struct, kw_only=True):
    object: Literal["embedding"] = "embedding"
    # Floats, or base64 of little-endian float32 when the request said ``base64``.
    embedding: list[float] | str
    index: int


class EmbeddingUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage
