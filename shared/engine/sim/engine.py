"""``SimEngine``: the CPU engine with the simulated runner (``--engine sim``).

For scale tests and benchmarks of the mesh (like the reference's mocker): everything a real
engine does to the mesh -- batching, prefix caching, KV events, load metrics, disaggregation --
at a GPU's speed (``--speedup-ratio``) and without a model. Its tokens are word-like but
meaningless; ``--engine torch`` serves real answers.

Defaults where the command line is silent: ``max_total_tokens`` 400,000 per DP rank (roughly
what 80 GB leave for Llama-3-8B's KV after weights and activations); ``kv_bytes_per_token``
from ``config.json`` (layers x 2 x KV heads x head dim x 2 bytes), else 131,072 (Llama-3-8B
in bf16). Tokens come from the model directory's ``tokenizer.json`` (``tokens.py``); a path that
is not a local directory (a hub id) gives the fallback vocabulary.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shared.engine.cpu.engine import CpuConfig, CpuEngine, cpu_config_fields
from shared.engine.cpu.runner import ModelRunner
from shared.engine.sim.cost import CostModel
from shared.engine.sim.runner import TIMESLICE_S, SimRunner
from shared.engine.sim.tokens import Vocabulary

if TYPE_CHECKING:
    from shared.engine.args import EngineArgs

__all__ = ["DEFAULT_KV_BYTES_PER_TOKEN", "SimConfig", "SimEngine", "sim_config"]

DEFAULT_KV_BYTES_PER_TOKEN = 131_072


@dataclass(slots=True, kw_only=True)
class SimConfig(CpuConfig):
    speedup_ratio: float = 1.0
    # > 0: requests stop early with eos after a drawn length of this mean.
    output_len_mean: float = 0.0
    # Seconds of back-to-back sub-millisecond steps before the loop is handed back (runner.py).
    timeslice_s: float = TIMESLICE_S
    kv_bytes_per_token: int | None = None
    cost: CostModel = field(default_factory=CostModel)

    def __post_init__(self) -> None:
        CpuConfig.__post_init__(self)
        if self.speedup_ratio < 0:
            raise ValueError("speedup_ratio must be >= 0 (0 = no simulated delays)")
        if self.output_len_mean < 0:
            raise ValueError("output_len_mean must be >= 0")
        if self.timeslice_s < 0:
            raise ValueError("timeslice_s must be >= 0")
        if self.kv_bytes_per_token is not None and self.kv_bytes_per_token < 1:
            raise ValueError("kv_bytes_per_token must be >= 1")


def _kv_bytes_per_token(config: dict[str, Any]) -> int:
    try:
        layers = int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or int(config["hidden_size"]) // heads)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return DEFAULT_KV_BYTES_PER_TOKEN
    value = layers * 2 * kv_heads * head_dim * 2
    return value if value > 0 else DEFAULT_KV_BYTES_PER_TOKEN


class SimEngine(CpuEngine):
    """The simulated SGLang engine (see the module docstring)."""

    kind = "sim"
    accepts_images = True
    default_max_total_tokens = 400_000
    config: SimConfig

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config)
        self.kv_bytes_per_token = config.kv_bytes_per_token or _kv_bytes_per_token(
            self.model_config
        )
        self.vocab: Vocabulary = Vocabulary.fallback()
        self.eos_token_ids = self.vocab.eos_token_ids

    async def _load(self) -> None:
        self.vocab = await asyncio.to_thread(
            Vocabulary.from_model_dir, self.config.model_path or None
        )
        self.eos_token_ids = self.vocab.eos_token_ids

    def _make_runner(self, rank: int) -> ModelRunner:
        cfg = self.config
        return SimRunner(
            self.vocab,
            cost=cfg.cost,
            speedup_ratio=cfg.speedup_ratio,
            output_len_mean=cfg.output_len_mean,
            kv_bytes_per_token=self.kv_bytes_per_token,
            timeslice_s=cfg.timeslice_s,
        )

    def _describe(self) -> str:
        cfg = self.config
        return f", speedup {cfg.speedup_ratio:g}, timeslice {cfg.timeslice_s * 1e3:g} ms"


def sim_config(args: EngineArgs) -> SimConfig:
    """The simulated engine's settings from the same command line SGLang would get."""
    return SimConfig(
        **cpu_config_fields(args),
        kv_bytes_per_token=args.kv_bytes_per_token,
        speedup_ratio=args.speedup_ratio,
        output_len_mean=args.sim_output_len_mean,
        timeslice_s=args.sim_timeslice_ms / 1e3,
    )
