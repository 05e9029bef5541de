"""``sglmesh worker``: one entry point for every worker role; the flags pick the service.

``--embedding-worker`` runs the encode service; ``--disaggregation-mode prefill`` the prefill
service; anything else LLM-shaped the decode service (aggregated or disaggregated decode).
Services are loaded by module path so none imports another.
"""

from __future__ import annotations

import importlib
import sys

from shared.worker.args import ENCODE, PREFILL, RoleError, select_role


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        role = select_role(args)
    except RoleError as exc:
        if "-h" not in args and "--help" not in args:
            print(f"sglmesh worker: error: {exc}", file=sys.stderr)
            return 2
        role = "decode"
    services = {PREFILL: "services.prefill.main", ENCODE: "services.encode.main"}
    module = importlib.import_module(services.get(role, "services.decode.main"))
    # Usage and errors name what the user typed.
    code: int = module.main(args, prog="sglmesh worker")
    return code
