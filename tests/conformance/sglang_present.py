"""Imported first by every conformance module that needs SGLang itself.

Skips the importing module where sglang is not installed (the main venv; ``make
test-conformance`` runs these in their own venv), and, without a GPU, puts a stand-in for
triton on the path: ``sglang.srt.utils.common`` imports triton unconditionally.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("sglang") is None:
    pytest.skip(
        "sglang is not installed; run `make test-conformance` (separate venv)",
        allow_module_level=True,
    )

if importlib.util.find_spec("triton") is None:
    sys.path.insert(0, str(Path(__file__).parent / "stubs"))
