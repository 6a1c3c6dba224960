"""Shared fixtures: small real models written to disk with their cards, and small CT-like volumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ctxai_testing import ct_volume, write_model

os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(scope="session", autouse=True)
def private_user_data(tmp_path_factory):
    """Runs through the worker append to the per-user audit log: in tests, a session folder's, not the tester's."""
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("user-data"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def classifier_card(model_dir) -> Path:
    return write_model(model_dir, "classifier", "classification")


@pytest.fixture(scope="session")
def unet_card(model_dir) -> Path:
    return write_model(model_dir, "unet", "segmentation")


@pytest.fixture(scope="session")
def volume():
    return ct_volume()


@pytest.fixture(scope="session")
def volume_file(tmp_path_factory, volume) -> Path:
    from CTXAILib import write_volume

    return write_volume(volume, tmp_path_factory.mktemp("volumes") / "ct.nrrd")
