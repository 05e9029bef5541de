"""The simulated model runner: a GPU's step time from a cost model, and deterministic tokens.

Why: the mesh's routing, batching and backpressure are load-tested at scale on CPUs (like the
reference's mocker), which a real model on a CPU cannot do. Under the same scheduler as the
torch runner, this runner makes each step last what it would on a GPU (``cost.py``, divided by
``speedup_ratio``; 0 = do not sleep) and draws each request's tokens from ``tokens.py``, a pure
function of (seed, prompt, position), so a disaggregated pair produces exactly what one
aggregated engine produces and tests can assert exact outputs.

Steps sleep against a running deadline, so the scheduler's own CPU time does not add up.
A step whose remaining time is under ``MIN_SLEEP_S`` is not slept out on its own (the deadline
carries it): at speedups in the thousands a step lasts microseconds, the next step's tokens
are ready before the streams could take this one's, and the scheduler runs on for up to
``timeslice_s`` (``--sim-timeslice-ms``, default ``TIMESLICE_S``) before it hands the loop
back, so each stream wakes once for the tokens of several steps (one item, one frame) as it
would reading an engine in another process. The
py-spy profile of a worker at c=64 showed the per-step wake-ups of every stream (their task,
three generator layers, a frame each) as most of its CPU. Realistic step times (>= 1 ms)
sleep every step, as before; speedup 0 or a timeslice of 0 yields after every step (one
token per stream item, as the reference's mocker streams: what a like-for-like comparison of
the mesh's cost per token needs).
``min_new_tokens`` masks stop tokens as SGLang's penalizer does: a masked draw is replaced by
another ordinary token. Logprobs are made up but well formed (``TokenGenerator.logprobs``).

Disaggregation moves ``kv_bytes_per_token`` stand-in bytes per prompt token (a function of the
bootstrap room, so a mix-up between rooms fails the transfer's checksum); the receiving side
checks and discards them.
"""

from __future__ import annotations

import asyncio
import hashlib
import types
from collections.abc import Generator, Iterator

from shared.engine.cpu.request import Req, TokenLogprob
from shared.engine.cpu.runner import ForwardBatch, StepOutput
from shared.engine.sim.cost import CostModel
from shared.engine.sim.tokens import TokenGenerator, Vocabulary, prompt_hash

__all__ = ["MIN_SLEEP_S", "TIMESLICE_S", "SimRunner"]

# A simulated step shorter than this (what remains of it on the running deadline) is not
# slept out on its own: the deadline carries it to the next step that is.
MIN_SLEEP_S = 1e-3
# ... but the scheduler still hands the event loop back at least this often.
TIMESLICE_S = 5e-4


@types.coroutine
def _yield_now() -> Generator[None, None, None]:
    """One pass of the event loop, as ``asyncio.sleep(0)`` gives, without its call layers:
    with the timeslice at 0 the scheduler yields after every step."""
    yield


class _StandInKv:
    """``num_tokens x kv_bytes_per_token`` room-specific bytes, generated chunk by chunk."""

    def __init__(self, room: int, nbytes: int) -> None:
        self.room = room
        self.nbytes = nbytes

    def chunks(self, size: int) -> Iterator[bytes | memoryview]:
        seed = hashlib.blake2b(self.room.to_bytes(8, "big")).digest()
        block = memoryview((seed * (min(size, self.nbytes) // len(seed) + 1))[:size])
        sent = 0
        while sent < self.nbytes:
            n = min(size, self.nbytes - sent)
            yield block[:n]
            sent += n


class _Discard:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def write(self, offset: int, data: bytes | memoryview) -> None:
        pass


class SimRunner:
    """:class:`~shared.engine.cpu.runner.ModelRunner` for the simulated engine."""

    def __init__(
        self,
        vocab: Vocabulary,
        *,
        cost: CostModel | None = None,
        speedup_ratio: float = 1.0,
        output_len_mean: float = 0.0,
        kv_bytes_per_token: int = 131_072,
        timeslice_s: float = TIMESLICE_S,
    ) -> None:
        if speedup_ratio < 0:
            raise ValueError("speedup_ratio must be >= 0 (0 = no simulated delays)")
        if kv_bytes_per_token < 0:
            raise ValueError("kv_bytes_per_token must be >= 0")
        self.vocab = vocab
        self.cost = cost or CostModel()
        self.speedup_ratio = speedup_ratio
        self.output_len_mean = output_len_mean
        self.kv_bytes_per_token = kv_bytes_per_token
        self.timeslice_s = timeslice_s
        self._next_t = 0.0
        self._yielded_at = 0.0

    @property
    def kv_layout(self) -> str:
        return f"simulated KV, {self.kv_bytes_per_token} bytes per token"

    def unsupported(self, req: Req) -> str | None:
        return None  # a simulation: every sampling field is accepted and shapes nothing

    def add(self, req: Req) -> None:
        sampling = req.sampling
        req.runner_state = TokenGenerator(
            self.vocab,
            seed=sampling.seed,
            prompt_digest=prompt_hash(req.input_ids),
            output_len_mean=self.output_len_mean,
            # The request's own floor, even on a prefill leg that samples one token: its
            # stream then matches the decode leg's.
            min_new_tokens=sampling.min_new_tokens,
            ignore_eos=sampling.ignore_eos,
        )

    def remove(self, req: Req) -> None:
        req.runner_state = None

    async def forward(self, batch: ForwardBatch) -> StepOutput:
        seconds = self._step_seconds(batch)
        speedup = self.speedup_ratio
        if speedup > 0:
            loop = asyncio.get_running_loop()
            now = loop.time()
            if self._next_t < now:
                self._next_t = now
            self._next_t += seconds / speedup
            delay = self._next_t - now
            if delay >= MIN_SLEEP_S:
                # A step worth a timer: let the streams and the sockets run meanwhile.
                await asyncio.sleep(delay)
                self._yielded_at = loop.time()
            elif now - self._yielded_at >= self.timeslice_s:
                # The timeslice is used up: let them run, without arming a timer for the
                # microseconds left (the deadline carries them). A timer per step was half
                # the CPU of a step with the timeslice at 0.
                await _yield_now()
                self._yielded_at = loop.time()
            # else: the simulated GPU is far quicker than this process (speedups in the
            # thousands), so the next step's tokens are ready before the streams could
            # take this one's: run on, and each stream takes the tokens of several steps
            # in one item, as from an engine in another process.
        else:
            await asyncio.sleep(0)
        tokens: list[int] = []
        logprobs: list[TokenLogprob | None] | None = None
        for k, req in enumerate(batch.sample):
            gen: TokenGenerator | None = req.runner_state
            if gen is None:  # aborted while the step ran: any token, it is dropped
                tokens.append(self.vocab.ordinary[0])
                continue
            i = len(req.output_ids)
            tok = gen.token(i)
            if i < req.min_new_tokens and tok in req.stop_ids:
                tok = self._resample(gen, req, i, tok)
            tokens.append(tok)
            if req.return_logprob:
                if logprobs is None:
                    logprobs = [None] * len(batch.sample)
                (lp, _, _), top = gen.logprobs(i, tok, req.top_logprobs_num)
                logprobs[k] = (lp, [(v, t) for v, t, _ in top] if top else None)
        return StepOutput(tokens, logprobs, seconds)

    def _step_seconds(self, batch: ForwardBatch) -> float:
        cost = self.cost
        seconds = 0.0
        if batch.prefill:
            seconds += cost.prefill_overhead_s
            for _, start, n in batch.prefill:
                seconds += cost.chunk_time(n, start + n)
        decode = batch.decode
        if decode:
            kv_tokens = len(decode)
            for r in decode:
                kv_tokens += r.kv_len
            seconds += cost.decode_time(len(decode), kv_tokens)
        return seconds

    @staticmethod
    def _resample(gen: TokenGenerator, req: Req, i: int, tok: int) -> int:
        attempt = 0
        while tok in req.stop_ids:
            attempt += 1
            tok = gen.alternative(i, attempt)
            if attempt > 64:
                break
        return tok

    def kv_nbytes(self, num_tokens: int) -> int:
        return num_tokens * self.kv_bytes_per_token

    def kv_export(self, req: Req, num_tokens: int) -> _StandInKv:
        return _StandInKv(req.bootstrap_room or 0, self.kv_nbytes(num_tokens))

    def kv_sink(self, req: Req, num_tokens: int) -> _Discard:
        return _Discard(self.kv_nbytes(num_tokens))

    def kv_import(self, req: Req, sink: object) -> None:
        pass  # nothing to write: the simulated pool holds no tensors

    async def close(self) -> None:
        pass
