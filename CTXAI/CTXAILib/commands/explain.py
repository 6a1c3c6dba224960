"""``ctxai methods``, ``ctxai layers`` and ``ctxai explain``: the engine's registry, a model's layers, and one
explanation written to a folder with its run record."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import InputError
from .terminal import TerminalProgress

__all__ = ["add_parser"]


def _ints(text: str, count: int, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise argparse.ArgumentTypeError(f"{what} needs {count} comma-separated integers, got {text!r}")
    return values


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

    model = load_model(args.model)
    infos = model.layers()
    default = model.default_layer()
    if args.json:
        print(json.dumps({"model": model.card.name, "default": default, "layers": [
            {"name": i.name, "type": i.type, "output_shape": i.output_shape, "conv": i.is_conv,
             "cam_usable": i.spatial} for i in infos]}, indent=2))
        return 0
    for info in infos:
        mark = "*" if info.name == default else " "
        print(f"{mark} {info.name:40s} {info.type:20s} {info.output_shape}")
    return 0


def _cmd_explain(args) -> int:
    import numpy as np

    from ..checks.faithfulness import faithfulness_check
    from ..engine.explain import Explainer
    from ..engine.geometry import read_volume
    from ..engine.models import load_model
    from ..engine.targets import Target, parse_region
    from ..records.outputs import write_explanation

    volume = read_volume(args.volume)
    mask = None
    if args.mask:
        mask_volume = read_volume(args.mask)
        if not mask_volume.same_geometry(volume):
            raise InputError(f"Mask {args.mask} does not have the geometry of volume {args.volume} (shape and "
                             "IJK-to-RAS must match). Resample the mask onto the volume first.")
        mask = np.asarray(mask_volume.array) > 0
    region = parse_region(args.roi, args.point, mask, component=not args.voxel)
    target_class = args.target
    target = Target(int(target_class) if target_class and target_class.isdigit() else target_class,
                    contrast=args.contrast, region=region, score=args.score)
    model = load_model(args.model)
    explainer = Explainer(model, device=args.device, precision=args.precision, memory_mb=args.memory_mb)
    bar = None if args.quiet else TerminalProgress()
    evaluate = faithfulness_check if args.quality else None
    try:
        result = explainer.explain(volume, args.method, target, layer=args.layer, settings=dict(args.set or []),
                                   progress=bar, seed=args.seed, output=args.output, evaluate=evaluate)
    finally:
        if bar is not None:
            bar.close()
    written = write_explanation(result, volume, model, args.out)
    prediction = result.prediction
    summary = (f"predicted {prediction['predicted_class']} (p={prediction['probabilities'][prediction['predicted_class']]:.3f})"
               if prediction["task"] == "classification" else
               f"{prediction['predicted_voxels_in_region']} of {prediction['region_voxels']} region voxels predicted "
               f"{prediction['class']}")
    print(f"{result.method} on {Path(args.volume).name}: target {result.target['class']}; {summary}; "
          f"{result.timings['total_s']:.1f} s on {result.device}")
    if result.quality.get("deletion_auc") is not None:
        q = result.quality
        print(f"  faithfulness: deletion AUC {q['deletion_auc']:.3f} (random order {q['deletion_auc_random']:.3f}), "
              f"insertion AUC {q['insertion_auc']:.3f} (random order {q['insertion_auc_random']:.3f})")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for key, path in written.items():
        print(f"  {key:12s} {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list the attribution methods and their settings")
    p.add_argument("--json", action="store_true", help="machine-readable registry (the Slicer panel reads this)")
    p.set_defaults(run=_cmd_methods)

    p = sub.add_parser("layers", help="list a model's layers with output shapes (* = default CAM layer)")
    p.add_argument("--model", required=True, help="model card (.json) or weights file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=_cmd_layers)

    p = sub.add_parser("explain", help="explain one target on one volume")
    p.add_argument("--volume", required=True, help="CT volume (NRRD, NIfTI, MHA, ...)")
    p.add_argument("--model", required=True, help="model card (.json) or weights file")
    p.add_argument("--method", required=True, help="method name (see `ctxai methods`)")
    p.add_argument("--target", help="class name or number (default: the predicted class / first foreground class)")
    p.add_argument("--contrast", help="explain TARGET minus this class ('why pore, not crack')")
    p.add_argument("--score", choices=("logit", "probability"), default="logit")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--roi", type=lambda t: _ints(t, 6, "--roi"), metavar="i0,j0,k0,i1,j1,k1",
                       help="IJK box (upper corner exclusive)")
    where.add_argument("--point", type=lambda t: _ints(t, 3, "--point"), metavar="i,j,k",
                       help="voxel: the predicted defect containing it (segmentation) or the patch around it")
    where.add_argument("--mask", help="label volume on the same grid; its non-zero voxels are the region")
    p.add_argument("--voxel", action="store_true", help="with --point: that voxel only, not its component")
    p.add_argument("--layer", help="layer for CAM methods (default: the card's, else the last conv)")
    p.add_argument("--set", action="append", type=_setting, metavar="KEY=VALUE", help="method setting (repeatable)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast on GPU")
    p.add_argument("--memory-mb", type=float, help="activation memory budget (default: a share of free memory)")
    p.add_argument("--output", choices=("full", "extent"), default="full",
                   help="map over the whole input (default) or only the computed extent")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling methods")
    p.add_argument("--quality", action="store_true",
                   help="also measure the map's faithfulness (deletion/insertion AUCs) into run.json")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_cmd_explain)
