"""Mesh configuration (shared.config) and structured logging (shared.logging).

Environment precedence is tested through the ``env=`` parameter, never os.environ, so the
tests cannot leak into (or be disturbed by) the process environment.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.config import (
    EndpointId,
    MeshConfig,
    MeshConfigError,
    add_mesh_args,
    mesh_config_from_namespace,
    parse_bool,
    parse_endpoint,
    parse_mesh_args,
)
from shared.logging import NOISY_LOGGERS, JsonFormatter, TextFormatter, configure_logging

# --------------------------------------------------------------------------------------------
# Endpoint names


@pytest.mark.parametrize("text", ["dyn://ns.comp.ep", "ns.comp.ep"])
def test_parse_endpoint_accepts_both_forms(text: str) -> None:
    ep = parse_endpoint(text)
    assert ep == EndpointId("ns", "comp", "ep")
    assert (ep.namespace, ep.component, ep.endpoint) == ("ns", "comp", "ep")
    assert str(ep) == "ns.comp.ep"
    assert ep.uri == "dyn://ns.comp.ep"
    assert ep.subject == "ns.comp.ep"


def test_parse_endpoint_allows_letters_digits_underscore_dash() -> None:
    ep = parse_endpoint("dyn://My-ns_1.back_end-2.gen3")
    assert ep == EndpointId("My-ns_1", "back_end-2", "gen3")
    assert parse_endpoint(ep.uri) == ep
    assert parse_endpoint(str(ep)) == ep


def test_endpoint_id_is_frozen_and_hashable() -> None:
    ep = EndpointId("a", "b", "c")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ep.namespace = "x"  # type: ignore[misc]
    assert {ep: 1}[EndpointId("a", "b", "c")] == 1


@pytest.mark.parametrize(
    "text",
    [
        "",
        "dyn://",
        "a",
        "a.b",
        "dyn://a.b",
        "a.b.c.d",
        "a..c",
        ".b.c",
        "a.b.",
        "a.*.c",
        "a.b.>",
        "*.b.c",
        "a b.c.d",
        " a.b.c",
        "a.b.c ",
        "a.b.c\n",
        "a/b.c.d",
        "http://a.b.c",
        "dyn:/a.b.c",
        "DYN://a.b.c",
        "dyn://dyn://a.b.c",
        "a.b.c/",
        "ns.cömp.ep",
    ],
)
def test_parse_endpoint_rejects_bad_forms(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_endpoint(text)
    message = str(info.value)
    assert repr(text) in message
    assert "dyn://namespace.component.endpoint" in message


@pytest.mark.parametrize(
    "parts", [("", "b", "c"), ("a.b", "c", "d"), ("a", "*", "c"), ("a", "b", ">")]
)
def test_endpoint_id_validates_parts(parts: tuple[str, str, str]) -> None:
    with pytest.raises(ValueError, match=re.escape("dyn://namespace.component.endpoint")):
        EndpointId(*parts)


# --------------------------------------------------------------------------------------------
# MeshConfig

EXPECTED_FIELDS = {
    "namespace": "sglmesh",
    "nats_url": "nats://127.0.0.1:4222",
    "etcd_endpoints": ["http://127.0.0.1:2379"],
    "endpoint": None,
    "lease_ttl": 10,
    "system_host": "127.0.0.1",
    "system_port": None,
    "admin_token": None,
    "graceful_shutdown_grace_period": 5.0,
    "heartbeat_interval": 0.5,
    "stream_timeout": 5.0,
    "response_plane": "auto",
    "response_host": "",
    "response_port": 0,
    "response_flush_interval": 0.005,
    "engine_request_limit": 0,
    "log_level": "info",
    "log_format": "json",
    "nats_user": None,
    "nats_password": None,
    "nats_token": None,
    "nats_nkey_seed": None,
    "nats_creds": None,
    "nats_tls_ca": None,
    "nats_tls_cert": None,
    "nats_tls_key": None,
    "etcd_user": None,
    "etcd_password": None,
    "etcd_tls_ca": None,
    "etcd_tls_cert": None,
    "etcd_tls_key": None,
}


def test_mesh_config_fields_and_defaults() -> None:
    assert [f.name for f in dataclasses.fields(MeshConfig)] == list(EXPECTED_FIELDS)
    assert dataclasses.asdict(MeshConfig()) == EXPECTED_FIELDS
    with pytest.raises(dataclasses.FrozenInstanceError):
        MeshConfig().lease_ttl = 3  # type: ignore[misc]


def test_response_plane_settings() -> None:
    assert MeshConfig().direct_responses
    assert MeshConfig(response_plane=" TCP ").response_plane == "tcp"
    assert not MeshConfig(response_plane="nats").direct_responses
    # auto: NATS reached over TLS keeps answers on NATS (the direct stream has no TLS).
    assert not MeshConfig(nats_url="tls://n:4222").direct_responses
    with pytest.raises(ValueError, match="no TLS"):
        MeshConfig(response_plane="tcp", nats_url="tls://n:4222")
    with pytest.raises(ValueError, match="response plane"):
        MeshConfig(response_plane="udp")
    with pytest.raises(ValueError, match="response port"):
        MeshConfig(response_port=70000)
    cfg, _ = parse_mesh_args([], prog="svc", env={"SGLMESH_RESPONSE_PLANE": "nats",
                                                   "SGLMESH_RESPONSE_PORT": "9400"})  # fmt: skip
    assert (cfg.response_plane, cfg.response_port) == ("nats", 9400)


def test_response_flush_interval(capsys: pytest.CaptureFixture[str]) -> None:
    assert MeshConfig().response_flush_interval == 0.005
    assert MeshConfig(response_flush_interval=0).response_flush_interval == 0.0
    for bad in (-0.001, 0.051, float("nan"), "1"):
        with pytest.raises(ValueError, match="response_flush_interval"):
            MeshConfig(response_flush_interval=bad)  # type: ignore[arg-type]
    cfg, _ = parse_mesh_args(["--response-flush-interval", "0.004"], prog="svc", env={})
    assert cfg.response_flush_interval == 0.004
    cfg, _ = parse_mesh_args([], prog="svc", env={"SGLMESH_RESPONSE_FLUSH_INTERVAL": "0"})
    assert cfg.response_flush_interval == 0.0
    with pytest.raises(SystemExit):
        parse_mesh_args(["--response-flush-interval", "1"], prog="svc", env={})
    err = capsys.readouterr().err
    assert "--response-flush-interval: must be between 0 and 0.05 seconds, got 1" in err
    assert len(err.strip().splitlines()) == 1


def test_mesh_config_normalises() -> None:
    endpoints = ["http://a:1", " b:2 ", ""]
    cfg = MeshConfig(
        etcd_endpoints=endpoints,
        graceful_shutdown_grace_period=-3,
        system_port=-1,
        log_level="WARN",
        log_format="TEXT",
        heartbeat_interval=1,
        stream_timeout=2,
    )
    assert cfg.graceful_shutdown_grace_period == 0.0
    assert cfg.system_port is None
    assert (cfg.log_level, cfg.log_format) == ("warning", "text")
    assert cfg.etcd_endpoints == ["http://a:1", "b:2"]
    endpoints.append("c:3")  # the config keeps its own copy
    assert cfg.etcd_endpoints == ["http://a:1", "b:2"]
    assert isinstance(cfg.heartbeat_interval, float)
    assert MeshConfig(system_port=0).system_port == 0
    assert MeshConfig(log_level="trace").log_level == "debug"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"namespace": "a.b"}, "namespace"),
        ({"namespace": ""}, "namespace"),
        ({"nats_url": "http://x:4222"}, "NATS"),
        ({"nats_url": " , "}, "NATS"),
        ({"etcd_endpoints": []}, "etcd"),
        ({"etcd_endpoints": ["ftp://x"]}, "etcd"),
        ({"lease_ttl": 0}, "lease_ttl"),
        ({"lease_ttl": True}, "lease_ttl"),
        ({"lease_ttl": 1.5}, "lease_ttl"),
        ({"system_host": ""}, "system_host"),
        ({"system_port": 70000}, "port"),
        ({"graceful_shutdown_grace_period": float("nan")}, "graceful"),
        ({"heartbeat_interval": 0}, "heartbeat_interval"),
        ({"stream_timeout": 0.5}, "stream_timeout"),
        ({"heartbeat_interval": 6.0}, "stream_timeout"),
        ({"stream_timeout": float("inf")}, "stream_timeout"),
        ({"engine_request_limit": -1}, "engine_request_limit"),
        ({"log_level": "loud"}, "log level"),
        ({"log_format": "xml"}, "log format"),
    ],
)
def test_mesh_config_rejects_bad_values(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        MeshConfig(**kwargs)  # type: ignore[arg-type]


def test_endpoint_or_falls_back_to_the_role_default() -> None:
    assert MeshConfig(namespace="ns").endpoint_or("backend") == EndpointId(
        "ns", "backend", "generate"
    )
    cfg = MeshConfig(endpoint=EndpointId("a", "b", "c"))
    assert cfg.endpoint_or("prefill") == EndpointId("a", "b", "c")
    assert MeshConfig(endpoint="dyn://x.y.z").endpoint == EndpointId("x", "y", "z")  # type: ignore[arg-type]


def test_nats_servers() -> None:
    assert MeshConfig().nats_servers == ["nats://127.0.0.1:4222"]
    cfg = MeshConfig(nats_url="nats://a:4222, b:4223,tls://c,,ws://d:80")
    assert cfg.nats_servers == ["nats://a:4222", "nats://b:4223", "tls://c", "ws://d:80"]


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("http://h:1", ("h", 1)),
        ("https://h.example:2380", ("h.example", 2380)),
        ("https://h", ("h", 2379)),
        ("h:2", ("h", 2)),
        ("h", ("h", 2379)),
        ("10.0.0.1", ("10.0.0.1", 2379)),
        ("http://h:1/", ("h", 1)),
        ("[::1]:2380", ("::1", 2380)),
    ],
)
def test_etcd_hostports(entry: str, expected: tuple[str, int]) -> None:
    assert MeshConfig(etcd_endpoints=[entry]).etcd_hostports() == [expected]


def test_etcd_hostports_many() -> None:
    cfg = MeshConfig(etcd_endpoints=["http://a:1", "b"])
    assert cfg.etcd_hostports() == [("a", 1), ("b", 2379)]


@pytest.mark.parametrize(
    "entry",
    ["ftp://h:1", "h:99999", "h:abc", "http://h:1/path", "http://u:p@h:1", "http://:1", "h:1?x"],
)
def test_etcd_endpoint_errors_quote_the_entry(entry: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(entry))):
        MeshConfig(etcd_endpoints=[entry])


@pytest.mark.parametrize(
    ("text", "expected"),
    [(t, True) for t in ("true", "1", "yes", "on", "TRUE", " On ")]
    + [(f, False) for f in ("false", "0", "no", "off", "False", "OFF")],
)
def test_parse_bool(text: str, expected: bool) -> None:
    assert parse_bool(text) is expected


@pytest.mark.parametrize("text", ["", "maybe", "2", "y es"])
def test_parse_bool_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="true/1/yes/on"):
        parse_bool(text)


# --------------------------------------------------------------------------------------------
# Flags and environment


def test_parse_defaults_with_empty_env() -> None:
    cfg, rest = parse_mesh_args([], env={})
    assert cfg == MeshConfig()
    assert rest == []


def test_env_param_replaces_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLMESH_NAMESPACE", "from-os")
    assert parse_mesh_args([], env={})[0].namespace == "sglmesh"
    assert parse_mesh_args([])[0].namespace == "from-os"


def test_every_flag_is_parsed() -> None:
    argv = [
        "--namespace=prod",
        "--nats-url",
        "nats://n1:4222,nats://n2:4222",
        "--etcd-endpoints",
        "http://e1:2379,e2",
        "--endpoint",
        "dyn://prod.backend.generate",
        "--lease-ttl",
        "3",
        "--system-host",
        "127.0.0.1",
        "--system-port",
        "8081",
        "--graceful-shutdown-grace-period",
        "2.5",
        "--heartbeat-interval",
        "0.5",
        "--stream-timeout",
        "2",
        "--engine-request-limit",
        "8",
        "--log-level",
        "DEBUG",
        "--log-format",
        "text",
    ]
    cfg, rest = parse_mesh_args(argv, env={})
    assert rest == []
    assert cfg == MeshConfig(
        namespace="prod",
        nats_url="nats://n1:4222,nats://n2:4222",
        etcd_endpoints=["http://e1:2379", "e2"],
        endpoint=EndpointId("prod", "backend", "generate"),
        lease_ttl=3,
        system_host="127.0.0.1",
        system_port=8081,
        graceful_shutdown_grace_period=2.5,
        heartbeat_interval=0.5,
        stream_timeout=2.0,
        engine_request_limit=8,
        log_level="debug",
        log_format="text",
    )
    assert cfg.nats_servers == ["nats://n1:4222", "nats://n2:4222"]


# flag, field, CLI value, SGLMESH_* value, reference var and value, and what each parses to
PRECEDENCE = [
    ("--namespace", "namespace", "cli", "sg", ("DYN_NAMESPACE", "ref"), "sglmesh"),
    (
        "--nats-url",
        "nats_url",
        "nats://cli:1",
        "nats://sg:2",
        ("NATS_SERVER", "nats://ref:3"),
        "nats://127.0.0.1:4222",
    ),
    (
        "--etcd-endpoints",
        "etcd_endpoints",
        "cli:1",
        "sg:2,sg:3",
        ("ETCD_ENDPOINTS", "http://ref:4"),
        ["http://127.0.0.1:2379"],
    ),
    ("--endpoint", "endpoint", "c.c.c", "s.s.s", ("DYN_ENDPOINT", "dyn://r.r.r"), None),
    ("--system-port", "system_port", "1001", "1002", ("DYN_SYSTEM_PORT", "1003"), None),
    (
        "--graceful-shutdown-grace-period",
        "graceful_shutdown_grace_period",
        "1.5",
        "2.5",
        ("DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS", "3.5"),
        5.0,
    ),
    (
        "--engine-request-limit",
        "engine_request_limit",
        "11",
        "12",
        ("DYN_ENGINE_REQUEST_LIMIT", "13"),
        0,
    ),
    ("--log-level", "log_level", "error", "warning", ("DYN_LOG", "debug"), "info"),
]

PARSED = {
    "cli": "cli",
    "sg": "sg",
    "ref": "ref",
    "nats://cli:1": "nats://cli:1",
    "nats://sg:2": "nats://sg:2",
    "nats://ref:3": "nats://ref:3",
    "cli:1": ["cli:1"],
    "sg:2,sg:3": ["sg:2", "sg:3"],
    "http://ref:4": ["http://ref:4"],
    "c.c.c": EndpointId("c", "c", "c"),
    "s.s.s": EndpointId("s", "s", "s"),
    "dyn://r.r.r": EndpointId("r", "r", "r"),
    "1001": 1001,
    "1002": 1002,
    "1003": 1003,
    "1.5": 1.5,
    "2.5": 2.5,
    "3.5": 3.5,
    "11": 11,
    "12": 12,
    "13": 13,
    "error": "error",
    "warning": "warning",
    "debug": "debug",
}


@pytest.mark.parametrize(("flag", "name", "cli", "sg", "ref", "default"), PRECEDENCE)
def test_precedence_cli_then_sglmesh_env_then_reference_env_then_default(
    flag: str, name: str, cli: str, sg: str, ref: tuple[str, str], default: object
) -> None:
    sg_var = "SGLMESH_" + name.upper()
    ref_var, ref_value = ref
    full_env = {sg_var: sg, ref_var: ref_value}

    def value(argv: list[str], env: dict[str, str]) -> object:
        return getattr(parse_mesh_args(argv, env=env)[0], name)

    assert value([], {}) == default
    assert value([], {ref_var: ref_value}) == PARSED[ref_value]
    assert value([], full_env) == PARSED[sg]
    assert value([flag, cli], full_env) == PARSED[cli]
    assert value([f"{flag}={cli}"], full_env) == PARSED[cli]
    # An empty variable is "not configured" (compose and Helm render FOO= for that).
    assert value([], {sg_var: "", ref_var: ref_value}) == PARSED[ref_value]
    assert value([], {sg_var: "  ", ref_var: ""}) == default


@pytest.mark.parametrize(
    ("flag", "name", "cli", "sg", "parsed_cli", "parsed_sg"),
    [
        ("--lease-ttl", "lease_ttl", "3", "4", 3, 4),
        ("--system-host", "system_host", "127.0.0.1", "::", "127.0.0.1", "::"),
        ("--heartbeat-interval", "heartbeat_interval", "0.25", "0.5", 0.25, 0.5),
        ("--stream-timeout", "stream_timeout", "9", "8", 9.0, 8.0),
        ("--log-format", "log_format", "text", "json", "text", "json"),
    ],
)
def test_sglmesh_only_flags_read_their_env_twin(
    flag: str, name: str, cli: str, sg: str, parsed_cli: object, parsed_sg: object
) -> None:
    env = {"SGLMESH_" + name.upper(): sg}
    assert getattr(parse_mesh_args([], env=env)[0], name) == parsed_sg
    assert getattr(parse_mesh_args([flag, cli], env=env)[0], name) == parsed_cli


def test_dyn_log_accepts_a_rust_style_filter() -> None:
    cfg, _ = parse_mesh_args([], env={"DYN_LOG": "debug,some_crate=trace"})
    assert cfg.log_level == "debug"
    assert parse_mesh_args([], env={"DYN_LOG": "warn"})[0].log_level == "warning"


def test_system_port_negative_means_off_and_beats_env() -> None:
    env = {"SGLMESH_SYSTEM_PORT": "9000", "DYN_SYSTEM_PORT": "9001"}
    assert parse_mesh_args(["--system-port", "-1"], env=env)[0].system_port is None
    assert parse_mesh_args([], env={"DYN_SYSTEM_PORT": "-1"})[0].system_port is None
    assert parse_mesh_args(["--system-port", "0"], env={})[0].system_port == 0


def test_negative_grace_period_becomes_zero() -> None:
    env = {"DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "-4"}
    assert parse_mesh_args([], env=env)[0].graceful_shutdown_grace_period == 0.0
    cfg, _ = parse_mesh_args(["--graceful-shutdown-grace-period", "-1"], env={})
    assert cfg.graceful_shutdown_grace_period == 0.0


def test_last_repeated_flag_wins() -> None:
    cfg, _ = parse_mesh_args(["--lease-ttl", "3", "--lease-ttl", "4"], env={})
    assert cfg.lease_ttl == 4


# --------------------------------------------------------------------------------------------
# Pass-through of flags that belong to someone else


def test_unknown_flags_pass_through_in_order() -> None:
    argv = [
        "--model-path",
        "x",
        "--namespace",
        "n",
        "--tp",
        "2",
        "--foo=bar",
        "--lease-ttl=4",
        "--log-level-http",
        "warning",
        "--mem-fraction-static",
        "0.8",
        "--enable-metrics",
        "--bar",
        "-1",
        "positional",
    ]
    cfg, rest = parse_mesh_args(argv, env={})
    assert (cfg.namespace, cfg.lease_ttl, cfg.log_level) == ("n", 4, "info")
    assert rest == [
        "--model-path",
        "x",
        "--tp",
        "2",
        "--foo=bar",
        "--log-level-http",
        "warning",
        "--mem-fraction-static",
        "0.8",
        "--enable-metrics",
        "--bar",
        "-1",
        "positional",
    ]


def test_abbreviations_of_our_flags_are_not_ours() -> None:
    argv = ["--names", "x", "--log", "debug", "--end", "a.b.c", "--lease", "3", "--nats=y"]
    cfg, rest = parse_mesh_args(argv, env={})
    assert cfg == MeshConfig()
    assert rest == argv


def test_flag_values_are_not_parsed_as_ours() -> None:
    # A value glued with '=' is one token, however much it looks like a mesh flag.
    argv = ["--served-model-name=--namespace", "--chat-template=--endpoint a.b"]
    cfg, rest = parse_mesh_args(argv, env={})
    assert cfg == MeshConfig()
    assert rest == argv


def test_add_help_false_leaves_help_for_the_next_parser() -> None:
    cfg, rest = parse_mesh_args(["--help", "--lease-ttl", "2"], env={}, add_help=False)
    assert cfg.lease_ttl == 2
    assert rest == ["--help"]


# --------------------------------------------------------------------------------------------
# Bad values: exit 2, name the flag (and the env var), no traceback

BAD_VALUES: list[tuple[list[str], dict[str, str], list[str]]] = [
    (["--lease-ttl", "0"], {}, ["--lease-ttl", ">= 1"]),
    (["--lease-ttl", "ten"], {}, ["--lease-ttl", "'ten'"]),
    (["--lease-ttl"], {}, ["--lease-ttl", "expected one argument"]),
    (["--endpoint", "a.b"], {}, ["--endpoint", "'a.b'", "dyn://namespace.component.endpoint"]),
    (["--endpoint", "a.*.c"], {}, ["--endpoint", "'a.*.c'"]),
    (["--system-port", "70000"], {}, ["--system-port", "70000"]),
    (["--system-port", "http"], {}, ["--system-port", "'http'"]),
    (["--stream-timeout", "0.5"], {}, ["--stream-timeout", "--heartbeat-interval"]),
    (
        ["--heartbeat-interval", "2", "--stream-timeout", "1.5"],
        {},
        ["--stream-timeout", "--heartbeat-interval"],
    ),
    (["--heartbeat-interval", "0"], {}, ["--heartbeat-interval", "> 0"]),
    (["--heartbeat-interval", "nan"], {}, ["--heartbeat-interval", "finite"]),
    (["--stream-timeout", "-5"], {}, ["--stream-timeout"]),
    (["--graceful-shutdown-grace-period", "soon"], {}, ["--graceful-shutdown-grace-period"]),
    (["--engine-request-limit", "-1"], {}, ["--engine-request-limit", ">= 0"]),
    (["--log-level", "loud"], {}, ["--log-level", "'loud'"]),
    (["--log-format", "xml"], {}, ["--log-format", "'xml'"]),
    (["--namespace", "a.b"], {}, ["--namespace", "'a.b'"]),
    (["--namespace", "a*"], {}, ["--namespace"]),
    (["--nats-url", "http://x:4222"], {}, ["--nats-url", "'http://x:4222'"]),
    (["--nats-url", "nats://x:99999"], {}, ["--nats-url"]),
    (["--etcd-endpoints", "ftp://x"], {}, ["--etcd-endpoints", "'ftp://x'"]),
    (["--etcd-endpoints", ","], {}, ["--etcd-endpoints"]),
    (["--system-host", ""], {}, ["--system-host"]),
    ([], {"SGLMESH_LEASE_TTL": "abc"}, ["--lease-ttl", "SGLMESH_LEASE_TTL", "'abc'"]),
    ([], {"SGLMESH_LEASE_TTL": "0"}, ["--lease-ttl", "SGLMESH_LEASE_TTL"]),
    ([], {"DYN_ENDPOINT": "a.b"}, ["--endpoint", "DYN_ENDPOINT", "'a.b'"]),
    ([], {"NATS_SERVER": "http://x"}, ["--nats-url", "NATS_SERVER"]),
    ([], {"ETCD_ENDPOINTS": "ftp://x"}, ["--etcd-endpoints", "ETCD_ENDPOINTS"]),
    ([], {"DYN_SYSTEM_PORT": "abc"}, ["--system-port", "DYN_SYSTEM_PORT"]),
    ([], {"SGLMESH_SYSTEM_PORT": "65536"}, ["--system-port", "SGLMESH_SYSTEM_PORT"]),
    (
        [],
        {"DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS": "x"},
        ["--graceful-shutdown-grace-period", "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS"],
    ),
    ([], {"DYN_ENGINE_REQUEST_LIMIT": "-2"}, ["--engine-request-limit"]),
    ([], {"DYN_LOG": "some_crate=debug"}, ["--log-level", "DYN_LOG"]),
    ([], {"SGLMESH_LOG_FORMAT": "xml"}, ["--log-format", "SGLMESH_LOG_FORMAT"]),
    (
        [],
        {"SGLMESH_HEARTBEAT_INTERVAL": "9"},
        ["--stream-timeout", "--heartbeat-interval", "SGLMESH_HEARTBEAT_INTERVAL"],
    ),
    (
        ["--heartbeat-interval", "1"],
        {"SGLMESH_STREAM_TIMEOUT": "1"},
        ["--stream-timeout", "SGLMESH_STREAM_TIMEOUT"],
    ),
]


@pytest.mark.parametrize(("argv", "env", "fragments"), BAD_VALUES)
def test_bad_values_exit_2_naming_the_flag(
    argv: list[str], env: dict[str, str], fragments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_mesh_args(argv, prog="svc", env=env)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "svc: error:" in err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


def test_help_names_every_flag_env_var_and_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parse_mesh_args(["--help"], prog="svc", env={})
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "mesh:" in out
    flat = " ".join(out.split())
    for name in EXPECTED_FIELDS:
        assert "--" + name.replace("_", "-") in out
        assert "SGLMESH_" + name.upper() in out
    for var in (
        "DYN_NAMESPACE",
        "NATS_SERVER",
        "ETCD_ENDPOINTS",
        "DYN_ENDPOINT",
        "DYN_SYSTEM_PORT",
        "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS",
        "DYN_ENGINE_REQUEST_LIMIT",
        "DYN_LOG",
    ):
        assert var in out
    # One default per field, and one for --credentials.
    assert flat.count("default:") == len(EXPECTED_FIELDS) + 1
    assert "default: nats://127.0.0.1:4222" in flat


# --------------------------------------------------------------------------------------------
# A service with its own parser


def _service_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svc", allow_abbrev=False)
    parser.add_argument("--migration-limit", type=int, default=0)
    add_mesh_args(parser)
    return parser


def test_service_parser_builds_config() -> None:
    parser = _service_parser()
    ns, rest = parser.parse_known_args(["--migration-limit", "3", "--lease-ttl", "2", "--tp", "4"])
    cfg = mesh_config_from_namespace(ns, {"DYN_NAMESPACE": "team"}, parser=parser)
    assert ns.migration_limit == 3
    assert (cfg.lease_ttl, cfg.namespace) == (2, "team")
    assert rest == ["--tp", "4"]
    assert any(g.title == "mesh" for g in parser._action_groups)


def test_service_parser_error_paths(capsys: pytest.CaptureFixture[str]) -> None:
    parser = _service_parser()
    ns = parser.parse_args([])
    with pytest.raises(MeshConfigError, match="SGLMESH_LEASE_TTL"):
        mesh_config_from_namespace(ns, {"SGLMESH_LEASE_TTL": "x"})
    with pytest.raises(SystemExit) as info:
        mesh_config_from_namespace(ns, {"SGLMESH_LEASE_TTL": "x"}, parser=parser)
    assert info.value.code == 2
    assert "svc: error:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Structured logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, lvl in noisy.items():
        logging.getLogger(name).setLevel(lvl)
    logging.captureWarnings(False)


def _json_lines(err: str) -> list[dict[str, object]]:
    lines = [line for line in err.splitlines() if line.strip()]
    return [json.loads(line) for line in lines]


TS_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


@pytest.mark.usefixtures("restore_logging")
def test_json_lines_carry_core_and_extra_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json", service="decode")
    log = logging.getLogger("sglmesh.test")
    marker = object()
    log.info(
        "served %s", "req", extra={"request_id": "r-1", "tokens": 7, "obj": marker, "level": "x"}
    )
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("boom\nsecond line")
    log.debug("not shown")

    records = _json_lines(capsys.readouterr().err)
    assert len(records) == 2
    first, second = records
    assert TS_RE.fullmatch(str(first["ts"]))
    assert first["level"] == "info"
    assert first["logger"] == "sglmesh.test"
    assert first["msg"] == "served req"
    assert first["service"] == "decode"
    assert first["pid"] == os.getpid()
    assert first["request_id"] == "r-1"
    assert first["tokens"] == 7
    assert first["obj"] == str(marker)
    assert first["extra_level"] == "x"  # an extra never overwrites a core key
    assert "exc" not in first
    assert second["level"] == "error"
    assert second["msg"] == "boom\nsecond line"
    assert "ZeroDivisionError" in str(second["exc"])
    assert "Traceback" in str(second["exc"])


@pytest.mark.usefixtures("restore_logging")
def test_unencodable_extras_do_not_lose_the_line(capsys: pytest.CaptureFixture[str]) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    loop: dict[str, object] = {}
    loop["self"] = loop
    configure_logging("info", "json")
    logging.getLogger("t").info("x", extra={"loop": loop, "bad": Unprintable(), "fine": [1, 2]})
    (record,) = _json_lines(capsys.readouterr().err)
    assert record["fine"] == [1, 2]
    assert "loop" in record and "bad" in record
    assert record["service"] is None


def test_bad_format_arguments_still_produce_a_line() -> None:
    # Called on the formatter directly: pytest's own capture handler would raise first.
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "x %s %s", (1,), None)
    line = JsonFormatter("svc").format(record)
    assert json.loads(line)["msg"] == "'x %s %s' % (1,)"
    assert "x %s %s" in TextFormatter().format(record)


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json", service="a")
    configure_logging("info", "json", service="b")
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_sglmesh", False)]
    assert len(ours) == 1
    logging.getLogger("t").warning("once")
    records = _json_lines(capsys.readouterr().err)
    assert [r["msg"] for r in records] == ["once"]
    assert records[0]["service"] == "b"


@pytest.mark.usefixtures("restore_logging")
def test_noisy_loggers_quiet_unless_debug(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    logging.getLogger("nats.aio.client").info("reconnecting")
    logging.getLogger("aiohttp.access").info("GET /")
    logging.getLogger("nats").warning("slow consumer")
    assert [r["msg"] for r in _json_lines(capsys.readouterr().err)] == ["slow consumer"]

    configure_logging("error", "json")
    logging.getLogger("nats").warning("hidden under error")
    assert capsys.readouterr().err == ""

    configure_logging("debug", "json")
    logging.getLogger("nats.aio.client").debug("details")
    assert [r["msg"] for r in _json_lines(capsys.readouterr().err)] == ["details"]


@pytest.mark.usefixtures("restore_logging")
def test_text_format_is_one_compact_line(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("debug", "text", service="proc")
    logging.getLogger("t").debug("hello", extra={"rid": "r1", "note": "two words"})
    (line,) = capsys.readouterr().err.splitlines()
    assert TS_RE.match(line)
    assert "DEBUG" in line and "[proc]" in line and "hello" in line
    assert "rid=r1" in line and "note='two words'" in line


@pytest.mark.usefixtures("restore_logging")
def test_warnings_are_logged(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("careful", UserWarning, stacklevel=1)
    (record,) = _json_lines(capsys.readouterr().err)
    assert record["logger"] == "py.warnings"
    assert "careful" in str(record["msg"])


@pytest.mark.parametrize(("level", "fmt"), [("loud", "json"), ("info", "xml")])
def test_configure_logging_rejects_unknown(level: str, fmt: str) -> None:
    with pytest.raises(ValueError):
        configure_logging(level, fmt)


def test_secrets_stay_out_of_repr() -> None:
    cfg = MeshConfig(
        nats_user="u", nats_password="nats-secret", etcd_user="e", etcd_password="etcd-secret",
        nats_token="tok-secret", admin_token="admin-secret",
    )  # fmt: skip
    assert "secret" not in repr(cfg)


def test_credentials_file_counts_as_environment(tmp_path: Path) -> None:
    creds = tmp_path / "worker.env"
    creds.write_text(
        "# written by sglmesh infra up\n"
        "export SGLMESH_NATS_USER=worker\n"
        "SGLMESH_NATS_PASSWORD='p w'\n"
        "SGLMESH_LEASE_TTL=7\n"
    )
    cfg, _ = parse_mesh_args(["--credentials", str(creds)], env={"SGLMESH_LEASE_TTL": "3"})
    assert (cfg.nats_user, cfg.nats_password) == ("worker", "p w")
    assert cfg.lease_ttl == 3  # the real environment wins over the file
    cfg, _ = parse_mesh_args([], env={"SGLMESH_CREDENTIALS": str(creds)})
    assert cfg.nats_user == "worker"


def test_credentials_file_errors_name_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.env"
    bad.write_text("PATH=/evil\n")
    with pytest.raises(SystemExit):
        parse_mesh_args(["--credentials", str(bad)], env={})
    assert "--credentials" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_mesh_args(["--credentials", str(tmp_path / "missing")], env={})
    assert "--credentials" in capsys.readouterr().err
