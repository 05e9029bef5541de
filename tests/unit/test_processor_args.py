"""The processor's command line (services/processor/args.py)."""

from __future__ import annotations

import pytest

from services.processor.args import parse_processor_args
from shared.router import RouterMode


def test_defaults() -> None:
    cfg = parse_processor_args([], env={})
    f = cfg.flags
    assert (f.http_host, f.http_port, f.router_mode) == ("127.0.0.1", 8000, RouterMode.KV)
    assert (f.migration_limit, f.max_inflight, f.active_decode_blocks_threshold) == (3, 1024, None)
    assert cfg.mesh.namespace == "sglmesh"


def test_flags_then_env_twins() -> None:
    env = {
        "SGLMESH_HTTP_PORT": "9000",
        "DYN_ROUTER_MODE": "least_loaded",
        "DYN_MIGRATION_LIMIT": "5",
        "SGLMESH_ACTIVE_DECODE_BLOCKS_THRESHOLD": "0.8",
    }
    f = parse_processor_args([], env=env).flags
    assert (f.http_port, f.router_mode, f.migration_limit) == (9000, RouterMode.LEAST_LOADED, 5)
    assert f.active_decode_blocks_threshold == 0.8
    f = parse_processor_args(["--http-port", "9100", "--router-mode", "random"], env=env).flags
    assert (f.http_port, f.router_mode) == (9100, RouterMode.RANDOM)


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--http-port", "70000"], {}, "--http-port"),
        (["--router-mode", "kv-ish"], {}, "--router-mode"),
        (["--active-decode-blocks-threshold", "1.5"], {}, "--active-decode-blocks-threshold"),
        (["--migration-limit", "-1"], {}, "--migration-limit"),
        (["--custom-jinja-template", "/nonexistent.jinja"], {}, "--custom-jinja-template"),
        ([], {"SGLMESH_MAX_BODY_BYTES": "0"}, "SGLMESH_MAX_BODY_BYTES"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(
    argv: list[str], env: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_processor_args(argv, env=env)
    assert exc.value.code == 2
    assert named in capsys.readouterr().err


def test_every_flag_has_help_with_env(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_processor_args(["--help"], env={})
    out = capsys.readouterr().out
    for flag in (
        "--http-host",
        "--http-port",
        "--router-mode",
        "--max-inflight",
        "--migration-limit",
        "--max-body-bytes",
        "--active-decode-blocks-threshold",
    ):
        assert flag in out
    assert "SGLMESH_HTTP_PORT" in out and "DYN_HTTP_PORT" in out


def test_kv_router_flags() -> None:
    cfg = parse_processor_args(
        ["--router-temperature", "0.5", "--no-router-kv-events"],
        env={"DYN_ROUTER_PREFILL_LOAD_SCALE": "2"},
    )
    kv = cfg.kv_router
    assert (kv.temperature, kv.use_kv_events, kv.prefill_load_scale) == (0.5, False, 2.0)
    assert parse_processor_args([], env={}).kv_router.use_kv_events


def test_router_mode_any_is_a_client_mode_only() -> None:
    # One RouterMode for every router; the processor takes its own subset.
    with pytest.raises(SystemExit):
        parse_processor_args(["--router-mode", "any"], env={})
