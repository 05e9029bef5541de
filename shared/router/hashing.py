"""The mesh's own KV block hashes: what a prompt and an engine's cached blocks are compared by.

Why not the engines' hashes: SGLang's block ids are SHA-256 based, differ with its event
``format`` and LoRA namespace, and another engine would hash differently again. The router
needs one hash that it can compute for a request prompt *and* for what an engine reports
(``BlockStored`` carries the token ids), so it hashes both itself, as the reference router
does (section 7.1): XXH3-64 over each full block's tokens as uint32 little-endian.

Why chained: a block's KV depends on every token before it, so a "cache hit" on a block only
means something if the whole prefix matches. Each block is hashed with the previous block's
hash as the XXH3 seed (the first with :data:`ROOT_SEED`, 1337 as in the reference), so equal
hashes mean equal prefixes, and the index can be a flat dict instead of a tree. The reference
hashes blocks position-independently and chains them in a second step; seeding does the same
in one C call per block.

Why these encodings: a trailing partial block is ignored (no engine caches one); hashes are
unsigned 64-bit ints (``xxh3_64_intdigest``), never signed. Tokens that do not fit in uint32
switch that block to ``0xff`` + uint64 LE, as SGLang does, so no input is rejected except a
negative token. A ``salt`` (see :func:`namespace_salt`) starts a separate chain for blocks that
must never match the default namespace (a LoRA adapter, a ``cache_salt``).

Speed: the tokens are converted once with ``array('I', ...)`` (C, no per-token Python), and
each block is one ``bytes`` slice and one hash call: about 3 ms for a 128k-token prompt at 16
tokens per block on a slow core (``tests/unit/test_kv_index.py`` checks the budget).
:func:`iter_block_hashes` hashes lazily, for lookups that usually stop early.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterator, Sequence
from itertools import chain

import xxhash

__all__ = ["ROOT_SEED", "block_hashes", "iter_block_hashes", "namespace_salt", "tokens_to_bytes"]

ROOT_SEED = 1337
_U64 = (1 << 64) - 1
_U32_MAX = 0xFFFF_FFFF
_WIDE_TAG = b"\xff"
_LITTLE = sys.byteorder == "little"
# "I" is 32-bit on every platform CPython supports; fall back rather than assume.
_U32_CODE = "I" if array("I").itemsize == 4 else "L"
_xxh3 = xxhash.xxh3_64_intdigest


def tokens_to_bytes(token_ids: Sequence[int]) -> bytes:
    """Tokens as uint32 little-endian bytes; raises ``OverflowError`` if one does not fit."""
    if isinstance(token_ids, array) and token_ids.typecode == _U32_CODE:
        words = token_ids
    else:
        words = array(_U32_CODE, token_ids)
    if not _LITTLE:
        words = array(_U32_CODE, words)
        words.byteswap()
    return words.tobytes()


def _wide_block(block: Sequence[int]) -> bytes:
    if any(t < 0 for t in block):
        raise ValueError("token ids must be non-negative")
    if all(t <= _U32_MAX for t in block):
        return tokens_to_bytes(block)
    words = array("Q", block)
    if not _LITTLE:
        words.byteswap()
    return _WIDE_TAG + words.tobytes()


def block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    *,
    salt: int = 0,
    parent: int | None = None,
) -> list[int]:
    """Chained hashes of the full blocks of ``token_ids`` (unsigned 64-bit ints).

    ``parent`` continues a chain: the hash of the block just before ``token_ids`` (then
    ``salt`` is ignored, since the chain already carries it). ``salt`` must fit in 64 bits.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    n = len(token_ids) // block_size
    if n == 0:
        return []
    if parent is not None:
        seed = parent & _U64
    else:
        if not 0 <= salt <= _U64:
            raise ValueError("salt must be an unsigned 64-bit int")
        seed = ROOT_SEED ^ salt
    used = n * block_size
    tokens = token_ids if len(token_ids) == used else token_ids[:used]
    h = _xxh3
    out: list[int] = []
    append = out.append
    try:
        data = tokens_to_bytes(tokens)
    except OverflowError:
        # Rare: a token id outside uint32 (or negative, which _wide_block rejects).
        for start in range(0, used, block_size):
            seed = h(_wide_block(tokens[start : start + block_size]), seed)
            append(seed)
        return out
    step = 4 * block_size
    for off in range(0, len(data), step):
        seed = h(data[off : off + step], seed)
        append(seed)
    return out


def iter_block_hashes(
    token_ids: Sequence[int],
    block_size: int,
    *,
    salt: int = 0,
    first_chunk: int = 32,
) -> Iterator[int]:
    """:func:`block_hashes`, computed lazily in chunks of ``first_chunk`` blocks, doubling.

    A prefix lookup stops at the first block no worker holds, usually after the shared
    system prompt, so hashing a long prompt up front would mostly be wasted: a 16k-token
    prompt costs about as much to hash as a deep lookup costs to walk.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return chain.from_iterable(_chunks(token_ids, block_size, salt, max(first_chunk, 1)))


def _chunks(token_ids: Sequence[int], block_size: int, salt: int, size: int) -> Iterator[list[int]]:
    total = len(token_ids) // block_size
    start = 0
    parent: int | None = None
    while start < total:
        end = min(total, start + size)
        hashes = block_hashes(
            token_ids[start * block_size : end * block_size], block_size, salt=salt, parent=parent
        )
        yield hashes
        parent = hashes[-1]
        start = end
        size *= 2


def namespace_salt(lora_name: str | None = None, cache_salt: str | None = None) -> int:
    """The ``salt`` for blocks cached under a LoRA adapter and/or a ``cache_salt``; 0 (the
    default namespace) when both are None. Presence is encoded, so ``("", None)`` and
    ``(None, "")`` differ from each other and from the default."""
    if lora_name is None and cache_salt is None:
        return 0
    parts = []
    for value in (lora_name, cache_salt):
        if value is None:
            parts.append(b"\x00")
        else:
            raw = value.encode("utf-8")
            parts.append(b"\x01" + len(raw).to_bytes(4, "little") + raw)
    salt: int = _xxh3(b"".join(parts), ROOT_SEED)
    return salt or 1  # 0 is reserved for the default namespace
