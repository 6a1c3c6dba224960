"""``ctxai bench --cases nnunet-cam``: CTXAI's Grad-CAM against nnunetv2-cam's on the same nnU-Net model and volume,
their times and the correlation of their maps.

The model is the tiny nnU-Net of :mod:`CTXAILib.synthetic.nnunet` (fold 0, 32³ patches at 0.2 mm), the volume a
phantom on its grid (seed :data:`.cases.BENCH_SEED`, :data:`SHAPE`³ voxels; nnU-Net tiles it in 27 tiles) and its
centred 32³ crop (one tile, where tiling plays no part). Both explain class :data:`CLASS` at the same layer, without
mirroring: CTXAI through :class:`~CTXAILib.engine.explain.Explainer` (overlap 0.5, nnU-Net's tile step), target the
class logit summed over the voxels predicted as the class; nnunetv2-cam as its ``run_cam_for_prediction`` runs, in
its own environment (``Utilities/reference_env.sh``: it needs torchvision, which does not import beside this torch),
by :mod:`.nnunet_cam_driver` in a child process, with nnunetv2-cam's target patched to ``class``: its own
(``shipped``) sums every output channel's logit over the tile's predicted voxels, ignoring the class it is given;
the first row also reports that one. Times are warm (after one run): CTXAI's from the volume in memory, its
prediction included (evicted before each run); nnunetv2-cam's from the file, nnU-Net's preprocessing included.

What still differs by definition: nnunetv2-cam takes each tile's own Grad-CAM (its channel weights from that tile's
gradients), scales it to [0, 1] per tile, upsamples it with a cubic spline (``scipy.ndimage.zoom``) and averages
overlapping tiles; CTXAI weights the channels by the whole target's average gradient over all tiles, upsamples
trilinearly and blends tiles with nnU-Net's Gaussian. :data:`LAYERS` has a layer at a sixteenth of the voxels
(upsampled ×2) and one at full resolution (no upsampling), so that the rows separate the two.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError
from .cases import BENCH_SEED
from .children import evict

__all__ = ["NNUNET_ROWS", "LAYERS", "SHAPE", "CLASS", "run_nnunet_cam", "format_nnunet"]

NNUNET_ROWS = ("nnunet-cam",)
LAYERS = ("decoder.stages.0", "decoder.stages.1")
"""The last decoder stage but one (16³ of a 32³ tile) and the last (32³); both networks name them alike."""
SHAPE = 64
CLASS = "pore"
_ONE_TILE = 32
_REPO = Path(__file__).resolve().parents[3]


def _reference_python(log: Callable[[str], None]) -> str:
    script = _REPO / "Utilities" / "reference_env.sh"
    if not script.is_file():
        raise InputError(f"The nnunet-cam case needs the source checkout's {script.relative_to(_REPO)} (it builds "
                         "the reference environment); run ctxai bench from a clone of the repository.")
    log("nnunet-cam: the reference environment (.venv-reference; the first time several GB, minutes)")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        raise InputError(f"Could not build the nnunetv2-cam reference environment:\n{done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def _correlations(a, b, mask) -> dict[str, float]:
    import numpy as np
    from scipy.stats import spearmanr

    def pearson(x, y) -> float:
        return float(np.corrcoef(x.astype(np.float64), y.astype(np.float64))[0, 1])

    return {"pearson": pearson(a.ravel(), b.ravel()), "spearman": float(spearmanr(a.ravel(), b.ravel())[0]),
            "pearson_predicted": pearson(a[mask], b[mask]), "spearman_predicted": float(spearmanr(a[mask], b[mask])[0])}


def _reference(python: str, folder: Path, volume: Path, layer: str, class_index: int, repeats: int, target: str,
               out: Path) -> tuple[Any, dict[str, Any]]:
    import numpy as np

    driver = Path(__file__).with_name("nnunet_cam_driver.py")
    done = subprocess.run([python, str(driver), str(folder), "0", str(volume), layer, str(class_index), str(repeats),
                           str(out), target], capture_output=True, text=True)
    if done.returncode != 0:
        raise InputError(f"nnunetv2-cam's run failed ({layer}, {target}):\n{done.stderr[-2000:]}")
    return np.load(out), json.loads(out.with_suffix(".json").read_text())


def run_nnunet_cam(workdir: Path, repeats: int, quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """The report's ``nnunet_cam`` section: one row per volume, layer and reference target."""
    import numpy as np

    from ..engine.explain import Explainer
    from ..engine.geometry import Volume, write_volume
    from ..engine.models import load_model
    from ..engine.targets import MaskRegion, Target
    from ..synthetic.nnunet import tiny_nnunet
    from ..synthetic.phantom import generate_phantom

    python = _reference_python(log)
    log("nnunet-cam: the tiny nnU-Net (trained once, cached)")
    folder = tiny_nnunet()
    model = load_model(folder, fold=0)
    explainer = Explainer(model, device="cpu", overlap=0.5)
    class_index = model.card.class_index(CLASS)
    phantom = generate_phantom(BENCH_SEED, (SHAPE,) * 3, spacing_mm=model.card.spacing_mm, defect_counts={"pore": 8},
                               part="coupon")
    lo = (SHAPE - _ONE_TILE) // 2
    crop = phantom.ct.array[lo:lo + _ONE_TILE, lo:lo + _ONE_TILE, lo:lo + _ONE_TILE].copy()
    volumes = {SHAPE: phantom.ct, _ONE_TILE: Volume(crop, phantom.ct.spacing)}
    repeats = 1 if quick else repeats
    rows = []
    for shape, volume in volumes.items():
        path = workdir / f"nnunet-cam-{shape}" / "case_0000.nrrd"
        path.parent.mkdir()
        write_volume(volume, path)
        predicted = explainer.segmentation_probabilities(explainer.prepare(volume)).argmax(0) == class_index
        target = Target(CLASS, region=MaskRegion(predicted))
        for layer in LAYERS:
            log(f"nnunet-cam: {shape}³, {layer}: CTXAI's Grad-CAM")

            def run():
                evict(explainer)  # nnunetv2-cam predicts on every call: CTXAI's time includes its prediction too
                started = time.perf_counter()
                result = explainer.explain(volume, "gradcam", target, layer=layer)
                return time.perf_counter() - started, result.attribution.array

            warm_up, ours = run()
            times = [run()[0] for _ in range(repeats)]
            for reference_target in ("class", "shipped") if shape == SHAPE and layer == LAYERS[0] else ("class",):
                log(f"nnunet-cam: {shape}³, {layer}: nnunetv2-cam's Grad-CAM (target {reference_target})")
                theirs, timing = _reference(python, folder, path, layer, class_index, repeats, reference_target,
                                            path.parent / f"{layer}-{reference_target}.npy")
                rows.append({
                    "volume_kji": [shape] * 3, "layer": layer, "reference_target": reference_target,
                    "predicted_voxels": int(predicted.sum()),
                    "ctxai": {"median_s": statistics.median(times), "times_s": times, "warm_up_s": warm_up},
                    "nnunetv2_cam": {"median_s": statistics.median(timing["times_s"]), "times_s": timing["times_s"],
                                     "warm_up_s": timing["warm_up_s"], "threads": timing["threads"]},
                    **_correlations(ours, theirs, predicted)})
    return {"model": f"{folder.parent.name}/{folder.name} fold 0", "seed": BENCH_SEED, "class": CLASS,
            "spacing_mm": list(model.card.spacing_mm), "patch_kji": list(model.card.patch_shape),
            "ctxai": {"method": "gradcam", "overlap": 0.5, "upsample": "trilinear", "threads": _threads(),
                      "target": f"logit of {CLASS!r} summed over the voxels predicted as {CLASS!r}"},
            "reference": {"package": "nnunetv2-cam", "python": python.removeprefix(f"{_REPO}/"), "versions": timing["versions"],
                          "call": "nnunetv2_cam.api.run_cam_for_prediction(method='gradcam', mirroring off, tile "
                                  "step 0.5)",
                          "targets": {"class": "the class logit over the tile's predicted voxels",
                                      "shipped": "nnunetv2-cam's own: every channel's logit over the tile's "
                                                 "predicted voxels"}},
            "repeats": repeats, "rows": rows}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def format_nnunet(section: dict[str, Any]) -> list[str]:
    """The nnunet-cam section as text lines."""
    lines = [f"{'nnunet-cam':<10s} {'layer':<17s} {'target':<8s} {'CTXAI s':>8s} {'ref s':>8s} {'Pearson':>8s} "
             f"{'Spearman':>9s} {'P pred':>7s} {'S pred':>7s}"]
    for r in section["rows"]:
        lines.append(f"{str(r['volume_kji'][0]) + '³':<10s} {r['layer']:<17s} {r['reference_target']:<8s} "
                     f"{r['ctxai']['median_s']:>8.2f} {r['nnunetv2_cam']['median_s']:>8.2f} {r['pearson']:>8.3f} "
                     f"{r['spearman']:>9.3f} {r['pearson_predicted']:>7.3f} {r['spearman_predicted']:>7.3f}")
    lines.append(f"(ref: nnunetv2-cam {section['reference']['versions']['nnunetv2-cam']} in its own environment; "
                 "P/S pred: over the predicted region)")
    return lines
