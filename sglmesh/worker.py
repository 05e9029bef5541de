"""``sglmesh worker``: one entry point for every worker role; the flags pick the service.

``--disaggregation-mode prefill`` runs the prefill service; anything else LLM-shaped runs the
decode service (aggregated or disaggregated decode). Services are loaded by module path so
neither imports the other.
"""

from __future__ import annotations

import importlib
import sys

from shared.worker.args import ENCODE, PREFILL, RoleError, select_role


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        role = "decode"
    else:
        try:
            role = select_role(args)
        except RoleError as exc:
            print(f"sglmesh worker: error: {exc}", file=sys.stderr)
            return 2
        if role == ENCODE:
            print(
                "sglmesh worker: error: encoder workers (--embedding-worker, "
                "--multimodal-encode-worker, --disaggregation-mode encode) come with the encode "
                "service: not available yet",
                file=sys.stderr,
            )
            return 2
    module = importlib.import_module(
        "services.prefill.main" if role == PREFILL else "services.decode.main"
    )
    # Usage and errors name what the user typed.
    code: int = module.main(args, prog="sglmesh worker")
    return code
