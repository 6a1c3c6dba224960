"""A tiny nnU-Net v2 trained on four small phantoms by nnU-Net's own pipeline, for the nnU-Net tests and the
``nnunet-cam`` benchmark row: :func:`tiny_nnunet` builds it once and caches it on disk.

``python -m CTXAILib.synthetic.nnunet OUT`` writes ``OUT/nnUNet_raw``, ``OUT/nnUNet_preprocessed`` and
``OUT/nnUNet_results/Dataset501_CTXAIPores/TinyTrainer__nnUNetPlans__3d_fullres`` with two folds. Everything
nnU-Net reads (its three folders) comes from the environment at import, so :func:`tiny_nnunet` runs this in its own
process and keeps the results folder under a hash of this file, the phantom generator and the training libraries.

The recipe: pores (label 1) in 48-cube titanium phantoms at 0.2 mm, CT normalisation (channel "CT"), the default
planner with its network shrunk to three stages of 4-16 features on 32-cube patches, two folds of a hand-made split
(four cases cannot make nnU-Net's default five), each trained for 2 epochs of 4 iterations on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from ..errors import CTXAIError

__all__ = ["RESULTS", "tiny_nnunet"]

DATASET_ID = 501
DATASET = f"Dataset{DATASET_ID}_CTXAIPores"
SEEDS = (11, 12, 13, 14)
CASES = [f"pores_{i:03d}" for i in range(len(SEEDS))]
RESULTS = Path(f"nnUNet_results/{DATASET}/TinyTrainer__nnUNetPlans__3d_fullres")


def write_raw(raw: Path) -> None:
    from ..engine.geometry import write_volume
    from .phantom import DEFECT_TYPES, generate_phantom

    images, labels = raw / "imagesTr", raw / "labelsTr"
    images.mkdir(parents=True)
    labels.mkdir()
    pore = DEFECT_TYPES.index("pore") + 1
    for case, seed in zip(CASES, SEEDS):
        phantom = generate_phantom(seed, shape=(48, 48, 48), defect_counts={"pore": 8}, part="coupon")
        write_volume(phantom.ct, images / f"{case}_0000.nrrd")
        mask = (phantom.labels.array == pore).astype("uint8")
        write_volume(phantom.labels.with_array(mask), labels / f"{case}.nrrd")
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, "pore": 1},
        "numTraining": len(CASES), "file_ending": ".nrrd"}, indent=2))


def shrink_plans(plans_file: Path) -> None:
    """Keep 3d_fullres only, with a three-stage network that trains in seconds on a CPU."""
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"]["3d_fullres"]
    config.update(patch_size=[32, 32, 32], batch_size=2)
    config["architecture"]["arch_kwargs"].update(
        n_stages=3, features_per_stage=[4, 8, 16], kernel_sizes=[[3, 3, 3]] * 3,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1])
    plans["configurations"] = {"3d_fullres": config}
    plans_file.write_text(json.dumps(plans, indent=2))


def main(out: Path) -> None:
    os.environ.update(nnUNet_raw=str(out / "nnUNet_raw"), nnUNet_preprocessed=str(out / "nnUNet_preprocessed"),
                      nnUNet_results=str(out / "nnUNet_results"), nnUNet_compile="false")
    write_raw(out / "nnUNet_raw" / DATASET)

    import torch
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset, plan_experiment_dataset, preprocess_dataset)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.manual_seed(0)
    torch.set_num_threads(2)
    extract_fingerprint_dataset(DATASET_ID, num_processes=1, verbose=False, show_progress_bar=False)
    plan_experiment_dataset(DATASET_ID)
    preprocessed = out / "nnUNet_preprocessed" / DATASET
    shrink_plans(preprocessed / "nnUNetPlans.json")
    preprocess_dataset(DATASET_ID, configurations=("3d_fullres",), num_processes=[1], show_progress_bar=False)
    (preprocessed / "splits_final.json").write_text(json.dumps([
        {"train": CASES[:3], "val": CASES[3:]}, {"train": CASES[1:], "val": CASES[:1]}]))

    class TinyTrainer(nnUNetTrainer):
        """nnU-Net's trainer, shortened to a few iterations."""

        def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                     device: torch.device = torch.device("cpu")):
            # nnU-Net records its trainer's arguments by name from this signature, so they are spelt out.
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 2
            self.num_iterations_per_epoch = 4
            self.num_val_iterations_per_epoch = 1

    os.environ["nnUNet_n_proc_DA"] = "0"  # augment in this process (the planner above needs a positive count)
    plans = json.loads((preprocessed / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    for fold in (0, 1):
        # nnU-Net's run_training() sets this flag in the plans, and the trainer pops it.
        trainer = TinyTrainer(dict(plans, continue_training=False), "3d_fullres", fold, dataset_json,
                              device=torch.device("cpu"))
        trainer.run_training()


def _recipe_key() -> str:
    """What the trained folder depends on: this recipe, the phantom generator and the training libraries."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update((Path(__file__).with_name("phantom.py")).read_bytes())
    for name in ("nnunetv2", "torch", "dynamic_network_architectures", "numpy"):
        digest.update(f"{name}={metadata.version(name)}".encode())
    return digest.hexdigest()[:16]


def tiny_nnunet(cache: str | Path | None = None) -> Path:
    """The results folder ``…/TinyTrainer__nnUNetPlans__3d_fullres`` (folds 0 and 1), trained on first use (about
    30 s on 2 CPU cores) under ``cache`` (default ``$CTXAI_TEST_CACHE`` or ``~/.cache/ctxai-tests``)."""
    cache = Path(cache or os.environ.get("CTXAI_TEST_CACHE", Path.home() / ".cache" / "ctxai-tests"))
    built = cache / f"nnunet-{_recipe_key()}"
    if not (built / RESULTS / "fold_1" / "checkpoint_final.pth").is_file():
        cache.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".nnunet-", dir=cache))
        package = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package, os.environ.get("PYTHONPATH")])))
        done = subprocess.run([sys.executable, "-m", "CTXAILib.synthetic.nnunet", str(staging)], env=env,
                              capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            raise CTXAIError(f"Training the tiny nnU-Net failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        shutil.rmtree(staging / "nnUNet_preprocessed")  # only the results folder is read
        try:
            os.rename(staging, built)
        except OSError:  # another process finished first: its folder is the same recipe's
            shutil.rmtree(staging, ignore_errors=True)
    return built / RESULTS


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())
