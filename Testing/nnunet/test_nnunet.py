"""nnU-Net v2 results folders: a tiny nnU-Net trained by nnU-Net's own pipeline (see conftest.py), loaded from its
folder, explained with every method after the explicit resampling, its maps on the input's exact grid."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from CTXAILib import Explainer, ModelError, Target, list_methods, read_volume, write_volume
from CTXAILib.engine.geometry import Box, Volume
from CTXAILib.engine.models import load_model
from CTXAILib.engine.resample import ModelGrid
from CTXAILib.engine.targets import BoxRegion, VoxelRegion

CTXAI = shutil.which("ctxai") or str(Path(sys.executable).with_name("ctxai"))
# Few steps and samples: these tests show every method runs through the resampling, not how good the maps are.
SMALL = {"integrated_gradients": {"steps": 4}, "smoothgrad": {"samples": 2}, "deepshap": {"baselines": 2},
         "gradient_shap": {"samples": 2, "baselines": 2}, "occlusion": {"window": 16, "stride": 16},
         "lime": {"samples": 16, "supervoxels": 8}, "kernel_shap": {"samples": 16, "supervoxels": 8},
         "feature_ablation": {"supervoxels": 8}}
ROI = BoxRegion(Box((8, 8, 6), (16, 16, 12)))


@pytest.fixture(scope="session")
def part() -> Volume:
    """A pore phantom at 0.25 x 0.25 x 0.3 mm (the model's is 0.2 mm), tilted and moved: any geometry error shows.
    25 x 25 x 21 voxels become 31 x 31 x 31 on the model's grid: one patch, so that every method runs in seconds."""
    from CTXAILib.synthetic.phantom import generate_phantom

    ct = generate_phantom(21, shape=(32, 32, 32), spacing_mm=(0.25, 0.25, 0.3), defect_counts={"pore": 3},
                          part="coupon").ct.crop(Box((3, 3, 5), (28, 28, 26)))
    turn = np.array([[np.cos(0.3), -np.sin(0.3), 0.0], [np.sin(0.3), np.cos(0.3), 0.0], [0.0, 0.0, 1.0]])
    return Volume(ct.array, ct.spacing, (12.5, -7.25, 3.125), turn)


@pytest.fixture(scope="session")
def explainer(nnunet_folder) -> Explainer:
    return Explainer(nnunet_folder, device="cpu")


def test_card_is_synthesised_from_the_plans(nnunet_folder):
    plans = json.loads((nnunet_folder / "plans.json").read_text())
    statistics = plans["foreground_intensity_properties_per_channel"]["0"]
    model = load_model(nnunet_folder)
    card = model.card
    assert (card.task, card.class_names, card.output_activation) == ("segmentation", ["background", "pore"], "softmax")
    assert card.patch_size == (32, 32, 32) and card.spacing_mm == (0.2, 0.2, 0.2) and card.resample_to_spacing
    norm = card.normalization
    assert (norm.type, norm.mean, norm.std, norm.clip) == (
        "percentile", statistics["mean"], statistics["std"],
        (statistics["percentile_00_5"], statistics["percentile_99_5"]))
    assert not norm.per_volume  # nnU-Net's CT statistics are the dataset's, not each volume's
    assert card.training["folds"] == ["fold_0"] and "mirroring" in card.training
    assert not any(m.training for m in model.module.modules())  # eval mode; deep supervision off: one output
    output = model(torch.zeros(1, 1, 32, 32, 32))
    assert isinstance(output, torch.Tensor) and output.shape == (1, 2, 32, 32, 32)


def test_probabilities_equal_nnunets_own_predictor(nnunet_folder):
    """On a volume at the model's spacing and patch size, CTXAI's confidence is nnU-Net's own prediction (its
    preprocessing, CT normalisation and network; mirroring off); the wrong normalisation is the control."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from CTXAILib.synthetic.phantom import generate_phantom

    volume = generate_phantom(31, shape=(32, 32, 32), defect_counts={"pore": 3}, part="coupon").ct
    model = load_model(nnunet_folder)
    ours = Explainer(model, device="cpu").explain(volume, "confidence", Target("pore")).attribution.array

    plans = PlansManager(json.loads((nnunet_folder / "plans.json").read_text()))
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                device=torch.device("cpu"), verbose=False, allow_tqdm=False)
    predictor.manual_initialization(model.module, plans, plans.get_configuration("3d_fullres"),
                                    [model.module.state_dict()],
                                    json.loads((nnunet_folder / "dataset.json").read_text()), "TinyTrainer", None)
    _, theirs = predictor.predict_single_npy_array(volume.array[None].astype(np.float32),
                                                   {"spacing": [0.2, 0.2, 0.2]}, None, None, True)
    # nnU-Net blends its tiles with a float16 Gaussian (sigma = patch / 8) that underflows towards the patch's
    # corners, where its own single-tile prediction loses precision: compared where that weight is >= 1 % of its peak.
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    weight = compute_gaussian((32, 32, 32), 1 / 8, 10, device=torch.device("cpu")).float().numpy()
    central = weight >= 0.01 * weight.max()
    assert central.mean() > 0.2
    np.testing.assert_allclose(ours[central], theirs[1][central], atol=2e-3)  # CTXAI keeps float16 probabilities

    control = Explainer(load_model(nnunet_folder), device="cpu")
    control.model.card.normalization = type(model.card.normalization)()  # no normalisation
    wrong = control.explain(volume, "confidence", Target("pore")).attribution.array
    assert np.abs(wrong - theirs[1])[central].max() > 0.05


def test_resampling_round_trip_keeps_the_input_geometry(part):
    grid = ModelGrid.between(part, (0.2, 0.2, 0.2))
    assert grid.needed and grid.model_shape == (31, 31, 31)
    model_volume = grid.to_model(part)
    # The card's spacing to within half a voxel over the extent (31 voxels per axis here).
    assert np.allclose(model_volume.spacing, (0.2, 0.2, 0.2), rtol=0.5 / 31 + 1e-9, atol=0)
    # Both grids cover one extent: their first voxels' outer corners coincide.
    corner = part.ijk_to_ras @ np.array([-0.5, -0.5, -0.5, 1.0])
    assert np.allclose(model_volume.ijk_to_ras @ np.array([-0.5, -0.5, -0.5, 1.0]), corner)
    back = grid.to_input(model_volume.array, part)
    assert back.shape == part.shape and np.array_equal(back.ijk_to_ras, part.ijk_to_ras)
    assert np.corrcoef(back.array.ravel(), part.array.ravel())[0, 1] > 0.95
    # A point moves to the model voxel at the same place.
    ijk = np.array([20, 5, 13])
    model_ijk = np.array(grid.region(VoxelRegion(tuple(ijk))).ijk)
    ras, model_ras = (v.ijk_to_ras @ np.array([*x, 1.0]) for v, x in ((part, ijk), (model_volume, model_ijk)))
    assert np.linalg.norm((ras - model_ras)[:3]) <= 0.5 * np.linalg.norm(model_volume.spacing)
    at_spacing = Volume(model_volume.array, (0.2, 0.2, 0.2), model_volume.origin, model_volume.directions)
    assert not ModelGrid.between(at_spacing, (0.2, 0.2, 0.2)).needed  # control: at the card's spacing, nothing to do


@pytest.mark.parametrize("method", [spec.name for spec in list_methods()])
def test_every_method_explains_on_the_inputs_grid(explainer, part, method):
    result = explainer.explain(part, method, Target("pore", region=ROI), settings=SMALL.get(method))
    attribution = result.attribution
    assert attribution.shape == part.shape and np.array_equal(attribution.ijk_to_ras, part.ijk_to_ras)
    assert np.isfinite(attribution.array).all() and np.abs(attribution.array).max() > 0
    assert result.resampling["to_shape_ijk"] == [31, 31, 31]
    assert result.resampling["from_spacing_mm"] == [0.25, 0.25, 0.3]
    assert result.warnings[0].startswith("Resampled the volume from (0.25, 0.25, 0.3) mm")
    assert result.confidence.same_geometry(part)
    # The ROI, given in the input's IJK, is inside the extent the map was computed over; the region explained, told
    # in the input's IJK again, is the ROI to within the voxel the two grids do not share.
    assert result.extent.contains(ROI.box)
    assert np.abs(np.array(result.target["box"]) - [[8, 8, 6], [16, 16, 12]]).max() <= 1


def test_fold_ensemble_is_the_mean_of_the_folds_maps(nnunet_folder, part):
    target = Target("pore", region=ROI)
    ensemble = Explainer(load_model(nnunet_folder, fold="all"), device="cpu").explain(part, "saliency", target)
    folds = [Explainer(load_model(nnunet_folder, fold=n), device="cpu").explain(part, "saliency", target)
             for n in (0, 1)]
    mean = (folds[0].attribution.array + folds[1].attribution.array) / 2
    np.testing.assert_allclose(ensemble.attribution.array, mean, rtol=1e-5, atol=1e-9)
    assert not np.allclose(folds[0].attribution.array, mean, rtol=1e-3)  # control: the folds differ
    assert ensemble.ensemble["members"] == ["Dataset501_CTXAIPores 3d_fullres fold_0",
                                            "Dataset501_CTXAIPores 3d_fullres fold_1"]
    assert any(w.startswith("Fold ensemble: the map and the confidence are the mean of the 2") for w in
               ensemble.warnings)


def test_cli_explains_the_results_folder(nnunet_folder, part, tmp_path):
    volume_file = write_volume(part, tmp_path / "part.nrrd")
    out = tmp_path / "run"
    done = subprocess.run([CTXAI, "explain", "--volume", volume_file, "--model", nnunet_folder, "--fold", "0",
                           "--method", "saliency", "--roi", "8,8,6,16,16,12",
                           "--out", out, "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "warning: Resampled the volume from (0.25, 0.25, 0.3) mm" in done.stderr
    assert "without test-time mirroring" in done.stderr
    volume = read_volume(volume_file)
    for name in ("attribution.nrrd", "confidence.nrrd"):
        written = read_volume(out / name)
        assert written.shape == volume.shape and np.array_equal(written.ijk_to_ras, volume.ijk_to_ras)
    record = json.loads((out / "run.json").read_text())
    assert record["resampling"]["card_spacing_mm"] == [0.2, 0.2, 0.2]
    assert record["model"]["card"]["training"]["source"] == "nnU-Net v2 results folder"
    assert record["model"]["card"]["normalization"]["type"] == "percentile"

    done = subprocess.run([CTXAI, "explain", "--volume", volume_file, "--model", nnunet_folder, "--fold", "7",
                           "--method", "saliency", "--out", tmp_path / "bad"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and "has no fold 7" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "bad").exists()


def test_checkpoint_beyond_weights_is_refused(nnunet_folder, tmp_path):
    import argparse

    folder = tmp_path / nnunet_folder.name
    (folder / "fold_0").mkdir(parents=True)
    for name in ("plans.json", "dataset.json"):
        shutil.copy(nnunet_folder / name, folder / name)
    from CTXAILib.engine.nnunet import _allowed_globals

    with torch.serialization.safe_globals(_allowed_globals()):
        checkpoint = torch.load(nnunet_folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    checkpoint["init_args"]["namespace"] = argparse.Namespace(arbitrary=True)  # an object weights-only refuses
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(ModelError, match=r"argparse.Namespace.*never unpickles.*torch.save\(\{'network_weights'"):
        load_model(folder)
    torch.save({"network_weights": checkpoint["network_weights"]}, folder / "fold_0" / "checkpoint_final.pth")
    assert load_model(folder).card.class_names == ["background", "pore"]  # the export the message gives loads


def test_worker_describes_the_results_folder_and_its_fold(nnunet_folder):
    """The panel's path: the real worker process loads the folder (default fold, or the request's), by its path."""
    from CTXAILib.worker.client import WorkerClient, WorkerError

    client = WorkerClient()
    try:
        default = client.call("describe_model", model=str(nnunet_folder), device="cpu")
        second = client.call("describe_model", model=str(nnunet_folder), device="cpu", fold=1)
        assert default["card"]["training"]["folds"] == ["fold_0"] and second["card"]["training"]["folds"] == ["fold_1"]
        assert default["sha256"] != second["sha256"] and default["card"]["resample_to_spacing"] is True
        assert any(layer["cam_usable"] for layer in default["layers"]) and default["default_layer"]
        with pytest.raises(WorkerError, match="has no fold 5"):
            client.call("describe_model", model=str(nnunet_folder), device="cpu", fold=5)
    finally:
        client.stop()
