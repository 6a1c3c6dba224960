"""The ``ctxai`` command line: list methods and layers, explain a volume, and (with their modules) run the demo
and the benchmarks. Errors print one line saying what is wrong and how to fix it, and exit with status 2; an
interrupted or failed run leaves no partial output files.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from .errors import Cancelled, CTXAIError, InputError

__all__ = ["main", "write_explanation", "TerminalProgress"]


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


class TerminalProgress:
    """A one-line progress bar with ETA on stderr."""

    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream = stream
        self.width = width
        self.active = stream.isatty()
        self._last = ""
        self._last_stage = None

    def __call__(self, progress) -> None:
        filled = int(progress.fraction * self.width)
        eta = "" if progress.eta_s is None else f" ETA {progress.eta_s:5.0f}s"
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {progress.fraction * 100:5.1f}% {progress.message}{eta}"
        if self.active:
            self.stream.write("\r" + line.ljust(len(self._last)))
        elif progress.message != self._last_stage:
            self.stream.write(line + "\n")  # a log file gets one line per stage, not a flood
        self.stream.flush()
        self._last = line
        self._last_stage = progress.message

    def close(self) -> None:
        if self.active and self._last:
            self.stream.write("\n")
            self.stream.flush()


def write_explanation(result, volume, model, out_dir: str | Path, extra: dict | None = None) -> dict[str, Path]:
    """Write ``attribution.nrrd``, ``confidence.nrrd`` (segmentation) and ``run.json`` into ``out_dir``.

    Files are written to a private staging folder first and moved in only when all succeeded.
    """
    from .geometry import write_volume
    from .record import run_record, write_json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ctxai-partial-", dir=out_dir))
    try:
        names = {"attribution": "attribution.nrrd"}
        write_volume(result.attribution, staging / names["attribution"])
        if result.confidence is not None:
            names["confidence"] = "confidence.nrrd"
            write_volume(result.confidence, staging / names["confidence"])
        record = run_record(result, volume, model, outputs=dict(names))
        record.update(extra or {})
        write_json(record, staging / "run.json")
        names["record"] = "run.json"
        written = {}
        for key, name in names.items():
            (staging / name).replace(out_dir / name)
            written[key] = out_dir / name
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _cmd_methods(args) -> int:
    from .methods import list_methods

    specs = list_methods()
    if args.json:
        print(json.dumps([s.to_dict() for s in specs], indent=2))
        return 0
    for spec in specs:
        flags = ", ".join(f for f, on in (("signed", spec.signed), ("needs layer", spec.needs_layer),
                                          ("segmentation only", spec.segmentation_only)) if on)
        print(f"{spec.name:20s} {spec.family:13s} {spec.summary}" + (f" [{flags}]" if flags else ""))
        for setting in spec.settings:
            print(f"{'':22s}--set {setting.name}={setting.default!s:12s} {setting.help}")
    return 0


def _cmd_layers(args) -> int:
    from .models import load_model

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

    from .explain import Explainer
    from .geometry import read_volume
    from .models import load_model
    from .targets import Target, parse_region

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
    try:
        result = explainer.explain(volume, args.method, target, layer=args.layer, settings=dict(args.set or []),
                                   progress=bar, seed=args.seed, output=args.output, quality=args.quality)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ctxai", description="Explain 3-D deep-learning models on CT volumes.")
    sub = parser.add_subparsers(dest="command", required=True)

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

    from .bench import add_parser as add_bench
    from .demo import add_parser as add_demo
    from .training import add_parser as add_train

    add_demo(sub)
    add_train(sub)
    add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        return args.run(args)
    except Cancelled as exc:
        print(f"cancelled: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"\ninterrupted after {time.perf_counter() - started:.1f} s; no output was written", file=sys.stderr)
        return 130
    except CTXAIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
