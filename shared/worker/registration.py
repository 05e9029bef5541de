"""What a worker tells discovery: its instance record fields and its model card.

Both live under the process's etcd lease, so a crashed worker's model disappears with it. The
numbers come from the running engine (its KV pool, batch limits, bootstrap port), never from
flags alone, so a router plans with what the engine actually has. Before the card is written,
the model's tokenizer, config and template files are published by hash
(``shared/model_files.py``) and listed in it, so no processor needs the model's directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import msgspec

from proto.discovery import ModelCard, RuntimeConfig, WorkerType, ZmqEndpoints, model_key
from shared.engine.args import EngineArgs
from shared.engine.protocol import EngineInfo
from shared.model_files import card_file_sources, files_sum, publish_model_files
from shared.runtime import DistributedRuntime
from shared.worker.args import AGGREGATED, DECODE, PREFILL, WorkerConfig

_WORKER_TYPES = {AGGREGATED: WorkerType.AGGREGATED, DECODE: WorkerType.DECODE,
                 PREFILL: WorkerType.PREFILL}  # fmt: skip
# Which peers a role needs before its model is servable (disjunctive normal form).
_NEEDS: dict[str, list[list[str]]] = {
    AGGREGATED: [],
    DECODE: [[WorkerType.PREFILL.value]],
    PREFILL: [[WorkerType.DECODE.value]],
}


def runtime_config(info: EngineInfo, role: str) -> RuntimeConfig:
    return RuntimeConfig(
        total_kv_blocks=math.ceil(info.max_total_tokens / info.page_size),
        max_num_seqs=info.max_running_requests,
        max_num_batched_tokens=info.max_prefill_tokens,
        context_length=info.context_length,
        kv_cache_block_size=info.page_size,
        data_parallel_start_rank=0,
        data_parallel_size=info.dp_size,
        bootstrap_host=info.bootstrap_host,
        bootstrap_port=info.bootstrap_port,
        # A decode worker's cache only ever holds transferred prompts: routers need not index it.
        enable_local_indexer=role != DECODE,
        kv_event_publishing_enabled=bool(info.kv_events_endpoints),
        worker_type=_WORKER_TYPES[role],
        needs=_NEEDS[role],
        engine_specific={"engine": info.engine},
    )


def zmq_endpoints(info: EngineInfo) -> ZmqEndpoints | None:
    if not (info.kv_events_endpoints or info.metrics_endpoint):
        return None
    return ZmqEndpoints(
        kv_events=list(info.kv_events_endpoints),
        kv_events_replay=list(info.kv_events_replay_endpoints),
        metrics=info.metrics_endpoint,
    )


def instance_fields(info: EngineInfo, config: WorkerConfig) -> dict[str, Any]:
    """Keyword arguments for ``Endpoint.serve`` that go into the instance record."""
    metadata = {"engine": info.engine, "role": config.role}
    if info.kv_events_topic:
        metadata["kv_events_topic"] = info.kv_events_topic
    return {
        "model": config.engine.model_name,
        "worker_type": _WORKER_TYPES[config.role],
        "runtime_config": runtime_config(info, config.role),
        "zmq": zmq_endpoints(info),
        "metadata": metadata,
    }


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int)]
    return []


def model_card(info: EngineInfo, config: WorkerConfig, instance_id: int) -> ModelCard:
    args: EngineArgs = config.engine
    model_dir = Path(args.model_path).expanduser()
    tokenizer_dir = Path(args.tokenizer_path).expanduser() if args.tokenizer_path else model_dir
    model_cfg = _read_json(model_dir / "config.json")
    gen_cfg = _read_json(model_dir / "generation_config.json")
    eos = _token_ids(gen_cfg.get("eos_token_id")) or _token_ids(model_cfg.get("eos_token_id"))
    bos = gen_cfg.get("bos_token_id", model_cfg.get("bos_token_id"))
    template = tokenizer_dir / "chat_template.jinja"
    # A prefill worker has no OpenAI surface of its own: its decode peer has it.
    model_type = ["prefill"] if config.role == PREFILL else list(config.worker.endpoint_types)
    return ModelCard(
        name=args.model_name,
        aliases=args.model_aliases,
        model_path=str(model_dir),
        tokenizer_path=str(tokenizer_dir),
        chat_template_path=str(template) if template.is_file() else None,
        custom_template_path=config.worker.custom_jinja_template,
        context_length=info.context_length,
        kv_cache_block_size=info.page_size,
        model_type=model_type,
        model_input="tokens",
        worker_type=_WORKER_TYPES[config.role],
        needs=_NEEDS[config.role],
        runtime_config=runtime_config(info, config.role),
        instance_id=instance_id,
        endpoint=str(config.endpoint),
        eos_token_ids=eos,
        bos_token_id=bos if isinstance(bos, int) else None,
        tool_call_parser=config.worker.dyn_tool_call_parser,
        reasoning_parser=config.worker.dyn_reasoning_parser,
        input_modalities=["text", "image"] if args.enable_multimodal else ["text"],
    )


async def with_model_files(runtime: DistributedRuntime, card: ModelCard) -> ModelCard:
    """Publish the card's files through etcd and list them (and their hash) in the card."""
    if not (card.tokenizer_path or card.model_path):
        return card
    files = await publish_model_files(
        runtime.etcd.client, runtime.config.namespace, card_file_sources(card)
    )
    if not files:
        return card
    return msgspec.structs.replace(card, files=files, mdc_sum=files_sum(files))


async def register_model(runtime: DistributedRuntime, card: ModelCard) -> str:
    """Write the card under the process lease; returns its key."""
    key = model_key(runtime.config.namespace, card.name, runtime.instance_id)
    await runtime.put_registered(key, runtime.encoder.encode(card))
    return key
