"""Wire messages: round trips, SGLang byte compatibility, and validation at decode time."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

import proto
from proto import (
    ENCODER,
    REPLAY_END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    BootstrapInfo,
    CompletionUsage,
    EmbeddingData,
    EmbeddingOutput,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    EngineOutput,
    FinishReason,
    GuidedDecodingOptions,
    InstanceRecord,
    KvCacheHit,
    KVEvent,
    KVEventBatch,
    KvEventsMessage,
    KvMetrics,
    LoadMetrics,
    ModelCard,
    MultimodalData,
    OutputOptions,
    PreprocessedEmbeddingRequest,
    PreprocessedRequest,
    PromptTokensDetails,
    RoutingHints,
    RuntimeConfig,
    SamplingOptions,
    SglangKvMetrics,
    StopConditions,
    TopLogprob,
    WorkerType,
    ZmqEndpoints,
    decode_seq,
    decoder,
    encode_seq,
)


def roundtrip(value: Any) -> Any:
    data = ENCODER.encode(value)
    return decoder(type(value)).decode(data)


def full_request() -> PreprocessedRequest:
    return PreprocessedRequest(
        model="qwen",
        token_ids=[1, 2, 3],
        stop_conditions=StopConditions(
            max_tokens=16,
            stop=["\n\n"],
            stop_token_ids=[7],
            stop_token_ids_hidden=[2],
            min_tokens=1,
            ignore_eos=False,
            max_thinking_tokens=100,
        ),
        sampling_options=SamplingOptions(
            n=1,
            best_of=1,
            presence_penalty=0.0,
            frequency_penalty=0.5,
            repetition_penalty=1.1,
            temperature=0.7,
            top_p=0.9,
            top_k=-1,
            min_p=0.0,
            use_beam_search=False,
            length_penalty=1.0,
            seed=-42,
            include_stop_str_in_output=True,
            guided_decoding=GuidedDecodingOptions(json={"type": "object"}, backend="xgrammar"),
            detokenize=False,
            allowed_token_ids=[1, 2],
            bad_words_token_ids=[[3, 4]],
        ),
        output_options=OutputOptions(
            logprobs=2,
            prompt_logprobs=1,
            skip_special_tokens=True,
            formatted_prompt=False,
            return_tokens_as_token_ids=True,
        ),
        eos_token_ids=[2],
        mdc_sum="abc",
        annotations=[proto.BYPASS_REMOTE_PREFILL_ANNOTATION],
        require_reasoning=True,
        routing=RoutingHints(
            backend_instance_id=1,
            prefill_worker_id=2,
            decode_worker_id=3,
            dp_rank=0,
            prefill_dp_rank=1,
            expected_output_tokens=10,
            lora_name="ad",
            cache_salt="salt",
            priority=-1,
            allowed_worker_ids=frozenset({1, 3}),
        ),
        bootstrap_info=BootstrapInfo(
            bootstrap_host="10.0.0.1", bootstrap_port=8998, bootstrap_room=2**63 - 1
        ),
        multi_modal_data=MultimodalData(image_url=["data:image/png;base64,AAAA"]),
        extra_args={"nvext": {"token_in": True}},
    )


# --- request / response ---------------------------------------------------------------------


def test_preprocessed_request_roundtrip_full_and_minimal() -> None:
    req = full_request()
    assert roundtrip(req) == req
    assert req.has_annotation("x-bypass-remote-prefill")

    minimal = PreprocessedRequest(token_ids=[5])
    assert roundtrip(minimal) == minimal
    # Defaults stay off the wire; the nested option structs are empty maps.
    assert msgspec.msgpack.decode(ENCODER.encode(minimal)) == {
        "token_ids": [5],
        "stop_conditions": {},
        "sampling_options": {},
        "output_options": {},
    }


def test_request_json_uses_reference_field_names() -> None:
    decoded = msgspec.json.decode(msgspec.json.encode(full_request()))
    assert decoded["stop_conditions"]["max_tokens"] == 16
    assert decoded["sampling_options"]["guided_decoding"]["json"] == {"type": "object"}
    assert decoded["bootstrap_info"] == {
        "bootstrap_host": "10.0.0.1",
        "bootstrap_port": 8998,
        "bootstrap_room": 2**63 - 1,
    }
    assert sorted(decoded["routing"]["allowed_worker_ids"]) == [1, 3]


def test_request_constants() -> None:
    assert proto.BYPASS_REMOTE_PREFILL_ANNOTATION == "x-bypass-remote-prefill"
    assert proto.FAKE_BOOTSTRAP_HOST == "2.2.2.2"


@pytest.mark.parametrize(
    "bootstrap",
    [
        {"bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": -1},
        {"bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": 2**63},
        {"bootstrap_host": "h", "bootstrap_port": 65536, "bootstrap_room": 0},
        {"bootstrap_host": "h", "bootstrap_port": -1, "bootstrap_room": 0},
        {"bootstrap_host": "h", "bootstrap_port": "80", "bootstrap_room": 0},
        {"bootstrap_port": 1, "bootstrap_room": 0},
    ],
)
def test_bootstrap_info_rejects_bad_values(bootstrap: dict[str, Any]) -> None:
    data = msgspec.msgpack.encode({"token_ids": [1], "bootstrap_info": bootstrap})
    with pytest.raises(msgspec.ValidationError):
        decoder(PreprocessedRequest).decode(data)


def test_bootstrap_info_bounds_accepted() -> None:
    for room, port in [(0, 0), (2**63 - 1, 65535)]:
        data = msgspec.msgpack.encode(
            {"bootstrap_host": "h", "bootstrap_port": port, "bootstrap_room": room}
        )
        info = decoder(BootstrapInfo).decode(data)
        assert (info.bootstrap_room, info.bootstrap_port) == (room, port)


@pytest.mark.parametrize(
    "body",
    [
        {},  # token_ids is required
        {"token_ids": "1 2 3"},
        {"token_ids": [1, -2]},
        {"token_ids": [2**32]},
        {"token_ids": [1], "stop_conditions": {"max_tokens": -1}},
        {"token_ids": [1], "sampling_options": {"n": 256}},
        {"token_ids": [1], "sampling_options": {"temperature": "hot"}},
        {
            "token_ids": [1],
            "sampling_options": {"guided_decoding": {"regex": "a", "choice": ["a"]}},
        },
        {"token_ids": [1], "routing": {"dp_rank": -1}},
        {"token_ids": [1], "annotations": "x"},
    ],
)
def test_preprocessed_request_rejects_bad_input(body: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        decoder(PreprocessedRequest).decode(msgspec.msgpack.encode(body))


def test_guided_decoding_allows_one_kind() -> None:
    with pytest.raises(ValueError, match="at most one"):
        GuidedDecodingOptions(regex="a+", grammar="root ::= 'a'")
    only = GuidedDecodingOptions(choice=["yes", "no"], whitespace_pattern=r"\s*")
    assert roundtrip(only) == only


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    data = msgspec.msgpack.encode({"token_ids": [1], "prefill_result": {"x": 1}})
    assert decoder(PreprocessedRequest).decode(data) == PreprocessedRequest(token_ids=[1])


def test_preprocessed_request_json_schema() -> None:
    schema = msgspec.json.schema(PreprocessedRequest)
    defs = schema["$defs"]
    props = defs["PreprocessedRequest"]["properties"]
    assert defs["PreprocessedRequest"]["required"] == ["token_ids"]
    assert {"token_ids", "stop_conditions", "bootstrap_info", "routing"} <= set(props)
    room = defs["BootstrapInfo"]["properties"]["bootstrap_room"]
    assert room["minimum"] == 0
    assert room["maximum"] == 2**63 - 1


def test_engine_output_roundtrip() -> None:
    out = EngineOutput(
        token_ids=[4, 5],
        index=1,
        text="hi",
        finish_reason=FinishReason.STOP,
        stop_reason=[4, 5],
        log_probs=[-0.1, -0.2],
        top_logprobs=[[TopLogprob(rank=1, token_id=4, token="a", logprob=-0.1)]],
        cum_log_probs=-0.3,
        completion_usage=CompletionUsage(
            prompt_tokens=3,
            completion_tokens=2,
            total_tokens=5,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=2),
        ),
        disaggregated_params={"bootstrap_host": "h", "bootstrap_port": 1, "bootstrap_room": 9},
        engine_data={"kv_cache_hit": {"prompt_tokens": 3, "reused_tokens": 2}},
    )
    assert roundtrip(out) == out
    assert out.finished
    assert out.kv_cache_hit() == KvCacheHit(prompt_tokens=3, reused_tokens=2)
    for reason in ("stop", 7):
        assert roundtrip(EngineOutput(stop_reason=reason)).stop_reason == reason


def test_engine_output_default_chunk_is_tiny() -> None:
    chunk = EngineOutput(token_ids=[9])
    assert msgspec.msgpack.decode(ENCODER.encode(chunk)) == {"token_ids": [9]}
    decoded = roundtrip(EngineOutput())
    assert decoded.token_ids == [] and decoded.index == 0 and not decoded.finished
    assert decoded.kv_cache_hit() is None
    assert EngineOutput(engine_data={"kv_cache_hit": {"x": 1}}).kv_cache_hit() is None


def test_finish_reason_values_and_abort_alias() -> None:
    assert [r.value for r in FinishReason] == [
        "eos",
        "length",
        "stop",
        "cancelled",
        "content_filter",
        "error",
    ]
    dec = decoder(FinishReason)
    assert dec.decode(msgspec.msgpack.encode("abort")) is FinishReason.CANCELLED
    with pytest.raises(msgspec.ValidationError):
        dec.decode(msgspec.msgpack.encode("exploded"))


# --- embeddings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inp", "texts", "tokens"),
    [
        ("hello", ["hello"], None),
        (["a", "b"], ["a", "b"], None),
        ([1, 2, 3], None, [[1, 2, 3]]),
        ([[1, 2], [3]], None, [[1, 2], [3]]),
    ],
)
def test_embedding_request_input_shapes(
    inp: Any, texts: list[str] | None, tokens: list[list[int]] | None
) -> None:
    body = msgspec.json.encode({"model": "e5", "input": inp, "dimensions": 8})
    req = msgspec.json.decode(body, type=EmbeddingRequest)
    assert req.texts() == texts
    assert req.token_batches() == tokens
    assert req.encoding_format == "float"
    assert roundtrip(req) == req


@pytest.mark.parametrize(
    "body",
    [
        {"model": "e5", "input": []},
        {"model": "e5", "input": ["a", 1]},
        {"model": "e5", "input": [[1], "a"]},
        {"model": "e5", "input": [[1], []]},
        {"model": "e5", "input": [-1]},
        {"model": "e5", "input": 5},
        {"model": "e5", "input": "a", "dimensions": 0},
        {"model": "e5", "input": "a", "encoding_format": "int8"},
        {"model": "e5", "input": "a", "truncate_prompt_tokens": 0},
        {"model": "e5", "input": "a", "truncate_prompt_tokens": -2},
        {"input": "a"},
    ],
)
def test_embedding_request_rejects_bad_input(body: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(body), type=EmbeddingRequest)


def test_embedding_response_keeps_object_fields() -> None:
    resp = EmbeddingResponse(
        data=[
            EmbeddingData(embedding="AACAPw==", index=0),
            EmbeddingData(embedding=[1.0], index=1),
        ],
        model="e5",
        usage=EmbeddingUsage(prompt_tokens=3, total_tokens=3),
    )
    decoded = msgspec.json.decode(msgspec.json.encode(resp))
    assert decoded["object"] == "list"
    assert decoded["data"][0] == {"object": "embedding", "embedding": "AACAPw==", "index": 0}
    assert decoded["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert roundtrip(resp) == resp

    pre = PreprocessedEmbeddingRequest(token_ids=[[1, 2]], model="e5", dimensions=4)
    assert roundtrip(pre) == pre
    assert len(pre) == 1
    assert roundtrip(PreprocessedEmbeddingRequest(texts=["a", "b"])).texts == ["a", "b"]
    out = EmbeddingOutput(index=3, embeddings=[b"\x00\x00\x80?"], prompt_tokens=2)
    assert roundtrip(out) == out


@pytest.mark.parametrize(
    "body",
    [{}, {"token_ids": [[1]], "texts": ["a"]}, {"token_ids": []}, {"texts": []}],
)
def test_preprocessed_embedding_request_needs_one_kind_of_input(body: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.decode(msgspec.msgpack.encode(body), type=PreprocessedEmbeddingRequest)


# --- discovery -----------------------------------------------------------------------------


def test_instance_record_roundtrip() -> None:
    rec = InstanceRecord(
        namespace="dyn",
        component="backend",
        endpoint="generate",
        instance_id=0x1F,
        subject="dyn.backend.generate",
        control_subject="dyn.backend.generate.ctl.1f",
        host="10.0.0.2",
        pid=42,
        started_at=1.5,
        lease_id=31,
        model="qwen",
        worker_type=WorkerType.DECODE,
        runtime_config=RuntimeConfig(
            total_kv_blocks=1000,
            max_num_seqs=64,
            max_num_batched_tokens=16384,
            context_length=4096,
            kv_cache_block_size=16,
            data_parallel_start_rank=2,
            data_parallel_size=2,
            bootstrap_host="10.0.0.2",
            bootstrap_port=8998,
            enable_local_indexer=False,
            kv_event_publishing_enabled=True,
            worker_type=WorkerType.DECODE,
            needs=[["prefill"]],
            engine_specific={"token_budget": {"combined_limit": 4000}},
        ),
        zmq=ZmqEndpoints(
            kv_events=["tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558"],
            metrics="ipc:///tmp/m",
        ),
        metadata={"zone": "a"},
    )
    assert roundtrip(rec) == rec
    assert msgspec.json.decode(msgspec.json.encode(rec), type=InstanceRecord) == rec
    assert rec.key() == "/dyn/instances/backend/generate/1f"
    assert rec.runtime_config is not None
    assert list(rec.runtime_config.dp_ranks) == [2, 3]


def test_instance_record_fields_are_keyword_only_and_validated() -> None:
    with pytest.raises(TypeError):
        InstanceRecord("dyn", "backend", "generate", 1, "s", "c", "h", 1, 0.0)  # type: ignore[call-arg]
    data = msgspec.msgpack.encode({"namespace": "dyn"})
    with pytest.raises(msgspec.ValidationError):
        decoder(InstanceRecord).decode(data)
    bad_role = msgspec.msgpack.encode({"worker_type": "janitor"})
    with pytest.raises(msgspec.ValidationError):
        decoder(RuntimeConfig).decode(bad_role)


def test_discovery_keys() -> None:
    assert (
        proto.instance_key("ns", "backend", "generate", 255) == "/ns/instances/backend/generate/ff"
    )
    assert proto.instances_prefix("ns", "backend", "generate") == "/ns/instances/backend/generate/"
    assert proto.model_key("ns", "Qwen/Qwen3-0.6B", 255) == "/ns/models/Qwen/Qwen3-0.6B/ff"
    assert proto.models_prefix("ns") == "/ns/models/"
    assert proto.model_key("ns", "m", 1).startswith(proto.models_prefix("ns"))
    assert proto.instance_id_from_key("/ns/models/Qwen/Qwen3-0.6B/ff") == 255
    with pytest.raises(ValueError):
        proto.instance_id_from_key("/ns/models/")


def test_model_card_roundtrip_and_defaults() -> None:
    card = ModelCard(name="qwen")
    assert card.model_type == ["chat", "completions"]
    assert card.model_input == "tokens"
    assert roundtrip(card) == card
    full = ModelCard(
        name="qwen",
        aliases=["q"],
        model_path="/models/qwen",
        tokenizer_path="/models/qwen",
        chat_template_path="/t.jinja",
        custom_template_path="/c.jinja",
        context_length=4096,
        kv_cache_block_size=16,
        model_type=["prefill"],
        model_input="text",
        worker_type=WorkerType.PREFILL,
        needs=[],
        runtime_config=RuntimeConfig(total_kv_blocks=10),
        instance_id=7,
        endpoint="dyn.prefill.generate",
        eos_token_ids=[2],
        bos_token_id=1,
        mdc_sum="abc",
    )
    assert roundtrip(full) == full
    assert full.served_names == ["qwen", "q"]
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(b'{"name": "m", "model_input": "pixels"}', type=ModelCard)


# --- KV events -----------------------------------------------------------------------------

# Produced by SGLang 0.5.23's own KVEventBatch/BlockStored/... classes for `sample_batch()`.
SGLANG_BATCH_BYTES = bytes.fromhex(
    "93cb3ff80000000000009486a474797065ab426c6f636b53746f726564ac626c6f636b5f686173686573"
    "92fb07b1706172656e745f626c6f636b5f68617368c0a9746f6b656e5f6964739401020304aa626c6f63"
    "6b5f73697a6502a76c6f72615f6964c088a474797065ab426c6f636b53746f726564ac626c6f636b5f68"
    "61736865739109b1706172656e745f626c6f636b5f6861736807a9746f6b656e5f696473920506aa626c"
    "6f636b5f73697a6502a76c6f72615f6964c0a66d656469756da3475055a96c6f72615f6e616d65a26164"
    "82a474797065ac426c6f636b52656d6f766564ac626c6f636b5f68617368657391fb81a474797065b041"
    "6c6c426c6f636b73436c656172656400"
)


def sample_batch() -> KVEventBatch:
    return KVEventBatch(
        ts=1.5,
        events=[
            BlockStored(
                block_hashes=[-5, 7],
                parent_block_hash=None,
                token_ids=[1, 2, 3, 4],
                block_size=2,
                lora_id=None,
            ),
            BlockStored(
                block_hashes=[9],
                parent_block_hash=7,
                token_ids=[5, 6],
                block_size=2,
                lora_id=None,
                medium="GPU",
                lora_name="ad",
            ),
            BlockRemoved(block_hashes=[-5]),
            AllBlocksCleared(),
        ],
        attn_dp_rank=0,
    )


def test_kv_event_batch_matches_sglang_bytes() -> None:
    assert ENCODER.encode(sample_batch()) == SGLANG_BATCH_BYTES
    assert decoder(KVEventBatch).decode(SGLANG_BATCH_BYTES) == sample_batch()


def test_kv_event_batch_shape() -> None:
    plain = msgspec.msgpack.decode(ENCODER.encode(sample_batch()))
    assert plain == [
        1.5,
        [
            {
                "type": "BlockStored",
                "block_hashes": [-5, 7],
                "parent_block_hash": None,
                "token_ids": [1, 2, 3, 4],
                "block_size": 2,
                "lora_id": None,
            },
            {
                "type": "BlockStored",
                "block_hashes": [9],
                "parent_block_hash": 7,
                "token_ids": [5, 6],
                "block_size": 2,
                "lora_id": None,
                "medium": "GPU",
                "lora_name": "ad",
            },
            {"type": "BlockRemoved", "block_hashes": [-5]},
            {"type": "AllBlocksCleared"},
        ],
        0,
    ]
    # The tag comes first in each map, as SGLang writes it.
    assert next(iter(plain[1][0])) == "type"
    # attn_dp_rank is positional and always present, nil when unset.
    assert msgspec.msgpack.decode(ENCODER.encode(KVEventBatch(ts=2.0, events=[]))) == [
        2.0,
        [],
        None,
    ]


def test_kv_event_batch_decodes_older_two_element_form() -> None:
    batch = decoder(KVEventBatch).decode(msgspec.msgpack.encode([3.0, []]))
    assert batch == KVEventBatch(ts=3.0, events=[], attn_dp_rank=None)


def test_block_stored_optional_fields_roundtrip() -> None:
    ev = BlockStored(
        block_hashes=[1],
        parent_block_hash=0,
        token_ids=[1],
        block_size=1,
        lora_id=3,
        medium=proto.StorageMedium.CPU_PINNED,
        cache_salt="s",
        session_id="sess",
        lora_name="ad",
    )
    dec = decoder(KVEvent)
    assert dec.decode(ENCODER.encode(ev)) == ev
    assert msgspec.msgpack.decode(ENCODER.encode(ev))["medium"] == "CPU_PINNED"


@pytest.mark.parametrize(
    "event",
    [
        {"type": "BlockStored", "block_hashes": [1], "token_ids": [1], "block_size": 1},
        {"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None, "lora_id": None},
        {"type": "BlockEvicted", "block_hashes": [1]},
        {"block_hashes": [1]},
        {"type": "BlockRemoved", "block_hashes": ["x"]},
    ],
)
def test_kv_event_rejects_bad_events(event: dict[str, Any]) -> None:
    with pytest.raises(msgspec.ValidationError):
        decoder(KVEventBatch).decode(msgspec.msgpack.encode([1.0, [event], 0]))


def test_seq_framing() -> None:
    assert encode_seq(0) == b"\x00" * 8
    assert encode_seq(1) == (1).to_bytes(8, "big")
    assert encode_seq(REPLAY_END_SEQ) == b"\xff" * 8
    assert decode_seq(b"\xff" * 8) == REPLAY_END_SEQ
    for seq in (0, 1, 255, 2**40, 2**63 - 1):
        assert decode_seq(encode_seq(seq)) == seq
    with pytest.raises(ValueError):
        decode_seq(b"\x00" * 4)


# --- metrics -------------------------------------------------------------------------------

# Produced by SGLang 0.5.23's KvMetrics for the values in the test below.
SGLANG_KV_METRICS_BYTES = bytes.fromhex(
    "99a94b764d657472696373030864cd100002cb3fe0000000000000cb3fd000000000000001"
)


def test_sglang_kv_metrics_bytes() -> None:
    m = SglangKvMetrics(
        request_active_slots=3,
        request_total_slots=8,
        kv_active_blocks=100,
        kv_total_blocks=4096,
        num_requests_waiting=2,
        gpu_cache_usage_perc=0.5,
        gpu_prefix_cache_hit_rate=0.25,
        data_parallel_rank=1,
    )
    assert ENCODER.encode(m) == SGLANG_KV_METRICS_BYTES
    assert decoder(SglangKvMetrics).decode(SGLANG_KV_METRICS_BYTES) == m
    assert isinstance(m, KvMetrics)
    assert roundtrip(KvMetrics(request_active_slots=1)) == KvMetrics(request_active_slots=1)
    with pytest.raises(msgspec.ValidationError):
        decoder(SglangKvMetrics).decode(msgspec.msgpack.encode(["LoadStat", 1]))


def test_load_metrics_from_kv_metrics() -> None:
    m = KvMetrics(
        request_active_slots=3,
        request_total_slots=8,
        kv_active_blocks=17,
        kv_total_blocks=4096,
        num_requests_waiting=2,
        gpu_cache_usage_perc=0.004,
        gpu_prefix_cache_hit_rate=0.25,
        data_parallel_rank=1,
    )
    load = LoadMetrics.from_kv_metrics(m, worker_id=9, page_size=16, ts=5.0)
    assert load == LoadMetrics(
        worker_id=9,
        dp_rank=1,
        kv_used_blocks=2,
        kv_total_blocks=256,
        num_running=3,
        num_waiting=2,
        max_running=8,
        cache_usage=0.004,
        prefix_hit_rate=0.25,
        ts=5.0,
    )
    assert roundtrip(load) == load
    with pytest.raises(ValueError):
        LoadMetrics.from_kv_metrics(m, worker_id=9, page_size=0, ts=5.0)
    with pytest.raises(msgspec.ValidationError):
        decoder(LoadMetrics).decode(msgspec.msgpack.encode({"worker_id": 1}))


def test_kv_events_message_roundtrip() -> None:
    msg = KvEventsMessage(worker_id=1, dp_rank=0, seq=12, ts=1.0, events=sample_batch().events)
    assert roundtrip(msg) == msg
    assert msgspec.msgpack.decode(ENCODER.encode(msg))["events"][2] == {
        "type": "BlockRemoved",
        "block_hashes": [-5],
    }


# --- package helpers -----------------------------------------------------------------------


def test_decoder_is_cached_per_type() -> None:
    assert decoder(EngineOutput) is decoder(EngineOutput)
    assert decoder(list[int]) is decoder(list[int])
    assert decoder(EngineOutput).type is EngineOutput
    assert decoder(list[int]).decode(ENCODER.encode([1, 2])) == [1, 2]


def test_public_names_exported() -> None:
    for name in proto.__all__:
        assert hasattr(proto, name), name
