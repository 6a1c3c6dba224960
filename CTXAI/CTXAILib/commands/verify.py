"""``ctxai verify RUN_DIR``: re-run a recorded run from its ``run.json`` and compare it with what it wrote."""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]

_BLOCKING = ("input", "model")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"--tolerance is a fraction of the map's largest |value| in [0, 1) "
                                         f"(0: bit-identical), got {text!r}")
    return value


def _cmd_verify(args) -> int:
    from ..records.reproduce import reproduce

    found = reproduce(args.run_dir, device=args.device, tolerance=args.tolerance)
    for kind in ("input", "model", "versions", "settings"):
        for line in found.differences.get(kind, []):
            print(f"{kind} differs: {line}")
    if not found.rerun:
        print(f"{args.run_dir}: NOT REPRODUCIBLE: the {' and '.join(k for k in _BLOCKING if k in found.differences)}"
              " differ from the record; restore them to re-run it")
        return 2
    for line in found.mismatches:
        print(f"mismatch: {line}")
    compared = ", ".join(f"{name} max |diff| {diff:.3g}" for name, diff in found.outputs.items())
    how = "bit for bit" if found.tolerance == 0 else f"within {found.tolerance:g} of the map's largest |value|"
    if found.identical:
        print(f"{args.run_dir}: REPRODUCED {how} on {found.device} ({compared})")
        return 0
    print(f"{args.run_dir}: MISMATCH on {found.device}, compared {how} ({compared})")
    return 2


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verify", help="re-run a recorded run from its run.json and compare (exit 2 on a mismatch)")
    p.add_argument("run_dir", help="a folder `ctxai explain` wrote (holds run.json)")
    p.add_argument("--device", help="run on this device instead of the recorded one (cpu, cuda, cuda:N)")
    p.add_argument("--tolerance", type=_fraction,
                   help="allowed difference, a fraction of the recorded map's largest |value| (default: 0, bit for "
                        "bit, on CPU; 1e-3 on a GPU, whose kernels are not deterministic)")
    p.set_defaults(run=_cmd_verify)
