"""nnunetv2-cam's Grad-CAM of an nnU-Net results folder on one volume, timed: the reference of ``ctxai bench --cases
nnunet-cam``, run by :mod:`.nnunet_cam` in the reference environment (``Utilities/reference_env.sh``).

``python nnunet_cam_driver.py FOLDER FOLD VOLUME LAYER CLASS_INDEX REPEATS OUT.npy TARGET`` writes the map
(float32, the volume's array order k, j, i) to ``OUT.npy`` and its times in seconds, one warm-up first, to
``OUT.json``. It imports nnU-Net, nnunetv2-cam, numpy and SimpleITK only: nothing of CTXAI, whose torch is another.

nnunetv2-cam runs as its ``run_cam_for_prediction`` does (nnU-Net's preprocessing, tiles at nnU-Net's step of 0.5,
pytorch-grad-cam's GradCAM per tile, mirroring off). ``TARGET`` is ``shipped`` (its own target: every output
channel's logit summed over the tile's voxels predicted as the class: it ignores the class it is given) or ``class``
(the class's logit only over those voxels, the target its docstring describes and CTXAI's definition).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path


def main(folder: str, fold: str, volume: str, layer: str, class_index: str, repeats: str, out: str,
         target: str) -> None:
    import numpy as np
    import SimpleITK as sitk
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    import nnunetv2.inference.predict_from_raw_data as predict
    import nnunetv2_cam.cam_core as cam_core
    from nnunetv2_cam.api import run_cam_for_prediction

    if target == "class":
        class ClassTarget(cam_core.SemanticSegmentationTarget):
            def __call__(self, model_output: torch.Tensor) -> torch.Tensor:
                return (model_output[self.category] * self.mask[0]).sum() * self.scale_factor

        cam_core.SemanticSegmentationTarget = ClassTarget
    find_trainer = predict.recursive_find_trainer_class_by_name

    def trainer_or_default(name: str):
        # A trainer defined outside nnU-Net (the bench's tiny one only shortens training) builds nnU-Net's network.
        try:
            return find_trainer(name)
        except RuntimeError:
            from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

            return nnUNetTrainer

    predict.recursive_find_trainer_class_by_name = trainer_or_default
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(folder, use_folds=(int(fold),),
                                                   checkpoint_name="checkpoint_final.pth")
    with tempfile.TemporaryDirectory(prefix="nnunet-cam-") as tmp:
        # nnunetv2-cam finds a case's channels by the file name: the volume alone, as channel 0000.
        image = Path(tmp) / "in" / "case_0000.nrrd"
        image.parent.mkdir()
        sitk.WriteImage(sitk.ReadImage(volume), str(image))
        times, heatmap = [], None
        for _ in range(int(repeats) + 1):
            started = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # it prints a citation on every call
                heatmap = run_cam_for_prediction(predictor, str(image), str(Path(tmp) / "out"), layer,
                                                 target_class=int(class_index), method="gradcam",
                                                 device=torch.device("cpu"), save_slices=False)[0]
            times.append(time.perf_counter() - started)
    np.save(out, np.asarray(heatmap, np.float32)[0])
    Path(out).with_suffix(".json").write_text(json.dumps({
        "warm_up_s": times[0], "times_s": times[1:], "torch": torch.__version__, "threads": torch.get_num_threads(),
        "versions": {name: _version(name) for name in ("nnunetv2", "nnunetv2-cam", "grad-cam", "torch")}}))


def _version(name: str) -> str:
    from importlib import metadata

    return metadata.version(name)


if __name__ == "__main__":
    main(*sys.argv[1:])
