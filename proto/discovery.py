"""What a process advertises in etcd: its instances and the model cards it serves.

Keys (all attached to the process's lease, so they vanish when it dies)::

    /{ns}/instances/{component}/{endpoint}/{instance_id:x}  -> InstanceRecord
    /{ns}/models/{model}/{instance_id:x}                    -> ModelCard

Model names may contain ``/`` (``Qwen/Qwen3-0.6B``), so a reader takes the model name from the
card, never from the key; the instance id is always the last key segment. ``RuntimeConfig``
uses the reference's ``ModelRuntimeConfig`` field names.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any, Literal

import msgspec

from proto.multimodal import VisionInfo
from proto.request import U16

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class WorkerType(enum.StrEnum):
    AGGREGATED = "aggregated"
    PREFILL = "prefill"
    DECODE = "decode"
    ENCODE = "encode"
    EMBEDDING = "embedding"


class ModelType(enum.StrEnum):
    """Values for ``ModelCard.model_type``: which APIs the model is served on."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDING = "embedding"
    PREFILL = "prefill"


class ZmqEndpoints(msgspec.Struct, omit_defaults=True, kw_only=True):
    """The engine's ZMQ sockets, as the publisher should dial them."""

    # One per local DP rank, in rank order: SGLang offsets the base port by the rank.
    kv_events: list[str] = []
    kv_events_replay: list[str] = []
    metrics: str | None = None


class RuntimeConfig(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Engine capacity and topology, read by the router and the processor."""

    total_kv_blocks: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    context_length: int | None = None
    kv_cache_block_size: int | None = None
    data_parallel_start_rank: int = 0
    data_parallel_size: PositiveInt = 1
    bootstrap_host: str | None = None
    bootstrap_port: U16 | None = None
    # False on a disaggregated decode worker: its KV comes from prefill, not from its own
    # prefix matches, so there is nothing worth indexing.
    enable_local_indexer: bool = False
    kv_event_publishing_enabled: bool = False
    reasoning_parser: str | None = None
    tool_call_parser: str | None = None
    worker_type: WorkerType = WorkerType.AGGREGATED
    # Peer roles this worker needs to be useful, in disjunctive normal form: any inner list
    # whose roles are all present satisfies it, e.g. ``[["prefill"]]`` for a decode worker.
    needs: list[list[str]] = []
    engine_specific: dict[str, Any] = {}

    @property
    def dp_ranks(self) -> range:
        start = self.data_parallel_start_rank
        return range(start, start + self.data_parallel_size)


def instance_key(namespace: str, component: str, endpoint: str, instance_id: int) -> str:
    return f"/{namespace}/instances/{component}/{endpoint}/{instance_id:x}"


def instances_prefix(namespace: str, component: str, endpoint: str) -> str:
    return f"/{namespace}/instances/{component}/{endpoint}/"


def model_key(namespace: str, model: str, instance_id: int) -> str:
    return f"/{namespace}/models/{model}/{instance_id:x}"


def models_prefix(namespace: str) -> str:
    return f"/{namespace}/models/"


def instance_id_from_key(key: str) -> int:
    """The instance id (last segment, hex) of an instance or model key.

    A watcher needs this on a delete, which carries only the key.
    """
    _, _, last = key.rpartition("/")
    try:
        return int(last, 16)
    except ValueError:
        raise ValueError(f"not an instance or model key: {key!r}") from None


class InstanceRecord(msgspec.Struct, omit_defaults=True, kw_only=True):
    namespace: str
    component: str
    endpoint: str
    instance_id: int
    # NATS subject requests go to, and the one for cancel/credit control messages.
    subject: str
    control_subject: str
    host: str
    pid: int
    started_at: float
    lease_id: int = 0
    model: str | None = None
    worker_type: WorkerType | None = None
    runtime_config: RuntimeConfig | None = None
    zmq: ZmqEndpoints | None = None
    metadata: dict[str, str] = {}

    def key(self) -> str:
        return instance_key(self.namespace, self.component, self.endpoint, self.instance_id)


class EmbeddingInfo(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What a processor needs to serve an embedding model (``ModelCard.embedding``)."""

    dimensions: PositiveInt  # the model's own vector size
    # Longest input the model embeds, special tokens included; longer ones are refused (or
    # truncated when the request asks for it).
    max_input_tokens: PositiveInt
    pooling: str = "mean"  # mean | cls | max | mean_sqrt_len | lasttoken
    normalized: bool = True  # vectors have unit L2 norm
    # ``dimensions`` requests (Matryoshka truncation): None refuses them; [] allows any size
    # up to ``dimensions``; otherwise only the sizes listed.
    matryoshka_dimensions: list[int] | None = None
    # Token ids must be below this (token-id inputs are checked against it).
    vocab_size: PositiveInt | None = None

    def dimensions_error(self, model: str, dimensions: int | None) -> str | None:
        """Why a request's ``dimensions`` cannot be served (None: it can). One rule for the
        processor, which answers 400, and the worker, which checks its input too."""
        if dimensions is None or dimensions == self.dimensions:
            return None
        allowed = self.matryoshka_dimensions
        if allowed is None:
            return (
                f"model {model!r} does not support 'dimensions' (it is not a Matryoshka "
                f"model; its vectors have {self.dimensions} dimensions)"
            )
        if dimensions > self.dimensions:
            return f"'dimensions' {dimensions} is larger than model {model!r}'s {self.dimensions}"
        if allowed and dimensions not in allowed:
            sizes = ", ".join(map(str, allowed))
            return f"model {model!r} supports 'dimensions' of {sizes} only"
        return None


class ModelFile(msgspec.Struct, frozen=True, kw_only=True):
    """One of a model's tokenizer/config/template files, published through the mesh
    (``shared/model_files.py``): fetched by ``sha256`` and checked against it."""

    name: str  # one of shared.model_files.PUBLISHED_FILES
    sha256: str  # lowercase hex
    size: int


class ModelCard(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What a processor needs to serve a model: how to tokenize and template it, which APIs it
    is on, and which endpoint to route it to."""

    name: str
    aliases: list[str] = []
    model_path: str = ""
    # None: load the tokenizer from ``model_path``.
    tokenizer_path: str | None = None
    chat_template_path: str | None = None
    custom_template_path: str | None = None
    context_length: int | None = None
    kv_cache_block_size: int | None = None
    model_type: list[str] = msgspec.field(
        default_factory=lambda: [ModelType.CHAT, ModelType.COMPLETIONS]
    )
    model_input: Literal["tokens", "text"] = "tokens"
    worker_type: WorkerType = WorkerType.AGGREGATED
    needs: list[list[str]] = []
    runtime_config: RuntimeConfig | None = None
    instance_id: int = 0
    # "namespace.component.endpoint" to send requests to.
    endpoint: str = ""
    eos_token_ids: list[int] = []
    bos_token_id: int | None = None
    # The hash of ``files`` (shared.model_files.files_sum): a new value is a changed model.
    mdc_sum: str | None = None
    # The files a processor needs, published by the worker: it fetches them by hash instead
    # of reading ``tokenizer_path`` (which it may not have). Empty: read the paths.
    files: list[ModelFile] = []
    # Embedding models (``model_type`` ["embedding"]) only.
    embedding: EmbeddingInfo | None = None
    # ``--dyn-tool-call-parser`` / ``--dyn-reasoning-parser``: the processor parses the output
    # with these (names from ``shared.parser_names``); None: no tool calls / no reasoning split.
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # What the model takes in: "text", and "image" when its workers take image embeddings
    # (``--enable-multimodal``). The processor refuses an image for a text-only model.
    input_modalities: list[str] = msgspec.field(default_factory=lambda: ["text"])
    # Image encode workers (``worker_type`` encode) only: the encoder's input and output.
    vision: VisionInfo | None = None

    @property
    def accepts_images(self) -> bool:
        return "image" in self.input_modalities

    @property
    def served_names(self) -> list[str]:
        return [self.name, *self.aliases]
