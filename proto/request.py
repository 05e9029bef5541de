"""The tokenized generate request: processor -> prefill/decode worker.

Field names follow the reference (NVIDIA Dynamo's ``PreprocessedRequest``) so anyone who knows
that protocol can read ours. Everything optional defaults to ``None`` and every struct omits
defaults, so a typical request on NATS is little more than its token ids. Integer ranges mirror
the reference's unsigned/signed widths: a negative token id or an out-of-range bootstrap room is
rejected when the message is decoded, before it can reach the engine.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from proto.multimodal import MultimodalItem

# Bounds of the reference's integer types, checked on decode.
U8 = Annotated[int, msgspec.Meta(ge=0, le=2**8 - 1)]
U16 = Annotated[int, msgspec.Meta(ge=0, le=2**16 - 1)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
# Instance/worker ids are u64 in the reference, but we mint them from etcd lease ids (int64).
U63 = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
I32 = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]
I64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
TokenId = U32

# A request carrying this annotation asks to skip remote prefill. SGLang has no conditional
# disaggregation, so a disaggregated decode worker answers it with an invalid-request error.
BYPASS_REMOTE_PREFILL_ANNOTATION = "x-bypass-remote-prefill"

# SGLang treats this bootstrap host as "fake transfer": the prefill runs but sends its KV
# nowhere. Health checks and warm-up use it so they need no decode peer.
FAKE_BOOTSTRAP_HOST = "2.2.2.2"


class StopConditions(msgspec.Struct, omit_defaults=True, kw_only=True):
    max_tokens: U32 | None = None
    stop: list[str] | None = None
    stop_token_ids: list[TokenId] | None = None
    # Stop on these tokens but never report them as the user-visible stop reason (e.g. EOS
    # variants the processor adds on the user's behalf).
    stop_token_ids_hidden: list[TokenId] | None = None
    min_tokens: U32 | None = None
    ignore_eos: bool | None = None
    max_thinking_tokens: U32 | None = None


_GUIDE_KINDS = ("json", "regex", "choice", "grammar", "structural_tag")


class GuidedDecodingOptions(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Constrained decoding. At most one of ``json``, ``regex``, ``choice``, ``grammar`` and
    ``structural_tag`` may be set; ``backend`` and ``whitespace_pattern`` qualify it."""

    json: Any = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    structural_tag: Any = None
    backend: str | None = None
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        chosen = [name for name in _GUIDE_KINDS if getattr(self, name) is not None]
        if len(chosen) > 1:
            raise ValueError(f"guided_decoding allows at most one of {_GUIDE_KINDS}, got {chosen}")


class SamplingOptions(msgspec.Struct, omit_defaults=True, kw_only=True):
    n: U8 | None = None
    best_of: U8 | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    temperature: float | None = None
    top_p: float | None = None
    # -1 means "no top-k", so this one is signed.
    top_k: I32 | None = None
    min_p: float | None = None
    use_beam_search: bool | None = None
    length_penalty: float | None = None
    seed: I64 | None = None
    include_stop_str_in_output: bool | None = None
    guided_decoding: GuidedDecodingOptions | None = None
    detokenize: bool | None = None
    allowed_token_ids: list[TokenId] | None = None
    # Token id (decimal string, as OpenAI and SGLang spell it) -> bias added to its logit.
    logit_bias: dict[str, float] | None = None
    bad_words_token_ids: list[list[TokenId]] | None = None


class OutputOptions(msgspec.Struct, omit_defaults=True, kw_only=True):
    logprobs: U32 | None = None
    prompt_logprobs: U32 | None = None
    skip_special_tokens: bool | None = None
    formatted_prompt: bool | None = None
    return_tokens_as_token_ids: bool | None = None


class RoutingHints(msgspec.Struct, omit_defaults=True, kw_only=True):
    """What the processor's router decided, for the worker to honour (or the router to reuse
    on a retry)."""

    backend_instance_id: U63 | None = None
    prefill_worker_id: U63 | None = None
    decode_worker_id: U63 | None = None
    dp_rank: U32 | None = None
    prefill_dp_rank: U32 | None = None
    expected_output_tokens: U32 | None = None
    lora_name: str | None = None
    cache_salt: str | None = None
    priority: I32 | None = None
    allowed_worker_ids: frozenset[U63] | None = None


class BootstrapInfo(msgspec.Struct, kw_only=True):
    """Where a decode worker pulls its KV from: the prefill engine's bootstrap server and the
    room (transfer id) both sides agreed on."""

    bootstrap_host: str
    bootstrap_port: U16
    bootstrap_room: U63


class MultimodalData(msgspec.Struct, omit_defaults=True, kw_only=True):
    """Media for the prompt, each an ``http(s)://`` URL or a ``data:`` URI."""

    image_url: list[str] | None = None
    video_url: list[str] | None = None
    audio_url: list[str] | None = None


class PreprocessedRequest(msgspec.Struct, omit_defaults=True, kw_only=True):
    model: str = ""
    token_ids: list[TokenId]
    stop_conditions: StopConditions = msgspec.field(default_factory=StopConditions)
    sampling_options: SamplingOptions = msgspec.field(default_factory=SamplingOptions)
    output_options: OutputOptions = msgspec.field(default_factory=OutputOptions)
    eos_token_ids: list[TokenId] = []
    # Checksum of the model card the processor tokenized with, so a worker can detect a
    # processor that is using a stale tokenizer.
    mdc_sum: str | None = None
    annotations: list[str] = []
    require_reasoning: bool = False
    routing: RoutingHints | None = None
    bootstrap_info: BootstrapInfo | None = None
    multi_modal_data: MultimodalData | None = None
    # Images the processor had encoded (E/PD): their placeholder positions in ``token_ids``
    # and their embeddings, in prompt order.
    mm_items: list[MultimodalItem] | None = None
    extra_args: dict[str, Any] | None = None

    def has_annotation(self, name: str) -> bool:
        return name in self.annotations
