"""`make compose-test` starts the shipped compose file's services in dependency order itself
(podman 4.3 cannot follow the chain); the order must honour every depends_on of each profile."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "compose_test.py"


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compose_test", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("compose_test", module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("profile", ["agg", "disagg"])
def test_every_dependency_starts_in_an_earlier_stage(profile: str) -> None:
    script = _script()
    services = script.profile_services(profile)
    stages = script.start_order(services)
    stage_of = {name: i for i, stage in enumerate(stages) for name in stage}
    assert set(stage_of) == set(services)
    for name, spec in services.items():
        for dep in spec.get("depends_on") or {}:
            assert stage_of[dep] < stage_of[name], (name, dep, stages)
    assert stages[0] == ["credentials", "etcd"]
    assert script.VICTIM[profile] in services
    assert all(name not in services for name in ("prefill", "decode")) or profile == "disagg"


def test_a_cycle_is_refused() -> None:
    script = _script()
    services = {"a": {"depends_on": {"b": {}}}, "b": {"depends_on": ["a"]}, "c": {}}
    with pytest.raises(SystemExit, match="cycle"):
        script.start_order(services)
