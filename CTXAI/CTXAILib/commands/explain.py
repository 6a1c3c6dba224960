"""``ctxai methods``, ``ctxai layers`` and ``ctxai explain``: the engine's registry, a model's layers, and one
explanation written to a folder with its run record."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ..engine.modelcard import BLENDS
from ..errors import InputError
from .terminal import TerminalProgress

__all__ = ["add_parser", "add_volume_options"]

VOLUME_HELP = ("CT volume: an image file (NRRD, NIfTI, MHA, multi-page TIFF, ...), a folder holding a DICOM series "
               "(see --series) or a folder of TIFF slices, read in natural name order (see --spacing); the run "
               "record says what was read")

_TRUST = ("let a MONAI bundle's config evaluate its Python expressions ($...) and build a network that is not "
          "MONAI's: this runs the bundle's code, so only for bundles from authors you trust")


def _ints(text: str, count: int, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"{what} needs {count} comma-separated integers, got {text!r}")
    return values


def _spacing_mm(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.replace(" ", "").split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(0 < v < float("inf") for v in values):
        raise argparse.ArgumentTypeError(f"--spacing needs three voxel sizes in mm, sx,sy,sz (for example "
                                         f"0.2,0.2,0.5), got {text!r}")
    return values


def add_volume_options(parser: argparse.ArgumentParser) -> None:
    """``--series`` and ``--spacing``, for every sub-command that takes ``--volume`` (pass both to read_volume)."""
    parser.add_argument("--series", metavar="UID",
                        help="the DICOM SeriesInstanceUID to read when a --volume folder holds several series "
                             "(the error lists them)")
    parser.add_argument("--spacing", type=_spacing_mm, metavar="sx,sy,sz",
                        help="voxel size in mm for TIFF stacks, instead of their tags (needed when they have "
                             "none); a volume that stores its spacing must agree with it")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"needs a whole number of at least 1, got {text!r}")
    return value


def _memory_mb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"--memory-mb must be a number of MiB greater than 0 (for example 512), "
                                         f"got {text!r}")
    return value


def _overlap(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"--overlap must be a fraction in [0, 1) of the patch that neighbouring "
                                         f"tiles share (for example 0.5), got {text!r}")
    return value


def _setting(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set needs key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def _cmd_methods(args) -> int:
    from ..engine.methods import list_methods

    specs = list_methods()
    if args.json:
        print(json.dumps([s.to_dict() for s in specs], indent=2))
        return 0
    for spec in specs:
        flags = ", ".join(f for f, on in (("needs layer", spec.needs_layer),
                                          ("segmentation only", spec.segmentation_only)) if on)
        print(f"{spec.name:20s} {spec.family:13s} {spec.sign:12s} {spec.summary}" + (f" [{flags}]" if flags else ""))
        for setting in spec.settings:
            print(f"{'':22s}--set {setting.name}={setting.default!s:12s} {setting.help}")
    return 0


def _cmd_layers(args) -> int:
    from ..engine.models import load_model

    model = load_model(args.model, trust_code=args.trust_bundle_code, fold=args.fold)
    infos = model.layers()
    default = model.default_layer()
    if args.json:
        print(json.dumps({"model": model.card.name, "default": default, "layer_methods": model.hookable,
                          "layer_access": model.layer_access(), "layers": [
            {"name": i.name, "type": i.type, "output_shape": i.output_shape, "conv": i.is_conv,
             "cam_usable": i.spatial} for i in infos]}, indent=2))
        return 0
    for info in infos:
        mark = "*" if info.name == default else " "
        print(f"{mark} {info.name:40s} {info.type:20s} {info.output_shape}")
    print(f"layers: {model.layer_access()}")
    return 0


def _cmd_explain(args) -> int:
    import numpy as np

    from ..checks.runner import explain_and_check, resolve_checks
    from ..engine.explain import Explainer
    from ..engine.geometry import read_volume
    from ..engine.models import load_model
    from ..engine.targets import Target, parse_region
    from ..records.audit import claim_log, log_path
    from ..records.outputs import claim_output_folder, write_explanation

    started = time.time()
    volume = read_volume(args.volume, series=args.series, spacing=args.spacing)
    mask = None
    if args.mask:
        mask_volume = read_volume(args.mask, spacing=args.spacing)
        if not mask_volume.same_geometry(volume):
            raise InputError(f"Mask {args.mask} does not have the geometry of volume {args.volume} (shape and "
                             "IJK-to-RAS must match). Resample the mask onto the volume first.")
        mask = np.asarray(mask_volume.array) > 0
    region = parse_region(args.roi, args.point, mask, component=not args.voxel)
    target_class = args.target
    target = Target(int(target_class) if target_class and target_class.isdigit() else target_class,
                    contrast=args.contrast, region=region, score=args.score)
    reference = None
    if args.reference_mask:
        reference_volume = read_volume(args.reference_mask, spacing=args.spacing)
        if not reference_volume.same_geometry(volume):
            raise InputError(f"Reference mask {args.reference_mask} does not have the geometry of volume "
                             f"{args.volume} (shape and IJK-to-RAS must match). Resample it onto the volume first.")
        reference = np.asarray(reference_volume.array) > 0
    model = load_model(args.model, trust_code=args.trust_bundle_code, fold=args.fold)
    # Check names are resolved before anything is written: a misspelt one costs no run and no folder.
    checks = resolve_checks(list(args.checks or []) + (["faithfulness"] if args.quality else []), model.card.task,
                            reference is not None)
    claim_output_folder(args.out, [args.volume, args.mask, args.reference_mask, args.model, model.card.path,
                                   model.card.weights_path],
                        args.overwrite, started)
    claim_log(log_path(args.audit_log, args.out))
    explainer = Explainer(model, device=args.device, precision=args.precision, memory_mb=args.memory_mb,
                          overlap=args.overlap, blend=args.blend, force=args.force)
    bar = None if args.quiet else TerminalProgress()
    try:
        result, verified = explain_and_check(explainer, volume, args.method, target, checks=checks,
                                             reference_mask=reference, layer=args.layer,
                                             settings=dict(args.set or []), seed=args.seed, progress=bar,
                                             output=args.output)
    finally:
        if bar is not None:
            bar.close()
    written = write_explanation(result, volume, model, args.out, extra=verified,
                                sources={"volume": args.volume, "model": args.model, "mask": args.mask,
                                         "reference_mask": args.reference_mask},
                                audit_log=args.audit_log)
    prediction = result.prediction
    summary = (f"predicted {prediction['predicted_class']} (p={prediction['probabilities'][prediction['predicted_class']]:.3f})"
               if prediction["task"] == "classification" else
               f"{prediction['predicted_voxels_in_region']} of {prediction['region_voxels']} region voxels predicted "
               f"{prediction['class']}")
    print(f"{result.method} on {Path(args.volume).name}: target {result.target['class']}; {summary}; "
          f"{result.timings['total_s']:.1f} s on {result.device}")
    if verified:
        print(f"  verdict: {verified['verdict']['verdict']}")
        for name, check in verified["checks"].items():
            state = {True: "pass", False: "FAIL", None: "n/a"}[check["pass"]]
            print(f"  {state:4s} {name}: {check['what']}")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for key, path in written.items():
        print(f"  {key:12s} {path}")
    return 0


_MODEL_HELP = ("model card (.json), weights file, MONAI bundle folder, or nnU-Net v2 results folder "
               "(DatasetXXX/TRAINER__PLANS__CONFIG)")
_FOLD_HELP = ("nnU-Net results folder: fold number, or 'all' for the fold ensemble (the mean of the folds' maps); "
              "default: the only fold, else fold 0")


def _fold(text: str) -> int | str:
    if text == "all" or text.isdigit():
        return int(text) if text.isdigit() else text
    raise argparse.ArgumentTypeError(f"--fold must be a fold number or 'all', got {text!r}")


def _check_names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _cmd_checks(args) -> int:
    from ..checks.runner import list_checks

    for check in list_checks():
        cost = f"{check.runs:g} re-run(s) of the method" + (f" + {check.passes} forward passes" if check.passes
                                                            else "")
        scope = " [segmentation]" if check.segmentation_only else " [needs --reference-mask]" \
            if check.needs_reference else ""
        print(f"{check.name:20s} {check.summary}{scope}\n{'':20s} cost: {cost}; a failure makes the map "
              f"{'not trusted' if check.blocking else 'to be used with care'}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the attribution methods and their settings")
    p.add_argument("--json", action="store_true", help="machine-readable registry (the Slicer panel reads this)")
    p.set_defaults(run=_cmd_methods)

    p = sub.add_parser("checks", help="list the checks that verify a map, their cost and what a failure means")
    p.set_defaults(run=_cmd_checks)

    p = sub.add_parser("layers", help="list a model's layers with output shapes (* = default CAM layer)")
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--trust-bundle-code", action="store_true", help=_TRUST)
    p.add_argument("--fold", type=_fold, help=_FOLD_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_layers)

    p = sub.add_parser("explain", help="explain one target on one volume")
    p.add_argument("--volume", required=True, help=VOLUME_HELP)
    add_volume_options(p)
    p.add_argument("--model", required=True, help=_MODEL_HELP)
    p.add_argument("--trust-bundle-code", action="store_true", help=_TRUST)
    p.add_argument("--fold", type=_fold, help=_FOLD_HELP)
    p.add_argument("--method", required=True, help="method name (see `ctxai methods`)")
    p.add_argument("--target", help="class name or number (default: the predicted class / first foreground class)")
    p.add_argument("--contrast", help="explain TARGET minus this class ('why pore, not crack')")
    p.add_argument("--score", choices=("logit", "probability"), default="logit")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--roi", type=lambda t: _ints(t, 6, "--roi"), metavar="i0,j0,k0,i1,j1,k1",
                       help="IJK box (upper corner exclusive)")
    where.add_argument("--point", type=lambda t: _ints(t, 3, "--point"), metavar="i,j,k",
                       help="voxel: the predicted region of the target class containing it (segmentation) or the "
                            "patch around it")
    where.add_argument("--mask", help="label volume on the same grid; its non-zero voxels are the region")
    p.add_argument("--voxel", action="store_true", help="with --point: that voxel only, not its component")
    p.add_argument("--layer", help="layer for CAM methods (default: the card's, else the last conv)")
    p.add_argument("--set", action="append", type=_setting, metavar="KEY=VALUE", help="method setting (repeatable)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast on GPU")
    p.add_argument("--memory-mb", type=_memory_mb, help="activation memory budget (default: a share of free memory)")
    p.add_argument("--overlap", type=_overlap, metavar="FRACTION",
                   help="sliding-window overlap: the fraction of the patch neighbouring tiles share (default: the "
                        "card's sliding_window, else 0.25); match the model's own inference tiling")
    p.add_argument("--blend", choices=BLENDS, help="how overlapping tiles are combined: gaussian weights or a "
                                                   "constant (plain) average (default: the card's, else gaussian)")
    p.add_argument("--force", action="store_true",
                   help="run even when the up-front estimate says it takes over 2 h or one pass needs more "
                        "memory than the device has free")
    p.add_argument("--output", choices=("full", "extent"), default="full",
                   help="map over the whole input (default) or only the computed extent")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling methods")
    p.add_argument("--checks", type=_check_names, metavar="all|NAME,...",
                   help="verify the map and write the checks and a verdict into run.json: all, or some of "
                        "randomisation, target_sensitivity, faithfulness, spill, stability, localisation "
                        "(`ctxai checks` says what each costs and means)")
    p.add_argument("--reference-mask", help="label volume on the volume's grid (ground truth or a trusted "
                                            "segmentation): adds the localisation check")
    p.add_argument("--quality", action="store_true", help="same as adding faithfulness to --checks")
    p.add_argument("--out", required=True, help="output folder (a run owns it: see --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of the run that wrote --out before, as a whole")
    p.add_argument("--audit-log", metavar="PATH",
                   help="audit log to append the run to (default: $CTXAI_AUDIT_LOG, else ctxai-audit.jsonl in the "
                        "--out folder's parent)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_explain)
