"""The torch engine's KV pool starts as zeros, whatever the allocator hands back.

Decode attention gathers whole pages and masks the slots past each row's length; a masked
slot's V is still multiplied by its zero weight, so a NaN left in never-written memory turns
the row's logits into NaN (seen on CI: a retracted guided request sampled the last token id to
its limit). Freeing a NaN-filled block of the pool's size first makes ``torch.empty`` hand that
block back; the pool must not see it.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from shared.engine.pytorch.kv_cache import PagedKvCache, zeroed  # noqa: E402

SHAPE = {"num_layers": 4, "num_kv_heads": 3, "head_dim": 64, "num_pages": 8, "page_size": 16}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_is_zero_after_a_dirty_block_of_its_size_was_freed(dtype: torch.dtype) -> None:
    slots = SHAPE["num_pages"] * SHAPE["page_size"]
    shape = (SHAPE["num_layers"], 2, slots, SHAPE["num_kv_heads"], SHAPE["head_dim"])
    for _ in range(5):
        dirty = torch.full(shape, float("nan"), dtype=dtype)
        del dirty
        cache = PagedKvCache(**SHAPE, dtype=dtype)
        assert cache.kv.shape == shape and cache.kv.dtype == dtype
        assert cache.kv.is_contiguous()
        assert not bool(cache.kv.any()), "the pool must start as zeros"


def test_zeroed_shapes_and_dtypes() -> None:
    t = zeroed((2, 3, 5), torch.bfloat16)
    assert t.shape == (2, 3, 5) and t.dtype == torch.bfloat16 and not bool(t.any())
    t[1, 2, 4] = 1.5  # writable, and a view of its own memory
    assert float(t.sum()) == 1.5
