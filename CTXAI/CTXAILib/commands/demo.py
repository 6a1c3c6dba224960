"""``ctxai demo``: the embedded default end to end (see :mod:`..synthetic.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..synthetic.demo import DEMO_SEED

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="generate a synthetic part, run the bundled models and explain their findings")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default out/demo)")
    p.add_argument("--seed", type=int, default=DEMO_SEED)
    p.add_argument("--device", default="auto")
    p.set_defaults(run=_cmd_demo)


def _cmd_demo(args) -> int:
    from ..synthetic.demo import print_guide, run_demo

    summary = run_demo(args.out, seed=args.seed, device=args.device, log=lambda m: print(m, flush=True))
    print_guide(args.out, summary)
    return 0
