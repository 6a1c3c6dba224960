"""Training the two bundled models on synthetic phantoms: ``ctxai train classifier`` and ``ctxai train unet``.

Both scripts are deterministic in their seed and run on this project's 2-core CPU machine within 30 minutes
each, phantom generation included. They write the weights (a state_dict), the model card beside them (with the
sha256 of the weights, the quality figures measured on held-out phantoms and the training provenance) into
``Resources/Models``.

- **Classifier** (``classifier.pt``): 32³ patches centred on a defect (with jitter) or on defect-free metal
  (edges, holes and cooling channels included), four classes: normal, pore (gas pores and lack-of-fusion voids),
  crack, inclusion (dense and light).
- **U-Net** (``unet.pt``): per-voxel background / void (pores, lack of fusion, cracks) / inclusion, trained on
  48³ crops (mostly around defects), applied to whole parts with 64³ sliding windows.

Training phantoms use seeds from :data:`TRAIN_SEED_BASE` upward; held-out evaluation uses seeds from
:data:`HELD_OUT_SEED_BASE`, which training never touches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..engine.modelcard import ModelCard
from ..engine.networks import DefectClassifier3D, UNet3D
from .dataset import (CLASSIFIER_CLASSES, CLASSIFIER_PATCH, HELD_OUT_SEED_BASE, NORMALIZATION, PHANTOM_SHAPE,
                      SEGMENTATION_CLASSES, SPACING_MM, TRAIN_SEED_BASE, TYPE_TO_CLASS, TYPE_TO_SEGMENT, UNET_CROP,
                      UNET_PATCH, classifier_patches, crop_around, segmentation_targets)
from .phantom import CT_AIR, Phantom, generate_phantom

__all__ = ["TrainResult", "train_classifier", "train_unet"]

def _augment(batch: torch.Tensor, rng: np.random.Generator, *more: torch.Tensor) -> list[torch.Tensor]:
    """The same random flips and in-plane quarter turns for the batch and its targets (k, the build direction,
    stays k so that lack-of-fusion voids stay in their layers)."""
    tensors = [batch, *more]
    for axis in (-3, -2, -1):
        if rng.random() < 0.5:
            tensors = [t.flip(axis) for t in tensors]
    turns = int(rng.integers(4))
    return [torch.rot90(t, turns, dims=(-2, -1)) for t in tensors]


def _phantoms(seeds: range, log) -> Iterator[Phantom]:
    for n, seed in enumerate(seeds, start=1):
        started = time.perf_counter()
        phantom = generate_phantom(seed, PHANTOM_SHAPE, SPACING_MM)
        log(f"phantom {n}/{len(seeds)} (seed {seed}, {phantom.part_kind}, {len(phantom.defects)} defects) "
            f"in {time.perf_counter() - started:.1f} s")
        yield phantom


@dataclass
class TrainResult:
    card: Path
    weights: Path
    metrics: dict
    minutes: float


def _save(module: torch.nn.Module, card: ModelCard, out_dir: Path, stem: str) -> tuple[Path, Path]:
    from ..engine.geometry import atomic_output
    from ..engine.models import sha256_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / f"{stem}.pt"
    with atomic_output(weights) as tmp:
        torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, tmp)
    card.weights = weights.name
    card.sha256 = sha256_file(weights)
    card.save(out_dir / f"{stem}.json")
    return out_dir / f"{stem}.json", weights


def _provenance(kind: str, seeds: range, steps: int, seed: int, started: float, extra: dict) -> dict:
    from ..records.record import library_versions

    return {"script": f"ctxai train {kind}", "phantom_seeds": [seeds.start, seeds.stop - 1],
            "phantom_shape_kji": list(PHANTOM_SHAPE), "spacing_mm": list(SPACING_MM), "steps": steps,
            "seed": seed, "minutes": round((time.perf_counter() - started) / 60, 1), "versions": library_versions(),
            **extra}


def _optimise(model: torch.nn.Module, steps: int, batch_loss: Callable[[], torch.Tensor], started: float,
              log) -> None:
    """AdamW with a one-cycle schedule over ``steps``; ``batch_loss()`` draws a batch and returns its loss."""
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=2e-3, total_steps=steps, pct_start=0.15)
    model.train()
    for step in range(1, steps + 1):
        loss = batch_loss()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            log(f"step {step}/{steps} loss {loss.item():.3f} ({(time.perf_counter() - started) / 60:.1f} min)")
    model.eval()


def _publish(saved: tuple[Path, Path], card: ModelCard, quality: Callable[[Path], dict], started: float,
             log) -> TrainResult:
    """Measure the held-out quality of the saved model (card, weights) into its card, and save the card again."""
    card_path, weights_path = saved
    log("evaluating on held-out phantoms")
    card.metrics = quality(card_path)
    card.training["minutes"] = round((time.perf_counter() - started) / 60, 1)
    card.save(card_path)
    return TrainResult(card_path, weights_path, card.metrics, card.training["minutes"])


def train_classifier(out_dir: Path, phantoms: int = 48, steps: int = 1200, batch: int = 32, seed: int = 0,
                     evaluate_on: int = 10, log=print) -> TrainResult:
    """Train the defect classifier; see the module docstring. Returns where it was written and its quality."""
    from .evaluation import classifier_quality, pointing_game

    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    seeds = range(TRAIN_SEED_BASE, TRAIN_SEED_BASE + phantoms)
    xs, ys = zip(*(classifier_patches(p, rng) for p in _phantoms(seeds, log)))
    x, y = np.concatenate(xs), np.concatenate(ys)
    log(f"{len(y)} patches; per class {np.bincount(y, minlength=4).tolist()}")
    # Balanced sampling: every class is drawn equally often, whatever its share of the patches.
    weights = 1.0 / np.bincount(y, minlength=4)[y]
    weights /= weights.sum()
    model = DefectClassifier3D(num_classes=len(CLASSIFIER_CLASSES))

    def batch_loss() -> torch.Tensor:
        index = rng.choice(len(y), size=batch, p=weights)
        inputs = torch.from_numpy(x[index].astype(np.float32))[:, None]
        inputs = inputs + 0.01 * torch.randn_like(inputs)  # a little extra noise: scans differ in dose
        (inputs,) = _augment(inputs, rng)
        return F.cross_entropy(model(inputs), torch.from_numpy(y[index]), label_smoothing=0.05)

    _optimise(model, steps, batch_loss, started, log)
    card = ModelCard(
        name="ctxai-defect-classifier", task="classification", class_names=list(CLASSIFIER_CLASSES),
        format="state_dict", weights="classifier.pt", input_channels=1,
        patch_size=(CLASSIFIER_PATCH,) * 3, spacing_mm=SPACING_MM, normalization=NORMALIZATION,
        air_value=CT_AIR, output_activation="softmax", default_cam_layer="features.block4",
        architecture={"name": "ctxai.DefectClassifier3D", "params": {"num_classes": len(CLASSIFIER_CLASSES),
                                                                     "pools": 2}},
        version="1.0",
        description="3-D CNN classifying a 32^3 CT patch (6.4 mm at 0.2 mm voxels) of a titanium part as normal "
                    "metal or the defect at its centre: pore (gas pore or lack-of-fusion void), crack or inclusion "
                    "(tungsten-rich or oxide). Trained on CTXAI's synthetic phantoms only.")
    card.training = _provenance("classifier", seeds, steps, seed, started,
                                {"patches": int(len(y)), "batch": batch, "augmentation": "flips, quarter turns "
                                 "about k, noise", "class_mapping": TYPE_TO_CLASS})
    held_out = range(HELD_OUT_SEED_BASE, HELD_OUT_SEED_BASE + evaluate_on)

    def quality(card_path: Path) -> dict:
        metrics = classifier_quality(card_path, held_out)
        metrics["gradcam_pointing_game"] = pointing_game(card_path, held_out[:3])
        return metrics

    result = _publish(_save(model, card, out_dir, "classifier"), card, quality, started, log)
    log(f"held-out balanced accuracy {result.metrics['balanced_accuracy']:.3f}")
    return result


def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice over the foreground classes, pooled over the batch (small defects still count)."""
    probabilities = torch.softmax(logits, dim=1)[:, 1:]
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3)[:, 1:].float()
    dims = (0, 2, 3, 4)
    intersection = (probabilities * one_hot).sum(dims)
    total = probabilities.sum(dims) + one_hot.sum(dims)
    return 1.0 - ((2 * intersection + 1.0) / (total + 1.0)).mean()


def train_unet(out_dir: Path, phantoms: int = 36, steps: int = 1500, batch: int = 4, seed: int = 0,
               evaluate_on: int = 4, log=print) -> TrainResult:
    """Train the defect segmentation U-Net; see the module docstring."""
    from .evaluation import segmentation_quality

    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    seeds = range(TRAIN_SEED_BASE, TRAIN_SEED_BASE + phantoms)
    volumes = []
    for phantom in _phantoms(seeds, log):
        volumes.append((NORMALIZATION.apply(phantom.ct.array).astype(np.float16),
                        segmentation_targets(phantom).astype(np.uint8),
                        np.argwhere(phantom.labels.array > 0), np.argwhere(phantom.part.array)))
    air = float(NORMALIZATION.apply(CT_AIR))
    model = UNet3D(out_channels=len(SEGMENTATION_CLASSES), widths=(12, 24, 48, 96))
    class_weights = torch.tensor([0.5, 1.0, 1.0])

    def batch_loss() -> torch.Tensor:
        inputs, targets = [], []
        for _ in range(batch):
            ct, target, defect_voxels, part_voxels = volumes[int(rng.integers(len(volumes)))]
            # Mostly crops around defects (they are a tiny fraction of the voxels), some anywhere in the part.
            pool = defect_voxels if rng.random() < 0.75 and len(defect_voxels) else part_voxels
            k, j, i = pool[int(rng.integers(len(pool)))] + rng.integers(-UNET_CROP // 4, UNET_CROP // 4 + 1, 3)
            inputs.append(crop_around(ct, (i, j, k), UNET_CROP, air))
            targets.append(crop_around(target, (i, j, k), UNET_CROP, 0))
        x = torch.from_numpy(np.stack(inputs).astype(np.float32))[:, None]
        t = torch.from_numpy(np.stack(targets).astype(np.int64))
        x, t = _augment(x, rng, t)
        logits = model(x + 0.01 * torch.randn_like(x))
        return F.cross_entropy(logits, t, weight=class_weights) + _dice_loss(logits, t)

    _optimise(model, steps, batch_loss, started, log)
    card = ModelCard(
        name="ctxai-defect-unet", task="segmentation", class_names=list(SEGMENTATION_CLASSES),
        format="state_dict", weights="unet.pt", input_channels=1, patch_size=(UNET_PATCH,) * 3,
        spacing_mm=SPACING_MM, normalization=NORMALIZATION, air_value=CT_AIR, output_activation="softmax",
        default_cam_layer="decoders.1",
        architecture={"name": "ctxai.UNet3D", "params": {"out_channels": len(SEGMENTATION_CLASSES),
                                                         "widths": [12, 24, 48, 96]}},
        version="1.0",
        description="3-D U-Net segmenting voids (gas pores, lack-of-fusion voids, cracks) and inclusions "
                    "(tungsten-rich, oxide) in CT of titanium parts at 0.2 mm voxels; sliding windows of 64^3. "
                    "Trained on CTXAI's synthetic phantoms only.")
    card.training = _provenance("unet", seeds, steps, seed, started,
                                {"crop": UNET_CROP, "batch": batch, "loss": "weighted cross-entropy + soft Dice",
                                 "class_mapping": TYPE_TO_SEGMENT})
    held_out = range(HELD_OUT_SEED_BASE, HELD_OUT_SEED_BASE + evaluate_on)
    result = _publish(_save(model, card, out_dir, "unet"), card,
                      lambda card_path: segmentation_quality(card_path, held_out), started, log)
    log(f"held-out Dice {result.metrics['dice']:.3f}, detection recall {result.metrics['detection_recall']:.3f}")
    return result
