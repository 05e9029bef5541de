"""``TorchEngine``: the CPU engine with the torch runner (``--engine torch``), real answers.

The model (``model.py``) is loaded once per engine and shared by its DP ranks; each rank has
its own KV cache tensors and runner, and every forward runs on one model thread (one engine's
ranks take turns: on a CPU they would only fight over the same cores).

Where the command line is silent:

- ``--dtype auto`` is float32 (the parity tests' reference); ``bfloat16`` is the option;
- ``--max-total-tokens`` defaults to what ``--mem-fraction-static`` (default 0.1 on a CPU) of
  the machine's RAM holds in this model's KV, between 4,096 and 131,072 tokens per rank. The
  pool is allocated lazily, so RAM is used only as pages fill;
- ``--torch-threads 0`` uses every core this process may run on (its CPU affinity);
- ``--chunked-prefill-size`` defaults to 512 tokens (SGLang sizes it for a GPU, 8,192 here):
  on a CPU a 512-token chunk is already an efficient matmul (~0.5 s for this model), and a
  long prompt then stalls the running streams for one such chunk per step, not for seconds;
- eos ids come from ``generation_config.json``, else ``config.json``, as transformers'
  ``generate`` reads them;
- guided decoding (``json_schema``, ``regex``, ``ebnf``, ``structural_tag``) compiles on a
  grammar thread of its own before the request reaches the scheduler (``grammar.py``); a
  bad spec is a 400. A mask thread computes each step's token masks while the model thread
  runs the forward, so masks cost the step only what does not overlap;
- ``OMP_WAIT_POLICY`` is ``PASSIVE`` unless the environment says otherwise: torch's OpenMP
  threads then sleep between parallel regions instead of spinning. On a machine the worker
  shares (with the processor, NATS, another worker -- ``sglmesh run`` does exactly that) a
  spinning thread waits whole scheduler timeslices for a descheduled peer: measured here under
  load, decode ran 10-20x slower spinning than sleeping. It must be set before torch loads,
  so the engine sets it when it is built;
- ``start`` ends with a warm-up: one greedy one-token request per DP rank (for the fake
  bootstrap host, so every disaggregation mode runs it alone), as SGLang's server warms up
  before it reports ready. The first forward of a fresh process costs ~1.2 s here against
  ~0.08 s after; without the warm-up the worker's first request -- often its own health
  canary, with a 3 s budget, on a machine still loading its peers -- paid for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from proto.request import FAKE_BOOTSTRAP_HOST
from shared.engine.cpu.engine import CpuConfig, CpuEngine, cpu_config_fields, model_config
from shared.engine.cpu.request import BadRequest, Req
from shared.engine.cpu.runner import ModelRunner

if TYPE_CHECKING:
    from shared.engine.args import EngineArgs
    from shared.engine.pytorch.grammar import GrammarBackend
    from shared.engine.pytorch.model import LoadedModel

__all__ = ["TorchConfig", "TorchEngine", "torch_config"]

log = logging.getLogger(__name__)

DEFAULT_MEM_FRACTION = 0.1
MIN_POOL_TOKENS = 4096
MAX_DEFAULT_POOL_TOKENS = 131_072
DEFAULT_CHUNKED_PREFILL_SIZE = 512


@dataclass(slots=True, kw_only=True)
class TorchConfig(CpuConfig):
    chunked_prefill_size: int | None = None  # None: DEFAULT_CHUNKED_PREFILL_SIZE
    dtype: str = "float32"
    threads: int = 0  # 0: every core this process may run on
    mem_fraction: float = DEFAULT_MEM_FRACTION

    def __post_init__(self) -> None:
        CpuConfig.__post_init__(self)
        if self.threads < 0:
            raise ValueError("threads must be >= 0")
        if not 0.0 < self.mem_fraction <= 1.0:
            raise ValueError("mem_fraction must be in (0, 1]")


def torch_config(args: EngineArgs) -> TorchConfig:
    """The torch engine's settings from the same command line SGLang would get."""
    dtype = {"auto": "float32", "float": "float32"}.get(args.dtype, args.dtype)
    return TorchConfig(
        **cpu_config_fields(args),
        dtype=dtype,
        threads=args.torch_threads,
        mem_fraction=args.mem_fraction_static or DEFAULT_MEM_FRACTION,
    )


def _eos_token_ids(model_path: str, config: dict[str, Any]) -> tuple[int, ...]:
    sources: list[Any] = []
    with contextlib.suppress(OSError, ValueError):
        sources.append(
            json.loads((Path(model_path) / "generation_config.json").read_text(encoding="utf-8"))
        )
    sources.append(config)
    for source in sources:
        value = source.get("eos_token_id") if isinstance(source, dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)
        if isinstance(value, list):
            ids = tuple(v for v in value if isinstance(v, int) and not isinstance(v, bool))
            if ids:
                return ids
    return ()


def _kv_bytes_per_token(config: dict[str, Any], dtype: str) -> int:
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or int(config.get("hidden_size") or 64) // heads)
    layers = int(config.get("num_hidden_layers") or 1)
    return layers * 2 * kv_heads * head_dim * (4 if dtype == "float32" else 2)


def _total_ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


class TorchEngine(CpuEngine):
    """The torch CPU engine (see the module docstring)."""

    kind = "torch"
    config: TorchConfig

    def __init__(self, config: TorchConfig) -> None:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        if config.chunked_prefill_size is None:
            config.chunked_prefill_size = DEFAULT_CHUNKED_PREFILL_SIZE
        if config.max_total_tokens is None:
            per_token = _kv_bytes_per_token(model_config(config.model_path), config.dtype)
            budget = int(_total_ram() * config.mem_fraction) // max(per_token, 1)
            self.default_max_total_tokens = max(
                MIN_POOL_TOKENS, min(MAX_DEFAULT_POOL_TOKENS, budget)
            )
        super().__init__(config)
        self.eos_token_ids = _eos_token_ids(config.model_path, self.model_config)
        self.model: LoadedModel | None = None
        self.threads = config.threads or len(os.sched_getaffinity(0))
        self._executor: ThreadPoolExecutor | None = None
        self.grammar_backend: GrammarBackend | None = None
        # One thread compiles grammars, one computes each step's masks beside the forward (a
        # slow compile never holds up a step); each starts with the first guided request.
        self._grammar_executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="torch-grammar"
        )
        self._mask_executor: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="torch-mask"
        )

    async def _load(self) -> None:
        from shared.engine.pytorch.model import load_model

        executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="torch-model", initializer=self._init_thread
        )
        self._executor = executor
        loop = asyncio.get_running_loop()
        self.model = await loop.run_in_executor(
            executor, lambda: load_model(self.config.model_path, dtype=self.config.dtype)
        )
        self.vocab_size = self.model.vocab_size

    async def start(self) -> None:
        warm = not self._started
        await super().start()
        if warm:
            await self._warm_up()

    async def _warm_up(self) -> None:
        started = time.perf_counter()
        bos = self.model_config.get("bos_token_id")
        token = bos if isinstance(bos, int) else 0
        for rank in range(self.config.dp_size):
            async for _ in self.async_generate(
                input_ids=[token],
                sampling_params={"max_new_tokens": 1, "temperature": 0.0},
                rid=f"warm-up-{rank}",
                bootstrap_host=FAKE_BOOTSTRAP_HOST,
                bootstrap_port=0,
                bootstrap_room=rank,
                data_parallel_rank=rank,
            ):
                pass
        log.info("torch engine warmed up in %.2f s", time.perf_counter() - started)

    def _init_thread(self) -> None:
        import torch

        torch.set_num_threads(self.threads)

    def _make_runner(self, rank: int) -> ModelRunner:
        from shared.engine.pytorch.kv_cache import PagedKvCache
        from shared.engine.pytorch.runner import TorchRunner

        model = self.model
        assert model is not None and self._executor is not None
        cache = PagedKvCache(
            num_layers=model.num_layers,
            num_kv_heads=model.num_kv_heads,
            head_dim=model.head_dim,
            num_pages=self.total_pages,
            page_size=self.page_size,
            dtype=model.dtype,
        )
        return TorchRunner(model, cache, self._executor, self._mask_executor)

    def _describe(self) -> str:
        return f", {self.config.dtype}, {self.threads} threads"

    async def _prepare(self, req: Req) -> None:
        guided = req.sampling.guided
        if not guided:
            return
        from shared.engine.pytorch.grammar import (
            DEFAULT_BACKEND,
            GrammarError,
            GrammarState,
            make_backend,
        )

        ((kind, spec),) = guided.items()
        if self._grammar_executor is None:
            raise BadRequest("the engine is shutting down")
        if self.grammar_backend is None:
            self.grammar_backend = make_backend(
                DEFAULT_BACKEND,
                self.config.model_path,
                self.vocab_size or 0,
                self.eos_token_ids,
            )
        backend = self.grammar_backend
        if kind not in backend.kinds:
            raise BadRequest(f"the torch engine does not support guided decoding by {kind}")
        loop = asyncio.get_running_loop()
        try:
            matcher = await loop.run_in_executor(
                self._grammar_executor, backend.matcher, kind, spec
            )
        except GrammarError as exc:
            raise BadRequest(str(exc)) from None
        req.grammar = GrammarState(matcher)

    async def shutdown(self) -> None:
        await super().shutdown()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        for executor in (self._grammar_executor, self._mask_executor):
            if executor is not None:
                executor.shutdown(wait=False, cancel_futures=True)
        self._grammar_executor = self._mask_executor = None
