"""Bearer-token checks for the mesh's HTTP servers (the processor's API keys, the system
servers' admin token), in one place so both compare the same way.

Why constant time: a comparison that stops at the first differing byte tells a patient
attacker, through response timing, how much of a guess was right. Every configured key is
compared in full (``hmac.compare_digest``), whether an earlier one matched or not.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

__all__ = ["bearer_token", "token_matches"]


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, None if absent or malformed."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(token: str | None, keys: Sequence[str]) -> bool:
    """Whether ``token`` equals one of ``keys``, in time independent of where they differ."""
    if token is None:
        return False
    given = token.encode()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return matched
