"""``NamedRegistry``: order, replacement, reserved names, and the error naming the choices."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from shared.registry import NamedRegistry


@dataclass(frozen=True)
class Kind:
    name: str
    value: int = 0


class Unknown(ValueError):
    pass


def test_items_keep_registration_order_and_a_replacement_keeps_its_place() -> None:
    reg: NamedRegistry[Kind] = NamedRegistry("widget", error=Unknown, reserved=("auto",))
    for kind in (Kind("a"), Kind("b"), Kind("c")):
        reg.register(kind)
    reg.register(Kind("b", 2))
    assert reg.names() == ("a", "b", "c")
    assert [k.value for k in reg] == [0, 2, 0]
    assert reg.get("b").value == 2 and reg.find("z") is None
    assert "a" in reg and "z" not in reg


def test_unknown_and_reserved_names_are_refused_with_the_choices() -> None:
    reg: NamedRegistry[Kind] = NamedRegistry("widget", error=Unknown, reserved=("auto",))
    reg.register(Kind("a"))
    with pytest.raises(Unknown, match=r"unknown widget 'z'; choose from a, auto"):
        reg.get("z")
    with pytest.raises(ValueError, match="'auto' is not a widget name"):
        reg.register(Kind("auto"))
