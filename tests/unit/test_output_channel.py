"""``OutputChannel``: what a consumer reads when the scheduler pushes faster than it reads."""

from __future__ import annotations

from typing import Any

from shared.engine.cpu.output import OutputChannel


def item(tokens: list[int], n: int, reason: Any = None) -> dict[str, Any]:
    meta = {"id": "r", "finish_reason": reason, "completion_tokens": n, "cached_tokens": 0}
    return {"text": "", "output_ids": tokens, "index": 0, "meta_info": meta}


async def read_all(channel: OutputChannel) -> list[dict[str, Any]]:
    return [x async for x in channel]


async def test_merge_token_joins_the_unread_increment_like_push() -> None:
    pushed, merged = OutputChannel(), OutputChannel()
    assert not merged.merge_token(7, 1, None)  # nothing unread: the caller pushes
    for channel in (pushed, merged):
        channel.push(item([7], 1))
    pushed.push(item([8], 2))
    pushed.push(item([9], 3, {"type": "length", "length": 3}), final=True)
    assert merged.merge_token(8, 2, None)
    assert merged.merge_token(9, 3, {"type": "length", "length": 3})
    assert merged.closed
    assert merged.merge_token(10, 4, None)  # closed: dropped, as push drops it
    want = [item([7, 8, 9], 3, {"type": "length", "length": 3})]
    assert await read_all(pushed) == want
    assert await read_all(merged) == want


async def test_merge_token_after_a_read_needs_a_new_item() -> None:
    channel = OutputChannel()
    channel.push(item([1], 1))
    it = aiter(channel)
    assert await anext(it) == item([1], 1)
    assert not channel.merge_token(2, 2, None)  # the reader has it: nothing to merge into
