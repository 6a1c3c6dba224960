"""The dependency installer's answers to Slicer's packaging API (slicer.packaging, Slicer >= 5.12), with that API
replaced by a stand-in that behaves as Slicer's pip_ensure does when the user declines."""

from __future__ import annotations

import sys
import types

import pytest


@pytest.fixture
def dependencies(monkeypatch):
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    packaging = types.ModuleType("slicer.packaging")

    def pip_ensure(requirements, constraints=None, requester=None, **options):
        raise RuntimeError("User declined package installation")  # Slicer's own message (packaging.py)

    packaging.pip_ensure = pip_ensure
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.delitem(sys.modules, "CTXAIGuiLib.dependencies", raising=False)
    from CTXAIGuiLib import dependencies

    return dependencies


def test_declined_install_is_the_modules_own_error(dependencies):
    from CTXAILib.errors import CTXAIError

    with pytest.raises(CTXAIError, match="not installed, so CTXAI cannot run: captum>=0.9.*User declined"):
        dependencies.pipInstall(["captum>=0.9,<0.10"])


def test_torch_is_installed_by_a_pythonslicer_process_never_imported_here(dependencies, monkeypatch):
    """PyTorchUtilsLogic().installTorch ends with ``import torch``: Slicer's own process must never load torch."""
    import slicer
    from types import SimpleNamespace

    calls = []
    pytorch_utils = types.ModuleType("PyTorchUtils")

    class PyTorchUtilsLogic:
        def installTorch(self, *args, **kwargs):
            raise AssertionError("PyTorchUtilsLogic.installTorch imports torch into Slicer's process")

    pytorch_utils.PyTorchUtilsLogic = PyTorchUtilsLogic
    monkeypatch.setitem(sys.modules, "PyTorchUtils", pytorch_utils)
    monkeypatch.setattr(slicer, "app", SimpleNamespace(testingEnabled=lambda: False), raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: calls.append("asked") or True,
                        raising=False)
    monkeypatch.setattr(slicer.util, "pip_install", lambda requirement: calls.append(("pip", requirement)),
                        raising=False)
    monkeypatch.setattr(slicer.util, "launchConsoleProcess", lambda command: calls.append(("run", command)) or 7,
                        raising=False)
    monkeypatch.setattr(slicer.util, "logProcessOutput", lambda process: calls.append(("log", process)),
                        raising=False)
    monkeypatch.setattr(dependencies, "pythonSlicerExecutable", lambda: "/opt/Slicer/bin/PythonSlicer")
    monkeypatch.setattr(dependencies, "isSatisfied", lambda requirement: False)
    dependencies.installTorch()
    assert calls == ["asked", ("pip", "light-the-torch>=0.5"),
                     ("run", ["/opt/Slicer/bin/PythonSlicer", "-m", "light_the_torch", "install", "torch>=2.3"]),
                     ("log", 7)]


def test_declined_torch_install_is_the_modules_own_error(dependencies, monkeypatch):
    import slicer
    from types import SimpleNamespace

    from CTXAILib.errors import CTXAIError

    monkeypatch.setattr(slicer, "app", SimpleNamespace(testingEnabled=lambda: False), raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda *a, **k: False, raising=False)
    with pytest.raises(CTXAIError, match="PyTorch was not installed"):
        dependencies.installTorch()
