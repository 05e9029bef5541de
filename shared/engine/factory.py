"""Choosing and building the engine a worker drives: SGLang on a GPU, else the simulator.

One log line says which engine was chosen and why (``--engine auto`` picks SGLang only when
the package is installed and a GPU is visible), so nobody wonders why a laptop serves
simulated tokens.
"""

from __future__ import annotations

import logging

from shared.engine.args import EngineArgs, resolve_engine_kind
from shared.engine.protocol import Engine
from shared.engine.sim.engine import SimConfig, SimEngine

log = logging.getLogger(__name__)


def sim_config(args: EngineArgs) -> SimConfig:
    """The simulated engine's settings from the same command line SGLang would get."""
    return SimConfig(
        model_path=args.model_path,
        served_model_name=args.model_name,
        page_size=args.page_size,
        max_total_tokens=args.max_total_tokens,
        max_running_requests=args.max_running_requests,
        max_prefill_tokens=args.max_prefill_tokens,
        chunked_prefill_size=args.chunked_prefill_size,
        context_length=args.context_length,
        dp_size=args.dp_size,
        disaggregation_mode=args.disaggregation_mode,
        bootstrap_port=args.disaggregation_bootstrap_port,
        kv_bytes_per_token=args.kv_bytes_per_token,
        bootstrap_timeout=args.bootstrap_timeout,
        kv_events_config=args.kv_events_config,
        enable_metrics=args.enable_metrics,
        speedup_ratio=args.speedup_ratio,
        output_len_mean=args.sim_output_len_mean,
        random_seed=args.random_seed,
        decode_log_interval=args.decode_log_interval,
    )


def create_engine(args: EngineArgs) -> Engine:
    """Build (not start) the engine ``args`` ask for. Raises EngineSelectionError."""
    kind, reason = resolve_engine_kind(args.engine)
    log.info("engine selected", extra={"engine": kind, "reason": reason})
    if kind == "sglang":
        from shared.engine.sglang_engine import SglangEngine

        return SglangEngine(args)
    if args.is_embedding:
        raise ValueError(
            "the simulated engine generates tokens only; embeddings need the encode service"
        )
    return SimEngine(sim_config(args))
