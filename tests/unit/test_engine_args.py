"""Engine command line: the built-in SGLang subset, what the mesh forces, the mesh engine flags.

The expected table below was read from the sglang 0.5.23 wheel
(``sglang/srt/arg_groups/fields/*.py`` and ``ServerArgs.add_cli_args``); the conformance test
re-checks the built-in parser against the real SGLang parser where sglang is installed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest

from shared.engine import args as engine_args
from shared.engine import registry
from shared.engine.args import (
    BUILTIN_SGLANG_FLAGS,
    EngineArgs,
    EngineSelectionError,
    add_engine_args,
    engine_flag_values,
    human_readable_int,
    kv_events_endpoints,
    parse_engine_args,
)

# dest: (flags as SGLang spells them, default, choices or None, store_true?)
SGLANG_0_5_23: dict[str, tuple[tuple[str, ...], Any, tuple[str, ...] | None, bool]] = {
    "model_path": (("--model-path", "--model"), None, None, False),
    "tokenizer_path": (("--tokenizer-path",), None, None, False),
    "tokenizer_mode": (("--tokenizer-mode",), "auto", ("auto", "slow"), False),
    "revision": (("--revision",), None, None, False),
    "trust_remote_code": (("--trust-remote-code",), False, None, True),
    "context_length": (("--context-length",), None, None, False),
    "is_embedding": (("--is-embedding",), False, None, True),
    "json_model_override_args": (("--json-model-override-args",), "{}", None, False),
    "dtype": (
        ("--dtype",),
        "auto",
        ("auto", "half", "float16", "bfloat16", "float", "float32"),
        False,
    ),
    "skip_tokenizer_init": (("--skip-tokenizer-init",), False, None, True),
    "served_model_name": (("--served-model-name",), None, None, False),
    "chat_template": (("--chat-template",), None, None, False),
    "host": (("--host",), "127.0.0.1", None, False),
    "port": (("--port",), 30000, None, False),
    "incremental_streaming_output": (("--incremental-streaming-output",), False, None, True),
    "mem_fraction_static": (("--mem-fraction-static",), None, None, False),
    "max_running_requests": (("--max-running-requests",), None, None, False),
    "max_total_tokens": (("--max-total-tokens",), None, None, False),
    "chunked_prefill_size": (("--chunked-prefill-size",), None, None, False),
    "max_prefill_tokens": (("--max-prefill-tokens",), 16384, None, False),
    "page_size": (("--page-size",), None, None, False),
    "disable_radix_cache": (("--disable-radix-cache",), False, None, True),
    "random_seed": (("--random-seed",), None, None, False),
    "enable_multimodal": (("--enable-multimodal",), None, None, True),
    "tp_size": (("--tp-size", "--tensor-parallel-size"), 1, None, False),
    "pp_size": (("--pp-size", "--pipeline-parallel-size"), 1, None, False),
    "dp_size": (("--dp-size", "--data-parallel-size"), 1, None, False),
    "dist_init_addr": (("--dist-init-addr", "--nccl-init-addr"), None, None, False),
    "nnodes": (("--nnodes",), 1, None, False),
    "node_rank": (("--node-rank",), 0, None, False),
    "disaggregation_mode": (
        ("--disaggregation-mode",),
        "null",
        ("null", "prefill", "decode"),
        False,
    ),
    "disaggregation_transfer_backend": (
        ("--disaggregation-transfer-backend",),
        "mooncake",
        ("mooncake", "nixl", "ascend", "fake", "mori", "mooncake_tcp"),
        False,
    ),
    "disaggregation_bootstrap_port": (("--disaggregation-bootstrap-port",), 8998, None, False),
    "log_level": (("--log-level",), "info", None, False),
    "enable_metrics": (("--enable-metrics",), False, None, True),
    "decode_log_interval": (("--decode-log-interval",), 40, None, False),
    "kv_events_config": (("--kv-events-config",), None, None, False),
    "device": (("--device",), None, None, False),
    "watchdog_timeout": (("--watchdog-timeout",), 300, None, False),
}

# The mesh flags' environment: never the test runner's own.
NO_ENV: dict[str, str] = {}


def parse(argv: list[str], env: dict[str, str] | None = None, **kw: Any) -> EngineArgs:
    return parse_engine_args(
        argv, prog="t", env=NO_ENV if env is None else env, use_sglang=False, **kw
    )


def builtin_actions() -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser(add_help=False)
    engine_args._add_builtin_sglang_args(parser)
    return {a.dest: a for a in parser._actions}


# --------------------------------------------------------------------------------------------
# The built-in parser mirrors SGLang


@pytest.mark.parametrize("dest", sorted(SGLANG_0_5_23))
def test_builtin_flag_matches_sglang(dest: str) -> None:
    flags, default, choices, store_true = SGLANG_0_5_23[dest]
    action = builtin_actions()[dest]
    sglang_spellings = [o for o in action.option_strings if o not in ("--tp", "--dp")]
    assert tuple(sglang_spellings) == flags
    assert action.default == default
    assert (tuple(action.choices) if action.choices else None) == choices
    assert isinstance(action, argparse._StoreTrueAction) == store_true


def test_every_builtin_flag_is_in_the_table() -> None:
    listed = {spec.dest for spec in BUILTIN_SGLANG_FLAGS} - {
        "config",
        "kv_cache_dtype",
        "load_format",
        "stream_interval",
    }
    assert listed <= set(SGLANG_0_5_23)


def test_defaults_and_forced_settings() -> None:
    a = parse(["--model-path", "/models/x"])
    assert a.model_path == "/models/x"
    assert a.served_model_name == ["/models/x"]
    assert a.model_name == "/models/x"
    assert a.page_size is None
    assert a.max_prefill_tokens == 16384
    assert (a.tp_size, a.dp_size, a.nnodes, a.node_rank) == (1, 1, 1, 0)
    assert a.disaggregation_mode == "null"
    assert a.disaggregation_transfer_backend == "mooncake"
    assert a.kv_events_config is None and not a.kv_events_enabled
    assert a.enable_metrics is False
    assert a.is_embedding is False
    assert a.random_seed is None
    # forced, as the reference forces them
    assert a.incremental_streaming_output is True
    assert a.skip_tokenizer_init is True
    assert 1 <= a.disaggregation_bootstrap_port <= 65535
    # mesh engine flags
    assert a.engine == "auto"
    assert a.speedup_ratio == 1.0
    assert a.kv_bytes_per_token == 131072 == 32 * 8 * 128 * 2 * 2
    assert a.sim_output_len_mean == 0
    assert a.bootstrap_timeout == 300.0
    assert a.server_args is None


def test_bootstrap_port_kept_when_given() -> None:
    assert (
        parse(
            ["--model", "m", "--disaggregation-bootstrap-port", "8998"]
        ).disaggregation_bootstrap_port
        == 8998
    )
    assert (
        parse(
            ["--model", "m", "--disaggregation-bootstrap-port=9100"]
        ).disaggregation_bootstrap_port
        == 9100
    )


def test_free_bootstrap_ports_differ_between_workers() -> None:
    ports = {parse(["--model", "m"]).disaggregation_bootstrap_port for _ in range(5)}
    assert len(ports) > 1


def test_embedding_worker_keeps_its_tokenizer() -> None:
    a = parse(["--model-path", "m"], embedding=True)
    assert a.is_embedding is True
    assert a.skip_tokenizer_init is False
    b = parse(["--model-path", "m", "--is-embedding"])
    assert b.is_embedding is True and b.skip_tokenizer_init is False


def test_served_model_name_list() -> None:
    a = parse(["--model-path", "/m", "--served-model-name", "llama, llama-alias  other,llama"])
    assert a.served_model_name == ["llama", "llama-alias", "other"]
    assert a.model_name == "llama"
    assert a.model_aliases == ["llama-alias", "other"]


def test_sglang_spellings_and_aliases() -> None:
    a = parse(
        [
            "--model", "m", "--tp", "2", "--dp", "4", "--page-size", "16",
            "--context-length", "8k", "--max-total-tokens", "1Mi", "--max-prefill-tokens", "1.5k",
            "--disaggregation-mode", "prefill", "--disaggregation-transfer-backend", "nixl",
            "--nnodes", "2", "--node-rank", "1", "--dist-init-addr", "10.0.0.1:5000",
            "--enable-metrics", "--random-seed", "7", "--mem-fraction-static", "0.8",
            "--chunked-prefill-size", "-1", "--max-running-requests", "64",
            "--trust-remote-code", "--tokenizer-path", "/tok", "--log-level", "debug",
        ]
    )  # fmt: skip
    assert (a.tp_size, a.dp_size, a.page_size) == (2, 4, 16)
    assert (a.context_length, a.max_total_tokens, a.max_prefill_tokens) == (8000, 2**20, 1500)
    assert a.disaggregation_mode == "prefill"
    assert a.disaggregation_transfer_backend == "nixl"
    assert (a.nnodes, a.node_rank, a.dist_init_addr) == (2, 1, "10.0.0.1:5000")
    assert a.enable_metrics and a.trust_remote_code
    assert (a.random_seed, a.mem_fraction_static, a.chunked_prefill_size) == (7, 0.8, -1)
    assert a.max_running_requests == 64
    assert a.tokenizer_path == "/tok"
    assert a.log_level == "debug"
    long = parse(["--model", "m", "--tensor-parallel-size", "2", "--data-parallel-size", "3"])
    assert (long.tp_size, long.dp_size) == (2, 3)


def test_human_readable_int() -> None:
    assert human_readable_int("4096") == 4096
    assert human_readable_int("32k") == 32_000
    assert human_readable_int("1.5M") == 1_500_000
    assert human_readable_int("32Ki") == 32 * 1024
    with pytest.raises(argparse.ArgumentTypeError):
        human_readable_int("1.5Ki")
    with pytest.raises(argparse.ArgumentTypeError):
        human_readable_int("lots")


# --------------------------------------------------------------------------------------------
# Errors: exit status 2 and a message naming the flag


def fails(argv: list[str], capsys: pytest.CaptureFixture[str], **kw: Any) -> str:
    with pytest.raises(SystemExit) as exc:
        parse(argv, **kw)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_unknown_flag_names_it_and_points_at_sglang(capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(["--model-path", "m", "--enable-hierarchical-cache"], capsys)
    assert "--enable-hierarchical-cache" in err
    assert "pip install sglang" in err
    assert "Traceback" not in err


def test_no_prefix_matching_in_builtin_mode(capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(["--model-path", "m", "--max-running", "3"], capsys)
    assert "--max-running" in err


def test_model_path_required(capsys: pytest.CaptureFixture[str]) -> None:
    assert "--model-path" in fails([], capsys)


def test_default_model_used_when_no_model_path() -> None:
    a = parse(["--page-size", "4"], default_model=lambda: "/cache/default")
    assert a.model_path == "/cache/default"
    b = parse(["--model", "/explicit"], default_model=lambda: pytest.fail("not needed"))
    assert b.model_path == "/explicit"


def test_default_model_failure_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    def broken() -> str:
        raise RuntimeError("pip install 'sglmesh[model]'")

    err = fails([], capsys, default_model=broken)
    assert "default model" in err and "sglmesh[model]" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--page-size", "0"], "--page-size"),
        (["--dp-size", "0"], "--dp-size"),
        (["--tp-size", "0"], "--tp-size"),
        (["--nnodes", "2", "--node-rank", "2"], "--node-rank"),
        (["--disaggregation-mode", "both"], "--disaggregation-mode"),
        (["--disaggregation-transfer-backend", "tcp"], "--disaggregation-transfer-backend"),
        (["--kv-events-config", "{not json"], "--kv-events-config"),
        (["--kv-events-config", "[1, 2]"], "--kv-events-config"),
        (["--kv-events-config", '{"publisher": "kafka"}'], "publisher"),
        (["--kv-events-config", '{"publisher": "zmq", "endpoint": "5557"}'], "endpoint"),
        (["--chunked-prefill-size", "0"], "--chunked-prefill-size"),
        (["--mem-fraction-static", "1.5"], "--mem-fraction-static"),
        (["--context-length", "0"], "--context-length"),
        (["--max-running-requests", "0"], "--max-running-requests"),
        (["--disaggregation-bootstrap-port", "70000"], "--disaggregation-bootstrap-port"),
        (["--page-size", "x"], "--page-size"),
        (["--speedup-ratio", "-1"], "--speedup-ratio"),
        (["--engine", "gpu"], "--engine"),
        (["--kv-bytes-per-token", "0"], "--kv-bytes-per-token"),
        (["--bootstrap-timeout", "0"], "--bootstrap-timeout"),
    ],
)
def test_validation_names_the_flag(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert needle in fails(["--model-path", "m", *argv], capsys)


# --------------------------------------------------------------------------------------------
# Mesh engine flags and their environment twins


def test_mesh_flags() -> None:
    a = parse(
        [
            "--model-path", "m", "--engine", "sim", "--speedup-ratio", "0",
            "--kv-bytes-per-token", "1024", "--sim-output-len-mean", "50",
            "--bootstrap-timeout", "2.5", "--sim-timeslice-ms", "0",
        ]
    )  # fmt: skip
    assert (a.engine, a.speedup_ratio, a.kv_bytes_per_token) == ("sim", 0.0, 1024)
    assert (a.sim_output_len_mean, a.bootstrap_timeout, a.sim_timeslice_ms) == (50, 2.5, 0.0)
    assert parse(["--model-path", "m"]).sim_timeslice_ms == 0.5


def test_env_twins_and_precedence() -> None:
    env = {
        "SGLMESH_ENGINE": "sim",
        "SGLMESH_SPEEDUP_RATIO": "4",
        "SGLMESH_KV_BYTES_PER_TOKEN": "2048",
        "SGLMESH_SIM_OUTPUT_LEN_MEAN": "9",
        "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT": "30",
        "SGLMESH_SIM_TIMESLICE_MS": "2",
    }
    a = parse(["--model-path", "m"], env)
    assert (a.engine, a.speedup_ratio, a.kv_bytes_per_token) == ("sim", 4.0, 2048)
    assert (a.sim_output_len_mean, a.bootstrap_timeout) == (9, 30.0)
    assert a.sim_timeslice_ms == 2.0
    # SGLMESH_* beats the reference's variable; the flag beats both
    env["SGLMESH_BOOTSTRAP_TIMEOUT"] = "60"
    assert parse(["--model-path", "m"], env).bootstrap_timeout == 60.0
    assert parse(["--model-path", "m", "--bootstrap-timeout", "5"], env).bootstrap_timeout == 5.0
    assert parse(["--model-path", "m", "--engine", "auto"], env).engine == "auto"


def test_empty_env_counts_as_unset() -> None:
    a = parse(["--model-path", "m"], {"SGLMESH_SPEEDUP_RATIO": "", "SGLMESH_ENGINE": " "})
    assert (a.speedup_ratio, a.engine) == (1.0, "auto")


def test_invalid_env_names_variable(capsys: pytest.CaptureFixture[str]) -> None:
    err = fails(["--model-path", "m"], capsys, env={"SGLMESH_SPEEDUP_RATIO": "fast"})
    assert "SGLMESH_SPEEDUP_RATIO" in err and "--speedup-ratio" in err


def test_help_lists_engine_flags_with_env(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag, env in [
        ("--engine", "SGLMESH_ENGINE"),
        ("--speedup-ratio", "SGLMESH_SPEEDUP_RATIO"),
        ("--kv-bytes-per-token", "SGLMESH_KV_BYTES_PER_TOKEN"),
        ("--sim-output-len-mean", "SGLMESH_SIM_OUTPUT_LEN_MEAN"),
        ("--sim-timeslice-ms", "SGLMESH_SIM_TIMESLICE_MS"),
        ("--bootstrap-timeout", "SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT"),
        ("--disagg-config", "SGLMESH_DISAGG_CONFIG"),
        ("--disagg-config-key", "SGLMESH_DISAGG_CONFIG_KEY"),
    ]:
        assert flag in out and env in out
    assert "--model-path" in out and "--disaggregation-mode" in out


def test_add_engine_args_on_a_callers_parser() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    ns = parser.parse_args([])
    assert ns.engine is None and ns.speedup_ratio is None  # so the environment can fill in
    values = engine_flag_values(ns, {"SGLMESH_ENGINE": "sim"})
    assert values["engine"] == "sim" and values["speedup_ratio"] == 1.0
    ns = parser.parse_args(["--engine", "sglang"])
    assert engine_flag_values(ns, {"SGLMESH_ENGINE": "sim"})["engine"] == "sglang"
    with pytest.raises(ValueError, match="SGLMESH_KV_BYTES_PER_TOKEN"):
        engine_flag_values(parser.parse_args([]), {"SGLMESH_KV_BYTES_PER_TOKEN": "-4"})


# --------------------------------------------------------------------------------------------
# --disagg-config / --config


@pytest.fixture
def disagg_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "disagg.yaml"
    path.write_text(
        "prefill:\n"
        "  disaggregation-mode: prefill\n"
        "  page-size: 32\n"
        "  enable-metrics: true\n"
        "  disaggregation-bootstrap-port: 9001\n"
        "decode:\n"
        "  disaggregation-mode: decode\n"
        "  page_size: 64\n"
        "  enable_metrics: false\n"
        "broken: 3\n",
        encoding="utf-8",
    )
    return path


def test_disagg_config_section_applies(disagg_yaml: Path) -> None:
    a = parse(
        ["--model-path", "m", "--disagg-config", str(disagg_yaml), "--disagg-config-key", "prefill"]
    )
    assert (a.disaggregation_mode, a.page_size, a.enable_metrics) == ("prefill", 32, True)
    # a port from the file counts as given: no free port is reserved over it
    assert a.disaggregation_bootstrap_port == 9001
    b = parse(
        ["--model-path", "m", "--disagg-config", str(disagg_yaml), "--disagg-config-key", "decode"]
    )
    assert (b.disaggregation_mode, b.page_size, b.enable_metrics) == ("decode", 64, False)
    assert (b.disagg_config, b.disagg_config_key) == (str(disagg_yaml), "decode")


def test_command_line_overrides_disagg_config(disagg_yaml: Path) -> None:
    a = parse(
        ["--model-path", "m", "--page-size", "8", "--disagg-config", str(disagg_yaml),
         "--disagg-config-key", "prefill"]
    )  # fmt: skip
    assert a.page_size == 8


def test_disagg_config_from_env(disagg_yaml: Path) -> None:
    env = {"DYN_SGL_DISAGG_CONFIG": str(disagg_yaml), "SGLMESH_DISAGG_CONFIG_KEY": "decode"}
    assert parse(["--model-path", "m"], env).disaggregation_mode == "decode"


def test_disagg_config_temp_file_removed(disagg_yaml: Path, tmp_path: Path) -> None:
    import tempfile

    before = set(Path(tempfile.gettempdir()).glob("sglmesh-disagg-*"))
    parse(
        ["--model-path", "m", "--disagg-config", str(disagg_yaml), "--disagg-config-key", "decode"]
    )
    assert set(Path(tempfile.gettempdir()).glob("sglmesh-disagg-*")) == before


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--disagg-config", "X"], "together"),
        (["--disagg-config-key", "prefill"], "together"),
        (["--disagg-config", "X", "--disagg-config-key", "nope"], "nope"),
        (["--disagg-config", "X", "--disagg-config-key", "broken"], "mapping"),
        (["--disagg-config", "/does/not/exist.yaml", "--disagg-config-key", "a"], "does not exist"),
    ],
)
def test_disagg_config_errors(
    extra: list[str], needle: str, disagg_yaml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model-path", "m", *(str(disagg_yaml) if a == "X" else a for a in extra)]
    assert needle in fails(argv, capsys)


def test_config_file_builtin_merge(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "model-path: /from/config\npage-size: 16\nenable-metrics: true\n"
        "kv-events-config: {publisher: zmq, endpoint: 'tcp://*:6000'}\n",
        encoding="utf-8",
    )
    a = parse(["--config", str(config), "--page-size", "4"])
    assert a.model_path == "/from/config"
    assert a.page_size == 4  # the command line wins
    assert a.enable_metrics is True
    assert json.loads(a.kv_events_config or "")["endpoint"] == "tcp://*:6000"


# --------------------------------------------------------------------------------------------
# Engine selection and KV event endpoints


def test_resolve_engine_kind(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with_weights = tmp_path / "model"
    with_weights.mkdir()
    (with_weights / "model.safetensors").write_bytes(b"")

    def resolved(engine: str, model: Path = tmp_path) -> tuple[str, str]:
        kind, reason = registry.resolve(EngineArgs(str(model), ["m"], engine=engine), {})
        return kind.name, reason

    installed = {"sglang": False, "torch": True, "transformers": True, "safetensors": True}
    monkeypatch.setattr(registry, "package_installed", lambda name: installed.get(name, False))
    assert resolved("sim")[0] == "sim"
    # auto, no sglang: torch when the model has weights, else the simulator.
    assert resolved("auto", with_weights) == (
        "torch",
        "--engine auto: torch is installed and the model has weights "
        "(not sglang: sglang is not installed)",
    )
    kind, reason = resolved("auto")
    assert kind == "sim" and "has no *.safetensors weights" in reason
    with pytest.raises(EngineSelectionError, match="pip install sglang"):
        resolved("sglang")
    installed["torch"] = False
    assert resolved("auto", with_weights)[0] == "sim"
    with pytest.raises(EngineSelectionError, match=r"needs torch: pip install 'sglmesh\[cpu\]'"):
        resolved("torch", with_weights)
    installed["sglang"] = True
    monkeypatch.setattr(registry, "gpu_visible", lambda env=None: (False, "no GPU here"))
    assert resolved("auto")[1].startswith("--engine auto: no real engine can run here")
    assert "sglang is installed but no GPU here" in resolved("auto")[1]
    monkeypatch.setattr(registry, "gpu_visible", lambda env=None: (True, "GPU nodes found"))
    assert resolved("auto")[0] == "sglang"
    assert resolved("sglang")[0] == "sglang"
    with pytest.raises(EngineSelectionError, match="unknown engine 'tpu'"):
        resolved("tpu")


def test_engine_flag_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert registry.engine_names() == ("sglang", "torch", "sim")
    with pytest.raises(SystemExit):
        parse_engine_args(["--model-path", "m", "--engine", "tpu"], prog="w", use_sglang=False)
    assert "expected one of sglang, torch, sim, auto" in capsys.readouterr().err


def test_gpu_hidden_by_cuda_visible_devices() -> None:
    assert registry.gpu_visible({"CUDA_VISIBLE_DEVICES": "-1"})[0] is False
    assert registry.gpu_visible({"CUDA_VISIBLE_DEVICES": ""})[0] is False


def test_kv_events_endpoints() -> None:
    assert kv_events_endpoints(None).endpoints == []
    assert kv_events_endpoints('{"publisher": "null"}').endpoints == []
    ep = kv_events_endpoints(
        '{"publisher": "zmq", "endpoint": "tcp://*:5557", "replay_endpoint": "tcp://*:5600",'
        ' "topic": "kv"}',
        dp_size=3,
    )
    assert ep.endpoints == ["tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558", "tcp://127.0.0.1:5559"]
    assert ep.replay_endpoints == [
        "tcp://127.0.0.1:5600",
        "tcp://127.0.0.1:5601",
        "tcp://127.0.0.1:5602",
    ]
    assert ep.topic == "kv"
    host = kv_events_endpoints('{"publisher": "zmq", "endpoint": "tcp://10.1.2.3:7000"}', 2)
    assert host.endpoints == ["tcp://10.1.2.3:7000", "tcp://10.1.2.3:7001"]
    default = kv_events_endpoints('{"publisher": "zmq"}')
    assert default.endpoints == ["tcp://127.0.0.1:5557"]
    a = parse(["--model-path", "m", "--dp-size", "2", "--kv-events-config", '{"publisher":"zmq"}'])
    assert a.kv_events_enabled
    assert a.kv_events_endpoints().endpoints == ["tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558"]
