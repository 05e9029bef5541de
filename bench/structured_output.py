"""Guided decoding's cost on the torch engine: output tokens/s with and without a JSON schema.

In process, one engine (SmolLM2-135M-Instruct, float32). At concurrency 1 and 16, that many
requests start together and each generates exactly ``--tokens`` tokens: unconstrained ones
with ``ignore_eos``, constrained ones under a schema whose array needs more items than fit
(so neither stops early and both runs produce the same token count; every step of the
constrained run masks every row). Runs alternate, ``--repeats`` times; figures are medians;
the ratio is constrained over unconstrained (goal: >= 0.8x). On a machine shared with other
work tokens/s swing by up to 6x between runs, so the ratio of the fastest runs
(``ratio_best``) and the masking's own time per step are reported too
(``ratio_from_apply_time``: the ratio if only that differed).

Compile: per schema, the grammar backend's matcher for a spec it has not seen (cold: compile
and validate, then a matcher) and for the same spec again (cached: a matcher only), after the
one-time tokenizer build (reported on its own).

Prints a table and writes ``bench/results/structured_output.json``.

    python bench/structured_output.py [--quick] [--repeats 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results" / "structured_output.json"
GOAL = 0.8
# Records of a small inventory; minItems far above what fits in the token budget.
LOAD_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "store": {"type": "string", "maxLength": 16},
        "items": {
            "type": "array",
            "minItems": 200,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "kind": {"enum": ["tool", "food", "book", "toy"]},
                    "count": {"type": "integer", "minimum": 0},
                    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
                },
                "required": ["name", "kind", "count"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["store", "items"],
    "additionalProperties": False,
}
COMPILE_SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    },
    "inventory": LOAD_SCHEMA,
    "nested_enum_format": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40},
            "status": {"enum": ["draft", "published", "archived"]},
            "author": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "email": {"type": "string", "format": "email"},
                    "born": {"type": "string", "format": "date"},
                },
                "required": ["name"],
            },
            "score": {"type": "number", "minimum": 0, "maximum": 10},
            "links": {"type": "array", "items": {"type": "string", "format": "uri"}},
        },
        "required": ["title", "status", "author"],
    },
}
QUESTIONS = [
    "List the items in a small hardware store as JSON.",
    "Describe a toy shop's stock as JSON.",
    "Give me a bookshop inventory in JSON.",
    "What does a corner grocery keep in stock? Answer in JSON.",
]


class _MaskTimer:
    """Times the runner's masking: ``_fill`` (matchers catch up and compute bitmasks, on the
    mask thread beside the forward) and ``_mask`` (apply them, on the model thread, in the
    step's critical path). Independent of how busy the machine is, unlike tokens/s."""

    def __init__(self) -> None:
        from shared.engine.pytorch import runner

        self.seconds = {"_fill": 0.0, "_mask": 0.0}
        self.steps = 0
        self.rows = 0
        for name in self.seconds:
            setattr(runner, name, self._wrap(name, getattr(runner, name)))

    def _wrap(self, name: str, inner: Any) -> Any:
        def timed(guided_or_logits: Any, *args: Any) -> Any:
            started = time.perf_counter()
            out = inner(guided_or_logits, *args)
            self.seconds[name] += time.perf_counter() - started
            if name == "_fill":
                self.steps += 1
                self.rows += len(guided_or_logits)
            return out

        return timed

    def take(self) -> dict[str, float]:
        steps = max(self.steps, 1)
        out = {
            "fill_ms_per_step": round(1000 * self.seconds["_fill"] / steps, 3),
            "fill_ms_per_row": round(1000 * self.seconds["_fill"] / max(self.rows, 1), 4),
            "apply_ms_per_step": round(1000 * self.seconds["_mask"] / steps, 3),
        }
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.steps = self.rows = 0
        return out


async def _run(engine: Any, prompts: list[list[int]], tokens: int, schema: str | None) -> float:
    """Output tokens/s of ``len(prompts)`` requests started together."""
    params: dict[str, Any] = {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}
    if schema is not None:
        params["json_schema"] = schema

    async def one(i: int, ids: list[int]) -> int:
        n = 0
        async for item in engine.async_generate(
            input_ids=ids, sampling_params=params, rid=f"{time.monotonic_ns()}-{i}"
        ):
            n += len(item["output_ids"])
            reason = item["meta_info"]["finish_reason"]
            if reason is not None and reason["type"] == "abort":
                raise RuntimeError(reason["message"])
        return n

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    elapsed = time.perf_counter() - started
    assert all(c == tokens for c in counts), counts
    return sum(counts) / elapsed


def _compile_times(engine: Any) -> dict[str, Any]:
    backend = engine.grammar_backend
    assert backend is not None  # built by the warm-up's first guided request
    out: dict[str, Any] = {}
    for name, schema in COMPILE_SCHEMAS.items():
        # A spec the cache has not seen (the warm-up compiled LOAD_SCHEMA as json.dumps does).
        spec = json.dumps(schema, indent=1)
        started = time.perf_counter()
        backend.matcher("json_schema", spec)
        cold = time.perf_counter() - started
        again = []
        for _ in range(5):
            started = time.perf_counter()
            backend.matcher("json_schema", spec)
            again.append(time.perf_counter() - started)
        out[name] = {
            "cold_ms": round(cold * 1000, 3),
            "cached_ms": round(statistics.median(again) * 1000, 3),
        }
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from shared.engine.pytorch.engine import TorchConfig, TorchEngine
    from shared.model import prepare_default_model
    from tests.real_model import chat_ids

    timer = _MaskTimer()
    engine = TorchEngine(TorchConfig(model_path=str(prepare_default_model())))
    await engine.start()
    try:
        prompts = [chat_ids([{"role": "user", "content": q}]) for q in QUESTIONS]
        schema = json.dumps(LOAD_SCHEMA)
        # Warm-up: the first guided request builds the tokenizer trie (timed on its own).
        started = time.perf_counter()
        await _run(engine, prompts[:1], 4, schema)
        first_guided = time.perf_counter() - started
        await _run(engine, prompts[:1], 4, None)
        results: dict[str, Any] = {"throughput": {}}
        for concurrency in args.concurrency:
            batch = [prompts[i % len(prompts)] for i in range(concurrency)]
            plain: list[float] = []
            guided: list[float] = []
            timer.take()
            for _ in range(args.repeats):
                plain.append(await _run(engine, batch, args.tokens, None))
                guided.append(await _run(engine, batch, args.tokens, schema))
            p, g = statistics.median(plain), statistics.median(guided)
            best_p, best_g = max(plain), max(guided)
            mask = timer.take()
            results["throughput"][str(concurrency)] = {
                "plain_tokens_per_s": round(p, 2),
                "json_schema_tokens_per_s": round(g, 2),
                "ratio": round(g / p, 3),
                # The fastest run of each: the one least slowed by other work on the machine.
                "best_plain_tokens_per_s": round(best_p, 2),
                "best_json_schema_tokens_per_s": round(best_g, 2),
                "ratio_best": round(best_g / best_p, 3),
                "goal": GOAL,
                **mask,
                "step_ms_plain": round(1000 * concurrency / p, 2),
                # What the ratio would be if only the masking's critical path differed.
                "ratio_from_apply_time": round(
                    (1000 * concurrency / p) / (1000 * concurrency / p + mask["apply_ms_per_step"]),
                    3,
                ),
                "runs_plain": [round(x, 2) for x in plain],
                "runs_json_schema": [round(x, 2) for x in guided],
            }
            print(
                f"concurrency {concurrency:3}: plain {p:8.1f} tok/s   json_schema {g:8.1f} "
                f"tok/s   ratio {g / p:.3f}, best runs {best_g / best_p:.3f} (goal >= {GOAL})"
                f"   per step of "
                f"{1000 * concurrency / p:.0f} ms: masks {mask['fill_ms_per_step']:.2f} ms "
                f"(beside the forward), applying them {mask['apply_ms_per_step']:.2f} ms",
                flush=True,
            )
        results["first_guided_request_s"] = round(first_guided, 3)
        results["compile"] = _compile_times(engine)
        for name, figures in results["compile"].items():
            print(
                f"compile {name:20} cold {figures['cold_ms']:8.3f} ms   cached "
                f"{figures['cached_ms']:8.3f} ms"
            )
        print(f"first guided request (tokenizer trie + 4 tokens): {first_guided:.2f} s")
        return results
    finally:
        await engine.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 tokens, one repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.tokens = 1, 32
    results = asyncio.run(main_async(args))
    results["settings"] = {
        "tokens": args.tokens,
        "repeats": args.repeats,
        "concurrency": args.concurrency,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "schema": "inventory (see LOAD_SCHEMA)",
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
