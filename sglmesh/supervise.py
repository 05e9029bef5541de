"""``python -m sglmesh.supervise NAME -- COMMAND...``: keep one service running.

Why: ``sglmesh run`` leaves the mesh running in the background; a service that crashes there
(an OOM kill, a bug) must come back by itself, as it would under compose's restart policy or
Kubernetes. Each service ``run`` starts is this small supervisor with the real command as its
child: a child that dies of a signal or exits non-zero is started again after a backoff
(0.5 s, doubling to 30 s, back to 0.5 s once a run lasted 30 s), each restart logged as one
line in the service's log (this process's stdout). A child that exits 0 (stopped on purpose)
or 2 (a bad command line, which no restart fixes) ends the supervisor with its code. SIGTERM
or SIGINT to the supervisor (``sglmesh stop`` signals the whole process group) is passed on,
the child gets ``--stop-timeout`` seconds to drain, and nothing is restarted.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from types import FrameType

__all__ = ["main"]

_BACKOFF_FIRST = 0.5
_BACKOFF_MAX = 30.0
_HEALTHY_RUN = 30.0


def _say(name: str, message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"{stamp} sglmesh supervise [{name}]: {message}", flush=True)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sglmesh.supervise")
    parser.add_argument("name", help="the service's name, for the log lines")
    parser.add_argument("--stop-timeout", type=float, default=15.0, metavar="SECONDS")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")

    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    backoff = _BACKOFF_FIRST
    restarts = 0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(command)
        while True:
            try:
                code = child.wait(timeout=args.stop_timeout if stopping else None)
                break
            except subprocess.TimeoutExpired:
                _say(args.name, f"did not stop within {args.stop_timeout:g} s; killing it")
                child.kill()
        if stopping:
            return 0
        if code == 0:
            _say(args.name, "exited normally; not restarting")
            return 0
        if code == 2:
            # A usage error: the same command line fails the same way every time.
            _say(args.name, "exited with code 2 (bad command line); not restarting")
            return 2
        ran = time.monotonic() - started
        if ran >= _HEALTHY_RUN:
            backoff = _BACKOFF_FIRST
        restarts += 1
        _say(
            args.name,
            f"{_describe(code)} after {ran:.1f} s; restarting in {backoff:g} s "
            f"(restart {restarts})",
        )
        deadline = time.monotonic() + backoff
        while not stopping and time.monotonic() < deadline:
            time.sleep(0.05)
        if stopping:
            return 0
        backoff = min(backoff * 2, _BACKOFF_MAX)


if __name__ == "__main__":
    sys.exit(main())
