"""The install carries the CPU build of torch 2.13.0 and never torchvision.

Any other torch (asked for by us or pulled by a dependency) is a multi-GB CUDA build, and
PyPI's torchvision replaces or breaks the CPU torch (see the cpu extra in pyproject.toml).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest


def test_torch_is_the_pinned_cpu_build() -> None:
    pytest.importorskip("torch")
    import torch

    assert importlib.metadata.version("torch").split("+")[0] == "2.13.0"
    assert torch.version.cuda is None  # the CPU build: no CUDA runtime came along
    assert not any(
        d.metadata["Name"].startswith("nvidia-") for d in importlib.metadata.distributions()
    )


def test_torchvision_is_never_installed() -> None:
    assert importlib.util.find_spec("torchvision") is None
