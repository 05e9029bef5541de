"""Load reports as SGLang sends them (pickle by default, msgpack otherwise), the restricted
unpickler that refuses everything else, and the publisher's ``sglang:*`` gauges."""

from __future__ import annotations

import pickle
import sys
import types
from collections.abc import Iterator

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from proto.metrics import SGLANG_KV_METRICS_CLASS, KvMetrics, SglangKvMetrics
from services.publisher.metrics import SGLANG_GAUGES, install
from shared.engine.cpu.kv_events import encode_kv_metrics
from shared.zmq_events import decode_kv_metrics

MODULE, CLASS = SGLANG_KV_METRICS_CLASS
FIELDS = {
    "request_active_slots": 3,
    "request_total_slots": 64,
    "kv_active_blocks": 1000,
    "kv_total_blocks": 16000,
    "num_requests_waiting": 2,
    "gpu_cache_usage_perc": 0.0625,
    "gpu_prefix_cache_hit_rate": 0.5,
    "data_parallel_rank": 1,
}


def state_opcodes(value: object) -> bytes:
    """The opcodes that push ``value`` (plain data only), without PROTO and STOP."""
    data = pickle.dumps(value, protocol=2)
    assert data[:2] == b"\x80\x02" and data[-1:] == b"."
    return data[2:-1]


def sglang_pickle(fields: dict[str, object], rebuild: str = "msgspec._utils") -> bytes:
    """What ``send_pyobj(KvMetrics(...))`` sends, written opcode by opcode: msgspec pickles a
    keyword-only Struct as ``rebuild(cls, {field: value})``."""
    return (
        b"\x80\x02"
        + f"c{rebuild}\nrebuild\n".encode()  # GLOBAL msgspec rebuild
        + f"c{MODULE}\n{CLASS}\n".encode()  # GLOBAL SGLang's class
        + state_opcodes(fields)  # the field dict
        + b"\x86"  # TUPLE2 (cls, state)
        + b"R"  # REDUCE: rebuild(cls, state)
        + b"."
    )


@pytest.fixture
def sglang_class() -> Iterator[type]:
    """SGLang's ``KvMetrics`` as sglang 0.5.23 defines it, under its real module name (no
    sglang import), so pickle produces exactly SGLang's bytes."""
    parts = MODULE.split(".")
    names = [".".join(parts[: i + 1]) for i in range(len(parts))]
    saved = {n: sys.modules.get(n) for n in names}
    for name in names:
        sys.modules[name] = types.ModuleType(name)

    class KvMetrics(msgspec.Struct, tag=True, kw_only=True, array_like=True):
        request_active_slots: int = 0
        request_total_slots: int = 0
        kv_active_blocks: int = 0
        kv_total_blocks: int = 0
        num_requests_waiting: int = 0
        gpu_cache_usage_perc: float = 0.0
        gpu_prefix_cache_hit_rate: float = 0.0
        data_parallel_rank: int = 0

    KvMetrics.__module__ = MODULE
    KvMetrics.__qualname__ = CLASS
    sys.modules[MODULE].KvMetrics = KvMetrics  # type: ignore[attr-defined]
    try:
        yield KvMetrics
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def test_hand_built_pickle_decodes_to_our_struct() -> None:
    report = decode_kv_metrics(sglang_pickle(FIELDS))
    assert type(report) is KvMetrics
    assert msgspec.structs.asdict(report) == FIELDS
    # Older msgspec releases pointed at msgspec._core.rebuild.
    assert decode_kv_metrics(sglang_pickle(FIELDS, rebuild="msgspec._core")) == report


def test_fields_a_newer_sglang_adds_are_dropped_and_types_are_checked() -> None:
    report = decode_kv_metrics(sglang_pickle({**FIELDS, "new_field": [1, 2]}))
    assert msgspec.structs.asdict(report) == FIELDS
    with pytest.raises(ValueError, match="KvMetrics field"):
        decode_kv_metrics(sglang_pickle({**FIELDS, "request_active_slots": "3"}))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_sglangs_own_pickles_decode_at_every_protocol(sglang_class: type, protocol: int) -> None:
    data = pickle.dumps(sglang_class(**FIELDS), protocol=protocol)
    assert MODULE.encode() in data
    assert msgspec.structs.asdict(decode_kv_metrics(data)) == FIELDS


def test_msgpack_form_decodes(sglang_class: type) -> None:
    ours = decode_kv_metrics(encode_kv_metrics(KvMetrics(**FIELDS)))  # type: ignore[arg-type]
    theirs = decode_kv_metrics(msgspec.msgpack.encode(sglang_class(**FIELDS)))
    assert isinstance(ours, SglangKvMetrics)
    assert msgspec.structs.asdict(ours) == msgspec.structs.asdict(theirs) == FIELDS


class Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.", id="os.system"),
        pytest.param(b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.", id="eval"),
        pytest.param(pickle.dumps(Boom(), protocol=4), id="reduce-to-print"),
        pytest.param(pickle.dumps(KvMetrics(), protocol=4), id="our-own-class"),
        # msgspec's rebuild, but of another class.
        pytest.param(
            b"\x80\x02cmsgspec._utils\nrebuild\ncollections\nOrderedDict\n}\x86R.",
            id="rebuild-other-class",
        ),
        # SGLang's class, but the state is not a field dict.
        pytest.param(
            b"\x80\x02cmsgspec._utils\nrebuild\n"
            + f"c{MODULE}\n{CLASS}\n".encode()
            + b"K\x01\x86R.",
            id="rebuild-bad-state",
        ),
        pytest.param(pickle.dumps({"request_active_slots": 1}, protocol=4), id="plain-dict"),
        pytest.param(b"\x80\x04\x95", id="truncated"),
        pytest.param(b"\x92\xa3Foo\x01", id="other-msgpack-tag"),
        pytest.param(b"not a report", id="garbage"),
        pytest.param(b"\x80\x02" + b"x" * 70_000, id="too-large"),
    ],
)
def test_everything_else_is_refused(data: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError):
        decode_kv_metrics(data)
    assert "pwned" not in capsys.readouterr().out


def test_sglang_gauges_per_worker_and_rank_come_and_go() -> None:
    registry = CollectorRegistry()
    loads: list[tuple[int, int, KvMetrics]] = [
        (0xABC, 0, KvMetrics(**FIELDS)),  # type: ignore[arg-type]
        (0xABC, 1, KvMetrics(request_active_slots=7, data_parallel_rank=1)),
    ]
    uninstall = install(lambda: loads, registry)
    text = generate_latest(registry).decode()
    assert 'sglang:num_running_reqs{dp_rank="0",worker_id="abc"} 3.0' in text
    assert 'sglang:num_running_reqs{dp_rank="1",worker_id="abc"} 7.0' in text
    assert 'sglang:num_queue_reqs{dp_rank="0",worker_id="abc"} 2.0' in text
    assert 'sglang:token_usage{dp_rank="0",worker_id="abc"} 0.0625' in text
    assert 'sglang:cache_hit_rate{dp_rank="0",worker_id="abc"} 0.5' in text
    assert 'sglang:max_running_requests{dp_rank="0",worker_id="abc"} 64.0' in text
    for name in SGLANG_GAUGES:
        assert f"# TYPE {name} gauge" in text
    # The worker leaves: its label sets go with it.
    loads.clear()
    assert 'worker_id="abc"' not in generate_latest(registry).decode()
    # One name per registry: a second collector (the worker's sglang:* in one process) clashes.
    with pytest.raises(ValueError):
        install(lambda: [], registry)
    uninstall()
    install(lambda: [], registry)()
