"""The program entry (`pipeline ...`, `python -m pipeline ...`): signals are handled before any
import that takes time, so Ctrl-C or SIGTERM at any instant ends with one line, never a traceback.
"""

from __future__ import annotations

import signal
import sys


def _exit_quietly(signum: int, frame: object) -> None:
    raise SystemExit(130)


def main() -> None:
    signal.signal(signal.SIGINT, _exit_quietly)
    signal.signal(signal.SIGTERM, _exit_quietly)
    from pipeline.cli import main as cli_main

    sys.exit(cli_main(interruptible=True))
