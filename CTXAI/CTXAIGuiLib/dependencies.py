"""The worker's Python packages inside Slicer: find PythonSlicer, check what is missing, install it on request.

Checks read package metadata only, so nothing (torch above all) is imported into Slicer's process. Installation
happens on the first Explain, never at start-up: torch by light-the-torch in a PythonSlicer process (the PyTorch
extension's way of picking the CUDA build, without importing torch here),
the rest of ``Resources/requirements.txt`` with ``slicer.packaging.pip_ensure`` where it exists (Slicer >= 5.12),
else after one confirmation with ``slicer.util.pip_install``.

>>> missing = missingRequirements(Path(slicer.util.modulePath("CTXAI")).parent / "Resources" / "requirements.txt")
"""

import importlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from pathlib import Path

import slicer
from slicer.i18n import tr as _

# captum 0.9 (the first release that allows numpy 2, which Slicer >= 5.10 ships) needs torch 2.3.
TORCH_REQUIREMENT = ">=2.3"
LIGHT_THE_TORCH = "light-the-torch>=0.5"  # what the PyTorch extension installs torch with
# Slicer's own packages (and the torch installed before): pinned while pip installs requirements.txt.
PINNED_PACKAGES = ("numpy", "SimpleITK", "vtk", "torch")


def pythonSlicerExecutable() -> str:
    """PythonSlicer, which runs Python in Slicer's environment (found as slicer.util does)."""
    found = shutil.which("PythonSlicer")
    if found:
        return found
    candidate = Path(sys.executable).with_name("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    if candidate.exists():
        return str(candidate)
    from CTXAILib.errors import CTXAIError

    raise CTXAIError("PythonSlicer was not found next to Slicer, so the CTXAI worker cannot start. Reinstall Slicer.")


def isSatisfied(requirement) -> bool:
    """Whether an installed distribution meets a ``packaging`` Requirement (metadata only: nothing is imported)."""
    if requirement.marker is not None and not requirement.marker.evaluate():
        return True
    try:
        version = importlib.metadata.version(requirement.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return requirement.specifier.contains(version, prereleases=True)


def readRequirements(path: Path) -> list:
    """The pip requirements of a requirements file as ``packaging`` Requirements (options such as -c skipped)."""
    from packaging.requirements import Requirement

    lines = [line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [Requirement(line) for line in lines if line and not line.startswith("-")]


def torchRequirement():
    from packaging.requirements import Requirement

    return Requirement("torch" + TORCH_REQUIREMENT)


def missingRequirements(path: Path) -> list:
    """What the worker needs (torch and the requirements file) and is not installed, as requirement strings."""
    wanted = [torchRequirement()] + readRequirements(path)
    return [str(requirement) for requirement in wanted if not isSatisfied(requirement)]


def ensureRequirements(path: Path) -> None:
    """Install what the worker needs, asking first: torch (:func:`installTorch`), then the pip requirements.

    :raises CTXAILib.errors.CTXAIError: the user declined, or something is still missing afterwards.
    """
    from CTXAILib.errors import CTXAIError

    if not isSatisfied(torchRequirement()):
        installTorch()
    missing = [str(requirement) for requirement in readRequirements(path) if not isSatisfied(requirement)]
    if missing:
        pipInstall(missing)
    importlib.invalidate_caches()  # metadata of packages installed just now
    stillMissing = missingRequirements(path)
    if stillMissing:
        raise CTXAIError(_("These Python packages are still missing, so CTXAI cannot run: {packages}. Restart "
                           "Slicer and press Explain again.").format(packages=", ".join(stillMissing)))


def installTorch() -> None:
    """torch for the worker, chosen as the PyTorch extension chooses it (light-the-torch picks the CUDA build for
    the NVIDIA driver, else the CPU build), installed by a PythonSlicer process after asking.

    Not through ``PyTorchUtilsLogic().installTorch``: it ends with ``import torch``, and Slicer's own process must
    never load torch (only the worker does). A specific build can still be chosen first in the PyTorch Utils module.
    """
    from packaging.requirements import Requirement

    from CTXAILib.errors import CTXAIError

    if slicer.app.testingEnabled():
        raise CTXAIError(_("PyTorch is not installed, and nothing is installed while Slicer runs tests."))
    arguments = ["install", "torch" + TORCH_REQUIREMENT]
    if not slicer.util.confirmOkCancelDisplay(
            _("CTXAI needs PyTorch. It will be downloaded and installed with light-the-torch, which picks the build "
              "for this computer's NVIDIA driver (or the CPU build); this can take some minutes. Install it now?"),
            _("CTXAI - Install PyTorch"), detailedText="ltt " + " ".join(arguments)):
        raise CTXAIError(_("PyTorch was not installed, so CTXAI cannot run. Press Explain to try again."))
    if not isSatisfied(Requirement(LIGHT_THE_TORCH)):
        slicer.util.pip_install(LIGHT_THE_TORCH)
    process = slicer.util.launchConsoleProcess([pythonSlicerExecutable(), "-m", "light_the_torch", *arguments])
    slicer.util.logProcessOutput(process)


def pinnedConstraints() -> str:
    """pip constraints (``name==version`` lines) that keep Slicer's own packages as they are."""
    pins = []
    for name in PINNED_PACKAGES:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}\n")
        except importlib.metadata.PackageNotFoundError:
            continue  # not a pip distribution in this Slicer (vtk usually is not): nothing to pin
    return "".join(pins)


def pipInstall(missing: list) -> None:
    """pip-install requirement strings after asking (slicer.packaging on Slicer >= 5.12), Slicer's packages pinned."""
    from CTXAILib.errors import CTXAIError

    with tempfile.TemporaryDirectory(prefix="ctxai-pip-") as folder:
        constraints = Path(folder) / "constraints.txt"
        constraints.write_text(pinnedConstraints(), encoding="utf-8")
        try:
            slicerPackaging = importlib.import_module("slicer.packaging")  # Slicer >= 5.12
        except ImportError:
            slicerPackaging = None
        if slicerPackaging is not None:
            try:
                slicerPackaging.pip_ensure(missing, constraints=str(constraints), requester="CTXAI")
            except RuntimeError as exc:  # the user declined, or another installation is running
                raise CTXAIError(_("The Python packages were not installed, so CTXAI cannot run: {packages} "
                                   "({reason}).").format(packages=", ".join(missing), reason=exc)) from exc
        elif not slicer.util.confirmOkCancelDisplay(
                _("CTXAI needs {count} Python package(s) in Slicer's Python environment. Install them now?")
                .format(count=len(missing)), _("CTXAI - Install Python Packages"), detailedText="\n".join(missing)):
            raise CTXAIError(_("The Python packages were not installed, so CTXAI cannot run: {packages}.")
                             .format(packages=", ".join(missing)))
        else:
            slicer.util.pip_install(["-c", str(constraints), *missing])
