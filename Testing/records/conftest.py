"""One real `ctxai explain` run shared by the audit, reproduce and report tests: a CT block with an off-centre pore,
its ground-truth mask, the tiny U-Net in a folder of its own, and the run folder with its audit log beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from records_testing import PORE_IJK, ROI, ctxai


@pytest.fixture(scope="session")
def recorded_run(tmp_path_factory, unet_card) -> dict[str, Path]:
    from CTXAILib import Volume, write_volume

    root = tmp_path_factory.mktemp("recorded")
    for name in ("unet.json", "unet.pt"):
        shutil.copy(unet_card.parent / name, root / name)
    rng = np.random.default_rng(3)
    k, j, i = np.indices((32, 32, 32))
    array = np.full((32, 32, 32), -1000.0, np.float32)
    array[4:-4, 4:-4, 4:-4] = 3000.0
    pore = (i - PORE_IJK[0]) ** 2 + (j - PORE_IJK[1]) ** 2 + (k - PORE_IJK[2]) ** 2 <= 9
    array[pore] = 200.0
    array += rng.normal(0, 60, array.shape).astype(np.float32)
    geometry = dict(spacing=(0.2, 0.2, 0.2), origin=(-3.1, 2.5, 10.0))
    write_volume(Volume(array, **geometry), root / "ct.nrrd")
    write_volume(Volume(pore.astype(np.uint8), **geometry), root / "pore.nrrd")
    out = ctxai("explain", "--volume", root / "ct.nrrd", "--model", root / "unet.json", "--method", "saliency",
                "--roi", ROI, "--reference-mask", root / "pore.nrrd", "--device", "cpu", "--quiet",
                "--out", root / "runs" / "pore")
    assert out.returncode == 0, out.stderr
    return {"root": root, "run": root / "runs" / "pore", "log": root / "runs" / "ctxai-audit.jsonl",
            "model": root / "unet.pt", "volume": root / "ct.nrrd", "mask": root / "pore.nrrd"}
