"""``ctxai train classifier|unet``: retrain a bundled model (see :mod:`..synthetic.training`)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..synthetic.evaluation import bundled_models_dir

    p = sub.add_parser("train", help="retrain a bundled model on synthetic phantoms (about 20-30 min on 2 cores)")
    p.add_argument("model", choices=("classifier", "unet"))
    p.add_argument("--out", type=Path, default=bundled_models_dir(), help="folder for weights and card")
    p.add_argument("--phantoms", type=int, help="training phantoms (default: 48 classifier, 36 U-Net)")
    p.add_argument("--steps", type=int, help="optimiser steps (default: 1200 classifier, 1500 U-Net)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=_cmd_train)


def _cmd_train(args) -> int:
    from ..synthetic.training import train_classifier, train_unet

    options = {k: v for k, v in (("phantoms", args.phantoms), ("steps", args.steps)) if v is not None}
    train = train_classifier if args.model == "classifier" else train_unet
    result = train(args.out, seed=args.seed, **options, log=lambda m: print(m, flush=True))
    print(f"wrote {result.weights} and {result.card} in {result.minutes:.1f} min")
    return 0
