"""``RouterMode``: how a request's target instance is chosen -- one name for the concept,
whoever chooses.

The processor's router (``shared.router.selector`` and the KV router) serves
``round-robin``, ``random``, ``least-loaded`` and ``kv``: :data:`PROCESSOR_MODES`. A bare
runtime client (``shared.runtime.client``) knows no load, so it serves ``round-robin``,
``random`` and ``any`` (the NATS queue group picks; no discovery needed):
:data:`CLIENT_MODES`.
"""

from __future__ import annotations

import enum

__all__ = ["CLIENT_MODES", "PROCESSOR_MODES", "RouterMode"]


class RouterMode(enum.StrEnum):
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    LEAST_LOADED = "least-loaded"
    # KV-aware (shared/router/kv_router.py): chosen by the processor, not by Selector, which
    # treats it as least-loaded (the decode leg of a disaggregated request is load-only).
    KV = "kv"
    # The NATS queue group picks the instance (runtime clients only).
    ANY = "any"


PROCESSOR_MODES = (
    RouterMode.ROUND_ROBIN,
    RouterMode.RANDOM,
    RouterMode.LEAST_LOADED,
    RouterMode.KV,
)
CLIENT_MODES = (RouterMode.ROUND_ROBIN, RouterMode.RANDOM, RouterMode.ANY)
