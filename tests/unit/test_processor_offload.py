"""``Offloader``: large jobs bounded (503 beyond the queue), tokenization on its threads."""

from __future__ import annotations

import asyncio
import threading

import pytest

from services.processor.offload import OffloadBusy, Offloader


async def test_tokenize_runs_on_a_thread_and_is_not_refused() -> None:
    offload = Offloader(threads=1, queue=0)
    try:
        loop_thread = threading.get_ident()
        release = threading.Event()
        # The one slot is taken by a large job: a large one is refused, a tokenization waits.
        large = asyncio.ensure_future(offload.run(release.wait, 5))
        await asyncio.sleep(0.01)
        with pytest.raises(OffloadBusy):
            await offload.run(lambda: None)
        pending = asyncio.ensure_future(offload.tokenize(threading.get_ident))
        release.set()
        assert await large is True
        assert await pending != loop_thread
    finally:
        offload.close()
