"""``ctxai report RUN_DIR|BATCH_DIR --out report.html``: a self-contained HTML report of a run or a batch."""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def _cmd_report(args) -> int:
    from ..records.html import write_report

    out = write_report(args.source, args.out, reference_mask=args.reference_mask)
    print(f"report: {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="one self-contained HTML report (pictures embedded) of a run or a batch")
    p.add_argument("source", metavar="RUN_DIR|BATCH_DIR", help="a folder of `ctxai explain` (run.json) or "
                                                              "`ctxai batch` (batch.json)")
    p.add_argument("--out", required=True, help="the HTML file to write (a batch's run pages go beside it, in "
                                                "<name>.runs/)")
    p.add_argument("--reference-mask", help="ground-truth label volume on the CT's grid: drawn as a green outline "
                                            "(default: the run's own --reference-mask, if it had one)")
    p.set_defaults(run=_cmd_report)
