"""Shared fixtures: small real models written to disk with their cards, and small CT-like volumes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ctxai_testing import ct_volume, write_model

os.environ.setdefault("MPLBACKEND", "Agg")

# The files that take minutes (the whole demo, the quick benchmark, the console example's real worker, the tiled IG
# references) run first: pytest-xdist hands files out in collection order, so both workers then finish together
# instead of one running the demo alone at the end.
SLOW_FIRST = ("defaults/test_demo.py", "engine/test_bench.py", "scene/test_readme_console.py",
              "engine/test_references.py", "batch/test_batch.py", "checks/test_checks.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.path.as_posix()
        return next((n for n, name in enumerate(SLOW_FIRST) if path.endswith(name)), len(SLOW_FIRST))
    items.sort(key=rank)  # stable: the order within a file and among the other files is kept


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
