"""Admission (services/processor/admission.py): --max-inflight counts engine requests, a request
that can never fit is a 400, a full server a 503 with Retry-After, draining waits for idle."""

from __future__ import annotations

import asyncio

import pytest

from services.processor.admission import Admission
from services.processor.failures import Failure


def test_cost_over_the_limit_is_a_400_and_a_full_server_a_503() -> None:
    admission = Admission(max_inflight=4, retry_after=2)
    with pytest.raises(Failure) as info:
        admission.check_cost(5)
    assert info.value.status == 400
    with admission.admitted(3):
        assert admission.engine_inflight == 3
        admission.check_arrival()  # one more engine request still fits
        with pytest.raises(Failure) as info, admission.admitted(2):
            pass
        assert info.value.status == 503 and info.value.headers["Retry-After"] == "2"
        with admission.admitted(1), pytest.raises(Failure):
            admission.check_arrival()
    assert admission.engine_inflight == 0


def test_no_limit() -> None:
    admission = Admission(max_inflight=0, retry_after=1)
    admission.check_cost(10**6)
    with admission.admitted(10**6):
        admission.check_arrival()


async def test_wait_idle_returns_when_the_last_request_ends() -> None:
    admission = Admission(max_inflight=0, retry_after=1)

    async def request() -> None:
        with admission.serving():
            await asyncio.sleep(0.05)

    task = asyncio.create_task(request())
    await asyncio.sleep(0)
    assert admission.inflight == 1
    await admission.wait_idle(5)
    assert admission.inflight == 0
    await task
    # A timeout is not an error: draining gives up waiting after the grace period.
    with admission.serving():
        await admission.wait_idle(0.01)
