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
