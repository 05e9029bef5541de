"""``NamedRegistry``: an open set of things chosen by name on a command line.

Engine kinds (``shared.engine.registry``) and image encoder kinds
(``services.encode.vision_engines``) are both open sets selected by ``--engine``, with an
``auto`` that walks them in registration order. One class holds that shape -- register,
replace by name, list in order, look up with an error naming the choices -- so each registry
keeps only what is its own (what a kind is, how ``auto`` decides).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Generic, Protocol, TypeVar

__all__ = ["Named", "NamedRegistry"]


class Named(Protocol):
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class NamedRegistry(Generic[T]):
    """Items by name, in registration order (a re-registered name keeps its place).

    ``what`` names the set in errors ("engine"); ``error`` is the exception an unknown name
    raises; ``reserved`` names are refused at registration (``auto`` is a choice, not a kind).
    """

    def __init__(
        self,
        what: str,
        *,
        error: type[Exception] = KeyError,
        reserved: Collection[str] = (),
    ) -> None:
        self.what = what
        self.error = error
        self.reserved = tuple(reserved)
        self._items: dict[str, T] = {}

    def register(self, item: T) -> None:
        """Add ``item``; a later registration of the same name replaces the earlier."""
        if item.name in self.reserved:
            raise ValueError(f"{item.name!r} is not a {self.what} name")
        self._items[item.name] = item

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def find(self, name: str) -> T | None:
        return self._items.get(name)

    def get(self, name: str) -> T:
        """The item called ``name``; ``error`` naming the choices if there is none."""
        item = self._items.get(name)
        if item is None:
            choices = ", ".join((*self._items, *self.reserved))
            raise self.error(f"unknown {self.what} {name!r}; choose from {choices}")
        return item

    def __iter__(self) -> Iterator[T]:
        return iter(tuple(self._items.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._items
