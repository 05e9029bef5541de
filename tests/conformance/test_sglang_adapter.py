"""Conformance of the SGLang adapter with the installed sglang, without a GPU.

What can be checked without a GPU, and is checked here:

(a) every keyword the adapter passes to ``sgl.Engine.async_generate`` / ``async_encode``
    exists in the installed SGLang's signatures, and every TokenizerManager method and
    request struct the adapter uses exists with the parameters it is called with -- read
    from the source with ``ast``, without importing the engine (which needs CUDA kernels);
(b) real ``ServerArgs`` built by ``parse_engine_args`` from our aggregated, prefill, decode
    and embedding command lines carry what we force, and the built-in parser (used where
    sglang is absent) spells, defaults and constrains every flag exactly as SGLang does.

The module is skipped where sglang is not installed (the main venv); ``make
test-conformance`` runs it in the separate venv built by scripts/install-sglang-conformance.sh.
An installed-but-broken sglang fails loudly instead of skipping.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tests.conformance.sglang_present  # noqa: F401  (skips without sglang)
from proto.multimodal import MultimodalItem
from proto.request import (
    BootstrapInfo,
    OutputOptions,
    PreprocessedRequest,
    RoutingHints,
    SamplingOptions,
    StopConditions,
)
from shared.engine import args as engine_args
from shared.engine.args import BUILTIN_SGLANG_FLAGS, parse_engine_args
from shared.engine.mapping import to_generate_kwargs
from shared.engine.sglang_engine import EMBEDDING_REQUEST_FIELDS, ENCODE_KWARGS, GENERATE_KWARGS
from shared.multimodal import MM_PAD_SHIFT, from_array, image_hash, placeholder_ids

SGLANG_ROOT = Path(next(iter(importlib.util.find_spec("sglang").submodule_search_locations or [])))


# --------------------------------------------------------------------------------------------
# (a) the source, read with ast


@cache
def _tree(relative: str) -> ast.Module:
    path = SGLANG_ROOT / relative
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _class(relative: str, name: str) -> ast.ClassDef:
    for node in ast.walk(_tree(relative)):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise AssertionError(f"class {name} not found in sglang/{relative}")


def _method(cls: ast.ClassDef, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{cls.name}.{name} not found")


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    a = fn.args
    return {p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)} - {"self", "cls"}


def _struct_fields(cls: ast.ClassDef) -> set[str]:
    return {
        node.target.id
        for node in cls.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }


ENGINE_PY = "srt/entrypoints/engine.py"
IO_STRUCT_PY = "srt/managers/io_struct.py"


def test_generate_kwargs_exist_in_engine_async_generate() -> None:
    fn = _method(_class(ENGINE_PY, "Engine"), "async_generate")
    assert isinstance(fn, ast.AsyncFunctionDef)
    # With **kwargs any name would be "accepted" and silently dropped: the check would be void.
    assert fn.args.kwarg is None
    missing = GENERATE_KWARGS - _params(fn)
    assert not missing, f"Engine.async_generate has no parameter(s) {sorted(missing)}"


def test_encode_kwargs_exist_in_engine_async_encode() -> None:
    fn = _method(_class(ENGINE_PY, "Engine"), "async_encode")
    assert isinstance(fn, ast.AsyncFunctionDef)
    assert fn.args.kwarg is None
    missing = ENCODE_KWARGS - _params(fn)
    assert not missing, f"Engine.async_encode has no parameter(s) {sorted(missing)}"


def test_embedding_request_fields_exist() -> None:
    """Token-id inputs go to SGLang as ``EmbeddingReqInput(input_ids=..., rid=...)`` through
    ``TokenizerManager.generate_request``: the fields and the method must exist (io_struct
    itself needs transformers, which this venv leaves out, so it is read, not imported)."""
    cls = _class(IO_STRUCT_PY, "EmbeddingReqInput")
    fields = {
        node.target.id
        for node in cls.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    missing = EMBEDDING_REQUEST_FIELDS - fields
    assert not missing, f"EmbeddingReqInput has no field(s) {sorted(missing)}"
    manager = _class("srt/managers/tokenizer_manager.py", "TokenizerManager")
    assert {"obj", "request"} <= _params(_method(manager, "generate_request"))


def test_engine_members_the_adapter_uses() -> None:
    engine = _class(ENGINE_PY, "Engine")
    assert isinstance(_method(engine, "shutdown"), ast.FunctionDef)  # run in a thread
    source = ast.unparse(engine)
    for attribute in ("self.server_args", "self.tokenizer_manager", "self._scheduler_init_result",
                      "self.port_args"):  # fmt: skip
        assert f"{attribute} =" in source, attribute
    init_result = _class(ENGINE_PY, "SchedulerInitResult")
    assert "scheduler_infos" in _struct_fields(init_result)
    port_args = _class("srt/server_args.py", "PortArgs")
    assert "metrics_ipc_name" in _struct_fields(port_args)
    scheduler = (SGLANG_ROOT / "srt/managers/scheduler.py").read_text(encoding="utf-8")
    assert '"max_total_num_tokens"' in scheduler
    internal = SGLANG_ROOT / "srt/managers/scheduler_components/internal_state.py"
    assert "effective_max_running_requests_per_dp" in internal.read_text(encoding="utf-8")


def test_top_level_engine_export() -> None:
    """The adapter builds the engine as ``sglang.Engine(server_args=...)``."""
    names: set[str] = set()
    for node in _tree("__init__.py").body:
        if isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    assert "Engine" in names
    init = _method(_class(ENGINE_PY, "Engine"), "__init__")
    assert init.args.kwarg is not None  # Engine(**kwargs) reads kwargs["server_args"]
    assert '"server_args"' in (SGLANG_ROOT / ENGINE_PY).read_text(encoding="utf-8")


TM_FILES = ("srt/managers/tokenizer_manager.py", "srt/managers/tokenizer_control_mixin.py")


def _tm_method(name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    for relative in TM_FILES:
        for node in ast.walk(_tree(relative)):
            if isinstance(node, ast.ClassDef) and (
                node.name == "TokenizerManager" or node.name.endswith("Mixin")
            ):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and (
                        item.name == name
                    ):
                        return item
    raise AssertionError(f"TokenizerManager.{name} not found")


@pytest.mark.parametrize(
    ("name", "is_async", "params"),
    [
        ("abort_request", False, {"rid", "abort_all"}),
        ("flush_cache", True, set()),
        ("pause_generation", True, {"obj"}),
        ("continue_generation", True, {"obj"}),
        ("release_memory_occupation", True, {"obj", "request"}),
        ("resume_memory_occupation", True, {"obj", "request"}),
        ("start_profile", True, {"req"}),
        ("stop_profile", True, set()),
        ("get_internal_state", True, set()),
        ("generate_request", True, {"obj", "request"}),
        ("auto_create_handle_loop", False, set()),
    ],
)
def test_tokenizer_manager_methods(name: str, is_async: bool, params: set[str]) -> None:
    fn = _tm_method(name)
    assert isinstance(fn, ast.AsyncFunctionDef) == is_async, name
    assert params <= _params(fn), (name, _params(fn))


def test_tokenizer_manager_tracks_requests_by_rid() -> None:
    assert "self.rid_to_state" in ast.unparse(_tree(TM_FILES[0]))
    context = ast.unparse(_tree(TM_FILES[0]))
    assert "self.context_len =" in context


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("PauseGenerationReqInput", {"mode"}),
        ("ContinueGenerationReqInput", set()),
        ("ReleaseMemoryOccupationReqInput", {"tags"}),
        ("ResumeMemoryOccupationReqInput", {"tags"}),
        ("ProfileReq", {"output_dir", "num_steps", "activities"}),
        ("EmbeddingReqInput", {"input_ids", "text"}),
        ("FlushCacheReqOutput", {"success"}),
    ],
)
def test_io_structs(name: str, fields: set[str]) -> None:
    cls = _class("srt/managers/io_struct.py", name)
    assert fields <= _struct_fields(cls), (name, _struct_fields(cls))


def _req(**kw: Any) -> PreprocessedRequest:
    kw.setdefault("token_ids", [1, 2, 3])
    kw.setdefault(
        "stop_conditions",
        StopConditions(max_tokens=16, min_tokens=1, stop_token_ids=[7], stop_token_ids_hidden=[2]),
    )
    kw.setdefault(
        "sampling_options",
        SamplingOptions(temperature=0.5, top_p=0.9, top_k=20, min_p=0.1, seed=3),
    )
    kw.setdefault("output_options", OutputOptions(logprobs=2, prompt_logprobs=1))
    kw.setdefault("routing", RoutingHints(dp_rank=0, prefill_dp_rank=0))
    return PreprocessedRequest(**kw)


BOOT = BootstrapInfo(bootstrap_host="127.0.0.1", bootstrap_port=8998, bootstrap_room=42)


@pytest.mark.parametrize(
    ("mode", "request_"),
    [
        ("null", _req()),
        ("prefill", _req(bootstrap_info=BOOT)),
        ("decode", _req(bootstrap_info=BOOT)),
    ],
)
def test_mapping_output_is_what_the_adapter_passes(
    mode: str, request_: PreprocessedRequest
) -> None:
    for skip_tokenizer_init in (False, True):
        kwargs = to_generate_kwargs(
            request_,
            rid="r",
            disaggregation_mode=mode,
            dp_rank=None,
            skip_tokenizer_init=skip_tokenizer_init,
        )
        assert set(kwargs) <= GENERATE_KWARGS, set(kwargs) - GENERATE_KWARGS


# -- images (E/PD): precomputed embeddings, as SGLang 0.5.23 takes them --------------------------

BASE_PROCESSOR_PY = "srt/multimodal/processors/base_processor.py"
SCHEDULE_BATCH_PY = "srt/managers/schedule_batch.py"


def _image_request() -> PreprocessedRequest:
    h1, h2 = image_hash(b"one"), image_hash(b"two")
    emb = from_array(np.ones((3, 8), np.float32), "float16")
    ids = [5, *placeholder_ids(h1, 3), 6, *placeholder_ids(h2, 3), 7]
    return _req(
        token_ids=ids,
        mm_items=[
            MultimodalItem(hash=h1, offset=1, length=3, embedding=emb),
            MultimodalItem(hash=h2, offset=5, length=3, embedding=emb),
        ],
    )


def _strings(fn: ast.AST) -> set[str]:
    return {
        n.value for n in ast.walk(fn) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def test_image_keywords_exist_and_carry_one_precomputed_embedding_item() -> None:
    kwargs = to_generate_kwargs(_image_request(), rid="r", disaggregation_mode="null", dp_rank=None)
    assert {"image_data", "mm_hashes"} <= set(kwargs) <= GENERATE_KWARGS
    gen = _class(IO_STRUCT_PY, "GenerateReqInput")
    assert {"image_data", "mm_hashes"} <= _struct_fields(gen)
    # SGLang recognises the item's format string...
    processor = _class(BASE_PROCESSOR_PY, "BaseMultimodalProcessor")
    fmt = _method(processor, "_get_preprocessed_input_format")
    (item,) = kwargs["image_data"]
    assert item["format"] in _strings(fmt)
    # ...and, for a preprocessed format, wants exactly one item per modality (all the images'
    # embeddings concatenated), which is what the mapping sends.
    one = ast.unparse(_method(processor, "_validate_one_modality"))
    assert "len(data_list) != 1" in one
    assert item["feature"].shape == (6, 8) and kwargs["mm_hashes"] == [
        i.hash for i in _image_request().mm_items or []
    ]


def test_multimodal_data_item_and_pad_shift_match_sglang() -> None:
    item = _class(SCHEDULE_BATCH_PY, "MultimodalDataItem")
    assert {"hash", "pad_value", "offsets", "precomputed_embeddings", "format"} <= _struct_fields(
        item
    )
    shift = next(
        node.value
        for node in _tree(SCHEDULE_BATCH_PY).body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "MM_PAD_SHIFT_VALUE" for t in node.targets)
    )
    assert isinstance(shift, ast.Constant) and shift.value == MM_PAD_SHIFT
    # The adapter writes each image position back as the model's image token, which SGLang's
    # model config reads from the checkpoint's config.
    config = ast.unparse(_class("srt/configs/model_config.py", "ModelConfig"))
    assert "self.image_token_id =" in config
    assert "model_config" in ast.unparse(
        _class("srt/managers/tokenizer_manager.py", "TokenizerManager")
    )


def test_sampling_params_are_sglang_sampling_params() -> None:
    """Every sampling key we produce is a ``SamplingParams.__init__`` parameter."""
    cls = _class("srt/sampling/sampling_params.py", "SamplingParams")
    try:
        accepted = _params(_method(cls, "__init__"))
    except AssertionError:  # a msgspec Struct / dataclass: its fields are the parameters
        accepted = _struct_fields(cls)
    kwargs = to_generate_kwargs(
        _req(sampling_options=SamplingOptions(n=1, temperature=0.5, top_p=0.9, top_k=20,
                                              min_p=0.1, seed=3, presence_penalty=0.1,
                                              frequency_penalty=0.1, repetition_penalty=1.1)),
        rid="r", disaggregation_mode="null", dp_rank=None,
    )  # fmt: skip
    produced = set(kwargs["sampling_params"]) | {"json_schema", "regex", "ebnf", "structural_tag"}
    assert produced <= accepted, produced - accepted


# --------------------------------------------------------------------------------------------
# (b) real ServerArgs from our command lines


@cache
def _server_args_cls() -> Any:
    from sglang.srt.server_args import ServerArgs

    return ServerArgs


def _parse(argv: list[str], **kw: Any) -> Any:
    return parse_engine_args(argv, prog="worker", env={}, use_sglang=True, **kw)


MODEL = ["--model-path", "/models/llama", "--served-model-name", "llama,llama-3,l3"]


def test_aggregated_command_line() -> None:
    a = _parse([*MODEL, "--page-size", "16", "--tp", "2", "--enable-metrics",
                "--kv-events-config", '{"publisher":"zmq","endpoint":"tcp://*:5557"}'])  # fmt: skip
    sa = a.server_args
    assert isinstance(sa, _server_args_cls())
    assert sa.model_path == "/models/llama"
    assert sa.served_model_name == "llama"
    assert a.served_model_name == ["llama", "llama-3", "l3"]
    assert sa.incremental_streaming_output is True
    assert sa.skip_tokenizer_init is True
    assert sa.is_embedding is False
    assert sa.disaggregation_mode == "null"
    assert (sa.page_size, sa.tp_size, sa.enable_metrics) == (16, 2, True)
    assert sa.disaggregation_bootstrap_port == a.disaggregation_bootstrap_port
    assert 1 <= sa.disaggregation_bootstrap_port <= 65535
    assert a.kv_events_endpoints().endpoints == ["tcp://127.0.0.1:5557"]


def test_prefill_command_line() -> None:
    a = _parse([*MODEL, "--disaggregation-mode", "prefill",
                "--disaggregation-transfer-backend", "nixl"])  # fmt: skip
    sa = a.server_args
    assert sa.disaggregation_mode == "prefill"
    assert sa.disaggregation_transfer_backend == "nixl"
    assert sa.incremental_streaming_output is True
    # no port given: a free one was reserved (the same on ServerArgs and EngineArgs)
    assert sa.disaggregation_bootstrap_port == a.disaggregation_bootstrap_port
    given = _parse([*MODEL, "--disaggregation-mode", "prefill",
                    "--disaggregation-bootstrap-port", "8998"])  # fmt: skip
    assert given.server_args.disaggregation_bootstrap_port == 8998


def test_decode_command_line() -> None:
    a = _parse([*MODEL, "--disaggregation-mode", "decode", "--dp-size", "2", "--engine", "sim"])
    sa = a.server_args
    assert sa.disaggregation_mode == "decode"
    assert sa.dp_size == 2 and a.dp_size == 2
    assert sa.incremental_streaming_output is True
    assert sa.skip_tokenizer_init is True
    assert a.engine == "sim"


def test_embedding_command_lines() -> None:
    for argv, kw in (([*MODEL, "--is-embedding"], {}), (MODEL, {"embedding": True})):
        a = _parse(argv, **kw)
        assert a.server_args.is_embedding is True
        assert a.server_args.skip_tokenizer_init is False  # text in: it needs its tokenizer
        assert a.server_args.incremental_streaming_output is True


def test_full_sglang_flags_accepted() -> None:
    a = _parse([*MODEL, "--enable-hierarchical-cache", "--schedule-policy", "lpm"])
    assert a.server_args.schedule_policy == "lpm"


def test_unknown_flag_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parse([*MODEL, "--no-such-flag"])
    assert exc.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_disagg_config_through_sglang_merger(tmp_path: Path) -> None:
    config = tmp_path / "disagg.yaml"
    config.write_text(
        "prefill:\n  disaggregation-mode: prefill\n  page-size: 32\n  enable-metrics: true\n"
        "decode:\n  disaggregation-mode: decode\n  page-size: 64\n",
        encoding="utf-8",
    )
    a = _parse([*MODEL, "--disagg-config", str(config), "--disagg-config-key", "prefill"])
    assert (a.server_args.disaggregation_mode, a.server_args.page_size) == ("prefill", 32)
    assert a.server_args.enable_metrics is True
    b = _parse([*MODEL, "--page-size", "8", "--disagg-config", str(config),
                "--disagg-config-key", "decode"])  # fmt: skip
    assert (b.server_args.disaggregation_mode, b.server_args.page_size) == ("decode", 8)


def test_validation_still_applies(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _parse([*MODEL, "--page-size", "0"])
    assert "--page-size" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The built-in parser against the real one


@cache
def _sglang_actions() -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser()
    _server_args_cls().add_cli_args(parser)
    return {a.dest: a for a in parser._actions}


@pytest.mark.parametrize("spec", BUILTIN_SGLANG_FLAGS, ids=lambda s: s.dest)
def test_builtin_flag_conforms(spec: engine_args.SglangFlag) -> None:
    real = _sglang_actions().get(spec.dest)
    assert real is not None, f"SGLang has no flag for dest {spec.dest}"
    assert set(spec.flags) <= set(real.option_strings), (spec.flags, real.option_strings)
    assert spec.flags[0] == real.option_strings[0]
    assert spec.default == real.default, (spec.default, real.default)
    assert (spec.kind == "bool") == isinstance(real, argparse._StoreTrueAction)
    if spec.choices is not None:
        assert real.choices is not None and set(spec.choices) <= set(real.choices)
    else:
        assert real.choices is None
    if spec.kind == "hint":
        assert getattr(real.type, "__name__", "") == "human_readable_int"
    elif spec.kind in ("int", "float", "str"):
        assert real.type is {"int": int, "float": float, "str": str}[spec.kind], real.type
    if spec.required:
        assert real.required


def test_builtin_extra_aliases_resolve_the_same_in_sglang() -> None:
    # --tp / --dp work in SGLang through argparse prefix matching; make sure they still do.
    parser = argparse.ArgumentParser()
    _server_args_cls().add_cli_args(parser)
    ns = parser.parse_args(["--model-path", "m", "--tp", "2", "--dp", "3"])
    assert (ns.tp_size, ns.dp_size) == (2, 3)


def test_builtin_and_sglang_parse_alike() -> None:
    argv = [*MODEL, "--page-size", "16", "--tp", "2", "--dp", "2", "--context-length", "8k",
            "--max-prefill-tokens", "4Ki", "--disaggregation-mode", "decode",
            "--kv-events-config", '{"publisher":"zmq"}', "--enable-metrics",
            "--disaggregation-bootstrap-port", "9000", "--mem-fraction-static", "0.7"]  # fmt: skip
    real = parse_engine_args(argv, prog="w", env={}, use_sglang=True)
    builtin = parse_engine_args(argv, prog="w", env={}, use_sglang=False)
    assert real == builtin  # dataclass equality ignores server_args
