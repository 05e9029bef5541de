"""The torch engine's KV cache: every page's K and V as real tensors, indexed by page id.

Why one tensor per engine rank, laid out ``[layers, 2 (K, V), slots, kv_heads, head_dim]``
(slot = page id x page size + offset): attention reads one layer's K (or V) for many tokens at
once, so a layer's slab is contiguous and a gather by slot index is one ``index_select``; the
radix cache, the requests' page tables and the KV events all name the same page ids. The
tensor starts as zeros from ``calloc`` (:func:`zeroed`): a large pool is fresh zero pages from
the OS, resident only as pages are written, and a small one is cleared heap memory. Zeros
matter: decode attention gathers whole pages and masks the slots past each row's length, but
a masked score still multiplies its V, and ``0 x NaN`` is NaN, so uninitialised memory that
happens to hold a NaN or an infinity (``torch.empty`` reusing a freed block of masked logits)
would poison every row that reads a partly written page.

A disaggregated transfer carries whole pages (``[layers, 2, pages, page_size, kv_heads,
head_dim]`` in the pool's dtype, C order): the prefill engine gathers a request's pages, the
decode engine scatters them into its own. Slots of the last page past the prompt are zeroed on
the wire, so nothing of an earlier request's KV ever leaves the engine. ``layout`` names all of
it, and both sides must agree.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

__all__ = ["KvPages", "PagedKvCache", "ReceivedKv", "zeroed"]


def zeroed(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor from ``calloc`` (numpy's ``zeros``), which takes fresh zero pages from
    the OS for a large block instead of writing them as ``torch.zeros`` does."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    raw = np.zeros(int(np.prod(shape, dtype=np.int64)) * itemsize, dtype=np.uint8)
    return torch.from_numpy(raw).view(dtype).view(shape)


class PagedKvCache:
    """``num_pages`` pages of ``page_size`` tokens for every layer of one model."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
    ) -> None:
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.num_pages = num_pages
        self.page_size = page_size
        self.dtype = dtype
        self.kv = zeroed((num_layers, 2, num_pages * page_size, num_kv_heads, head_dim), dtype)

    @property
    def layout(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return (
            f"torch {dtype} KV: {self.num_layers} layers x (K, V) x pages of {self.page_size} "
            f"tokens x {self.num_kv_heads} KV heads x {self.head_dim}"
        )

    @property
    def page_bytes(self) -> int:
        return (
            self.num_layers
            * 2
            * self.page_size
            * self.num_kv_heads
            * self.head_dim
            * self.kv.element_size()
        )

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index``'s K and V, ``[slots, kv_heads, head_dim]`` each (views)."""
        return self.kv[index, 0], self.kv[index, 1]

    def nbytes(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size) * self.page_bytes

    def _slots(self, pages: list[int]) -> torch.Tensor:
        p = self.page_size
        base = torch.tensor(pages, dtype=torch.long) * p
        return (base[:, None] + torch.arange(p)).reshape(-1)

    def read(self, pages: list[int], num_tokens: int) -> torch.Tensor:
        """The pages holding ``num_tokens`` tokens, ``[layers, 2, pages, page, heads, dim]``,
        contiguous, with the slots past ``num_tokens`` zeroed."""
        n = -(-num_tokens // self.page_size)
        slots = self._slots(pages[:n])
        data = self.kv.index_select(2, slots)
        data[:, :, num_tokens:] = 0
        return data.view(self.num_layers, 2, n, self.page_size, self.num_kv_heads, self.head_dim)

    def write(self, pages: list[int], data: torch.Tensor) -> None:
        """Store ``data`` (as :meth:`read` returns it) into ``pages``."""
        n = data.shape[2]
        if len(pages) < n:
            raise ValueError(f"{n} pages of KV but only {len(pages)} pages to hold them")
        flat = data.reshape(self.num_layers, 2, n * self.page_size, *data.shape[4:])
        self.kv.index_copy_(2, self._slots(pages[:n]), flat)


class KvPages:
    """The prefill side of a transfer (``runner.KvPayload``): a request's pages as bytes."""

    def __init__(self, data: torch.Tensor) -> None:
        self._data = data.contiguous()
        self._bytes = self._data.view(torch.uint8).numpy().data.cast("B")

    @property
    def nbytes(self) -> int:
        return len(self._bytes)

    def chunks(self, size: int) -> Iterator[memoryview]:
        view = self._bytes
        for start in range(0, len(view), size):
            yield view[start : start + size]


class ReceivedKv:
    """The decode side of a transfer (``runner.KvSink``): a buffer for whole pages."""

    def __init__(self, cache: PagedKvCache, num_tokens: int) -> None:
        n = -(-num_tokens // cache.page_size)
        self.data = torch.empty(
            (cache.num_layers, 2, n, cache.page_size, cache.num_kv_heads, cache.head_dim),
            dtype=cache.dtype,
        )
        self._bytes = self.data.view(torch.uint8).numpy().data.cast("B")

    @property
    def nbytes(self) -> int:
        return len(self._bytes)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._bytes[offset : offset + len(data)] = data
