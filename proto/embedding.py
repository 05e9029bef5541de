"""Embedding requests and responses (OpenAI ``/v1/embeddings`` shape).

The same structs serve the HTTP body (JSON) and the processor -> encode-worker message
(msgpack): the embedding worker takes text, as in the reference. Responses keep their default
fields on the wire because OpenAI clients expect ``"object"`` to be present.

``input`` is one of: a string, a list of strings, one token list, or a list of token lists.
msgspec unions allow a single array type, so the wire type is a list of
``str | int | list[int]`` and ``__post_init__`` insists that the list is homogeneous.
"""

from __future__ import annotations

from typing import Annotated, Literal, cast

import msgspec

from proto.request import TokenId

EncodingFormat = Literal["float", "base64"]
Dimensions = Annotated[int, msgspec.Meta(ge=1)]
EmbeddingInput = str | list[str | TokenId | list[TokenId]]


class EmbeddingRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    model: str
    input: EmbeddingInput
    user: str | None = None
    dimensions: Dimensions | None = None
    encoding_format: EncodingFormat = "float"

    def __post_init__(self) -> None:
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
    """Token-level embedding request, for encoders that take tokens rather than text."""

    token_ids: list[list[TokenId]]
    model: str = ""
    encoding_format: EncodingFormat = "float"
    dimensions: Dimensions | None = None
    mdc_sum: str | None = None
    annotations: list[str] = []


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
