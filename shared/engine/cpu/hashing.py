"""SGLang 0.5.23's KV page hashes, bit for bit, for the simulated engine's KV events.

Routers link ``BlockStored`` parents and match ``BlockRemoved`` hashes against what they saw
stored, and a mesh may mix simulated and real engines, so the simulated radix cache must
publish exactly the ids a real SGLang scheduler would for the same tokens and page size.

SGLang (``mem_cache/cpp_utils/hash_binding.cpp`` via ``get_hash_str``, events via
``hash_str_to_int64``) computes, per full page of a radix path:

- ``digest = SHA256(parent_digest || page)``, where ``parent_digest`` is the raw 32-byte
  digest of the previous page on the path and is left out entirely for the first page;
- ``page`` is the tokens as uint32 little-endian; if any token of the page does not fit in
  uint32 the page is instead ``0xff || tokens as uint64 little-endian`` (the odd length keeps
  the two encodings apart); negative tokens are an error;
- the published block hash is the first 8 bytes of the digest read big-endian as a signed
  int64 (SGLang parses the first 16 hex characters of the hex digest).

This covers the default cache (no LoRA namespace, no ``cache_salt``, ``format="default"``),
which is all the simulated engine serves.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

__all__ = [
    "DIGEST_SIZE",
    "digest_to_int64",
    "hash_page_run",
    "page_hash",
    "page_hash_bytes",
    "tokens_to_u32le",
]

DIGEST_SIZE = 32
_U32_MAX = 0xFFFF_FFFF
_WIDE_TAG = b"\xff"
_LITTLE = sys.byteorder == "little"
_sha256 = hashlib.sha256


def digest_to_int64(digest: bytes) -> int:
    """The event hash of a page digest: its first 8 bytes, big-endian, signed."""
    return int.from_bytes(digest[:8], "big", signed=True)


def tokens_to_u32le(tokens: Sequence[int]) -> bytes:
    """Tokens as the uint32 little-endian bytes SGLang hashes.

    Raises OverflowError if a token is negative or does not fit in uint32.
    """
    words = array("I", tokens)
    if not _LITTLE:
        words.byteswap()
    return words.tobytes()


def _page_bytes(page_tokens: Sequence[int]) -> bytes:
    try:
        return tokens_to_u32le(page_tokens)
    except OverflowError:
        pass
    # Slow path, only for vocabularies beyond 2**32: SGLang switches the whole page to the
    # tagged uint64 encoding.
    if any(t < 0 for t in page_tokens):
        raise ValueError("token ids must be non-negative")
    words = array("Q", page_tokens)
    if not _LITTLE:
        words.byteswap()
    return _WIDE_TAG + words.tobytes()


def page_hash_bytes(parent_digest: bytes | None, page: bytes) -> tuple[bytes, int]:
    """``page_hash`` for a page already encoded (see ``tokens_to_u32le``)."""
    digest = _sha256(parent_digest + page if parent_digest else page).digest()
    return digest, int.from_bytes(digest[:8], "big", signed=True)


def page_hash(parent_digest: bytes | None, page_tokens: Sequence[int]) -> tuple[bytes, int]:
    """Hash one page chained to its parent: returns ``(digest to chain, signed int64 hash)``.

    ``parent_digest`` is the digest returned for the previous page of the same radix path, or
    None for the first page.
    """
    if parent_digest is not None and len(parent_digest) != DIGEST_SIZE:
        raise ValueError(f"parent digest must be {DIGEST_SIZE} bytes")
    return page_hash_bytes(parent_digest, _page_bytes(page_tokens))


def hash_page_run(
    parent_digest: bytes | None, data: bytes, page_bytes: int
) -> tuple[bytes, array[int]]:
    """Hash consecutive full pages of uint32-LE token bytes in one pass.

    Returns the concatenated 32-byte digests (one per page, for chaining and later splits)
    and the pages' int64 hashes as ``array('q')``. ``len(data)`` must be a multiple of
    ``page_bytes``. This is the radix cache's hot path, so it avoids per-page Python objects
    beyond the digest itself.
    """
    sha = _sha256
    prev = parent_digest or b""
    digests: list[bytes] = []
    append = digests.append
    for off in range(0, len(data), page_bytes):
        prev = sha(prev + data[off : off + page_bytes]).digest()
        append(prev)
    joined = b"".join(digests)
    # Every digest is four 8-byte words; the hash is the first word read big-endian.
    words = array("q")
    words.frombytes(joined)
    if _LITTLE:
        words.byteswap()
    return joined, words[::4]
