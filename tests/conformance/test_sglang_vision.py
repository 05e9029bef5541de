"""Conformance of the SGLang image encoder (``services.encode.sglang_vision``) with the installed
sglang, without a GPU.

What the adapter assumes about SGLang's encoder disaggregation, each checked against SGLang's
own source or classes (the fake in ``tests/unit/test_sglang_vision.py`` relies on the same):

- the bring-up: ``publish(server_args, role="encoder")`` then ``launch_local_runtime(server_args)``
  (what SGLang's encoder HTTP server does), an ``EncoderRuntime`` with ``encoder`` and
  ``scheduler``, ``start()`` synchronous and ``stop()`` a coroutine;
- the request: ``EncoderScheduler.submit(request)``, and the dict we build passes SGLang's own
  ``validate_encode_request``; an image given as bytes is something ``load_image`` takes;
- the answer: ``(nbytes, tokens, hidden, error, code)`` tuples, the embedding staged as
  ``req_states[rid].embedding_data.embedding``, 2-D (tokens x hidden), on the CPU unless the
  mooncake backend keeps it on the GPU; ``release_request(req_id)`` frees it;
- the command line: ``ServerArgs.encoder_only`` exists and means an encoder-only server; our
  image encode command lines (ours and the reference's spelling) give real ``ServerArgs`` with
  it set and ``disaggregation_mode`` null, which SGLang requires.

sglang's encoder modules import transformers, which this venv leaves out, so they are read
with ``ast``; ``ServerArgs``, ``publish`` and ``Modality`` are imported and inspected.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
from functools import cache
from pathlib import Path
from typing import Any

import pytest

import tests.conformance.sglang_present  # noqa: F401  (skips without sglang)
from services.encode.args import ENCODER_ONLY_FLAG, parse_encode_args
from services.encode.sglang_vision import encode_request

_SPEC = importlib.util.find_spec("sglang")
assert _SPEC is not None and _SPEC.submodule_search_locations
SGLANG_ROOT = Path(next(iter(_SPEC.submodule_search_locations)))
ENCODER = "srt/disaggregation/encoder"
SERVER_PY = f"{ENCODER}/server.py"
RUNTIME_PY = f"{ENCODER}/runtime.py"
RECEIVER_PY = f"{ENCODER}/receiver.py"


@cache
def _tree(relative: str) -> ast.Module:
    path = SGLANG_ROOT / relative
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _def(relative: str, name: str) -> ast.AST:
    for node in _tree(relative).body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and (
            node.name == name
        ):
            return node
    raise AssertionError(f"{name} not found in sglang/{relative}")


def _method(cls: ast.AST, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    assert isinstance(cls, ast.ClassDef)
    for node in cls.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
            return node
    raise AssertionError(f"{cls.name}.{name} not found")


def _params(fn: ast.AST) -> list[str]:
    assert isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
    a = fn.args
    return [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs) if p.arg not in ("self",)]


def _fields(cls: ast.AST) -> set[str]:
    assert isinstance(cls, ast.ClassDef)
    return {
        n.target.id
        for n in cls.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }


# -- bring-up ---------------------------------------------------------------------------------


def test_publish_takes_the_encoder_role() -> None:
    from sglang.srt.runtime_context import ROLE_NAMESPACE_SETS, publish

    params = inspect.signature(publish).parameters
    assert next(iter(params)) == "server_args"
    assert params["role"].kind is inspect.Parameter.KEYWORD_ONLY
    assert "encoder" in ROLE_NAMESPACE_SETS  # publish refuses roles it does not know


def test_sglangs_own_server_publishes_then_launches_the_local_runtime() -> None:
    """Our bring-up is SGLang's ``launch_server`` minus uvicorn: the same two calls, in order."""
    launch = ast.unparse(_def(f"{ENCODER}/http_server.py", "launch_server"))
    publish_at = launch.index("publish(server_args, role='encoder')")
    assert publish_at < launch.index("launch_local_runtime(server_args)")
    fn = _def(RUNTIME_PY, "launch_local_runtime")
    assert isinstance(fn, ast.FunctionDef) and _params(fn) == ["server_args"]
    assert fn.returns is not None and ast.unparse(fn.returns) == "EncoderRuntime"
    runtime = _def(RUNTIME_PY, "EncoderRuntime")
    assert {"encoder", "scheduler"} <= _fields(runtime)
    assert isinstance(_method(runtime, "start"), ast.FunctionDef)  # called, not awaited
    assert isinstance(_method(runtime, "stop"), ast.AsyncFunctionDef)


# -- the request ------------------------------------------------------------------------------


def test_scheduler_submit_takes_one_request_dict() -> None:
    scheduler = _def(RUNTIME_PY, "EncoderScheduler")
    submit = _method(scheduler, "submit")
    assert isinstance(submit, ast.AsyncFunctionDef) and _params(submit) == ["request"]
    assert "self.max_batch_size =" in ast.unparse(_method(scheduler, "__init__"))


def _sglang_validator() -> Any:
    """SGLang's own ``validate_encode_request``, compiled from its source (its module imports
    transformers), run with SGLang's real ``Modality``."""
    from sglang.srt.multimodal.modality import Modality

    fn = _def(RUNTIME_PY, "validate_encode_request")
    assert isinstance(fn, ast.FunctionDef)
    module = ast.Module(body=[fn], type_ignores=[])
    namespace: dict[str, Any] = {"Modality": Modality, "Optional": Any}
    exec(compile(module, "validate_encode_request", "exec"), namespace)
    return namespace["validate_encode_request"]


def test_our_request_passes_sglangs_validation() -> None:
    from sglang.srt.multimodal.modality import Modality

    validate = _sglang_validator()
    request = encode_request("sglmesh-image-1-0", b"\x89PNG...")
    assert validate(request) is None
    assert Modality.from_str(request["modality"]) is Modality.IMAGE
    # The validator can fail: it is not vacuous.
    assert validate({**request, "part_idx": 1}) is not None
    assert validate({**request, "mm_items": []}) is not None


def test_image_bytes_are_what_sglangs_loader_takes() -> None:
    load = ast.unparse(_def("srt/utils/common.py", "load_image"))
    assert "isinstance(image_file, bytes)" in load
    # The preprocessor hands each item to load_image (a dict only when it carries a url).
    preprocessor = _def(f"{ENCODER}/preprocessor.py", "EncoderPreprocessor")
    single = ast.unparse(_method(preprocessor, "_load_single_item"))
    assert "load_image(data" in single


# -- the answer -------------------------------------------------------------------------------


def test_batch_results_are_nbytes_tokens_hidden_error_code() -> None:
    encoder = _def(SERVER_PY, "MMEncoder")
    staged = ast.unparse(_method(encoder, "_stage_embeddings"))
    assert "(embedding.nbytes, embedding.shape[0], embedding.shape[1], None, None)" in staged
    errors = ast.unparse(_method(encoder, "_stage_errors"))
    assert "(0, 0, 0, msg, code)" in errors
    batch = _method(encoder, "batch_encode")
    assert isinstance(batch, ast.AsyncFunctionDef) and _params(batch) == ["requests", "modality"]


def test_the_embedding_is_staged_two_dimensional_where_we_read_it() -> None:
    encoder = _def(SERVER_PY, "MMEncoder")
    init = ast.unparse(_method(encoder, "__init__"))
    assert "self.req_states: Dict[str, ReqState] = {}" in init
    assert "embedding_data" in _fields(_def(SERVER_PY, "ReqState"))
    staged = ast.unparse(_method(encoder, "_stage_embeddings"))
    assert "EmbeddingData(" in staged and "embedding," in staged
    data = _method(_def(RECEIVER_PY, "EmbeddingData"), "__init__")
    assert "embedding" in _params(data)
    assert "self.embedding = embedding" in ast.unparse(data)
    direct = ast.unparse(_method(encoder, "_compute_direct_embedding"))
    # tokens x hidden, whatever the tower returned; moved to the CPU unless kept for mooncake.
    assert "mm_embedding.reshape(-1, mm_embedding.shape[-1])" in direct
    assert "if not keep_on_gpu:" in direct and "mm_embedding.cpu()" in direct
    batch = ast.unparse(_method(encoder, "batch_encode"))
    assert "keep_on_gpu = self.use_mooncake and (not is_health_check)" in batch


def test_release_request_frees_a_staged_rid() -> None:
    release = _method(_def(SERVER_PY, "MMEncoder"), "release_request")
    assert isinstance(release, ast.AsyncFunctionDef)
    assert _params(release)[0] == "req_id"
    assert release.args.kwonlyargs and all(d is not None for d in release.args.kw_defaults)
    assert "self.req_states.pop(req_id, None)" in ast.unparse(release)


# -- the command line -------------------------------------------------------------------------


def test_encoder_only_is_sglangs_encoder_only_server_flag() -> None:
    from sglang.srt.server_args import ServerArgs

    disagg = ast.unparse(_def("srt/arg_groups/fields/disagg.py", "Disagg"))
    assert (
        "encoder_only: A[bool, 'For MLLM with an encoder, launch an encoder-only server'] = False"
        in disagg
    )
    import argparse

    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    action = next(a for a in parser._actions if a.dest == "encoder_only")
    assert ENCODER_ONLY_FLAG in action.option_strings
    assert isinstance(action, argparse._StoreTrueAction) and action.default is False
    # SGLang refuses encoder_only beside a prefill/decode mode: ours must stay null.
    hook = ast.unparse(
        _def("srt/arg_groups/pd_disaggregation_hook.py", "handle_encoder_disaggregation")
    )
    assert "if cfg.encoder_only and (not cfg.disaggregation_mode == 'null'):" in hook


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shared.engine.registry.gpu_visible", lambda env=None: (True, "a GPU"))


@pytest.mark.parametrize(
    "argv",
    [
        ["--multimodal-encode-worker", "--engine", "sglang"],
        ["--multimodal-encode-worker"],  # auto: sglang, a GPU, a model that is not .onnx
        ["--enable-multimodal", "--disaggregation-mode", "encode", "--engine", "sglang"],
    ],
)
def test_image_encode_command_lines_give_encoder_only_server_args(
    gpu: None, argv: list[str]
) -> None:
    from sglang.srt.server_args import ServerArgs

    config = parse_encode_args(
        [*argv, "--model-path", "Qwen/Qwen2.5-VL-7B-Instruct", "--vision-image-size", "448"],
        env={},
        use_sglang=True,
    )
    sa = config.worker.engine.server_args
    assert isinstance(sa, ServerArgs)
    assert config.engine == "sglang" and config.worker.vision and config.image_size == 448
    assert sa.encoder_only is True and sa.language_only is False
    assert sa.disaggregation_mode == "null"
    assert sa.model_path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert config.worker.engine.model_name == "Qwen/Qwen2.5-VL-7B-Instruct"
    # --enable-multimodal is the role flag here (taken off): SGLang decides, and for a VL model
    # outside its short list of opt-in architectures it turns multimodal on (as the reference
    # sets it for its encode worker).
    assert sa.enable_multimodal is None
    config_source = ast.unparse(_def("srt/configs/model_config.py", "ModelConfig"))
    disabled = config_source.split("mm_disabled_models = [", 1)[1].split("]", 1)[0]
    assert "Qwen2_5_VL" not in disabled and "enable_multimodal = True" in config_source
    # The model family is one SGLang's encoder disaggregation serves.
    hook = ast.unparse(
        _def("srt/arg_groups/pd_disaggregation_hook.py", "handle_encoder_disaggregation")
    )
    assert "'Qwen2_5_VLForConditionalGeneration'" in hook


def test_no_gpu_is_a_one_line_error_naming_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("shared.engine.registry.gpu_visible", lambda env=None: (False, "no GPU"))
    with pytest.raises(SystemExit) as exc:
        parse_encode_args(
            ["--multimodal-encode-worker", "--engine", "sglang", "--model-path", "/m/qwen-vl"],
            env={},
            use_sglang=True,
        )
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--engine sglang needs a GPU" in last
