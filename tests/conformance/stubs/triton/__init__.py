"""Import-only stand-in for ``triton`` in the SGLang conformance venv.

Why: ``sglang.srt.utils.common`` imports triton unconditionally, and importing
``sglang.srt.server_args`` goes through it. The real triton wheel is about 1 GB and useless
without a GPU; the conformance tests only parse arguments and read source, so a module whose
decorators return the function unchanged is enough. Only ever on PYTHONPATH for those tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__version__ = "0.0.0+stub"


def jit(fn: Any = None, **_kwargs: Any) -> Any:
    """``@triton.jit`` and ``@triton.jit(...)``: the function itself."""
    if fn is None:
        return lambda f: f
    return fn


def autotune(*_args: Any, **_kwargs: Any) -> Callable[[Any], Any]:
    return lambda f: f


def heuristics(*_args: Any, **_kwargs: Any) -> Callable[[Any], Any]:
    return lambda f: f


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
