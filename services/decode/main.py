"""``python -m services.decode`` / ``sglmesh decode``: an aggregated or disaggregated decode worker.

Serves ``{ns}.backend.generate`` (and ``clear_kv_blocks``). Without ``--disaggregation-mode``
(or with ``null``/``agg``/``pd``) it is aggregated; ``--disaggregation-mode decode`` makes it
the decode half of a disaggregated pair, which needs ``bootstrap_info`` in every request.
"""

from __future__ import annotations

import sys

from services.decode.handler import DecodeHandler
from shared.engine.protocol import Engine
from shared.engine.registry import engine_kind
from shared.worker.args import PREFILL, WorkerConfig, parse_worker_args
from shared.worker.metrics import WorkerMetrics
from shared.worker.runner import llm_role, worker_main


def _handler(engine: Engine, config: WorkerConfig, metrics: WorkerMetrics) -> DecodeHandler:
    kind = engine_kind(engine.info.engine)
    return DecodeHandler(
        engine,
        disaggregation_mode=config.engine.disaggregation_mode,
        skip_tokenizer_init=config.engine.skip_tokenizer_init
        and not kind.min_tokens_without_tokenizer,
        metrics=metrics,
    )


def main(argv: list[str] | None = None, *, prog: str = "sglmesh decode") -> int:
    config = parse_worker_args(argv, prog=prog)
    if config.role == PREFILL:
        print(
            "sglmesh decode: error: --disaggregation-mode prefill is the prefill service "
            "(sglmesh prefill, or sglmesh worker)",
            file=sys.stderr,
        )
        return 2
    return worker_main(config, llm_role(_handler))
