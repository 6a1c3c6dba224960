"""``ctxai audit verify LOG``: check an audit log's hash chain and the output files it lists."""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def _cmd_verify(args) -> int:
    from ..records.audit import verify_log

    check = verify_log(args.log)
    gone = f"; {len(check.files_missing)} listed file(s) no longer on disk" if check.files_missing else ""
    if check.intact:
        print(f"{args.log}: intact: {check.entries} entries, {check.files_checked} output file(s) match{gone}")
        return 0
    print(f"{args.log}: BROKEN at line {check.broken_line}: {check.problem} ({check.entries} entries before it "
          f"verified{gone})")
    return 2


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="the audit log of runs (hash-chained JSON lines)")
    actions = p.add_subparsers(dest="action", required=True)
    v = actions.add_parser("verify", help="check the chain and every output file still on disk; exit 2 at the "
                                          "first broken entry, which it names")
    v.add_argument("log", help="audit log (.jsonl)")
    v.set_defaults(run=_cmd_verify)
