"""The ``ctxai`` command line. Each sub-command lives in a module of :mod:`.commands` that registers its own
parser; this entry point only gathers them and turns errors into one line (what is wrong and how to fix it) with
exit status 2. An interrupted or failed run leaves no partial output files.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Sequence

from .commands import bench, card, demo, explain, profile, train
from .errors import Cancelled, CTXAIError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxai", description="Explain 3-D deep-learning models on CT volumes.")
    sub = parser.add_subparsers(dest="command", required=True)

    for module in (explain, profile, demo, train, bench, card):
        module.add_parser(sub)
    return parser


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    # A batch system or `kill` stops a run with SIGTERM: it must clean up like Ctrl-C, not leave partial files.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.run(args)
    except Cancelled as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\ninterrupted after {time.perf_counter() - started:.1f} s; no output was written", file=sys.stderr)
        return 130
    except CTXAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
