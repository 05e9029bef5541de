"""Images on the wire: processor -> image encode worker -> LLM worker (E/PD).

Why these shapes: a tensor travels as its raw little-endian bytes with its ``shape`` and
``dtype`` beside them (msgpack carries bytes without inflation, and the receiver checks that
``prod(shape) * itemsize == len(data)`` before it trusts a byte). The processor decodes an
image once, fits it to the encoder's input size and sends the pixels (``uint8``, H x W x 3,
150 KB at 224 x 224): the message size is bounded whatever the client uploaded. The encoder
answers one image's embeddings (257 x 384 float32, 395 KB, for the ViT-S/14), and the
processor hands them to the LLM worker inside the generate request
(:class:`MultimodalItem`), as float16 (197 KB an image), so a request with the processor's
maximum of images stays under NATS's 1 MiB default message size.

Why request-plane frames and not the TCP KV transfer: measured (``bench/multimodal.py``), a
chat request whose image is already encoded reaches its first token ~3 ms later than the same
request without the image -- the embeddings' trip in the request, and 257 more prompt tokens,
included -- while encoding the image costs ~100 ms. A side channel could save part of those
3 ms and would cost every LLM worker another connection and another failure mode.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

DType = Literal["float32", "float16", "uint8"]
ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "uint8": 1}
Dim = Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]
# The content hash of an image: sha256 of its bytes, hex.
ImageHash = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]


class Tensor(msgspec.Struct, kw_only=True, array_like=True):
    """A dense array: C-order little-endian ``data`` of ``shape`` and ``dtype``."""

    shape: Annotated[list[Dim], msgspec.Meta(min_length=1, max_length=4)]
    dtype: DType
    data: bytes

    def __post_init__(self) -> None:
        count = 1
        for dim in self.shape:
            count *= dim
        if count * ITEMSIZE[self.dtype] != len(self.data):
            raise ValueError(
                f"tensor of shape {self.shape} and dtype {self.dtype} needs "
                f"{count * ITEMSIZE[self.dtype]} bytes, got {len(self.data)}"
            )


class ImageEncodeRequest(msgspec.Struct, kw_only=True):
    """Processor -> image encode worker: one image, already decoded and fitted to the
    encoder's input (``VisionInfo.image_size``), as ``uint8`` H x W x 3 RGB."""

    hash: ImageHash
    pixels: Tensor
    model: str = ""


class ImageEncodeOutput(msgspec.Struct, kw_only=True):
    """Image encode worker -> processor: the image's embeddings (tokens x hidden)."""

    hash: ImageHash
    embedding: Tensor


class MultimodalItem(msgspec.Struct, omit_defaults=True, kw_only=True):
    """One image of a generate request, SGLang's ``MultimodalDataItem`` reduced to the wire.

    The image occupies ``length`` prompt positions from ``offset``; their token ids are the
    image's placeholder values (``shared.multimodal.placeholder_ids``), derived from ``hash``,
    so a prefix cache and KV-aware routing see the same image as the same tokens."""

    modality: Literal["image"] = "image"
    hash: ImageHash
    offset: Annotated[int, msgspec.Meta(ge=0)]
    length: Annotated[int, msgspec.Meta(ge=1)]
    # tokens x hidden: the encoder's output for this image.
    embedding: Tensor


class VisionInfo(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What an image encode worker's card tells the processor (``ModelCard.vision``)."""

    image_size: Dim  # the square input, in pixels
    tokens: Dim  # embeddings per image
    hidden_size: Dim
    # How the processor fits an image: the longest side to ``image_size``, then padded
    # (centred, black) to a square, as the model was trained.
    resize: Literal["longest_pad"] = "longest_pad"
