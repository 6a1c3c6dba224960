"""``ctxai batch``: predict a folder or manifest of scans, explain the regions a policy picks, keep a table."""

from __future__ import annotations

import argparse
import sys

from .explain import _check_names, _count, _memory_mb, _setting
from .terminal import TerminalProgress

__all__ = ["add_parser"]


def _cmd_batch(args) -> int:
    from ..batch.run import run_batch

    bar = None if args.quiet else TerminalProgress()
    try:
        batch = run_batch(args.model, args.inputs, args.out, policy=args.policy, methods=args.methods,
                          checks=args.checks, settings=dict(args.set or []), seed=args.seed, engine=args.engine,
                          workers=args.workers, address=args.address, device=args.device,
                          memory_mb=args.memory_mb, min_voxels=args.min_voxels, audit_log=args.audit_log,
                          progress=bar)
    except KeyboardInterrupt:
        print(f"\ninterrupted: the items finished so far are kept in {args.out}; run the same command again to "
              "resume", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    counts = batch["counts"]
    for row in batch["rows"]:
        if row["status"] == "failed":
            where = row["part_id"] + (f" defect {row['defect_id']}" if row["defect_id"] else "")
            print(f"failed: {where}: {row['error']}", file=sys.stderr)
    print(f"{counts['done']} of {counts['items']} item(s) explained ({counts['reused']} from earlier runs), "
          f"{counts['failed']} failed, {counts['skipped']} region(s) not selected, over {counts['scans']} scan(s) "
          f"with {counts['regions']} region(s) on {batch['workers']['workers']} {batch['engine']} worker(s)")
    print(f"  table  {args.out}/batch.csv\n  json   {args.out}/batch.json")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="explain the regions a policy picks over many scans (local pool or Ray), "
                                     "resumable, with a table of every region")
    p.add_argument("--model", required=True, help="model card (.json) or weights file")
    p.add_argument("--inputs", required=True,
                   help="folder of volumes, or a manifest (.csv/.json: volume, optional part_id and one of mask, "
                        "roi i0,j0,k0,i1,j1,k1, point i,j,k; a classifier needs an roi or point per row)")
    p.add_argument("--out", required=True, help="batch folder; the same command resumes the batch there")
    p.add_argument("--policy", default="all",
                   help="regions to explain (segmentation): all, confidence<T (mean confidence below T) and/or "
                        "sample=P%% (seeded), joined by '+', e.g. 'confidence<0.9+sample=25%%' (default: all)")
    p.add_argument("--methods", type=_check_names, default=["saliency"], metavar="M1,M2",
                   help="methods to explain each item with (see `ctxai methods`; default: saliency)")
    p.add_argument("--checks", type=_check_names, metavar="all|NAME,...",
                   help="checks to run on each map (see `ctxai checks`), recorded with a verdict per run")
    p.add_argument("--set", action="append", type=_setting, metavar="KEY=VALUE",
                   help="method setting, given to the methods that have it (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed of the policy's sample and of sampling methods")
    p.add_argument("--min-voxels", type=_count, default=1, help="ignore predicted regions smaller than this")
    p.add_argument("--engine", default="local",
                   help="local process pool (default, no server) or Ray (a cluster at --address, else local)")
    p.add_argument("--workers", type=_count,
                   help="worker processes, each loading the model once (default: one per GPU, else one per 4 "
                        "CPU cores)")
    p.add_argument("--address", help="Ray cluster address (host:port or 'auto'); inputs and --out must be on a "
                                     "file system every node sees")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (the engine gives each worker its GPU)")
    p.add_argument("--memory-mb", type=_memory_mb, help="activation memory budget per worker")
    p.add_argument("--audit-log", metavar="PATH",
                   help="audit log every item's run is appended to (default: $CTXAI_AUDIT_LOG, else "
                        "ctxai-audit.jsonl in --out)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_batch)
