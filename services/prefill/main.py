"""``python -m services.prefill`` / ``sglmesh prefill``: a disaggregated prefill worker.

Serves ``{ns}.prefill.generate``: answers each request with its bootstrap info at once, runs
the prefill, and hands the KV to the decode worker that registered the same bootstrap room.
``--disaggregation-mode prefill`` is implied.
"""

from __future__ import annotations

from services.prefill.handler import PrefillHandler
from shared.engine.protocol import Engine
from shared.engine.registry import engine_kind
from shared.worker.args import PREFILL, WorkerConfig, parse_worker_args
from shared.worker.metrics import WorkerMetrics
from shared.worker.runner import llm_role, worker_main


def _handler(engine: Engine, config: WorkerConfig, metrics: WorkerMetrics) -> PrefillHandler:
    info, args = engine.info, config.engine
    return PrefillHandler(
        engine,
        bootstrap_host=info.bootstrap_host or "127.0.0.1",
        bootstrap_port=info.bootstrap_port or args.disaggregation_bootstrap_port,
        dp_size=info.dp_size,
        skip_tokenizer_init=args.skip_tokenizer_init
        and not engine_kind(info.engine).min_tokens_without_tokenizer,
        metrics=metrics,
    )


def main(argv: list[str] | None = None, *, prog: str = "sglmesh prefill") -> int:
    return worker_main(parse_worker_args(argv, prog=prog, role=PREFILL), llm_role(_handler))
