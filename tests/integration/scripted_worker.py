"""A worker whose model output is a script: tool calls and thinking on demand, for the
processor's parsing tests (no engine writes a tool call on request; the simulator writes words).

Run as ``python -m tests.integration.scripted_worker --endpoint ns.backend.generate [mesh
flags]``; it registers the model card of ``scripted`` (the default model's tokenizer and chat
template, ``hermes`` tool calls, ``qwen3`` reasoning) and prints ``READY <instance hex>``.
The output, as tokens of the default model's tokenizer, depends on what reached the worker:

- a ``json`` guide (``tool_choice`` required/named): a constrained call array;
- a prompt containing ``think``: a ``<think>`` block then an answer;
- otherwise: prose then a Hermes ``<tool_call>``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from tokenizers import Tokenizer

from proto.discovery import ModelCard
from proto.request import PreprocessedRequest
from proto.response import EngineOutput, FinishReason
from shared.config import parse_mesh_args
from shared.model import default_model_path
from shared.runtime import Context, DistributedRuntime
from shared.runtime.service import run_service
from shared.runtime.system_server import SystemServer
from shared.worker.registration import register_model

MODEL = "scripted"
CALL_TEXT = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)
GUIDED_TEXT = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]'
THINK_TEXT = "<think>\nThe user greets me.\n</think>\n\nHello there!"


def main(argv: list[str] | None = None) -> int:
    config, _ = parse_mesh_args(argv, prog="scripted_worker")
    if config.endpoint is None:
        raise SystemExit("scripted_worker: --endpoint is required")
    endpoint = config.endpoint
    model_dir = default_model_path()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    async def handler(request: PreprocessedRequest, ctx: Context) -> AsyncIterator[EngineOutput]:
        guide = request.sampling_options.guided_decoding
        if guide is not None and guide.json is not None:
            text = GUIDED_TEXT
        elif "think" in tokenizer.decode(request.token_ids):
            text = THINK_TEXT
        else:
            text = CALL_TEXT
        for tid in tokenizer.encode(text, add_special_tokens=False).ids:
            yield EngineOutput(token_ids=[tid])
        yield EngineOutput(token_ids=[], finish_reason=FinishReason.EOS)

    async def start(runtime: DistributedRuntime, system: SystemServer | None) -> None:
        await runtime.endpoint(endpoint).serve(handler, request_type=PreprocessedRequest)
        card = ModelCard(
            name=MODEL,
            model_path=str(model_dir),
            instance_id=runtime.instance_id,
            endpoint=str(endpoint),
            tool_call_parser="hermes",
            reasoning_parser="qwen3",
        )
        await register_model(runtime, card)
        print(f"READY {runtime.instance_id:x}", flush=True)

    return run_service(config, start, service="scripted-worker")


if __name__ == "__main__":
    raise SystemExit(main())
