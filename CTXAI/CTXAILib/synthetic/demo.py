"""``ctxai demo``: the embedded default end to end, with no data and no network.

1. Generates a synthetic CT scan of a titanium part with known defects (a seed never used in training).
2. Runs the bundled U-Net over the whole part (sliding window) and the bundled classifier on a patch around each
   detected defect.
3. For the most confident detection of each defect type (pore, crack, inclusion) explains both models with a
   class activation map and Integrated Gradients: the classifier's class score on its patch with Grad-CAM, and the
   U-Net's class summed over the detected defect (the connected component) with HiResCAM. Grad-CAM averages each
   channel's gradient over the whole map, so for a segmentation target it lights up every region with the class's
   features; HiResCAM, its element-wise form, stays on the defect that is explained.
4. Writes every volume as NRRD (CT, ground truth, the U-Net's confidence and labels, each attribution in the CT's
   geometry) with a run record beside each attribution, and a tri-planar PNG per explanation (CT, heat map and the
   ground-truth outline at the defect), then prints where everything is and what it shows.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ..engine.geometry import Box, write_volume

__all__ = ["run_demo", "print_guide", "DEMO_SEED"]

DEMO_SEED = 2026
# A U-Net target spans several 64³ tiles (a crack, a dozen), each integrated along the whole path: 16 Gauss-Legendre
# nodes halve the demo's longest runs; each run record states its steps.
_METHODS = {"classifier": (("gradcam", {}), ("integrated_gradients", {"steps": 32, "baseline": "part_mean"})),
            "unet": (("hirescam", {}), ("integrated_gradients", {"steps": 16, "baseline": "part_mean"}))}


def _detections(probabilities: np.ndarray, classifier_explainer, ct, log) -> list[dict]:
    """Connected components of the U-Net's defect voxels, each classified by the classifier at its centre."""
    from scipy import ndimage

    predicted = probabilities.argmax(axis=0)
    components, count = ndimage.label(predicted > 0, structure=np.ones((3, 3, 3), bool))
    prepared = classifier_explainer.prepare(ct)
    card = classifier_explainer.model.card
    detections = []
    for label, where in enumerate(ndimage.find_objects(components), start=1):
        member = components[where] == label
        voxels = int(member.sum())
        if voxels < 4:
            continue  # specks; a real defect at 0.2 mm is several voxels
        # The voxel of the component nearest its centroid: a crack's centroid can lie outside the crack.
        inside = np.argwhere(member)
        nearest = inside[np.argmin(np.linalg.norm(inside - inside.mean(axis=0), axis=1))]
        k, j, i = nearest + [s.start for s in where]
        box = Box((i, j, k), (i + 1, j + 1, k + 1))
        probs = classifier_explainer.class_probabilities(prepared, classifier_explainer.patch_extent(box, ct.shape))
        best = int(np.argmax(probs))
        seg_class = int(np.bincount(predicted[where][member]).argmax())
        detections.append({"component": label, "voxel_ijk": [int(i), int(j), int(k)], "voxels": voxels,
                           "segmentation_class": seg_class, "classifier_class": card.class_names[best],
                           "classifier_confidence": float(probs[best]),
                           "unet_mean_confidence": float(probabilities[seg_class][where][member].mean())})
    log(f"U-Net found {count} connected defect regions; {len(detections)} of at least 4 voxels")
    return detections


def _ground_truth(phantom, detection: dict) -> dict | None:
    i, j, k = detection["voxel_ijk"]
    ident = int(phantom.instances.array[k, j, i])
    if ident == 0:
        return None
    defect = phantom.defects[ident - 1]
    return {"id": defect.id, "type": defect.type, "equivalent_diameter_mm": defect.equivalent_diameter_mm}


def run_demo(out: str | Path, seed: int = DEMO_SEED, shape: tuple[int, int, int] = (128, 128, 128),
             device: str = "auto", log=print) -> dict:
    """Run the demo into ``out`` and return its summary (also written as ``summary.json``)."""
    from ..engine.explain import Explainer
    from ..engine.targets import BoxRegion, ComponentRegion, Target
    from ..records.outputs import write_explanation
    from ..records.report import triplanar_png
    from .evaluation import bundled_model
    from .phantom import generate_phantom, save_phantom

    started = time.perf_counter()
    out = Path(out)
    log(f"generating a synthetic CT scan (seed {seed}, {shape[2]}x{shape[1]}x{shape[0]} voxels)")
    phantom = generate_phantom(seed, shape)
    files = {key: str(path) for key, path in save_phantom(phantom, out / "phantom").items()}
    ct = phantom.ct

    unet = Explainer(bundled_model("unet"), device=device)
    classifier = Explainer(bundled_model("classifier"), device=device)
    log("segmenting the part with the U-Net (sliding window)")
    probabilities = unet.segmentation_probabilities(unet.prepare(ct))
    segmentation = out / "segmentation"
    files["predicted_labels"] = str(write_volume(ct.with_array(probabilities.argmax(axis=0).astype(np.uint8)),
                                                 segmentation / "predicted_labels.nrrd"))
    for index, name in enumerate(unet.model.card.class_names[1:], start=1):
        files[f"confidence_{name}"] = str(write_volume(ct.with_array(probabilities[index].astype(np.float32)),
                                                       segmentation / f"confidence_{name}.nrrd"))
    detections = _detections(probabilities, classifier, ct, log)

    explanations = []
    for defect_class in classifier.model.card.class_names[1:]:
        candidates = [d for d in detections if d["classifier_class"] == defect_class]
        if not candidates:
            log(f"no detection classified as {defect_class}; nothing to explain for it")
            continue
        detection = max(candidates, key=lambda d: d["classifier_confidence"])
        truth = _ground_truth(phantom, detection)
        i, j, k = detection["voxel_ijk"]
        outline = phantom.instances.array == truth["id"] if truth else None
        seg_name = unet.model.card.class_names[detection["segmentation_class"]]
        runs = [("classifier", classifier, Target(defect_class, region=BoxRegion(Box((i, j, k), (i + 1, j + 1, k + 1))))),
                ("unet", unet, Target(seg_name, region=ComponentRegion((i, j, k))))]
        for model_name, explainer, target in runs:
            for method, settings in _METHODS[model_name]:
                name = f"{defect_class}-{model_name}-{method}"
                result = explainer.explain(ct, method, target, settings=settings)
                folder = out / "explanations" / name
                written = write_explanation(result, ct, explainer.model, folder,
                                            extra={"demo": {"detection": detection, "ground_truth": truth}},
                                            sources={"volume": files["ct"], "model": explainer.model.card.path})
                picture = triplanar_png(
                    ct, result.attribution, folder / "triplanar.png", (i, j, k), sign=result.sign, outline=outline,
                    title=f"{method} of the {model_name} for '{result.target['class']}' at voxel {(i, j, k)}; "
                          f"ground truth: {truth['type'] if truth else 'none'}")
                explanations.append({"name": name, "model": model_name, "method": method,
                                     "target": result.target["class"], "detection": detection,
                                     "ground_truth": truth, "time_s": round(result.timings["total_s"], 2),
                                     "files": {**{k: str(v) for k, v in written.items()}, "picture": str(picture)}})
                log(f"  {name}: {result.timings['total_s']:.1f} s")
    summary = {"seed": seed, "shape_kji": list(shape), "part": phantom.part_kind,
               "defects_in_ground_truth": len(phantom.defects), "detections": detections,
               "explanations": explanations, "files": files,
               "minutes": round((time.perf_counter() - started) / 60, 2)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def print_guide(out: Path, summary: dict) -> None:
    print(f"\nCTXAI demo finished in {summary['minutes']:.1f} min. Outputs in {out}:")
    print(f"  phantom/ct.nrrd                 synthetic CT of a {summary['part']} (air -1000, titanium +3000)")
    print(f"  phantom/gt_labels.nrrd (+.ctbl) ground truth: {summary['defects_in_ground_truth']} defects by type")
    print("  phantom/gt_instances.nrrd       ground truth per defect; defects.json lists them")
    print("  segmentation/*.nrrd             the U-Net's prediction and its confidence per class (model output, "
          "not an explanation)")
    for item in summary["explanations"]:
        truth = item["ground_truth"]["type"] if item["ground_truth"] else "no ground-truth defect"
        print(f"  explanations/{item['name']:<38s} why the {item['model']} said '{item['target']}' "
              f"(ground truth: {truth}): attribution.nrrd, run.json, triplanar.png")
    print("  summary.json                    everything above, machine-readable")
    print("Load ct.nrrd and an attribution.nrrd in 3D Slicer (or open the PNGs) to see where each model looked.")
