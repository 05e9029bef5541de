"""``python -m services.decode`` / ``sglmesh decode``: an aggregated or disaggregated decode worker.

Serves ``{ns}.backend.generate`` (and ``clear_kv_blocks``). Without ``--disaggregation-mode``
(or with ``null``/``agg``/``pd``) it is aggregated; ``--disaggregation-mode decode`` makes it
the decode half of a disaggregated pair, which needs ``bootstrap_info`` in every request.
"""

from __future__ import annotations

import sys

from shared.worker.args import PREFILL, parse_worker_args
from shared.worker.runner import worker_main


def main(argv: list[str] | None = None, *, prog: str = "sglmesh decode") -> int:
    config = parse_worker_args(argv, prog=prog)
    if config.role == PREFILL:
        print(
            "sglmesh decode: error: --disaggregation-mode prefill is the prefill service "
            "(sglmesh prefill, or sglmesh worker)",
            file=sys.stderr,
        )
        return 2
    return worker_main(config)
