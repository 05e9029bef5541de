"""SGLang's KV cache events, byte-compatible with what an SGLang 0.5.23 scheduler publishes.

The publisher must decode a real engine's stream unchanged, and the simulated engine must
produce the same bytes, so these structs copy SGLang's msgspec configuration exactly:

- a ZMQ multipart message is ``[topic, seq, payload]``; ``seq`` is an 8-byte big-endian
  counter per publisher, starting at 0;
- ``payload`` is ``KVEventBatch``, a positional array ``[ts, events, attn_dp_rank]``. It does
  not omit defaults, so ``attn_dp_rank`` is always present (``nil`` when unset);
- each event is a map tagged by ``"type"`` = class name. Optional fields that are ``None`` are
  omitted, but ``parent_block_hash`` and ``lora_id`` have no default, so they are always
  present, even as ``nil``.

The replay socket answers with the same frames and ends with ``seq = -1`` (signed) and an
empty payload.
"""

from __future__ import annotations

import enum
from typing import TypeAlias

import msgspec

REPLAY_END_SEQ = -1
SEQ_SIZE = 8


class StorageMedium(enum.StrEnum):
    """Known values of the events' ``medium`` field (kept as a plain ``str`` on the wire so a
    newer engine's tier does not make the whole batch undecodable)."""

    GPU = "GPU"
    CPU_PINNED = "CPU_PINNED"
    DISK = "DISK"
    EXTERNAL = "EXTERNAL"


class _KvCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag_field="type", tag=True):
    pass


class BlockStored(_KvCacheEvent):
    # Engine hashes: opaque ids for linking parents and matching removals. Routers compute their
    # own content hashes from ``token_ids``.
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None
    cache_salt: str | None = None
    session_id: str | None = None
    lora_name: str | None = None


class BlockRemoved(_KvCacheEvent):
    block_hashes: list[int]
    medium: str | None = None


class AllBlocksCleared(_KvCacheEvent):
    pass


KVEvent: TypeAlias = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[KVEvent]
    # SGLang's name: the attention-DP rank under DP attention, else the DP rank.
    attn_dp_rank: int | None = None


def encode_seq(seq: int) -> bytes:
    return seq.to_bytes(SEQ_SIZE, "big", signed=True)


def decode_seq(data: bytes) -> int:
    """Signed, because the replay end marker is -1; SGLang's own counters never reach 2**63."""
    if len(data) != SEQ_SIZE:
        raise ValueError(f"sequence frame must be {SEQ_SIZE} bytes, got {len(data)}")
    return int.from_bytes(data, "big", signed=True)
