"""transformers' model code against a hand-written Llama forward, over the same paged KV cache.

The torch engine runs transformers' own model definitions (every architecture comes along,
and they are the parity tests' reference). Would a forward written here, with the usual
fusions (one matmul for Q, K and V, one for gate and up), be much faster? This measures one
decode step of each on the same captured step (the same tokens, pages and attention),
checks that their logits agree, and reports CPU time per step (all threads; steadier than wall
time on a shared machine), interleaved, at batch 1 and 32.

Prints a table and writes ``bench/results/torch_forward.json``.

    python bench/torch_forward.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from shared.engine.pytorch import attention  # noqa: E402
from shared.engine.pytorch.engine import TorchConfig, TorchEngine  # noqa: E402
from shared.engine.pytorch.model import LoadedModel  # noqa: E402
from shared.model import prepare_default_model  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "torch_forward.json"


class HandWrittenLlama:
    """Llama's forward in plain torch ops over the paged attention, weights fused."""

    def __init__(self, model: LoadedModel) -> None:
        body: Any = model.body
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = model.num_kv_heads
        self.dim = model.head_dim
        self.eps = float(config.rms_norm_eps)
        self.inner = int(config.intermediate_size)
        self.embed = body.embed_tokens.weight
        self.norm = body.norm.weight
        self.lm_head = model.lm_head.weight
        self.layers = [
            (
                layer.input_layernorm.weight,
                torch.cat(
                    [
                        layer.self_attn.q_proj.weight,
                        layer.self_attn.k_proj.weight,
                        layer.self_attn.v_proj.weight,
                    ]
                ).contiguous(),
                layer.self_attn.o_proj.weight,
                layer.post_attention_layernorm.weight,
                torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight]).contiguous(),
                layer.mlp.down_proj.weight,
            )
            for layer in body.layers
        ]
        theta = float(config.rope_parameters["rope_theta"])
        inv = 1.0 / (theta ** (torch.arange(0, self.dim, 2).float() / self.dim))
        angles = torch.arange(int(config.max_position_embeddings)).float()[:, None] * inv
        table = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = table.cos(), table.sin()

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def forward(self, plan: Any) -> torch.Tensor:
        ids, positions = plan.input_ids[0], plan.positions[0]
        x = F.embedding(ids, self.embed)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        h, kv, d = self.heads, self.kv_heads, self.dim
        for index, (norm1, qkv, out, norm2, gate_up, down) in enumerate(self.layers):
            y = F.linear(self._rms(x, norm1), qkv)
            q = self._rotate(y[:, : h * d].view(-1, h, d), cos, sin)
            k = self._rotate(y[:, h * d : (h + kv) * d].view(-1, kv, d), cos, sin)
            v = y[:, (h + kv) * d :].view(-1, kv, d)
            layer = type("Layer", (), {"layer_idx": index})
            o, _ = attention.paged_attention(
                layer,  # type: ignore[arg-type]
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                None,
                scaling=d**-0.5,
                paged=plan.step,
            )
            x = x + F.linear(o[0].reshape(-1, h * d), out)
            g = F.linear(self._rms(x, norm2), gate_up)
            x = x + F.linear(F.silu(g[:, : self.inner]) * g[:, self.inner :], down)
        x = self._rms(x.index_select(0, plan.sample_index), self.norm)
        return F.linear(x, self.lm_head)


async def capture_steps() -> tuple[TorchEngine, dict[int, Any]]:
    """One decode step's plan at batch 1 and at batch 32 (200-token prompts)."""
    engine = TorchEngine(
        TorchConfig(model_path=str(prepare_default_model()), max_total_tokens=65536)
    )
    await engine.start()
    runner: Any = engine.runners[0]
    plans: dict[int, Any] = {}
    run = runner._run

    def capture(plan: Any) -> Any:
        if not plan.step.chunks and len(plan.rows) in (1, 32):
            plans.setdefault(len(plan.rows), plan)
        return run(plan)

    runner._run = capture
    rng = random.Random(0)

    async def one(rid: str) -> None:
        prompt = [rng.randrange(1000, 40000) for _ in range(200)]
        async for _ in engine.async_generate(
            input_ids=prompt,
            # Long enough that all 32 run decode-only steps once every prompt is prefilled.
            sampling_params={"max_new_tokens": 40, "temperature": 0, "ignore_eos": True},
            rid=rid,
        ):
            pass

    for batch in (1, 32):
        await asyncio.gather(*(one(f"{batch}-{i}") for i in range(batch)))
    runner._run = run
    await engine.shutdown()
    return engine, plans


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    engine, plans = asyncio.run(capture_steps())
    model = engine.runners[0].model  # type: ignore[attr-defined]
    hand = HandWrittenLlama(model)
    torch.set_num_threads(engine.threads)

    def transformers_step(plan: Any) -> torch.Tensor:
        hidden = model.body(
            input_ids=plan.input_ids, position_ids=plan.positions, use_cache=False, paged=plan.step
        ).last_hidden_state
        return model.lm_head(hidden[0].index_select(0, plan.sample_index))

    def cpu_ms(step: Any, plan: Any) -> float:
        started = time.process_time()
        for _ in range(10):
            step(plan)
        return (time.process_time() - started) / 10 * 1e3

    results: dict[str, Any] = {}
    print(f"{'batch':>5} {'transformers':>13} {'hand-written':>13} {'ratio':>6}   (CPU ms/step)")
    with torch.inference_mode():
        for batch, plan in sorted(plans.items()):
            diff = float((transformers_step(plan) - hand.forward(plan)).abs().max())
            ours, theirs = [], []
            for _ in range(args.rounds):
                ours.append(cpu_ms(transformers_step, plan))
                theirs.append(cpu_ms(hand.forward, plan))
            a, b = statistics.median(ours), statistics.median(theirs)
            results[str(batch)] = {
                "transformers_cpu_ms": a,
                "hand_written_cpu_ms": b,
                "speedup": a / b,
                "max_logit_diff": diff,
            }
            print(f"{batch:>5} {a:>13.1f} {b:>13.1f} {a / b:>5.2f}x   (max logit diff {diff:.1e})")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"threads": engine.threads, "steps": results}, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
