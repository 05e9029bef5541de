"""xgrammar against llguidance on SmolLM2's tokenizer: what chose the torch engine's backend.

Per schema: compile time (cold: a fresh compiler, nothing cached) and the per-step mask time
(fill one token bitmask and advance the matcher on a valid token), walking a valid JSON
document token by token. Each backend applies its mask with its own CPU path: xgrammar's
C++ kernel, and for llguidance the engine's ``apply_bitmask`` (llguidance's own goes through
``torch.compile``: seconds on first use). Prints a table and writes
``bench/results/grammar_backends.json``.

xgrammar is not a project dependency (its wheel declares torch and, on Linux x86_64, triton);
to include it: ``pip install --no-deps xgrammar apache-tvm-ffi`` (pydantic, numpy,
transformers and typing-extensions are already there). Without it only llguidance runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

SCHEMAS: dict[str, tuple[dict[str, Any], Any]] = {
    "flat": (
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
        },
        {"name": "Ada Lovelace", "age": 36},
    ),
    "nested": (
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "maxLength": 40},
                "status": {"enum": ["draft", "published", "archived"]},
                "author": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "email": {"type": "string", "format": "email"},
                    },
                    "required": ["name"],
                },
                "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
                "score": {"type": "number", "minimum": 0, "maximum": 10},
            },
            "required": ["title", "status", "author", "tags"],
        },
        {
            "title": "Structured output on CPUs",
            "status": "published",
            "author": {"name": "Grace", "email": "grace@example.com"},
            "tags": ["llm", "grammar", "cpu"],
            "score": 8.5,
        },
    ),
    "list_of_objects": (
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "kind": {"enum": ["a", "b", "c"]},
                    "ok": {"type": "boolean"},
                },
                "required": ["id", "kind", "ok"],
            },
            "minItems": 1,
        },
        [{"id": i, "kind": "abc"[i % 3], "ok": i % 2 == 0} for i in range(6)],
    ),
}


def _xgrammar(
    tok: Any, vocab: int, eos: list[int], schema: str, doc_ids: list[int]
) -> dict[str, float]:
    import torch
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=eos)
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(schema)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    compiler.compile_json_schema(schema)
    cached = time.perf_counter() - t
    matcher = xgr.GrammarMatcher(compiled)
    mask = xgr.allocate_token_bitmask(1, vocab)
    logits = torch.zeros(1, vocab)
    steps = []
    for token in doc_ids:
        t = time.perf_counter()
        matcher.fill_next_token_bitmask(mask, 0)
        xgr.apply_token_bitmask_inplace(logits, mask)
        assert matcher.accept_token(token), token
        steps.append(time.perf_counter() - t)
    return _figures(cold, cached, steps)


def _llguidance(
    tok: Any, vocab: int, eos: list[int], schema: str, doc_ids: list[int]
) -> dict[str, float]:
    import llguidance
    import llguidance.hf
    import llguidance.torch
    import torch

    from shared.engine.pytorch.grammar import apply_bitmask

    t = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos[0])
    tokenizer_s = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
    matcher = llguidance.LLMatcher(lltok, grammar)
    assert not matcher.is_error(), matcher.get_error()
    cold = time.perf_counter() - t
    t = time.perf_counter()
    llguidance.LLMatcher(lltok, grammar)
    cached = time.perf_counter() - t
    mask = llguidance.torch.allocate_token_bitmask(1, vocab)
    logits = torch.zeros(1, vocab)
    steps = []
    for token in doc_ids:
        t = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, mask, 0)
        apply_bitmask(logits, mask)
        assert matcher.consume_token(token), (token, matcher.get_error())
        steps.append(time.perf_counter() - t)
    out = _figures(cold, cached, steps)
    out["tokenizer_ms"] = tokenizer_s * 1000
    return out


def _figures(cold: float, cached: float, steps: list[float]) -> dict[str, float]:
    steps_ms = sorted(s * 1000 for s in steps)
    return {
        "compile_cold_ms": round(cold * 1000, 3),
        "compile_again_ms": round(cached * 1000, 3),
        "mask_step_mean_ms": round(statistics.fmean(steps_ms), 4),
        "mask_step_p99_ms": round(steps_ms[int(0.99 * (len(steps_ms) - 1))], 4),
        "mask_step_max_ms": round(steps_ms[-1], 4),
        "steps": len(steps_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench/results/grammar_backends.json")
    args = parser.parse_args()
    import torch
    from transformers import AutoTokenizer

    from shared.model import prepare_default_model

    torch.set_num_threads(1)
    path = prepare_default_model()
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    config = json.loads((path / "config.json").read_text())
    vocab = int(config["vocab_size"])
    eos = [int(config.get("eos_token_id") or tok.eos_token_id)]
    results: dict[str, Any] = {}
    backends: list[tuple[str, Any]] = [("llguidance", _llguidance)]
    try:
        import xgrammar  # noqa: F401

        backends.insert(0, ("xgrammar", _xgrammar))
    except ImportError:
        print("xgrammar is not installed: llguidance only (see the module docstring)")
    for name, (schema, doc) in SCHEMAS.items():
        text = json.dumps(doc)
        ids = [*tok.encode(text, add_special_tokens=False), eos[0]]
        spec = json.dumps(schema)
        for backend, run in backends:
            figures = run(tok, vocab, eos, spec, ids)
            results.setdefault(name, {})[backend] = figures
            print(f"{name:16} {backend:10} {figures}")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
