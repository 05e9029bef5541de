"""The CPU engines' scheduler: one asyncio task per DP rank, shaped like SGLang's.

Why SGLang's shape and not a simpler queue: the mesh above routes on what this produces -- KV
events (which prefixes are cached where), load metrics (running, waiting, KV use) and latency
(TTFT grows with queueing and uncached prompt tokens, ITL with batch size and context). A
scheduler that batches, caches, evicts and retracts like SGLang makes those signals behave as
they will in production, and the same scheduler drives the real model on a CPU (the torch
runner) and the simulated one (``runner.py`` says how they split the work).

One step (``_plan`` -> ``runner.forward`` -> ``_apply``):

- admission, FCFS: the head of the waiting queue is matched against the radix cache (whole
  pages, never a 100% hit: at least one token is computed), its match locked and the rest of
  its sequence given pages (evicting unlocked cached pages when short). Admission also keeps a
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
- finish: ``max_new_tokens`` (length), eos and ``stop_token_ids`` (stop; the runner never
  samples one before ``min_new_tokens``; ``ignore_eos`` disables every token-based stop, as
  in SGLang), abort. The sequence's full pages go into the cache, the rest is freed.

Pages are allocated and freed only between steps, on the event loop, so a forward running in
another thread never sees its pages change under it (an abort during a step frees them after).

KV events are taken from the cache after a step and published when there are any (the
router sees a stored prefix one step after it exists). ``KvMetrics`` go out after a step
with prefill work, every ``decode_log_interval`` decode steps and when the scheduler goes
idle, as SGLang reports them. Both at most once per ``publish_interval`` (20 ms) while busy,
and within it once idle: SGLang publishes per step, and its GPU steps take milliseconds, but a
simulated step at a high speedup takes microseconds, and a message per step per worker then
cost more CPU (worker, publisher, NATS, router) than the requests themselves (the KV rows
of ``make bench-reference`` show it; the torch engine's steps take longer than 20 ms anyway).
``kv_active_blocks``/``kv_total_blocks`` are tokens, as SGLang
computes them.

Disaggregation: in ``prefill`` mode a finished prefill keeps its KV while a separate task
sends it to the decode engine (the scheduler keeps stepping), then reports the first token
with ``{"type": "length", "length": 1}``. In ``decode`` mode a request first receives its KV
(a separate task, into a buffer), then takes pages and a running slot and joins the batch
without prefill compute, its first output being the token the prefill sampled. The decode side
neither matches nor inserts prefixes (``cached_tokens`` 0), as SGLang's decode engine without
its decode radix cache. A decode-mode request for the fake bootstrap host (health checks,
warm-up) has no prefill peer and is prefilled locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from proto.metrics import KvMetrics
from proto.request import FAKE_BOOTSTRAP_HOST
from shared.engine.cpu.contracts import (
    KvEventSink,
    KvReceiver,
    KvSender,
    MetricsSink,
    TransferError,
)
from shared.engine.cpu.radix import RadixCache
from shared.engine.cpu.request import (
    DECODING,
    DONE,
    PREFILLING,
    READY,
    RECEIVING,
    SENDING,
    WAITING,
    Req,
    TokenLogprob,
)
from shared.engine.cpu.runner import ForwardBatch, KvSink, ModelRunner, StepOutput

__all__ = ["Scheduler", "SchedulerConfig", "SchedulerStats"]

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

# The first token's logprob travels with the KV (the transfer's ``extra``).
_LOGPROB_ENCODER = msgspec.msgpack.Encoder()
_LOGPROB_DECODER = msgspec.msgpack.Decoder(tuple[float, list[tuple[float, int]] | None] | None)


@dataclass(slots=True)
class SchedulerConfig:
    page_size: int = 16
    max_total_tokens: int = 400_000
    max_running_requests: int = 256
    max_prefill_tokens: int = 16384
    # <= 0 disables chunking: a prompt is prefilled in one step.
    chunked_prefill_size: int = 8192
    disaggregation_mode: str = "null"  # "null" | "prefill" | "decode"
    decode_log_interval: int = 40
    # Seconds between KV-event and load-metric publications while busy (0: every step).
    publish_interval: float = 0.02
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
        if self.decode_log_interval < 1:
            raise ValueError("decode_log_interval must be >= 1")
        if not self.publish_interval >= 0:
            raise ValueError("publish_interval must be >= 0")

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
    forward_seconds: float = 0.0  # what the runner reported for all steps
    max_running: int = 0


def _length(n: int) -> dict[str, Any]:
    return {"type": "length", "length": n}


def _abort(message: str, status_code: int | None = None) -> dict[str, Any]:
    reason: dict[str, Any] = {"type": "abort", "message": message}
    if status_code is not None:
        reason["status_code"] = status_code
    return reason


def _logprob_meta(meta: dict[str, Any], req: Req, toks: list[int], lps: list[Any]) -> None:
    """SGLang's ``output_token_logprobs`` / ``output_top_logprobs`` for ``toks``."""
    chosen: list[tuple[float, int, None]] = []
    tops: list[list[tuple[float, int, None]]] = []
    for tok, entry in zip(toks, lps, strict=True):
        lp, top = entry if entry is not None else (float("nan"), None)
        chosen.append((lp, tok, None))
        tops.append([(v, t, None) for v, t in top] if top else [])
    meta["output_token_logprobs"] = chosen
    if req.top_logprobs_num > 0:
        meta["output_top_logprobs"] = tops


class Scheduler:
    """One DP rank's scheduler; see the module docstring.

    ``submit`` takes a :class:`Req` and streams through its ``channel``. Every other method is
    synchronous and safe to call between steps (everything runs on one loop).
    """

    def __init__(
        self,
        config: SchedulerConfig,
        runner: ModelRunner,
        *,
        cache: RadixCache | None = None,
        event_sink: KvEventSink | None = None,
        metrics_sink: MetricsSink | None = None,
        kv_sender: KvSender | None = None,
        kv_receiver: KvReceiver | None = None,
    ) -> None:
        self.config = config
        self.runner = runner
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
        self.requests: dict[str, Req] = {}
        self._waiting: deque[Req] = deque()
        self._ready: deque[Req] = deque()
        self._prefilling: list[Req] = []
        self._decoding: list[Req] = []
        self._admit_counter = 0
        self._new_token_ratio = config.init_new_token_ratio
        self._cache_hit_rate = 0.0
        self._decode_since_report = 0
        self._metrics_due = False
        self._published_at = 0.0
        self._publish_timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._released = False
        self._closed = False
        self._idle_reported = False
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()
        # Decode mode: received KV waiting for its pages.
        self._received: dict[str, KvSink] = {}
        # A retraction while planning may hit a request already in the step's decode rows.
        self._retracted_during_plan = False

    # ----- lifecycle -----

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"scheduler-dp{self.dp_rank}"
            )

    async def close(self) -> None:
        """Stop stepping; every open stream ends with an abort."""
        self._closed = True
        self._wake.set()
        if self._publish_timer is not None:
            self._publish_timer.cancel()
            self._publish_timer = None
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

    def submit(self, req: Req) -> None:
        if req.rid in self.requests:
            self._refuse(req, _abort(f"duplicate request id {req.rid}", 400))
            return
        if self._closed:
            self._refuse(req, _abort("the engine is shutting down"))
            return
        if self._released:
            self._refuse(req, _abort("the engine's memory is released", 503))
            return
        refusal = self.runner.unsupported(req)
        if refusal is not None:
            self._refuse(req, _abort(refusal, 400))
            return
        self.requests[req.rid] = req
        self.runner.add(req)
        if self.mode == "decode" and req.bootstrap_host != FAKE_BOOTSTRAP_HOST:
            if None in (req.bootstrap_host, req.bootstrap_port, req.bootstrap_room):
                self._terminate(
                    req,
                    _abort(
                        "a decode-mode engine needs bootstrap_host, bootstrap_port and "
                        "bootstrap_room (the request's prefill leg)",
                        400,
                    ),
                )
                return
            req.state = RECEIVING
            req.task = self._spawn(self._receive(req), f"kv-receive-{req.rid}")
        else:
            req.state = WAITING
            self._waiting.append(req)
        self._wake.set()

    def _refuse(self, req: Req, reason: dict[str, Any]) -> None:
        req.state = DONE
        req.channel.push(self._item(req, [], [], reason), final=True)

    def abort(self, rid: str, message: str = "aborted by request") -> bool:
        """End ``rid`` wherever it is (waiting, running, in a KV transfer); False if unknown."""
        req = self.requests.get(rid)
        if req is None:
            return False
        self._release_decode_peer(req)
        self._terminate(req, _abort(message))
        self._wake.set()
        return True

    def _release_decode_peer(self, req: Req) -> None:
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
        try:
            while not self._closed:
                batch = None if self._paused else self._plan()
                if batch is None:
                    if not self._idle_reported:
                        self._idle_reported = True
                        self._metrics_due = True  # the idle report
                        self._publish_soon()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                self._idle_reported = False
                try:
                    out = await self.runner.forward(batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # The step's requests cannot continue (their KV is unknown); the rest can.
                    log.exception("dp%d: a forward step failed", self.dp_rank)
                    for req, _, _ in batch.prefill:
                        self._terminate(req, _abort(f"the model failed: {exc!r}"))
                    for req in batch.decode:
                        self._terminate(req, _abort(f"the model failed: {exc!r}"))
                    self._decoding = [r for r in self._decoding if r.state == DECODING]
                    continue
                self._apply(batch, out)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("scheduler dp%d crashed", self.dp_rank)
            self._closed = True
            for req in list(self.requests.values()):
                self._terminate(req, _abort(f"the scheduler crashed: {exc!r}"))

    def _plan(self) -> ForwardBatch | None:
        batch = ForwardBatch()
        cfg = self.config

        # Decode-mode arrivals whose KV is here: straight into the running batch.
        while self._ready and self.num_running < cfg.max_running_requests:
            req = self._ready[0]
            if not self._admit_ready(req):
                break
            if self._ready and self._ready[0] is req:
                self._ready.popleft()

        # Decode: every fully prefilled request gets one token; make room for its KV.
        if self._decoding:
            page = self.page_size
            for req in list(self._decoding):
                if req.state != DECODING:
                    continue  # retracted just now
                if req.kv_len >= len(req.page_table) * page and not self._grow(req):
                    continue
                batch.decode.append(req)

        # Prefill: continue the chunked request(s), then admit from the waiting queue.
        budget = cfg.max_prefill_tokens
        if cfg.chunked_prefill_size > 0:
            budget = min(budget, cfg.chunked_prefill_size)
        chunk_limit = cfg.chunked_prefill_size > 0
        chunks = batch.prefill
        for req in self._prefilling:
            if budget <= 0:
                break
            remaining = req.target - req.kv_len
            n = min(remaining, budget) if chunk_limit else remaining
            chunks.append((req, req.kv_len, n))
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
                chunks.append((req, req.kv_len, n))
                budget -= n

        if batch.decode and self._retracted_during_plan:
            batch.decode = [r for r in batch.decode if r.state == DECODING]
        self._retracted_during_plan = False
        if not chunks and not batch.decode:
            return None
        if chunks:
            batch.sample = [r for r, start, n in chunks if start + n >= r.target]
            batch.sample.extend(batch.decode)
        else:
            batch.sample = batch.decode.copy()
        running = self.num_running
        if running > self.stats.max_running:
            self.stats.max_running = running
        return batch

    def _apply(self, batch: ForwardBatch, out: StepOutput) -> None:
        stats = self.stats
        stats.steps += 1
        stats.forward_seconds += out.seconds
        finished_any = False
        if out.failed:
            for i, why in out.failed.items():
                req = batch.sample[i]
                self._release_decode_peer(req)
                self._terminate(req, _abort(why, 500))
            finished_any = True
        tokens = out.tokens
        logprobs = out.logprobs

        if batch.prefill:
            # Where each finishing prefill's token is (they come first in ``sample``).
            first_decode = len(batch.sample) - len(batch.decode)
            sampled = {id(r): i for i, r in enumerate(batch.sample[:first_decode])}
            stats.prefill_steps += 1
            computed = 0
            hit = 0
            for req, _, n in batch.prefill:
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
                    i = sampled[id(req)]
                    lp = logprobs[i] if logprobs is not None else None
                    if self._prefill_done(req, tokens[i], lp):
                        finished_any = True
            stats.prefill_tokens += computed
            stats.cached_prompt_tokens += hit
            if computed + hit:
                self._cache_hit_rate = hit / (computed + hit)

        if batch.decode:
            stats.decode_steps += 1
            self._decode_since_report += 1
            if self._new_token_ratio > self.config.min_new_token_ratio:
                self._new_token_ratio = max(
                    self.config.min_new_token_ratio,
                    self._new_token_ratio - self.config.new_token_ratio_decay,
                )
            first = len(batch.sample) - len(batch.decode)
            if self._decode_batch(batch.decode, tokens, logprobs, first):
                finished_any = True

        if finished_any:
            self._decoding = [r for r in self._decoding if r.state == DECODING]

        if batch.prefill or self._decode_since_report >= self.config.decode_log_interval:
            self._decode_since_report = 0
            self._metrics_due = True
        if self._metrics_due or self.cache.has_events:  # else nothing to publish: no clock read
            self._publish_soon(now_only=True)

    def _decode_batch(
        self,
        batch: list[Req],
        tokens: list[int],
        logprobs: list[TokenLogprob | None] | None,
        first: int,
    ) -> bool:
        """One decode token for each request; True if any finished."""
        finished_any = False
        stats = self.stats
        produced = 0
        for k, req in enumerate(batch, first):
            if req.state != DECODING:
                continue
            req.kv_len += 1
            out = req.output_ids
            tok = tokens[k]
            out.append(tok)
            produced += 1
            n = len(out)
            if n >= req.max_new_tokens:
                reason: dict[str, Any] | None = {"type": "length", "length": req.max_new_tokens}
            elif not req.ignore_eos and tok in req.stop_ids:
                reason = {"type": "stop", "matched": tok}
            else:
                reason = None
            channel = req.channel
            # A stream that has not read its last increment yet takes the token into it (what
            # push would merge) without a new item: the common case when steps are quicker
            # than the streams (a fast simulated engine, a busy worker).
            if req.return_logprob or not channel.merge_token(tok, n, reason):
                meta: dict[str, Any] = {
                    "id": req.rid,
                    "finish_reason": reason,
                    "prompt_tokens": req.prompt_len,
                    "completion_tokens": n,
                    "cached_tokens": req.cached_tokens,
                }
                if req.return_logprob:
                    lp = logprobs[k] if logprobs is not None else None
                    _logprob_meta(meta, req, [tok], [lp])
                item = {"text": "", "output_ids": [tok], "index": 0, "meta_info": meta}
                channel.push(item, final=reason is not None)
            if reason is not None:
                self._release(req, insert=True)
                req.state = DONE
                del self.requests[req.rid]
                self.runner.remove(req)
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

    def _admit(self, req: Req, reserve: float) -> tuple[bool, float]:
        """Match, lock and give pages to ``req``'s sequence; returns (admitted, new reserve)."""
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
        own = cache.alloc(need)
        if own is None:
            cache.unlock(match)
            return False, reserve
        req.match = match
        req.locked_pages = match.num_pages
        req.page_table = match.page_ids() + own if match.num_pages else own
        req.kv_len = match.num_tokens
        req.target = seq_len
        if req.cached_tokens < 0:
            req.cached_tokens = match.num_tokens
        self._admit_counter += 1
        req.admit_seq = self._admit_counter
        req.state = PREFILLING
        self._prefilling.append(req)
        return True, reserve + future_reserve

    def _admit_ready(self, req: Req) -> bool:
        """Decode mode: a request whose KV arrived takes a running slot and its pages."""
        need = -(-req.prompt_len // self.page_size)
        if need > self.cache.total_pages:
            self._terminate(req, _abort("the prompt does not fit in the KV cache", 400))
            return True
        own = self.cache.alloc(need)
        if own is None:
            return False
        req.match = None
        req.locked_pages = 0
        req.page_table = own
        sink = self._received.pop(req.rid, None)
        if sink is not None:
            self.runner.kv_import(req, sink)
        req.kv_len = req.prompt_len
        req.target = req.prompt_len
        req.cached_tokens = 0
        self._admit_counter += 1
        req.admit_seq = self._admit_counter
        first = req.first_token
        assert first is not None
        req.state = DECODING
        self._decoding.append(req)
        self._emit_token(req, first, req.first_logprob)
        return True

    def _grow(self, req: Req) -> bool:
        """One more page for a decoding request, retracting others if need be; False if
        ``req`` itself was retracted or aborted."""
        cache = self.cache
        while (page := cache.alloc(1)) is None:
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
        req.page_table.extend(page)
        return True

    def _latest_running(self) -> Req | None:
        latest: Req | None = None
        for req in self._prefilling:
            if latest is None or req.admit_seq > latest.admit_seq:
                latest = req
        for req in self._decoding:
            if req.state == DECODING and (latest is None or req.admit_seq > latest.admit_seq):
                latest = req
        return latest

    def _retract(self, req: Req) -> None:
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
        self._retracted_during_plan = True
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

    def _checkpoint(self, req: Req) -> None:
        """Put the request's computed full pages into the tree and hold them locked (SGLang's
        ``cache_unfinished_req``)."""
        cache = self.cache
        full = req.kv_len // self.page_size
        if full <= req.locked_pages:
            return
        m2 = cache.adopt(req.fill[: full * self.page_size], req.page_table, req.locked_pages)
        cache.lock(m2)
        if req.match is not None:
            cache.unlock(req.match)
        req.match = m2
        req.locked_pages = m2.num_pages

    def _release(self, req: Req, *, insert: bool) -> None:
        """Give back the request's KV; with ``insert`` its computed full pages stay cached."""
        if req.state in (WAITING, RECEIVING, READY, DONE) or (
            req.match is None and not req.page_table
        ):
            return
        cache = self.cache
        table = req.page_table
        held = req.locked_pages
        if insert and self.mode != "decode" and req.kv_len >= self.page_size:
            full = req.kv_len // self.page_size
            if full > held:
                tokens = req.fill if req.state == PREFILLING else req.input_ids + req.output_ids
                cache.adopt(tokens[: full * self.page_size], table, held)
                held = full
        if len(table) > held:
            cache.pool.free(table[held:])
        if req.match is not None:
            cache.unlock(req.match)
        req.match = None
        req.page_table = []
        req.locked_pages = 0

    # ----- prefill completion and disaggregation -----

    def _prefill_done(self, req: Req, tok: int, lp: TokenLogprob | None) -> bool:
        """The prefill's forward sampled the next token; True if the request finished."""
        if self.mode == "prefill":
            req.output_ids.append(tok)
            self.stats.output_tokens += 1
            if (
                req.bootstrap_host is None
                or req.bootstrap_host == FAKE_BOOTSTRAP_HOST
                or req.bootstrap_room is None
                or self.kv_sender is None
            ):
                self._finish(req, [tok], [lp], _length(1))
                return True
            # Keep the KV, give up the running slot, and send it in the background.
            req.state = SENDING
            req.first_logprob = lp
            req.task = self._spawn(self._send(req, tok), f"kv-send-{req.rid}")
            return True
        req.state = DECODING
        self._decoding.append(req)
        return self._emit_token(req, tok, lp)

    def _emit_token(self, req: Req, tok: int, lp: TokenLogprob | None) -> bool:
        """Append a just-sampled token (not via the decode loop), stream it and check for a
        finish; True if finished."""
        if req.state != DECODING:
            return False
        out = req.output_ids
        i = len(out)
        if i >= req.max_new_tokens:  # max_new_tokens=0: a prefill-only request
            self._finish(req, [], [], _length(req.max_new_tokens))
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
            req.channel.push(self._item(req, [tok], [lp], None))
            return False
        self._finish(req, [tok], [lp], reason)
        return True

    async def _send(self, req: Req, tok: int) -> None:
        sender = self.kv_sender
        assert sender is not None and req.bootstrap_room is not None
        try:
            await sender.send(
                room=req.bootstrap_room,
                num_tokens=req.prompt_len,
                first_token=tok,
                rid=req.rid,
                layout=self.runner.kv_layout,
                payload=self.runner.kv_export(req, req.prompt_len),
                extra=_LOGPROB_ENCODER.encode(req.first_logprob),
            )
        except TransferError as exc:
            self._terminate(req, _abort(f"KV transfer failed: {exc}"))
        except Exception as exc:
            # Anything else is a bug or a bad argument; the stream must still end.
            log.exception("dp%d: sending the KV of %s failed", self.dp_rank, req.rid)
            self._terminate(req, _abort(f"KV transfer failed: {exc!r}"))
        else:
            if req.state == SENDING:
                self._finish(req, [tok], [req.first_logprob], _length(1))
        finally:
            self._wake.set()

    async def _receive(self, req: Req) -> None:
        receiver = self.kv_receiver
        assert req.bootstrap_host is not None
        assert req.bootstrap_port is not None and req.bootstrap_room is not None
        if receiver is None:
            self._terminate(req, _abort("this engine has no KV receiver (not in decode mode)"))
            return
        sink = self.runner.kv_sink(req, req.prompt_len)
        try:
            tok, extra = await receiver.receive(
                host=req.bootstrap_host,
                port=req.bootstrap_port,
                room=req.bootstrap_room,
                num_tokens=req.prompt_len,
                rid=req.rid,
                layout=self.runner.kv_layout,
                sink=sink,
            )
            lp = _LOGPROB_DECODER.decode(extra) if extra else None
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
        req.first_logprob = lp
        self._received[req.rid] = sink
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

    def _item(
        self,
        req: Req,
        toks: list[int],
        lps: list[TokenLogprob | None],
        reason: dict[str, Any] | None,
    ) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "id": req.rid,
            "finish_reason": reason,
            "prompt_tokens": req.prompt_len,
            "completion_tokens": len(req.output_ids),
            "cached_tokens": max(req.cached_tokens, 0),
        }
        if req.return_logprob:
            _logprob_meta(meta, req, toks, lps)
        return {"text": "", "output_ids": toks, "index": 0, "meta_info": meta}

    def _finish(
        self,
        req: Req,
        toks: list[int],
        lps: list[TokenLogprob | None],
        reason: dict[str, Any],
    ) -> None:
        """Normal end: final item, KV into the cache, bookkeeping."""
        if req.state == DONE:
            return
        req.channel.push(self._item(req, toks, lps, reason), final=True)
        self._release(req, insert=True)
        self._unlist(req)
        req.state = DONE
        self.requests.pop(req.rid, None)
        self.runner.remove(req)
        self.stats.finished += 1

    def _terminate(self, req: Req, reason: dict[str, Any]) -> None:
        """Abnormal end (abort, transfer failure, shutdown): final item with no new tokens."""
        if req.state == DONE:
            return
        task = req.task
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()
        req.channel.push(self._item(req, [], [], reason), final=True)
        self._release(req, insert=True)
        self._unlist(req)
        req.state = DONE
        self.requests.pop(req.rid, None)
        self._received.pop(req.rid, None)
        self.runner.remove(req)
        self.stats.aborted += 1

    def _unlist(self, req: Req) -> None:
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

    def _publish_soon(self, *, now_only: bool = False) -> None:
        """Publish pending events (and the metrics report, if one is due) now if the last
        publication is ``publish_interval`` old, else -- unless ``now_only`` (a busy step:
        the next step will look again) -- when it is."""
        wait = self._published_at + self.config.publish_interval - time.monotonic()
        if wait <= 0:
            self._published_at = time.monotonic()
            if self._publish_timer is not None:
                self._publish_timer.cancel()
                self._publish_timer = None
            self._publish_events()
            if self._metrics_due:
                self._metrics_due = False
                self._publish_metrics()
        elif not now_only and self._publish_timer is None:
            self._publish_timer = asyncio.get_running_loop().call_later(wait, self._on_timer)

    def _on_timer(self) -> None:
        self._publish_timer = None
        if not self._closed:
            self._publish_soon()

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
