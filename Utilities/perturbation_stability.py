"""Measure how stable LIME and KernelSHAP maps are on the bundled classifier, per sample count (run by hand).

For a few held-out pore patches: Spearman rank correlation of |map| between two seeds, and between the map and the
map of the same patch plus Gaussian noise of 1 % of the card's intensity window (same seed). The default sample
count of both methods in engine/methods/perturbation.py is chosen from this table.

    PYTHONPATH=CTXAI python Utilities/perturbation_stability.py [--methods lime kernel_shap]
        [--samples 200 500 1000 2000] [--patches 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.stats import spearmanr

from CTXAILib.engine.explain import Explainer
from CTXAILib.engine.geometry import Volume
from CTXAILib.synthetic.dataset import HELD_OUT_SEED_BASE, SPACING_MM, TYPE_TO_CLASS, classifier_patches
from CTXAILib.synthetic.evaluation import bundled_model
from CTXAILib.synthetic.phantom import generate_phantom


def pore_patches(count: int, first_seed: int) -> list[np.ndarray]:
    """Grey-value pore patches, one per held-out phantom from ``first_seed`` on (96³ phantoms: quicker to make,
    the same defects and patch size)."""
    found, seed = [], first_seed
    while len(found) < count:
        phantom = generate_phantom(seed, (96, 96, 96), SPACING_MM)
        x, y = classifier_patches(phantom, np.random.default_rng(seed), jitter=0, normal_per_defect=0.0)
        pores = [p for p, label in zip(x, y) if label == TYPE_TO_CLASS["pore"]]
        if pores:
            found.append(pores[0].astype(np.float32) * 5000.0 - 1000.0)  # back to grey values
        seed += 1
    return found


def rank(a: np.ndarray, b: np.ndarray) -> float:
    return float(spearmanr(np.abs(a).ravel(), np.abs(b).ravel())[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lime", "kernel_shap"])
    parser.add_argument("--samples", type=int, nargs="+", default=[200, 500, 1000, 2000])
    parser.add_argument("--patches", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=HELD_OUT_SEED_BASE + 300)
    args = parser.parse_args()
    explainer = Explainer(bundled_model("classifier"), device="cpu")
    low, high = explainer.model.card.normalization.window
    sigma = 0.01 * (high - low)
    patches = pore_patches(args.patches, args.first_seed)
    print(f"{len(patches)} pore patches; noise sigma {sigma:g} grey units (1 % of the window)")
    for method in args.methods:
        for samples in args.samples:
            seeds, noise, ties, started = [], [], [], time.perf_counter()
            for n, patch in enumerate(patches):
                noisy = patch + np.random.default_rng(n).normal(0.0, sigma, patch.shape).astype(np.float32)
                maps = [explainer.explain(Volume(v, spacing=SPACING_MM), method, "pore",
                                          settings={"samples": samples}, seed=s).attribution.array
                        for v, s in ((patch, 0), (patch, 1), (noisy, 0))]
                seeds.append(rank(maps[0], maps[1]))
                noise.append(rank(maps[0], maps[2]))
                top = np.abs(maps[0])
                ties.append(int((top == top.max()).sum()))
            print(f"{method:12s} samples {samples:5d}: seed rho {np.mean(seeds):.3f} (min {np.min(seeds):.3f}), "
                  f"noise rho {np.mean(noise):.3f} (min {np.min(noise):.3f}), voxels at max {np.mean(ties):.0f}, "
                  f"{(time.perf_counter() - started) / len(patches) / 3:.1f} s per map", flush=True)


if __name__ == "__main__":
    main()
