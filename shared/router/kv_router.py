"""KV-aware routing: send a request where its prompt is cached, weighed against load.

Every candidate ``(worker, dp_rank)`` -- each DP rank is a scheduler with its own cache and
queue -- gets the reference router's cost (section 9.4), in KV blocks:

    prefill = ceil(prompt_tokens / block_size) - overlap_score_credit * overlap_blocks
              + active_prefill_tokens / block_size
    cost    = prefill_load_scale * max(prefill, 0) + decode_blocks
              + decode_active_request_weight * active_requests

``overlap_blocks`` is how many leading blocks of the prompt the rank holds (:class:`KvIndex`,
fed by the engines' KV events); the lowest cost wins, ties drawn at random so processors do not
herd. With ``temperature > 0`` the choice is sampled: costs are min-max normalized to [0, 1]
and weighted ``exp(-normalized / temperature)``, so the temperature is relative to the spread
of the costs, whatever their scale.

Load comes from two sources (``LoadTracker.rank_loads`` and the publisher's ``LoadMetrics``):

- the router's own count of what it placed: a decision is charged at once (``begin``), the
  prompt's uncached tokens stay pending prefill until the first output token, and its blocks
  stay until the stream ends. Without this, a burst of requests would all see the same
  stale metrics and pile onto one worker;
- the engine's report of used blocks, which also sees other processors' requests but is
  late (SGLang reports at prefill batches and every 40 decode steps). The two are combined
  as ``max(tracked, reported + (tracked - tracked_when_reported))``: the report, moved by
  whatever this router added or released since it arrived, but never below the router's
  own count. Requests this router placed just before a report arrived may be counted
  twice for one report interval; that errs towards spreading load. A report older than
  ``metrics_ttl`` seconds is ignored (an idle engine stops reporting, and its last report
  would otherwise pin a stale load on it). Active requests are combined the same way
  (reported: running + waiting).

Without KV events (``use_kv_events=False``, or nothing indexed yet) every overlap is 0, so
this is load-only routing, and the prompt is not even hashed.

The same ``busy_threshold`` as :class:`Selector` applies per rank: decode blocks over
``threshold x`` the rank's pool (reported ``kv_total_blocks``, else the candidate's
``total_kv_blocks``, which the reference registers per rank) skip that rank; all busy is
:class:`BusyError`. Workers in ``exclude`` (they just failed this request) are avoided while
any other remains.

Disaggregated serving: the prefill leg is routed here (its cache is what the prompt hits); the
decode leg is load-only (its KV arrives by transfer), so it stays with :class:`Selector`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from proto.metrics import KvEventsMessage, LoadMetrics
from shared.flags import Flag, float_converter, parse_bool
from shared.router.hashing import block_hashes, iter_block_hashes
from shared.router.kv_index import KvIndex, WorkerKey
from shared.router.load import ActiveRequest, LoadTracker
from shared.router.selector import BusyError

__all__ = [
    "KV_ROUTER_FLAGS",
    "CandidateLike",
    "KvRouter",
    "KvRouterConfig",
    "RankCost",
    "RouteDecision",
    "kv_router_config",
]


class CandidateLike(Protocol):
    """What the router reads from a candidate (``WorkerCandidate`` fits)."""

    @property
    def instance_id(self) -> int: ...
    @property
    def dp_size(self) -> int: ...
    @property
    def dp_start(self) -> int: ...
    @property
    def total_kv_blocks(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class KvRouterConfig:
    overlap_score_credit: float = 1.0
    prefill_load_scale: float = 1.0
    temperature: float = 0.0
    decode_active_request_weight: float = 0.0
    use_kv_events: bool = True
    # Seconds an engine load report stays usable (see the module doc).
    metrics_ttl: float = 10.0

    def __post_init__(self) -> None:
        for name in (
            "overlap_score_credit",
            "prefill_load_scale",
            "temperature",
            "decode_active_request_weight",
            "metrics_ttl",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class RouteDecision(NamedTuple):
    instance_id: int
    dp_rank: int
    overlap_blocks: int


class RankCost(NamedTuple):
    """One candidate rank's terms (the reference's ``get_potential_loads``, plus the cost);
    ``prefill_blocks`` is after the overlap credit, floored at 0."""

    instance_id: int
    dp_rank: int
    overlap_blocks: int
    prefill_blocks: float
    decode_blocks: int
    active_requests: int
    cost: float
    busy: bool


@dataclass(slots=True)
class _Report:
    used_blocks: int
    total_blocks: int
    requests: int
    received: float
    # The router's own counts for the rank when the report arrived.
    tracked_blocks: int
    tracked_requests: int


class KvRouter:
    """Chooses ``(instance_id, dp_rank)`` per request. Synchronous; one event loop owns it.

    Feed it ``apply_events`` (KV events) and ``update_load`` (load metrics); call
    ``remove_worker`` when a worker leaves discovery; per request ``select`` then ``begin``,
    and report the stream on the returned :class:`ActiveRequest` (``add_tokens`` releases the
    pending prefill at the first token, ``finish`` releases the rest).
    """

    def __init__(
        self,
        config: KvRouterConfig | None = None,
        *,
        index: KvIndex | None = None,
        tracker: LoadTracker | None = None,
        busy_threshold: float | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config if config is not None else KvRouterConfig()
        self.index = index if index is not None else KvIndex()
        self.tracker = tracker if tracker is not None else LoadTracker()
        self.busy_threshold = busy_threshold
        self._rng = rng or random.Random()
        self._clock = clock
        self._reports: dict[WorkerKey, _Report] = {}

    # ----- inputs -----

    def apply_events(self, message: KvEventsMessage) -> None:
        """One relayed KV event batch (ignored with ``use_kv_events=False``)."""
        if self.config.use_kv_events:
            self.index.apply_message(message)

    def update_load(self, metrics: LoadMetrics) -> None:
        key = (metrics.worker_id, metrics.dp_rank)
        load = self.tracker.rank_loads.get(key)
        self._reports[key] = _Report(
            used_blocks=metrics.kv_used_blocks,
            total_blocks=metrics.kv_total_blocks,
            requests=metrics.num_running + metrics.num_waiting,
            received=self._clock(),
            tracked_blocks=load.active_blocks if load is not None else 0,
            tracked_requests=load.active_requests if load is not None else 0,
        )

    def remove_worker(self, worker_id: int) -> None:
        """The worker left discovery: forget its blocks, reports and in-flight load."""
        self.index.remove_worker(worker_id)
        for key in [k for k in self._reports if k[0] == worker_id]:
            del self._reports[key]
        self.tracker.forget(worker_id)

    # ----- decisions -----

    def prompt_hashes(self, token_ids: Sequence[int], block_size: int, salt: int = 0) -> list[int]:
        """The prompt's block hashes as ``select`` computes them (none when they cannot
        matter: KV events off or nothing indexed)."""
        if not self.config.use_kv_events or self.index.empty:
            return []
        return block_hashes(token_ids, block_size, salt=salt)

    def costs(
        self,
        candidates: Sequence[CandidateLike],
        token_ids: Sequence[int] | None = None,
        *,
        block_size: int,
        hashes: Sequence[int] | None = None,
        prompt_tokens: int | None = None,
        salt: int = 0,
    ) -> list[RankCost]:
        """Every candidate rank's cost terms, in candidate then rank order.

        Give the prompt as ``token_ids`` (hashed here), or as precomputed ``hashes`` (from
        :func:`block_hashes` with the same ``block_size`` and ``salt``) plus
        ``prompt_tokens`` (default: the hashed blocks' tokens).
        """
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if token_ids is not None:
            prompt_tokens = len(token_ids)
        elif hashes is None:
            raise TypeError("give token_ids or hashes")
        elif prompt_tokens is None:
            prompt_tokens = len(hashes) * block_size
        cfg = self.config
        matches: Mapping[WorkerKey, int] = {}
        if cfg.use_kv_events and not self.index.empty:
            # Hashed lazily: the walk usually stops well before the end of a long prompt.
            prompt: Iterable[int] = (
                hashes
                if hashes is not None
                else iter_block_hashes(token_ids or (), block_size, salt=salt)
            )
            ranks = [
                (c.instance_id, rank)
                for c in candidates
                for rank in range(c.dp_start, c.dp_start + max(c.dp_size, 1))
            ]
            matches = self.index.find_matches(prompt, ranks)
        prompt_blocks = -(-prompt_tokens // block_size)
        credit = cfg.overlap_score_credit
        scale = cfg.prefill_load_scale
        weight = cfg.decode_active_request_weight
        threshold = self.busy_threshold
        rank_loads = self.tracker.rank_loads
        reports = self._reports
        oldest = self._clock() - cfg.metrics_ttl
        out: list[RankCost] = []
        for cand in candidates:
            iid = cand.instance_id
            for rank in range(cand.dp_start, cand.dp_start + max(cand.dp_size, 1)):
                key = (iid, rank)
                overlap = matches.get(key, 0)
                load = rank_loads.get(key)
                if load is not None:
                    blocks = load.active_blocks
                    requests = load.active_requests
                    pending = load.active_prefill_tokens / block_size
                else:
                    blocks = requests = 0
                    pending = 0.0
                total = cand.total_kv_blocks
                report = reports.get(key)
                if report is not None:
                    if report.total_blocks:
                        total = report.total_blocks
                    if report.received >= oldest:
                        blocks = max(blocks, report.used_blocks + blocks - report.tracked_blocks)
                        requests = max(
                            requests, report.requests + requests - report.tracked_requests
                        )
                prefill = max(prompt_blocks - credit * overlap + pending, 0.0)
                # The request's own blocks would add the same to every rank, except the prefix
                # it shares with requests already running there (counted once in
                # ``blocks``): that part is credited.
                held = 0
                if load is not None and load.shared and hashes is not None:
                    shared = load.shared
                    for h in hashes:
                        if h not in shared:
                            break
                        held += 1
                cost = scale * prefill + blocks - held + weight * requests
                busy = (
                    threshold is not None
                    and total is not None
                    and total > 0
                    and blocks > threshold * total
                )
                out.append(RankCost(iid, rank, overlap, prefill, blocks, requests, cost, busy))
        return out

    def select(
        self,
        candidates: Sequence[CandidateLike],
        token_ids: Sequence[int] | None = None,
        *,
        block_size: int,
        hashes: Sequence[int] | None = None,
        prompt_tokens: int | None = None,
        salt: int = 0,
        exclude: Collection[int] = (),
    ) -> RouteDecision:
        """The rank for this prompt (see :meth:`costs` for the prompt arguments).

        Raises ``LookupError`` with no candidates and ``BusyError`` when every rank left
        after ``exclude`` is busy. Charges nothing: call :meth:`begin` with the decision.
        """
        if not candidates:
            raise LookupError("no candidate workers")
        pool = [c for c in candidates if c.instance_id not in exclude] or list(candidates)
        ranked = self.costs(
            pool,
            token_ids,
            block_size=block_size,
            hashes=hashes,
            prompt_tokens=prompt_tokens,
            salt=salt,
        )
        free = [r for r in ranked if not r.busy]
        if not free:
            raise BusyError(
                f"all {len(ranked)} worker ranks are over the active KV blocks threshold "
                f"({self.busy_threshold:g})"
            )
        chosen = self._pick(free)
        return RouteDecision(chosen.instance_id, chosen.dp_rank, chosen.overlap_blocks)

    def _pick(self, ranked: list[RankCost]) -> RankCost:
        if len(ranked) == 1:
            return ranked[0]
        lo = min(r.cost for r in ranked)
        hi = max(r.cost for r in ranked)
        # Costs are sums of a few floats: what differs only by rounding is a tie.
        tol = 1e-9 * max(1.0, abs(lo))
        temperature = self.config.temperature
        if temperature > 0 and hi - lo > tol:
            span = (hi - lo) * temperature
            weights = [math.exp(-(r.cost - lo) / span) for r in ranked]
            return self._rng.choices(ranked, weights)[0]
        return self._rng.choice([r for r in ranked if r.cost - lo <= tol])

    def begin(
        self,
        decision: RouteDecision,
        prompt_tokens: int,
        block_size: int,
        hashes: Sequence[int] = (),
    ) -> ActiveRequest:
        """Charge the decision to its rank until the returned request's ``finish``: all its
        prompt blocks at once, and its uncached prompt tokens as pending prefill."""
        return self.tracker.begin(
            decision.instance_id,
            prompt_tokens,
            block_size,
            dp_rank=decision.dp_rank,
            cached_tokens=decision.overlap_blocks * block_size,
            hashes=tuple(hashes),
        )

    def is_busy(self, candidate: CandidateLike) -> bool:
        """Every rank of ``candidate`` is over the busy threshold (never, without one)."""
        if self.busy_threshold is None:
            return False
        ranks = self.costs([candidate], hashes=(), prompt_tokens=0, block_size=1)
        return all(r.busy for r in ranks)


# ----- flags -----


_non_negative = float_converter(0.0)


_D = KvRouterConfig()
DEFAULT_PREFILL_LOAD_SCALE = 2.0
KV_ROUTER_FLAGS: tuple[Flag, ...] = (
    Flag("router_kv_overlap_score_credit", _non_negative, _D.overlap_score_credit, "X",
         "KV router: prefill blocks credited per cached prompt block (0 ignores the cache)",
         ("DYN_ROUTER_KV_OVERLAP_SCORE_CREDIT",)),
    # 2, not the reference's 1: prefilling a block again costs more than holding a decode
    # block, and bench/kv_routing.py (16 shared 2k-token prefixes, 4 workers) measured a
    # prefix-hit rate of 84% at 1 and 93% at 2 (the oracle's: 97%).
    Flag("router_prefill_load_scale", _non_negative, DEFAULT_PREFILL_LOAD_SCALE, "X",
         "KV router: weight of prefill blocks against decode blocks in the cost",
         ("DYN_ROUTER_PREFILL_LOAD_SCALE",)),
    Flag("router_temperature", _non_negative, _D.temperature, "T",
         "KV router: 0 takes the cheapest worker; > 0 samples by softmax over normalized costs",
         ("DYN_ROUTER_TEMPERATURE",)),
    Flag("router_decode_active_request_weight", _non_negative,
         _D.decode_active_request_weight, "X",
         "KV router: cost added per active request on the worker",
         ("DYN_ROUTER_DECODE_ACTIVE_REQUEST_WEIGHT",)),
    Flag("router_kv_events", parse_bool, _D.use_kv_events, None,
         "KV router: follow the engines' KV events (--no-router-kv-events: load only)",
         ("DYN_ROUTER_USE_KV_EVENTS",)),
)  # fmt: skip


def kv_router_config(values: Mapping[str, Any]) -> KvRouterConfig:
    """The config from ``KV_ROUTER_FLAGS``' resolved values (``flag_values``' dict; other
    keys are ignored)."""
    return KvRouterConfig(
        overlap_score_credit=float(values["router_kv_overlap_score_credit"]),
        prefill_load_scale=float(values["router_prefill_load_scale"]),
        temperature=float(values["router_temperature"]),
        decode_active_request_weight=float(values["router_decode_active_request_weight"]),
        use_kv_events=bool(values["router_kv_events"]),
    )
