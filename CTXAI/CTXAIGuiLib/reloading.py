"""Reload for developers: Slicer's Reload re-executes the module file only, not the packages beside it."""

import importlib
import sys


def reloadPackages(*packageNames: str) -> None:
    """Re-import every loaded module of these packages (called before Slicer re-executes ``CTXAI.py``).

    All are dropped before any is imported again, so no new module picks up an old sibling.

    >>> reloadPackages("CTXAILib", "CTXAIGuiLib")
    """
    names = sorted(name for name in sys.modules if name.split(".")[0] in packageNames)
    for name in names:
        del sys.modules[name]
    for name in names:
        importlib.import_module(name)
