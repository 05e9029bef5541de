"""Bootstrap rooms: the transfer id a disaggregated prefill and decode leg agree on."""

from __future__ import annotations

import random

__all__ = ["MAX_BOOTSTRAP_ROOM", "choose_bootstrap_room"]

# Rooms are u64 in the reference but must stay <= 2**63 - 1 (SGLang's limit).
MAX_BOOTSTRAP_ROOM = 2**63 - 1


def choose_bootstrap_room(dp_rank: int | None = None, dp_size: int = 1) -> int:
    """A random room in ``[0, 2**63 - 1]``; with ``dp_rank``, one where
    ``room % dp_size == dp_rank`` (SGLang routes a room to prefill DP rank ``room % dp_size``)."""
    room = random.getrandbits(63)
    if dp_rank is None or dp_size <= 1:
        return room
    room += dp_rank % dp_size - room % dp_size
    if room > MAX_BOOTSTRAP_ROOM:
        room -= dp_size
    return room
