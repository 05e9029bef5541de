"""The publisher's flags (each with an env twin) and how it turns records and specs into engines."""

from __future__ import annotations

import socket

import pytest

from proto.discovery import InstanceRecord, RuntimeConfig, ZmqEndpoints
from services.publisher.args import parse_publisher_args
from services.publisher.sources import (
    EngineSource,
    RankSockets,
    dial_address,
    parse_static_sources,
    source_from_record,
)

KV0 = "worker_id=1f,kv=tcp://127.0.0.1:5557,replay=tcp://127.0.0.1:5567,metrics=ipc:///tmp/m"


def test_defaults() -> None:
    config = parse_publisher_args([], env={})
    flags = config.flags
    assert flags.node == socket.gethostname()
    assert flags.discover and flags.static_sources == ()
    settings = flags.relay_settings()
    assert (settings.replay_timeout, settings.idle_check_interval) == (2.0, 5.0)
    assert config.mesh.namespace == "sglmesh"


def test_flags_beat_env_twins() -> None:
    env = {
        "SGLMESH_NODE": "gpu-7",
        "SGLMESH_IDLE_CHECK_INTERVAL": "0",
        "SGLMESH_REPLAY_TIMEOUT": "3.5",
        "SGLMESH_DISCOVER": "false",
        "SGLMESH_ZMQ_ENDPOINT": f"{KV0}; worker_id=2,kv=tcp://h:1",
        "SGLMESH_SYSTEM_PORT": "9099",
    }
    flags = parse_publisher_args([], env=env).flags
    assert (flags.node, flags.replay_timeout, flags.discover) == ("gpu-7", 3.5, False)
    assert flags.relay_settings().idle_check_interval is None  # 0: never
    assert sorted(s.worker_id for s in flags.static_sources) == [0x2, 0x1F]
    flags = parse_publisher_args(
        ["--node", "*", "--discover", "--zmq-endpoint", "worker_id=3,kv=tcp://h:2"], env=env
    ).flags
    assert (flags.node, flags.discover) == ("*", True)
    assert [s.worker_id for s in flags.static_sources] == [3]


@pytest.mark.parametrize(
    "argv,env,message",
    [
        (["--zmq-endpoint", "kv=tcp://h:1"], {}, "worker_id is required"),
        (["--zmq-endpoint", "worker_id=xyz,kv=tcp://h:1"], {}, "hexadecimal"),
        (["--zmq-endpoint", "worker_id=1,kv=tcp://h:1,port=3"], {}, "unknown key 'port'"),
        (["--zmq-endpoint", "worker_id=1"], {}, "kv=... and/or metrics=..."),
        (["--replay-timeout", "0"], {}, "--replay-timeout"),
        ([], {"SGLMESH_IDLE_CHECK_INTERVAL": "soon"}, "SGLMESH_IDLE_CHECK_INTERVAL"),
        ([], {"SGLMESH_ZMQ_ENDPOINT": "worker_id=1,kv"}, "SGLMESH_ZMQ_ENDPOINT"),
        (["--no-discover"], {}, "nothing to relay"),
    ],
)
def test_bad_input_exits_2_naming_the_flag(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_publisher_args(argv, env=env)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_static_specs_group_ranks_by_worker() -> None:
    (source,) = parse_static_sources(
        [
            "worker_id=0xAB,kv=tcp://h:5558,dp_rank=1,page_size=16,metrics=ipc:///tmp/m",
            "worker_id=ab,kv=tcp://h:5557,replay=tcp://h:5567,page_size=16",
        ]
    )
    assert source.worker_id == 0xAB and source.static and source.page_size == 16
    assert source.ranks == (
        RankSockets(0, "tcp://h:5557", "tcp://h:5567"),
        RankSockets(1, "tcp://h:5558", None),
    )
    assert source.metrics == "ipc:///tmp/m"
    with pytest.raises(ValueError, match="dp_rank 0 given twice"):
        parse_static_sources(["worker_id=1,kv=tcp://h:1", "worker_id=1,kv=tcp://h:2"])
    with pytest.raises(ValueError, match="conflicting page sizes"):
        parse_static_sources(
            [
                "worker_id=1,kv=tcp://h:1,page_size=16",
                "worker_id=1,kv=tcp://h:2,dp_rank=1,page_size=8",
            ]
        )


def record(host: str, **zmq: object) -> InstanceRecord:
    return InstanceRecord(
        namespace="ns",
        component="backend",
        endpoint="generate",
        instance_id=0xBEEF,
        subject="ns.backend.generate.beef",
        control_subject="_SGLMESH.ctl.beef",
        host=host,
        pid=1,
        started_at=0.0,
        runtime_config=RuntimeConfig(
            kv_cache_block_size=16, data_parallel_start_rank=2, data_parallel_size=2
        ),
        zmq=ZmqEndpoints(**zmq),  # type: ignore[arg-type]
        metadata={"kv_events_topic": "kv"},
    )


def test_a_local_record_is_dialled_as_advertised() -> None:
    rec = record(
        "node-a",
        kv_events=["tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558"],
        kv_events_replay=["tcp://127.0.0.1:5567", "tcp://127.0.0.1:5568"],
        metrics="ipc:///tmp/sglang-metrics",
    )
    assert source_from_record(rec, local_host="node-a") == EngineSource(
        worker_id=0xBEEF,
        ranks=(
            RankSockets(2, "tcp://127.0.0.1:5557", "tcp://127.0.0.1:5567"),
            RankSockets(3, "tcp://127.0.0.1:5558", "tcp://127.0.0.1:5568"),
        ),
        metrics="ipc:///tmp/sglang-metrics",
        page_size=16,
        topic="kv",
        host="node-a",
    )


def test_a_remote_record_is_dialled_at_its_host_without_metrics() -> None:
    rec = record(
        "node-b",
        kv_events=["tcp://127.0.0.1:5557", "ipc:///tmp/kv"],
        metrics="ipc:///tmp/sglang-metrics",
    )
    source = source_from_record(rec, local_host="node-a")
    assert source is not None
    assert source.ranks == (RankSockets(2, "tcp://node-b:5557", None),)
    assert source.metrics is None
    assert source_from_record(record("node-b", metrics="ipc:///m"), local_host="node-a") is None
    assert source_from_record(record("node-a"), local_host="node-a") is None


def test_dial_address() -> None:
    assert dial_address("tcp://10.0.0.5:5557", "h", local=False) == "tcp://10.0.0.5:5557"
    assert dial_address("tcp://localhost:5557", "fd00::1", local=False) == "tcp://[fd00::1]:5557"
    assert dial_address("tcp://[::1]:5557", "h", local=False) == "tcp://h:5557"
    assert dial_address("ipc:///x", "h", local=True) == "ipc:///x"
    assert dial_address("ipc:///x", "h", local=False) is None
