"""The torch model runner: one real forward per scheduler step, over the paged KV cache.

Each step is one flat row of tokens (every prefill chunk, then one token per decoding request)
through transformers' model code with the paged attention (``attention.py``), the LM head on
the rows that sample only, guided rows masked to what their grammar allows (``grammar.py``),
then sampling (``sampling.py``). What the step needs from the
scheduler's requests (tokens, positions, page tables, sampling parameters) is copied on the
event loop before the forward starts; the forward itself runs on the engine's one model
thread under ``torch.inference_mode``, so the event loop keeps serving while the model runs.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from shared.engine.cpu.request import Req
from shared.engine.cpu.runner import ForwardBatch, KvSink, StepOutput
from shared.engine.pytorch.attention import PagedStep
from shared.engine.pytorch.grammar import GrammarState, apply_bitmask, bitmask_words
from shared.engine.pytorch.kv_cache import KvPages, PagedKvCache, ReceivedKv
from shared.engine.pytorch.model import LoadedModel
from shared.engine.pytorch.sampling import SampleRow, sample

__all__ = ["TorchRunner"]


class _Plan:
    """A step copied out of the scheduler's requests (built on the event loop)."""

    __slots__ = ("bitmask", "guided", "input_ids", "positions", "rows", "sample_index", "step")

    def __init__(self, batch: ForwardBatch, cache: PagedKvCache) -> None:
        ids: list[int] = []
        positions: list[int] = []
        sample_index: list[int] = []
        prefill: list[tuple[list[int], int, int]] = []
        for req, start, length in batch.prefill:
            ids.extend(req.fill[start : start + length])
            positions.extend(range(start, start + length))
            prefill.append((req.page_table, start, length))
            if start + length >= req.target:
                sample_index.append(len(ids) - 1)
        decode: list[tuple[list[int], int]] = []
        for req in batch.decode:
            sample_index.append(len(ids))
            ids.append(req.output_ids[-1])
            positions.append(req.kv_len)
            decode.append((req.page_table, req.kv_len))
        self.input_ids = torch.tensor([ids], dtype=torch.long)
        self.positions = torch.tensor([positions], dtype=torch.long)
        self.sample_index = torch.tensor(sample_index, dtype=torch.long)
        self.step = PagedStep.build(cache, prefill, decode)
        self.rows = [_sample_row(req) for req in batch.sample]
        # Guided rows: (row, matcher, outputs it has not consumed yet, output length, stops).
        self.guided: list[tuple[int, GrammarState, list[int], int, list[int]]] = []
        for i, req in enumerate(batch.sample):
            state = req.grammar
            if state is not None:
                out = req.output_ids
                stops = sorted(req.stop_ids)
                self.guided.append((i, state, list(out), len(out), stops))
        self.bitmask: Future[tuple[torch.Tensor, dict[int, str]]] | None = None


def _sample_row(req: Req) -> SampleRow:
    params = req.sampling
    generated = len(req.output_ids)
    # The token history only where a penalty reads it (a copy: the scheduler appends to the
    # request's list while the step runs).
    return SampleRow(
        params=params,
        position=len(req.input_ids) + generated,
        prompt=req.input_ids if params.repetition_penalty != 1.0 else [],
        output=list(req.output_ids) if params.penalized else [],
        logprobs=req.top_logprobs_num if req.return_logprob else -1,
        generated=generated,
    )


_Guided = list[tuple[int, GrammarState, list[int], int, list[int]]]


def _fill(guided: _Guided, vocab_size: int) -> tuple[torch.Tensor, dict[int, str]]:
    """Catch each guided row's matcher up on its outputs and compute its next-token bitmask
    (on the mask thread, while the forward runs); also the rows whose grammar is stuck, by
    sampled-row index, with why (the scheduler ends those requests)."""
    bitmask = torch.empty((len(guided), bitmask_words(vocab_size)), dtype=torch.int32)
    stuck: dict[int, str] = {}
    for k, (row, state, pending, total, stops) in enumerate(guided):
        state.sync(pending, total)
        why = state.fill(bitmask, k, stops)
        if why is not None:
            stuck[row] = why
    return bitmask, stuck


def _mask(logits: torch.Tensor, guided: _Guided, bitmask: torch.Tensor) -> None:
    """Mask the guided rows of ``logits`` (float32) to what their grammars allow."""
    if len(guided) == logits.shape[0]:  # every row guided: no gather and scatter
        apply_bitmask(logits, bitmask)
        return
    rows = torch.tensor([i for i, *_ in guided], dtype=torch.long)
    masked = logits.index_select(0, rows)
    apply_bitmask(masked, bitmask)
    logits.index_copy_(0, rows, masked)


class TorchRunner:
    """:class:`~shared.engine.cpu.runner.ModelRunner` over a real model (module docstring)."""

    def __init__(
        self,
        model: LoadedModel,
        cache: PagedKvCache,
        executor: ThreadPoolExecutor,
        mask_executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.model = model
        self.cache = cache
        self._executor = executor
        self._mask_executor = mask_executor

    @property
    def kv_layout(self) -> str:
        return self.cache.layout

    def unsupported(self, req: Req) -> str | None:
        guided = req.sampling.guided
        if guided and req.grammar is None:
            return f"guided decoding ({', '.join(guided)}) was not prepared for this request"
        return None

    def add(self, req: Req) -> None:
        pass

    def remove(self, req: Req) -> None:
        pass

    async def forward(self, batch: ForwardBatch) -> StepOutput:
        plan = _Plan(batch, self.cache)
        if plan.guided:
            if self._mask_executor is None:
                plan.bitmask = Future()
                plan.bitmask.set_result(_fill(plan.guided, self.model.vocab_size))
            else:
                plan.bitmask = self._mask_executor.submit(_fill, plan.guided, self.model.vocab_size)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, plan)

    def _run(self, plan: _Plan) -> StepOutput:
        started = time.perf_counter()
        with torch.inference_mode():
            hidden = self.model.body(
                input_ids=plan.input_ids,
                position_ids=plan.positions,
                use_cache=False,
                paged=plan.step,
            ).last_hidden_state
            tokens: list[int] = []
            logprobs = None
            stuck: dict[int, str] = {}
            if plan.rows:
                logits = self.model.lm_head(hidden[0].index_select(0, plan.sample_index))
                if plan.bitmask is not None:
                    logits = logits.float()
                    bitmask, stuck = plan.bitmask.result()
                    _mask(logits, plan.guided, bitmask)
                tokens, lps = sample(logits, plan.rows)
                if any(lp is not None for lp in lps):
                    logprobs = lps
        return StepOutput(tokens, logprobs, time.perf_counter() - started, failed=stuck or None)

    def kv_nbytes(self, num_tokens: int) -> int:
        return self.cache.nbytes(num_tokens)

    def kv_export(self, req: Req, num_tokens: int) -> KvPages:
        return KvPages(self.cache.read(req.page_table, num_tokens))

    def kv_sink(self, req: Req, num_tokens: int) -> ReceivedKv:
        return ReceivedKv(self.cache, num_tokens)

    def kv_import(self, req: Req, sink: KvSink) -> None:
        if not isinstance(sink, ReceivedKv):
            raise TypeError(f"not a torch KV buffer: {type(sink).__name__}")
        self.cache.write(req.page_table, sink.data)

    async def close(self) -> None:
        pass
