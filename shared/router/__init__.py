"""Choosing a worker for a request: load tracking, selection policies, busy detection, and
KV-aware routing (a prefix index over the engines' KV events plus a cost model)."""

from shared.router.hashing import block_hashes, namespace_salt
from shared.router.kv_index import KvIndex, KvIndexStats, WorkerKey
from shared.router.kv_router import (
    KV_ROUTER_FLAGS,
    KvRouter,
    KvRouterConfig,
    RankCost,
    RouteDecision,
    kv_router_config,
)
from shared.router.load import ActiveRequest, LoadTracker, WorkerLoad
from shared.router.selector import BusyError, RouterMode, Selector, WorkerCandidate

__all__ = [
    "KV_ROUTER_FLAGS",
    "ActiveRequest",
    "BusyError",
    "KvIndex",
    "KvIndexStats",
    "KvRouter",
    "KvRouterConfig",
    "LoadTracker",
    "RankCost",
    "RouteDecision",
    "RouterMode",
    "Selector",
    "WorkerCandidate",
    "WorkerKey",
    "WorkerLoad",
    "block_hashes",
    "kv_router_config",
    "namespace_salt",
]
