"""``ctxai card init``: write the model card of a weights file from flags, after checking that the model it
describes loads and answers a dummy volume the way the card says (channels, output shape, class count).

Example::

    ctxai card init unet.pt --task segmentation --classes background,pore --patch 64,64,64 \\
        --spacing 0.2,0.2,0.2 --normalization minmax --architecture ctxai.UNet3D --params '{"out_channels": 2}' \\
        --out unet.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

__all__ = ["add_parser", "parse_normalization"]

_NORMALIZATION_HELP = ("none | window:LO,HI | meanstd:MEAN,STD | minmax | minmax:LO,HI | percentile:P_LOW,P_HIGH"
                       "[,MEAN,STD] | a JSON object as in the card (formulas in CTXAILib/engine/modelcard.py)")


def _numbers(text: str, counts: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) not in counts:
        raise argparse.ArgumentTypeError(f"{what} needs {' or '.join(map(str, counts))} comma-separated numbers, "
                                         f"got {text!r}")
    return values


def parse_normalization(text: str) -> dict:
    """The card's ``normalization`` object from the flag's short form (or its JSON form).

    >>> parse_normalization("percentile:0.5,99.5")
    {'type': 'percentile', 'percentiles': [0.5, 99.5]}
    """
    if text.lstrip().startswith("{"):
        return _json_object(text, "--normalization", "the card's normalization object")
    kind, _, values = text.partition(":")
    if kind == "none" and not values:
        return {"type": "none"}
    if kind == "minmax":
        return {"type": "minmax", **({"range": _numbers(values, (2,), "minmax")} if values else {})}
    if kind == "window" and values:
        return {"type": "window", "window": _numbers(values, (2,), "window")}
    if kind == "meanstd" and values:
        mean, std = _numbers(values, (2,), "meanstd")
        return {"type": "meanstd", "mean": mean, "std": std}
    if kind == "percentile" and values:
        numbers = _numbers(values, (2, 4), "percentile")
        spec = {"type": "percentile", "percentiles": numbers[:2]}
        return spec | ({"mean": numbers[2], "std": numbers[3]} if len(numbers) == 4 else {})
    raise argparse.ArgumentTypeError(f"--normalization must be {_NORMALIZATION_HELP}; got {text!r}")


def _triple(text: str, kind: type, what: str) -> list:
    values = _numbers(text, (3,), what)
    if kind is int and not all(v.is_integer() for v in values):
        raise argparse.ArgumentTypeError(f"{what} needs whole numbers of voxels, got {text!r}")
    return [kind(v) for v in values]


def _json_object(text: str, option: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{option} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{option} must be a JSON object: {what}")
    return value


def _params(text: str) -> dict:
    return _json_object(text, "--params", "the network's keyword arguments")


def _cmd_init(args) -> int:
    import torch

    from ..engine.geometry import atomic_output
    from ..engine.models import _is_torchscript, load_model, sha256_file
    from ..errors import CTXAIError, ModelError

    weights = Path(args.weights).resolve()
    out = Path(args.out).resolve()
    if not weights.is_file():
        raise ModelError(f"Weights file {args.weights} does not exist or is not a file. Check the path.")
    if out.suffix.lower() != ".json":
        raise ModelError(f"--out {args.out} must end in .json (a model card). Name it, e.g., {weights.stem}.json.")
    if out.exists() and not args.overwrite:
        raise ModelError(f"Model card {args.out} already exists. Pass --overwrite to replace it, or choose "
                         "another --out.")
    torchscript = _is_torchscript(weights)
    if not torchscript and not args.architecture:
        raise ModelError(f"{args.weights} is not TorchScript, so the card must name its network: add "
                         "--architecture NAME (e.g. ctxai.UNet3D or monai.networks.nets.UNet) and --params JSON.")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    card = {"name": args.name or weights.stem, "task": args.task, "class_names": classes,
            "input_channels": args.input_channels, "patch_size": args.patch, "spacing_mm": args.spacing,
            "normalization": args.normalization, "output_activation": args.activation,
            "default_cam_layer": args.layer, "format": "torchscript" if torchscript else "state_dict",
            "weights": os.path.relpath(weights, out.parent), "sha256": sha256_file(weights)}
    if not torchscript:
        card["architecture"] = {"name": args.architecture, "params": args.params or {}}
    card = {k: v for k, v in card.items() if v is not None}

    # The card is written beside its final place (its weights path is relative to it) and renamed there only once
    # the model it describes has loaded and answered: a card that does not load is never left behind.
    with atomic_output(out) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
        try:
            model = load_model(tmp)
            model.check_output()
            shape = (1, model.card.input_channels) + model.probe_shape()
            with torch.no_grad():
                output = model(torch.zeros(shape))
            if output.shape[1] != len(classes):
                raise ModelError(f"The model returns {output.shape[1]} output channel(s) for a {tuple(shape)} input, "
                                 f"but --classes names {len(classes)} ({', '.join(classes)}). Give one class name per "
                                 "output channel.")
            layer = model.default_layer()
            if args.layer is not None:
                model.get_layer(args.layer)  # a misspelt layer is refused with the layers that exist
        except CTXAIError as exc:
            # The errors name the card being checked: the analyst knows it as --out, not as its temporary twin.
            raise type(exc)(f"{str(exc).replace(str(tmp), str(out))} No card was written.") from None
    print(f"wrote {out}")
    print(f"  format       {card['format']}" + ("" if torchscript else f" ({args.architecture})"))
    print(f"  sha256       {card['sha256']}")
    print(f"  checked      a dummy {tuple(shape)} input gives output {tuple(output.shape)}: {args.task}, "
          f"{len(classes)} classes")
    print(f"  CAM layer    {layer or 'none (TorchScript layers cannot be hooked)'}"
          + ("" if args.layer else " (inferred: the last convolution before the output)"))
    print(f"  patch        {args.patch or 'none: the whole volume in one pass'}")
    for warning in model.warnings:
        print(f"warning: {warning}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("card", help="write a model card for a weights file")
    commands = p.add_subparsers(dest="card_command", required=True)
    p = commands.add_parser("init", help="write a model card from flags, checked with one forward pass")
    p.add_argument("weights", help="TorchScript file, or a state_dict with --architecture")
    p.add_argument("--task", required=True, choices=("classification", "segmentation"))
    p.add_argument("--classes", required=True, metavar="A,B,...", help="class names, one per output channel")
    p.add_argument("--patch", type=lambda t: _triple(t, int, "--patch"), metavar="I,J,K",
                   help="patch in voxels (default: the whole volume at once)")
    p.add_argument("--spacing", type=lambda t: _triple(t, float, "--spacing"), metavar="I,J,K",
                   help="voxel spacing in mm the model was trained at")
    p.add_argument("--normalization", type=parse_normalization, default={"type": "none"}, help=_NORMALIZATION_HELP)
    p.add_argument("--activation", choices=("softmax", "sigmoid", "none"), default="softmax",
                   help="output activation (default softmax)")
    p.add_argument("--layer", help="default CAM layer (default: the last convolution)")
    p.add_argument("--input-channels", type=int, default=1)
    p.add_argument("--architecture", help="network of a state_dict: ctxai.<Name> or monai.networks.nets.<Name>")
    p.add_argument("--params", type=_params, help="the network's keyword arguments as a JSON object")
    p.add_argument("--name", help="model name (default: the weights file's stem)")
    p.add_argument("--out", required=True, help="the card to write (.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing card")
    p.set_defaults(run=_cmd_init)
