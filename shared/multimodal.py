"""Image helpers the processor, the encode worker and the engines all use.

- :func:`to_array` / :func:`from_array`: a wire :class:`~proto.multimodal.Tensor` to numpy and
  back, shape and dtype checked (the struct's own check already matched bytes to shape).
- :func:`placeholder_ids`: the token ids an image occupies in a prompt. SGLang replaces an
  image's tokens by "pad values" derived from the image's hash (``MM_PAD_SHIFT_VALUE`` plus
  wide bits of a tagged sha256), so its radix cache treats the same image as the same prefix
  and a different image as a miss. We do the same, with one difference forced by the wire:
  our token ids are u32, so each value is ``MM_PAD_SHIFT + (64 bits of the digest mod
  (2**32 - MM_PAD_SHIFT))`` instead of a 62-bit value. Four values cycle over the image's
  positions, as SGLang's wide sentinels do, so a block that holds part of an image still
  carries the image's identity. The values are above every vocabulary we serve (SGLang checks
  the same bound), so they never collide with a text token.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from proto.multimodal import ITEMSIZE, Tensor

__all__ = [
    "MM_PAD_SHIFT",
    "from_array",
    "image_hash",
    "is_placeholder",
    "pad_values",
    "placeholder_ids",
    "to_array",
]

# SGLang's MM_PAD_SHIFT_VALUE: pad values start above any vocabulary.
MM_PAD_SHIFT = 1_000_000
_TAG = b"sglmesh-mm-pad-v1"
_SPAN = 2**32 - MM_PAD_SHIFT
_NP_DTYPES = {"float32": "<f4", "float16": "<f2", "uint8": "u1"}


def image_hash(data: bytes) -> str:
    """The content hash images are cached and placed by: sha256 of the bytes, hex."""
    return hashlib.sha256(data).hexdigest()


def pad_values(hash_hex: str) -> tuple[int, int, int, int]:
    digest = hashlib.sha256(_TAG + bytes.fromhex(hash_hex)).digest()
    a, b, c, d = (
        MM_PAD_SHIFT + int.from_bytes(digest[i : i + 8], "big") % _SPAN for i in range(0, 32, 8)
    )
    return a, b, c, d


def placeholder_ids(hash_hex: str, length: int) -> list[int]:
    """The ``length`` token ids an image with this hash occupies."""
    values = pad_values(hash_hex)
    return [values[i % 4] for i in range(length)]


def is_placeholder(token_id: int) -> bool:
    return token_id >= MM_PAD_SHIFT


def to_array(tensor: Tensor) -> np.ndarray[Any, Any]:
    """A read-only view of the tensor's bytes (no copy)."""
    return np.frombuffer(tensor.data, dtype=_NP_DTYPES[tensor.dtype]).reshape(tensor.shape)


def from_array(array: np.ndarray[Any, Any], dtype: str | None = None) -> Tensor:
    """The array (converted to ``dtype`` when given) as a wire tensor."""
    name = dtype or str(array.dtype)
    if name not in ITEMSIZE:
        raise ValueError(f"dtype {name} cannot travel; use one of {sorted(ITEMSIZE)}")
    data = np.ascontiguousarray(array, dtype=_NP_DTYPES[name]).tobytes()
    return Tensor(shape=list(array.shape), dtype=name, data=data)  # type: ignore[arg-type]
