"""``python -m services.prefill`` / ``sglmesh prefill``: a disaggregated prefill worker.

Serves ``{ns}.prefill.generate``: answers each request with its bootstrap info at once, runs
the prefill, and hands the KV to the decode worker that registered the same bootstrap room.
``--disaggregation-mode prefill`` is implied.
"""

from __future__ import annotations

from shared.worker.args import PREFILL, parse_worker_args
from shared.worker.runner import worker_main


def main(argv: list[str] | None = None, *, prog: str = "sglmesh prefill") -> int:
    return worker_main(parse_worker_args(argv, prog=prog, role=PREFILL))
