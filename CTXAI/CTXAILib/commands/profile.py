"""``ctxai profile``: a model's trust profile — every method through the checks, a table and a recommendation per
method (see :mod:`..checks.profile`). Cases come from the embedded phantom (held-out seeds, its defects as reference
masks) or from the analyst's volumes and masks (each connected component of a mask is one case)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .explain import add_volume_options

__all__ = ["add_parser"]

PROFILE_SEED = 900_500  # held out: training never used seeds past 900 000


def _phantom_cases(task: str, count: int, shape: int):
    from ..checks.profile import ProfileCase
    from ..engine.targets import ComponentRegion, Target, VoxelRegion
    from ..synthetic.dataset import TYPE_TO_CLASS
    from ..synthetic.phantom import generate_phantom

    phantom = generate_phantom(PROFILE_SEED, (shape,) * 3)
    voids = ("pore", "lack_of_fusion")
    defects = sorted((d for d in phantom.defects if task == "classification" or d.type in voids),
                     key=lambda d: -d.voxel_count)
    classes = ("normal", "pore", "crack", "inclusion")
    cases = []
    for defect in defects[:count]:
        ijk = tuple(int(round(v)) for v in defect.centre)
        mask = phantom.instances.array == defect.id
        target = (Target(classes[TYPE_TO_CLASS[defect.type]], region=VoxelRegion(ijk)) if task == "classification"
                  else Target("void", region=ComponentRegion(ijk)))
        cases.append(ProfileCase(phantom.ct, target, f"phantom {PROFILE_SEED} {defect.type} #{defect.id}", mask))
    return cases


def _user_cases(volumes: list[str], masks: list[str], task: str, count: int, target_class: str | None,
                series: str | None = None, spacing: tuple[float, float, float] | None = None):
    from scipy import ndimage

    from ..checks.profile import ProfileCase
    from ..engine.geometry import read_volume
    from ..engine.targets import MaskRegion, Target, VoxelRegion
    from ..errors import InputError

    if masks and len(masks) != len(volumes):
        raise InputError(f"Give one --mask per --volume ({len(volumes)} volumes, {len(masks)} masks).")
    cases = []
    for index, path in enumerate(volumes):
        volume = read_volume(path, series=series, spacing=spacing)
        if not masks:
            cases.append(ProfileCase(volume, Target(target_class), f"{Path(path).name} (whole)"))
            continue
        labels, found = ndimage.label(read_volume(masks[index], spacing=spacing).array > 0)
        sizes = np.bincount(labels.ravel())[1:] if found else []
        for label in (np.argsort(-np.asarray(sizes))[:count] + 1 if found else []):
            mask = labels == label
            k, j, i = (int(round(v)) for v in ndimage.center_of_mass(mask))
            region = VoxelRegion((i, j, k)) if task == "classification" else MaskRegion(mask)
            cases.append(ProfileCase(volume, Target(target_class, region=region),
                                     f"{Path(path).name} component {label}", mask))
    return cases[:max(count, 1) * len(volumes)]


def _cmd_profile(args) -> int:
    from ..checks.profile import PROFILE_CHECKS, build_profile, format_profile, profile_path
    from ..engine.explain import Explainer
    from ..engine.methods import list_methods
    from ..records.record import write_json

    explainer = Explainer(args.model, device=args.device)
    task = explainer.model.card.task
    methods = args.methods or [s.name for s in list_methods()
                                if s.family != "prediction" and not (s.needs_hooks and explainer.model.is_torchscript)]
    cases = (_user_cases(args.volume, args.mask or [], task, args.cases, args.target, args.series, args.spacing)
             if args.volume else
             _phantom_cases(task, args.cases, args.shape))
    profile = build_profile(explainer, cases, methods, checks=args.checks or PROFILE_CHECKS,
                            log=lambda m: print(m, flush=True))
    table = format_profile(profile)
    out = Path(args.out) if args.out else profile_path(args.model)
    write_json(profile | {"table": table}, out)
    print("\n" + table + f"\n\nprofile: {out}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="a model's trust profile: every method through the checks, with advice")
    p.add_argument("--model", required=True, help="model card (.json)")
    p.add_argument("--volume", action="append",
                   help="your volume (repeatable; default: the embedded phantom): an image file, a DICOM series "
                        "folder or a TIFF stack, as for `ctxai explain`")
    add_volume_options(p)
    p.add_argument("--mask", action="append", help="reference mask per --volume: each component is one case")
    p.add_argument("--target", help="class to explain on your volumes (default: predicted / first foreground)")
    p.add_argument("--methods", type=lambda t: [m.strip() for m in t.split(",") if m.strip()],
                   help="comma-separated methods (default: all that apply)")
    p.add_argument("--checks", type=lambda t: [c.strip() for c in t.split(",") if c.strip()],
                   help="comma-separated checks (default: all; faithfulness costs ~130 passes over each extent)")
    p.add_argument("--cases", type=int, default=3, help="defects per volume (default 3)")
    p.add_argument("--shape", type=int, default=96, help="edge of the phantom in voxels (default 96)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON to write (default: <card>.profile.json beside the card, read by the panel)")
    p.set_defaults(run=_cmd_profile)
