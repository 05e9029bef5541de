"""The simulated engine's scheduler: one asyncio task per DP rank, shaped like SGLang's.

Why SGLang's shape and not a simpler queue: the mesh above routes on what this produces -- KV
events (which prefixes are cached where), load metrics (running, waiting, KV use) and latency
(TTFT grows with queueing and uncached prompt tokens, ITL with batch size and context). A
scheduler that batches, caches, evicts and retracts like SGLang makes those signals behave
as they will in production, so routing and backpressure can be developed and tested on CPUs.

One step (``_plan`` -> simulated forward time -> ``_apply``):

- admission, FCFS: the head of the waiting queue is matched against the radix cache (whole
  pages, never a 100% hit: at least one token is computed), its match locked and the rest of
  its sequence allocated (evicting unlocked cached pages when short). Admission also keeps a
  reserve for the future decode tokens of everything running, scaled by SGLang's
  ``new_token_ratio`` (starts at 0.7, decays per step, jumps after a retraction), so a full
  pool does not admit work it will immediately have to retract. Head of line blocks;
- chunked prefill: at most ``min(chunked_prefill_size, max_prefill_tokens)`` new prompt tokens
  per step across the prefilling requests; a long prompt takes several steps. After each
  chunk the computed full pages are inserted into the cache and locked (SGLang's
  ``cache_unfinished_req``), so a concurrent request with the same prefix hits them at once;
- decode: one token for every fully prefilled request, in the same step (a mixed batch). A
  request crossing a page boundary gets a new page; when none is free even after eviction,
  the most recently admitted request is retracted: it loses its private KV, goes back to the
  front of the waiting queue and re-prefills its prompt plus the tokens generated so far;
- the step's duration is the cost model's prefill time for the uncached tokens processed
  plus its decode time for the batch, divided by ``speedup_ratio``; the scheduler sleeps for it
  (against a running deadline, so its own CPU time does not add up) before the step's
  results are emitted. With ``speedup_ratio == 0`` it only yields to the event loop;
- finish: ``max_new_tokens`` (length), eos and ``stop_token_ids`` (stop, never before
  ``min_new_tokens``, neither with ``ignore_eos`` -- SGLang's ``ignore_eos`` disables every
  token-based stop), abort. The sequence's full pages go into the cache, the rest is freed.

KV events are taken from the cache after every step and published when there are any (the
router sees a stored prefix one step after it exists). ``KvMetrics`` go out after every step
with prefill work, every ``decode_log_interval`` decode steps and when the scheduler goes
idle, as SGLang reports them; ``kv_active_blocks``/``kv_total_blocks`` are tokens, as SGLang
computes them.

Disaggregation: in ``prefill`` mode a finished prefill keeps its KV while a separate task
sends it to the decode engine (the scheduler keeps stepping), then reports the first token
with ``{"type": "length", "length": 1}``. In ``decode`` mode a request first receives its KV
(a separate task) and then joins the running batch without prefill compute, its first output
being the token the prefill sampled. The decode side neither matches nor inserts prefixes
(``cached_tokens`` 0), as SGLang's decode engine without its decode radix cache.

Outputs go through an :class:`OutputChannel` (a deque plus a future, cheaper than
``asyncio.Queue``); increments a slow consumer has not picked up yet are merged, so a lagging
stream costs one dict, not one per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from proto.metrics import KvMetrics
from proto.request import FAKE_BOOTSTRAP_HOST
from shared.engine.cpu.contracts import (
    KvEventSink,
    KvReceiver,
    KvSender,
    MetricsSink,
    TransferError,
)
from shared.engine.cpu.radix import PrefixMatch, RadixCache
from shared.engine.sim.cost import CostModel
from shared.engine.sim.tokens import TokenGenerator

__all__ = [
    "OutputChannel",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerStats",
    "SimRequest",
]

log = logging.getLogger(__name__)

# SGLang's defaults for the admission reserve (``--schedule-conservativeness 1``): the
# initial and minimum share of a request's remaining max_new_tokens reserved, the per-step
# decay between them, and the cap on max_new_tokens counted (SGLang's CLIP_MAX_NEW_TOKENS).
INIT_NEW_TOKEN_RATIO: Final = 0.7
MIN_NEW_TOKEN_RATIO: Final = 0.1
NEW_TOKEN_RATIO_DECAY: Final = (INIT_NEW_TOKEN_RATIO - MIN_NEW_TOKEN_RATIO) / 600
CLIP_MAX_NEW_TOKENS: Final = 4096
# After a retraction SGLang assumes every running request decodes this many more steps.
RETRACT_DECODE_STEPS: Final = 20

# Request states.
WAITING: Final = 0
PREFILLING: Final = 1
DECODING: Final = 2
RECEIVING: Final = 3  # decode mode: waiting for the KV from prefill
READY: Final = 4  # decode mode: KV arrived, waiting for a running slot
SENDING: Final = 5  # prefill mode: prefill done, KV being sent
DONE: Final = 6


class OutputChannel:
    """One request's stream: the scheduler pushes SGLang-shaped dicts, one consumer iterates.

    Unconsumed increments are merged into one dict (``output_ids`` and logprob lists
    concatenated, ``meta_info`` taken from the newest), exactly what SGLang's incremental
    streaming hands a slow reader.
    """

    __slots__ = ("_closed", "_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[dict[str, Any]] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def push(self, item: dict[str, Any], *, final: bool = False) -> None:
        if self._closed:
            return
        items = self._items
        if items:
            last = items[-1]
            last["output_ids"].extend(item["output_ids"])
            meta = item["meta_info"]
            old = last["meta_info"]
            for key in ("output_token_logprobs", "output_top_logprobs"):
                if key in meta and key in old:
                    meta[key] = old[key] + meta[key]
            last["meta_info"] = meta
        else:
            items.append(item)
        if final:
            self._closed = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        """End the stream without a final item (only for teardown paths)."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        items = self._items
        loop = asyncio.get_running_loop()
        while True:
            if items:
                yield items.popleft()
                continue
            if self._closed:
                return
            waiter = loop.create_future()
            self._waiter = waiter
            await waiter


class SimRequest:
    """A generate request inside the scheduler (built by the engine, which validated it)."""

    __slots__ = (
        "admit_seq",
        "bootstrap_host",
        "bootstrap_port",
        "bootstrap_room",
        "cached_tokens",
        "cap",
        "channel",
        "fill",
        "first_token",
        "gen",
        "ignore_eos",
        "input_ids",
        "kv_len",
        "locked_pages",
        "match",
        "max_new_tokens",
        "min_new_tokens",
        "output_ids",
        "private_pages",
        "prompt_len",
        "retractions",
        "return_logprob",
        "rid",
        "sim_decode_s",
        "sim_prefill_s",
        "state",
        "stop_ids",
        "target",
        "task",
        "top_logprobs_num",
    )

    def __init__(
        self,
        *,
        rid: str,
        input_ids: list[int],
        gen: TokenGenerator,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        ignore_eos: bool = False,
        stop_token_ids: frozenset[int] = frozenset(),
        return_logprob: bool = False,
        top_logprobs_num: int = 0,
        bootstrap_host: str | None = None,
        bootstrap_port: int | None = None,
        bootstrap_room: int | None = None,
    ) -> None:
        self.rid = rid
        self.input_ids = input_ids
        self.prompt_len = len(input_ids)
        self.gen = gen
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.ignore_eos = ignore_eos
        # Stop ids plus eos: every token that ends the request unless ignore_eos.
        self.stop_ids = stop_token_ids
        self.return_logprob = return_logprob
        self.top_logprobs_num = top_logprobs_num
        self.bootstrap_host = bootstrap_host
        self.bootstrap_port = bootstrap_port
        self.bootstrap_room = bootstrap_room
        self.output_ids: list[int] = []
        self.channel = OutputChannel()
        self.state = WAITING
        # KV bookkeeping: the locked cache match, pages owned privately (not in the tree),
        # tokens with computed KV, and capacity in tokens (locked + private pages).
        self.match: PrefixMatch | None = None
        self.locked_pages = 0
        self.private_pages = 0
        self.kv_len = 0
        self.cap = 0
        # The token sequence being prefilled and its length (prompt + outputs so far).
        self.fill: list[int] = input_ids
        self.target = 0
        self.cached_tokens = -1  # -1: not admitted yet
        self.admit_seq = 0
        self.first_token: int | None = None
        self.task: asyncio.Task[None] | None = None
        self.retractions = 0
        # Simulated GPU seconds charged to this request.
        self.sim_prefill_s = 0.0
        self.sim_decode_s = 0.0

    @property
    def finished(self) -> bool:
        return self.state == DONE


@dataclass(slots=True)
class SchedulerConfig:
    page_size: int = 16
    max_total_tokens: int = 400_000
    max_running_requests: int = 256
    max_prefill_tokens: int = 16384
    # <= 0 disables chunking: a prompt is prefilled in one step.
    chunked_prefill_size: int = 8192
    disaggregation_mode: str = "null"  # "null" | "prefill" | "decode"
    speedup_ratio: float = 1.0
    decode_log_interval: int = 40
    cost: CostModel = field(default_factory=CostModel)
    dp_rank: int = 0
    init_new_token_ratio: float = INIT_NEW_TOKEN_RATIO
    min_new_token_ratio: float = MIN_NEW_TOKEN_RATIO
    new_token_ratio_decay: float = NEW_TOKEN_RATIO_DECAY

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError("page_size must be >= 1")
        if self.max_total_tokens < self.page_size:
            raise ValueError("max_total_tokens must hold at least one page")
        if self.max_running_requests < 1:
            raise ValueError("max_running_requests must be >= 1")
        if self.max_prefill_tokens < 1:
            raise ValueError("max_prefill_tokens must be >= 1")
        if self.disaggregation_mode not in ("null", "prefill", "decode"):
            raise ValueError(
                f"disaggregation_mode must be null, prefill or decode, not "
                f"{self.disaggregation_mode!r}"
            )
        if self.speedup_ratio < 0:
            raise ValueError("speedup_ratio must be >= 0")
        if self.decode_log_interval < 1:
            raise ValueError("decode_log_interval must be >= 1")

    @property
    def total_pages(self) -> int:
        return self.max_total_tokens // self.page_size


@dataclass(slots=True)
class SchedulerStats:
    steps: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    retractions: int = 0
    prefill_tokens: int = 0  # computed (uncached) prompt tokens
    cached_prompt_tokens: int = 0
    output_tokens: int = 0
    finished: int = 0
    aborted: int = 0
    sim_seconds: float = 0.0  # simulated GPU time of all steps
    max_running: int = 0


class _Step:
    __slots__ = ("chunks", "decode", "duration", "prefill_s")

    def __init__(self) -> None:
        self.chunks: list[tuple[SimRequest, int]] = []
        self.decode: list[SimRequest] = []
        self.duration = 0.0
        self.prefill_s = 0.0


def _length(n: int) -> dict[str, Any]:
    return {"type": "length", "length": n}


def _abort(message: str, status_code: int | None = None) -> dict[str, Any]:
    reason: dict[str, Any] = {"type": "abort", "message": message}
    if status_code is not None:
        reason["status_code"] = status_code
    return reason


class Scheduler:
    """One DP rank's scheduler; see the module docstring.

    ``submit`` takes a :class:`SimRequest` and streams through its ``channel``. Every other
    method is synchronous and safe to call between steps (everything runs on one loop).
    """

    def __init__(
        self,
        config: SchedulerConfig,
        *,
        cache: RadixCache | None = None,
        event_sink: KvEventSink | None = None,
        metrics_sink: MetricsSink | None = None,
        kv_sender: KvSender | None = None,
        kv_receiver: KvReceiver | None = None,
    ) -> None:
        self.config = config
        self.dp_rank = config.dp_rank
        self.page_size = config.page_size
        self.cache = (
            cache
            if cache is not None
            else RadixCache(config.page_size, config.total_pages, events=event_sink is not None)
        )
        if self.cache.page_size != config.page_size:
            raise ValueError("the radix cache's page size differs from the scheduler's")
        self.event_sink = event_sink
        self.metrics_sink = metrics_sink
        self.kv_sender = kv_sender
        self.kv_receiver = kv_receiver
        self.mode = config.disaggregation_mode
        self.stats = SchedulerStats()
        self.requests: dict[str, SimRequest] = {}
        self._waiting: deque[SimRequest] = deque()
        self._ready: deque[SimRequest] = deque()
        self._prefilling: list[SimRequest] = []
        self._decoding: list[SimRequest] = []
        self._admit_counter = 0
        self._new_token_ratio = config.init_new_token_ratio
        self._cache_hit_rate = 0.0
        self._decode_since_report = 0
        self._paused = False
        self._released = False
        self._closed = False
        self._idle_reported = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._next_t = 0.0
        self._side_tasks: set[asyncio.Task[None]] = set()

    # ----- lifecycle -----

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"sim-scheduler-dp{self.dp_rank}"
            )

    async def close(self) -> None:
        """Stop stepping; every open stream ends with an abort."""
        self._closed = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for req in list(self.requests.values()):
            self._terminate(req, _abort("the engine is shutting down"))
        tasks = list(self._side_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ----- public control -----

    @property
    def num_running(self) -> int:
        return len(self._prefilling) + len(self._decoding)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._ready)

    @property
    def load(self) -> int:
        """For least-loaded DP routing: every request this rank holds in any state."""
        return len(self.requests)

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def is_idle(self) -> bool:
        return not self.requests

    def submit(self, req: SimRequest) -> None:
        if req.rid in self.requests:
            req.state = DONE
            req.channel.push(
                self._item(req, [], _abort(f"duplicate request id {req.rid}", 400)), final=True
            )
            return
        if self._closed:
            req.state = DONE
            req.channel.push(self._item(req, [], _abort("the engine is shutting down")), final=True)
            return
        if self._released:
            req.state = DONE
            req.channel.push(
                self._item(req, [], _abort("the engine's memory is released", 503)), final=True
            )
            return
        self.requests[req.rid] = req
        if self.mode == "decode":
            if (
                req.bootstrap_host is None
                or req.bootstrap_port is None
                or (req.bootstrap_room is None)
            ):
                self._terminate(
                    req,
                    _abort(
                        "a decode-mode engine needs bootstrap_host, bootstrap_port and "
                        "bootstrap_room (the request's prefill leg)",
                        400,
                    ),
                )
                return
            if req.bootstrap_host == FAKE_BOOTSTRAP_HOST:
                # No prefill peer (health check, warm-up): sample the first token here.
                req.first_token = self._sample(req, 0)
                req.state = READY
                self._ready.append(req)
            else:
                req.state = RECEIVING
                req.task = self._spawn(self._receive(req), f"sim-kv-receive-{req.rid}")
        else:
            req.state = WAITING
            self._waiting.append(req)
        self._wake.set()

    def abort(self, rid: str, message: str = "aborted by request") -> bool:
        """End ``rid`` wherever it is (waiting, running, in a KV transfer); False if unknown."""
        req = self.requests.get(rid)
        if req is None:
            return False
        self._release_decode_peer(req)
        self._terminate(req, _abort(message))
        self._wake.set()
        return True

    def _release_decode_peer(self, req: SimRequest) -> None:
        # Whatever stage a prefill request is at (queued, prefilling, sending), its decode
        # peer waits on the room: tell it now rather than let it run into the bootstrap
        # timeout. The sender remembers the room for a decode that registers later.
        if (
            self.kv_sender is not None
            and req.bootstrap_room is not None
            and req.bootstrap_host != FAKE_BOOTSTRAP_HOST
        ):
            self.kv_sender.abort(req.bootstrap_room)

    def pause(self) -> None:
        """Stop stepping after the current step; requests stay where they are."""
        self._paused = True
        self._wake.set()

    def resume(self) -> None:
        self._paused = False
        self._wake.set()

    def flush(self) -> bool:
        """Drop the prefix cache (one ``AllBlocksCleared``) if nothing is in flight."""
        if self.requests:
            return False
        self.cache.reset()
        self._publish_events()
        return True

    def release_memory(self) -> None:
        """Free all KV (requests in flight end with an abort) and refuse new work until
        :meth:`resume_memory`, like SGLang's ``release_memory_occupation``."""
        self._released = True
        for req in list(self.requests.values()):
            self._release_decode_peer(req)
            self._terminate(req, _abort("the engine's memory is being released", 503))
        self.cache.reset()
        self._publish_events()
        self._publish_metrics()

    def resume_memory(self) -> None:
        self._released = False
        self._wake.set()

    def metrics(self) -> KvMetrics:
        cache = self.cache
        total_pages = cache.total_pages
        used = total_pages - cache.free_pages - cache.evictable_pages
        usage = used / total_pages if total_pages else 0.0
        total_tokens = total_pages * self.page_size
        return KvMetrics(
            request_active_slots=self.num_running,
            request_total_slots=self.config.max_running_requests,
            kv_active_blocks=int(usage * total_tokens),
            kv_total_blocks=total_tokens,
            num_requests_waiting=self.num_waiting + self._count_receiving(),
            gpu_cache_usage_perc=usage,
            gpu_prefix_cache_hit_rate=self._cache_hit_rate,
            data_parallel_rank=self.dp_rank,
        )

    # ----- the loop -----

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        speedup = self.config.speedup_ratio
        try:
            while not self._closed:
                step = None if self._paused else self._plan()
                if step is None:
                    if not self._idle_reported:
                        self._idle_reported = True
                        self._publish_events()
                        self._publish_metrics()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._idle_reported = False
                now = loop.time()
                if self._next_t < now:
                    self._next_t = now
                if speedup > 0:
                    self._next_t += step.duration / speedup
                    delay = self._next_t - loop.time()
                    await asyncio.sleep(delay if delay > 0 else 0)
                else:
                    await asyncio.sleep(0)
                self._apply(step)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("simulated scheduler dp%d crashed", self.dp_rank)
            self._closed = True
            for req in list(self.requests.values()):
                self._terminate(req, _abort(f"simulated scheduler crashed: {exc!r}"))

    def _plan(self) -> _Step | None:
        step = _Step()
        cfg = self.config
        cost = cfg.cost

        # Decode-mode arrivals whose KV is here: straight into the running batch.
        while self._ready and self.num_running < cfg.max_running_requests:
            req = self._ready[0]
            if not self._admit_ready(req):
                break
            if self._ready and self._ready[0] is req:
                self._ready.popleft()

        # Decode: every fully prefilled request gets one token; make room for its KV.
        kv_tokens = 0
        if self._decoding:
            batch = step.decode
            for req in list(self._decoding):
                if req.state != DECODING:
                    continue  # retracted just now
                if req.kv_len >= req.cap and not self._grow(req):
                    continue
                batch.append(req)
                kv_tokens += req.kv_len + 1

        # Prefill: continue the chunked request(s), then admit from the waiting queue.
        budget = cfg.max_prefill_tokens
        if cfg.chunked_prefill_size > 0:
            budget = min(budget, cfg.chunked_prefill_size)
        chunk_limit = cfg.chunked_prefill_size > 0
        chunks = step.chunks
        for req in self._prefilling:
            if budget <= 0:
                break
            remaining = req.target - req.kv_len
            n = min(remaining, budget) if chunk_limit else remaining
            chunks.append((req, n))
            budget -= n
        if self._waiting and not self._released:
            reserve = -1.0
            while budget > 0 and self._waiting and self.num_running < cfg.max_running_requests:
                req = self._waiting[0]
                if reserve < 0:
                    reserve = self._reserved_tokens()
                admitted, reserve = self._admit(req, reserve)
                if not admitted:
                    if req.state == DONE:
                        continue  # rejected (can never fit); try the next one
                    break
                self._waiting.popleft()
                remaining = req.target - req.kv_len
                if not chunk_limit and remaining > budget and chunks:
                    break  # unchunked: a prompt over the budget runs alone next step
                n = min(remaining, budget) if chunk_limit else remaining
                chunks.append((req, n))
                budget -= n

        if not chunks and not step.decode:
            return None

        prefill_s = 0.0
        if chunks:
            share = cost.prefill_overhead_s / len(chunks)
            for req, n in chunks:
                t = cost.chunk_time(n, req.kv_len + n) + share
                req.sim_prefill_s += t
                prefill_s += t
        decode_s = 0.0
        if step.decode:
            decode_s = cost.decode_time(len(step.decode), kv_tokens)
            per_req = decode_s / len(step.decode)
            for req in step.decode:
                req.sim_decode_s += per_req
        step.prefill_s = prefill_s
        step.duration = prefill_s + decode_s
        running = self.num_running
        if running > self.stats.max_running:
            self.stats.max_running = running
        return step

    def _apply(self, step: _Step) -> None:
        stats = self.stats
        stats.steps += 1
        stats.sim_seconds += step.duration
        finished_any = False

        if step.chunks:
            stats.prefill_steps += 1
            computed = 0
            hit = 0
            for req, n in step.chunks:
                if req.state != PREFILLING:
                    continue  # aborted while the step ran
                if req.kv_len == req.cached_tokens and req.retractions == 0:
                    hit += req.cached_tokens
                req.kv_len += n
                computed += n
                if self.mode != "decode":
                    self._checkpoint(req)
                if req.kv_len >= req.target:
                    self._prefilling.remove(req)
                    req.fill = req.input_ids
                    if self._prefill_done(req):
                        finished_any = True
            stats.prefill_tokens += computed
            stats.cached_prompt_tokens += hit
            if computed + hit:
                self._cache_hit_rate = hit / (computed + hit)

        if step.decode:
            stats.decode_steps += 1
            self._decode_since_report += 1
            if self._new_token_ratio > self.config.min_new_token_ratio:
                self._new_token_ratio = max(
                    self.config.min_new_token_ratio,
                    self._new_token_ratio - self.config.new_token_ratio_decay,
                )
            if self._decode_batch(step.decode):
                finished_any = True

        if finished_any:
            self._decoding = [r for r in self._decoding if r.state == DECODING]

        self._publish_events()
        if step.chunks or self._decode_since_report >= self.config.decode_log_interval:
            self._decode_since_report = 0
            self._publish_metrics()

    def _decode_batch(self, batch: list[SimRequest]) -> bool:
        """One decode token for each request; True if any finished."""
        finished_any = False
        stats = self.stats
        produced = 0
        for req in batch:
            if req.state != DECODING:
                continue
            req.kv_len += 1
            out = req.output_ids
            i = len(out)
            gen = req.gen
            tok = gen.token(i)
            if i < req.min_new_tokens and tok in req.stop_ids:
                tok = self._resample(req, i, tok)
            out.append(tok)
            produced += 1
            n = i + 1
            if n >= req.max_new_tokens:
                reason: dict[str, Any] | None = {"type": "length", "length": req.max_new_tokens}
            elif not req.ignore_eos and tok in req.stop_ids:
                reason = {"type": "stop", "matched": tok}
            else:
                reason = None
            meta: dict[str, Any] = {
                "id": req.rid,
                "finish_reason": reason,
                "prompt_tokens": req.prompt_len,
                "completion_tokens": n,
                "cached_tokens": req.cached_tokens,
            }
            if req.return_logprob:
                self._add_logprobs(req, meta, i, tok)
            item = {"text": "", "output_ids": [tok], "index": 0, "meta_info": meta}
            if reason is None:
                req.channel.push(item)
            else:
                req.channel.push(item, final=True)
                self._release(req, insert=True)
                req.state = DONE
                del self.requests[req.rid]
                stats.finished += 1
                finished_any = True
        stats.output_tokens += produced
        return finished_any

    # ----- admission and memory -----

    def _reserved_tokens(self) -> float:
        """Tokens the running requests are expected to still need (SGLang's reserve)."""
        ratio = self._new_token_ratio
        total = 0
        for req in self._decoding:
            total += min(req.max_new_tokens - len(req.output_ids), CLIP_MAX_NEW_TOKENS)
        for req in self._prefilling:
            total += min(req.max_new_tokens - len(req.output_ids), CLIP_MAX_NEW_TOKENS)
        return total * ratio

    def _admit(self, req: SimRequest, reserve: float) -> tuple[bool, float]:
        """Match, lock and allocate ``req``'s sequence; returns (admitted, new reserve)."""
        cache = self.cache
        page = self.page_size
        if req.output_ids:
            req.fill = req.input_ids + req.output_ids
        fill = req.fill
        seq_len = len(fill)
        if self.mode == "decode":
            match = cache.match_prefix(())  # decode side: no prefix reuse
        else:
            # Never a full hit: at least one token must be computed to produce logits.
            match = cache.match_prefix(fill if seq_len % page else fill[:-1])
        need = -(-seq_len // page) - match.num_pages
        if match.num_pages + need > cache.total_pages:
            self._terminate(
                req,
                _abort(
                    f"the request needs {seq_len} KV tokens but the KV cache holds only "
                    f"{cache.total_pages * page}",
                    400,
                ),
            )
            return False, reserve
        future = min(req.max_new_tokens - len(req.output_ids), CLIP_MAX_NEW_TOKENS)
        future_reserve = future * self._new_token_ratio
        if self.num_running:
            available = (cache.free_pages + cache.evictable_pages) * page - reserve
            if available < (seq_len - match.num_tokens) + future_reserve:
                return False, reserve
        cache.lock(match)
        if not cache.alloc(need):
            cache.unlock(match)
            return False, reserve
        req.match = match
        req.locked_pages = match.num_pages
        req.private_pages = need
        req.cap = (match.num_pages + need) * page
        req.kv_len = match.num_tokens
        req.target = seq_len
        if req.cached_tokens < 0:
            req.cached_tokens = match.num_tokens
        self._admit_counter += 1
        req.admit_seq = self._admit_counter
        req.state = PREFILLING
        self._prefilling.append(req)
        return True, reserve + future_reserve

    def _admit_ready(self, req: SimRequest) -> bool:
        """Decode mode: a request whose KV arrived takes a running slot and its pages."""
        need = -(-req.prompt_len // self.page_size)
        if need > self.cache.total_pages:
            self._terminate(req, _abort("the prompt does not fit in the KV cache", 400))
            return True
        if not self.cache.alloc(need):
            return False
        req.match = None
        req.locked_pages = 0
        req.private_pages = need
        req.cap = need * self.page_size
        req.kv_len = req.prompt_len
        req.target = req.prompt_len
        req.cached_tokens = 0
        self._admit_counter += 1
        req.admit_seq = self._admit_counter
        first = req.first_token
        assert first is not None
        req.state = DECODING
        self._decoding.append(req)
        self._emit_token(req, first)
        return True

    def _grow(self, req: SimRequest) -> bool:
        """One more page for a decoding request, retracting others if need be; False if
        ``req`` itself was retracted or aborted."""
        cache = self.cache
        while not cache.alloc(1):
            victim = self._latest_running()
            if victim is None:
                return False
            if victim is req and self.num_running == 1:
                self._terminate(
                    req,
                    _abort(
                        f"out of KV cache: {req.kv_len} tokens do not fit in "
                        f"{cache.total_pages * self.page_size}"
                    ),
                )
                return False
            self._retract(victim)
            if victim is req:
                return False
        req.private_pages += 1
        req.cap += self.page_size
        return True

    def _latest_running(self) -> SimRequest | None:
        latest: SimRequest | None = None
        for req in self._prefilling:
            if latest is None or req.admit_seq > latest.admit_seq:
                latest = req
        for req in self._decoding:
            if req.state == DECODING and (latest is None or req.admit_seq > latest.admit_seq):
                latest = req
        return latest

    def _retract(self, req: SimRequest) -> None:
        """SGLang's decode retraction: drop the request's private KV (its cached prefix stays
        in the tree, unlocked) and requeue it at the front, keeping its output so far."""
        self._release(req, insert=False)
        if req.state == PREFILLING:
            self._prefilling.remove(req)
        else:
            self._decoding.remove(req)
        req.state = WAITING
        req.fill = req.input_ids
        req.kv_len = 0
        req.retractions += 1
        self.stats.retractions += 1
        self._waiting.appendleft(req)
        # SGLang's estimate after a retraction: every running request is assumed to decode
        # RETRACT_DECODE_STEPS more tokens.
        running = [*self._decoding, *self._prefilling]
        if running:
            decoded = sum(len(r.output_ids) for r in running)
            budget = sum(min(r.max_new_tokens, CLIP_MAX_NEW_TOKENS) for r in running)
            estimate = (decoded + RETRACT_DECODE_STEPS * len(running)) / max(budget, 1)
            self._new_token_ratio = min(1.0, max(self._new_token_ratio, estimate))
        log.debug(
            "dp%d retracted %s (%d output tokens)", self.dp_rank, req.rid, len(req.output_ids)
        )

    def _checkpoint(self, req: SimRequest) -> None:
        """Put the request's computed full pages into the tree and hold them locked (SGLang's
        ``cache_unfinished_req``)."""
        cache = self.cache
        full = req.kv_len // self.page_size
        if full <= req.locked_pages:
            return
        m2 = cache.insert(req.fill[: full * self.page_size])
        moved = m2.num_pages - req.locked_pages
        dup = moved - m2.new_pages
        if dup:
            cache.pool.free(dup)
        req.private_pages -= moved
        cache.lock(m2)
        if req.match is not None:
            cache.unlock(req.match)
        req.match = m2
        req.locked_pages = m2.num_pages

    def _release(self, req: SimRequest, *, insert: bool) -> None:
        """Give back the request's KV; with ``insert`` its computed full pages stay cached."""
        if req.state in (WAITING, RECEIVING, READY, DONE) or (
            req.match is None and req.private_pages == 0
        ):
            return
        cache = self.cache
        if insert and self.mode != "decode" and req.kv_len >= self.page_size:
            full = req.kv_len // self.page_size
            if full > req.locked_pages:
                tokens = req.fill if req.state == PREFILLING else req.input_ids + req.output_ids
                m2 = cache.insert(tokens[: full * self.page_size])
                moved = m2.num_pages - req.locked_pages
                dup = moved - m2.new_pages
                req.private_pages -= moved
                if dup:
                    cache.pool.free(dup)
        if req.private_pages:
            cache.pool.free(req.private_pages)
        if req.match is not None:
            cache.unlock(req.match)
        req.match = None
        req.private_pages = 0
        req.locked_pages = 0
        req.cap = 0

    # ----- prefill completion and disaggregation -----

    def _prefill_done(self, req: SimRequest) -> bool:
        """The prefill's forward samples the next token; True if the request finished."""
        i = len(req.output_ids)
        tok = self._sample(req, i)
        if self.mode == "prefill":
            req.output_ids.append(tok)
            self.stats.output_tokens += 1
            if (
                req.bootstrap_host is None
                or req.bootstrap_host == FAKE_BOOTSTRAP_HOST
                or req.bootstrap_room is None
                or self.kv_sender is None
            ):
                self._finish(req, [tok], _length(1))
                return True
            # Keep the KV, give up the running slot, and send it in the background.
            req.state = SENDING
            req.task = self._spawn(self._send(req, tok), f"sim-kv-send-{req.rid}")
            return True
        req.state = DECODING
        self._decoding.append(req)
        return self._emit_token(req, tok)

    def _emit_token(self, req: SimRequest, tok: int) -> bool:
        """Append a just-sampled token (not via the decode loop), stream it and check for a
        finish; True if finished."""
        if req.state != DECODING:
            return False
        out = req.output_ids
        i = len(out)
        if i >= req.max_new_tokens:  # max_new_tokens=0: a prefill-only request
            self._finish(req, [], _length(req.max_new_tokens))
            return True
        out.append(tok)
        self.stats.output_tokens += 1
        n = i + 1
        reason: dict[str, Any] | None = None
        if n >= req.max_new_tokens:
            reason = _length(req.max_new_tokens)
        elif not req.ignore_eos and tok in req.stop_ids:
            reason = {"type": "stop", "matched": tok}
        if reason is None:
            req.channel.push(self._item(req, [tok], None, first_index=i))
            return False
        self._finish(req, [tok], reason, first_index=i)
        return True

    async def _send(self, req: SimRequest, tok: int) -> None:
        sender = self.kv_sender
        assert sender is not None and req.bootstrap_room is not None
        try:
            await sender.send(
                room=req.bootstrap_room, num_tokens=req.prompt_len, first_token=tok, rid=req.rid
            )
        except TransferError as exc:
            self._terminate(req, _abort(f"KV transfer failed: {exc}"))
        except Exception as exc:
            # Anything else is a bug or a bad argument; the stream must still end.
            log.exception("dp%d: sending the KV of %s failed", self.dp_rank, req.rid)
            self._terminate(req, _abort(f"KV transfer failed: {exc!r}"))
        else:
            if req.state == SENDING:
                self._finish(req, [tok], _length(1))
        finally:
            self._wake.set()

    async def _receive(self, req: SimRequest) -> None:
        receiver = self.kv_receiver
        assert req.bootstrap_host is not None
        assert req.bootstrap_port is not None and req.bootstrap_room is not None
        if receiver is None:
            self._terminate(req, _abort("this engine has no KV receiver (not in decode mode)"))
            return
        try:
            tok = await receiver.receive(
                host=req.bootstrap_host,
                port=req.bootstrap_port,
                room=req.bootstrap_room,
                num_tokens=req.prompt_len,
                rid=req.rid,
            )
        except TransferError as exc:
            self._terminate(req, _abort(f"KV transfer failed: {exc}"))
            return
        except Exception as exc:
            log.exception("dp%d: receiving the KV of %s failed", self.dp_rank, req.rid)
            self._terminate(req, _abort(f"KV transfer failed: {exc!r}"))
            return
        if req.state != RECEIVING:
            return
        req.first_token = tok
        req.state = READY
        self._ready.append(req)
        self._wake.set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        return task

    def _count_receiving(self) -> int:
        if self.mode != "decode":
            return 0
        return sum(1 for r in self.requests.values() if r.state == RECEIVING)

    # ----- outputs -----

    def _sample(self, req: SimRequest, i: int) -> int:
        tok = req.gen.token(i)
        if i < req.min_new_tokens and tok in req.stop_ids:
            tok = self._resample(req, i, tok)
        return tok

    @staticmethod
    def _resample(req: SimRequest, i: int, tok: int) -> int:
        # min_new_tokens masks stop tokens (SGLang's penalizer): draw another ordinary one.
        attempt = 0
        while tok in req.stop_ids:
            attempt += 1
            tok = req.gen.alternative(i, attempt)
            if attempt > 64:
                break
        return tok

    def _item(
        self,
        req: SimRequest,
        toks: list[int],
        reason: dict[str, Any] | None,
        *,
        first_index: int = 0,
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": req.rid,
            "finish_reason": reason,
            "prompt_tokens": req.prompt_len,
            "completion_tokens": len(req.output_ids),
            "cached_tokens": max(req.cached_tokens, 0),
        }
        if req.return_logprob:
            lps: list[tuple[float, int, None]] = []
            tops: list[list[tuple[float, int, None]]] = []
            for k, tok in enumerate(toks):
                chosen, top = req.gen.logprobs(first_index + k, tok, req.top_logprobs_num)
                lps.append(chosen)
                tops.append(top)
            meta["output_token_logprobs"] = lps
            if req.top_logprobs_num > 0:
                meta["output_top_logprobs"] = tops
        return {"text": "", "output_ids": toks, "index": 0, "meta_info": meta}

    @staticmethod
    def _add_logprobs(req: SimRequest, meta: dict[str, Any], i: int, tok: int) -> None:
        chosen, top = req.gen.logprobs(i, tok, req.top_logprobs_num)
        meta["output_token_logprobs"] = [chosen]
        if req.top_logprobs_num > 0:
            meta["output_top_logprobs"] = [top]

    def _finish(
        self,
        req: SimRequest,
        toks: list[int],
        reason: dict[str, Any],
        *,
        first_index: int | None = None,
    ) -> None:
        """Normal end: final item, KV into the cache, bookkeeping."""
        if req.state == DONE:
            return
        start = len(req.output_ids) - len(toks) if first_index is None else first_index
        req.channel.push(self._item(req, toks, reason, first_index=start), final=True)
        self._release(req, insert=True)
        self._unlist(req)
        req.state = DONE
        self.requests.pop(req.rid, None)
        self.stats.finished += 1

    def _terminate(self, req: SimRequest, reason: dict[str, Any]) -> None:
        """Abnormal end (abort, transfer failure, shutdown): final item with no new tokens."""
        if req.state == DONE:
            return
        task = req.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
        req.channel.push(self._item(req, [], reason), final=True)
        self._release(req, insert=True)
        self._unlist(req)
        req.state = DONE
        self.requests.pop(req.rid, None)
        self.stats.aborted += 1

    def _unlist(self, req: SimRequest) -> None:
        state = req.state
        if state == WAITING:
            with contextlib.suppress(ValueError):
                self._waiting.remove(req)
        elif state == READY:
            with contextlib.suppress(ValueError):
                self._ready.remove(req)
        elif state == PREFILLING:
            with contextlib.suppress(ValueError):
                self._prefilling.remove(req)
        elif state == DECODING:
            with contextlib.suppress(ValueError):
                self._decoding.remove(req)

    # ----- publishing -----

    def _publish_events(self) -> None:
        events = self.cache.take_events()
        if events and self.event_sink is not None:
            try:
                self.event_sink.publish(events)
            except Exception:
                log.exception("dp%d: publishing KV events failed", self.dp_rank)

    def _publish_metrics(self) -> None:
        if self.metrics_sink is None:
            return
        try:
            self.metrics_sink.publish(self.metrics())
        except Exception:
            log.exception("dp%d: publishing load metrics failed", self.dp_rank)
