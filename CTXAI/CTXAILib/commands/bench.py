"""``ctxai bench``: its command-line options; the benchmark itself is :mod:`CTXAILib.bench`."""

from __future__ import annotations

import sys
from pathlib import Path

from ..bench import format_table, run_bench
from .explain import _count

__all__ = ["add_parser"]


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="time the engine against the passes it needs, Captum and MONAI (JSON report)")
    p.add_argument("--out", type=Path, required=True, help="JSON report to write")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast on GPU")
    p.add_argument("--repeats", type=_count, default=3,
                   help="timed runs per measure after the warm-up (heavy CPU measures run once)")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of about a minute")
    p.add_argument("--cases", type=lambda t: [part.strip() for part in t.split(",") if part.strip()],
                   metavar="SUBSTRING,...",
                   help="run only the cases whose name contains one of these (default: all)")
    p.set_defaults(run=_cmd_bench)


def _cmd_bench(args) -> int:
    report = run_bench(args.out, device=args.device, precision=args.precision, repeats=args.repeats,
                       quick=args.quick, cases=args.cases, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_table(report))
    print(f"\nreport: {args.out} ({report['minutes']:.1f} min)")
    return 0
