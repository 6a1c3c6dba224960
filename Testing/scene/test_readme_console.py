"""The README's console example ("In 3D Slicer"), executed as written against real MRML (slicer-core) and the
real worker subprocess. Only what the Slicer application adds around MRML is stood in for: ``slicer.app``,
``slicer.mrmlScene``, module lookup, the volume reader, and the Qt/GUI modules that the logic's imports name."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from mrml_helpers import add_volume_node

README = Path(__file__).resolve().parents[2] / "README.md"
GUIDE = README.parent / "Docs" / "SlicerUsers.md"


def console_example(path: Path = README, heading: str = "## In 3D Slicer") -> str:
    section = path.read_text(encoding="utf-8").split(heading, 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_slicer_guide_shows_the_example_that_runs():
    """Docs/SlicerUsers.md repeats the README's console example: the one below runs it, so both must agree."""
    assert console_example(GUIDE, "## From the Python console") == console_example()
    image = re.search(r"!\[[^]]*\]\(([^)]+)\)", GUIDE.read_text(encoding="utf-8")).group(1)
    assert (GUIDE.parent / image).resolve().is_file()


@pytest.fixture
def slicer_console(slicer_app, monkeypatch):
    """``slicer`` as the Python console sees it, on the test's scene; returns the module logic."""
    import slicer

    from CTXAILib import read_volume

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.GuiConnector = object
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = wrapper.Default = wrapper.WithinRange = lambda *args, **kwargs: None
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleLogic:  # as Slicer's: the module name is the class name without "Logic"
        def __init__(self):
            self.moduleName = type(self).__name__[:-len("Logic")]

    scripted.ScriptedLoadableModuleLogic = scripted.ScriptedLoadableModuleWidget = ScriptedLoadableModuleLogic
    for name, module in (("qt", types.ModuleType("qt")), ("slicer.i18n", i18n),
                         ("slicer.parameterNodeWrapper", wrapper), ("slicer.ScriptedLoadableModule", scripted)):
        monkeypatch.setitem(sys.modules, name, module)
    for name in [n for n in sys.modules if n.startswith("CTXAIGuiLib")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: None, connect=lambda *a: None,
                                                             testingEnabled=lambda: False), raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", slicer_app.scene, raising=False)
    monkeypatch.setattr(slicer, "modules", types.SimpleNamespace(
        volumerendering=types.SimpleNamespace(logic=lambda: slicer_app.vr_logic)), raising=False)
    from CTXAIGuiLib import logic as logic_module

    # PythonSlicer is this test's interpreter.
    monkeypatch.setattr(logic_module, "pythonSlicerExecutable", lambda: sys.executable)
    logic = logic_module.CTXAILogic()
    module_file = Path(logic_module.__file__).parents[1] / "CTXAI.py"
    monkeypatch.setattr(slicer.util, "modulePath", lambda name: str(module_file), raising=False)
    monkeypatch.setattr(slicer.util, "getModuleLogic", lambda name: logic, raising=False)
    monkeypatch.setattr(slicer.util, "loadVolume",
                        lambda path: add_volume_node(slicer_app.scene, read_volume(path), Path(path).stem))
    yield logic
    logic.shutdown()


def test_readme_console_example_runs_as_written(slicer_console, slicer_app, tmp_path, monkeypatch, capsys):
    import slicer

    from CTXAILib.synthetic.phantom import generate_phantom, save_phantom

    monkeypatch.chdir(tmp_path)
    save_phantom(generate_phantom(7, (64, 64, 64), defect_counts={"pore": 2}), tmp_path / "out/demo/phantom")
    namespace = {"slicer": slicer}
    exec(compile(console_example(), str(README), "exec"), namespace)
    run = namespace["run"]
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) > 2 and printed[-2] == "100%"
    assert printed[-1] == str(run.explanation["verdict"])  # the default checks ran and their verdict was printed
    assert set(run.explanation["checks"]) == {"spill", "target_sensitivity"}
    assert run.top_percent == 2.0 and slicer_console.runs()[-1].attribution == run.attribution
    labels = slicer.util.arrayFromVolume(slicer_app.scene.GetNodeByID(run.labels))
    attribution = slicer.util.arrayFromVolume(slicer_app.scene.GetNodeByID(run.attribution))
    assert 0 < np.count_nonzero(labels) <= 0.03 * np.count_nonzero(attribution)
