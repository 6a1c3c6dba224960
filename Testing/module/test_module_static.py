"""Static checks of the Slicer module: it cannot run here (no Slicer application, no Qt), so these tests read its
files and fail as soon as the code, the .ui, the CMake lists and the requirements drift apart.

What they check: the .ui parses and declares its custom widgets; every widget name the code uses exists in it; every
parameter of the parameterNodeWrapper class is bound exactly once (a SlicerParameterName property on a widget whose
type a stock connector accepts, or the widget's MANUAL_BINDINGS table) and has a default the wrapper can store; the
GUI code (the module file CTXAI.py, which only wires things, and the CTXAIGuiLib package beside it: widget, logic,
parameter node, self-test, helpers) stays importable on Slicer 5.8 (Python 3.9: no PEP 604 unions, no ``imp``), never
imports torch, exposes the classes Slicer looks up by name, and is reloaded as a whole; the CMake lists name every
shipped file and nothing else; requirements.txt covers the engine's imports and never touches Slicer's own packages.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "CTXAI"
MODULE_PY = MODULE_DIR / "CTXAI.py"
GUI_LIB_DIR = MODULE_DIR / "CTXAIGuiLib"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CTXAI.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
TOP_CMAKE = REPO / "CMakeLists.txt"
REQUIREMENTS = MODULE_DIR / "Resources" / "requirements.txt"
MODELS_DIR = REPO / "Resources" / "Models"

# Names a parameterNodeWrapper class may not use (slicer/parameterNodeWrapper/wrapper.py, 5.8 to 5.12).
RESERVED = {"allParameters", "default", "isCached", "dataType", "getValue", "setValue", "connectGui",
            "connectParametersToGui", "disconnectGui", "StartModify", "EndModify", "AddObserver", "RemoveObserver",
            "Modified", "parameterNode"}
# Packages that Slicer (or its PyTorch extension) provides: requirements.txt must never install or replace them.
SLICER_OWNED = {"simpleitk", "vtk", "numpy", "torch"}
# Engine imports provided by Slicer itself, and optional ones the engine reports clearly when missing.
PROVIDED_IMPORTS = {"numpy", "SimpleITK", "vtk", "slicer", "torch", "qt", "ctk"}
# Extras, imported lazily where a model or the Ray engine needs them; nnunetv2_cam only by the benchmark's driver,
# which runs in the reference environment of `ctxai bench --cases nnunet-cam`, never in Slicer.
OPTIONAL_IMPORTS = {"monai", "nnunetv2", "ray", "nnunetv2_cam"}
IMPORT_TO_DISTRIBUTION = {"skimage": "scikit-image", "sklearn": "scikit-learn"}
# The only CTXAILib modules the Slicer process may import (none of them imports torch), as paths below CTXAILib;
# the phantom generator and the volume class (torch-free: the bridge uses it) only in the self-test.
GUI_ENGINE_MODULES = {"errors", "records.html", "scene.bridge", "scene.session", "synthetic.evaluation",
                      "worker.client"}
TEST_ENGINE_MODULES = {"synthetic.phantom", "engine.geometry"}
# The classes looked up by name in the module file's namespace: CTXAI and CTXAIWidget by Slicer's C++
# (qSlicerScriptedLoadableModule[Widget]::setPythonSource, also on Reload), CTXAITest by
# ScriptedLoadableModule.runTest and slicer.testing.runUnitTest (ctest), CTXAILogic by other modules and the console.
SLICER_LOOKUPS = ("CTXAI", "CTXAIWidget", "CTXAILogic", "CTXAITest")


# ---------------------------------------------------------------------------------------------------- helpers
def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ui_root().iter("widget")}


def ui_object_names() -> set[str]:
    root = ui_root()
    return {e.get("name") for e in list(root.iter("widget")) + list(root.iter("layout")) if e.get("name")}


def ui_parameter_names() -> dict[str, str]:
    """SlicerParameterName -> widget name."""
    bound = {}
    for widget in ui_root().iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                value = prop.findtext("string")
                assert value not in bound, f"parameter {value!r} bound to two widgets: {bound.get(value)}, " \
                                           f"{widget.get('name')}"
                bound[value] = widget.get("name")
    return bound


def module_tree() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(encoding="utf-8"), filename=str(MODULE_PY))


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def gui_files() -> list[Path]:
    """The code that runs in Slicer's GUI process: the module file and its helper package."""
    files = [MODULE_PY] + python_files(GUI_LIB_DIR)
    assert len(files) > 2, "CTXAIGuiLib is missing or empty"
    return files


def gui_trees() -> dict[Path, ast.Module]:
    return {path: ast.parse(path.read_text(encoding="utf-8"), filename=str(path)) for path in gui_files()}


def module_constants() -> dict[str, object]:
    """Module-level NAME = <literal> assignments of the file that defines the parameter node class."""
    constants = {}
    for node in parameter_definition()[0].body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return constants


def enum_members() -> dict[str, set[str]]:
    """Enum classes of the file that defines the parameter node class -> member names."""
    enums = {}
    for node in parameter_definition()[0].body:
        if isinstance(node, ast.ClassDef) and any(ast.unparse(b) in ("enum.Enum", "Enum") for b in node.bases):
            enums[node.name] = {t.id for s in node.body if isinstance(s, ast.Assign) for t in s.targets
                                if isinstance(t, ast.Name)}
    return enums


def parameter_definition() -> tuple[ast.Module, ast.ClassDef]:
    """The @parameterNodeWrapper class of the GUI code and the tree of the file that defines it."""
    found = [(tree, node) for tree in gui_trees().values() for node in tree.body if isinstance(node, ast.ClassDef)
             and any(ast.unparse(d).split("(")[0].endswith("parameterNodeWrapper") for d in node.decorator_list)]
    assert len(found) == 1, "the GUI code must define exactly one @parameterNodeWrapper class"
    return found[0]


def parameter_class() -> ast.ClassDef:
    return parameter_definition()[1]


def parameters() -> dict[str, ast.AnnAssign]:
    return {s.target.id: s for s in parameter_class().body if isinstance(s, ast.AnnAssign)}


def split_annotation(annotation: ast.expr) -> tuple[ast.expr, list[ast.expr]]:
    """Annotated[T, m1, m2] -> (T, [m1, m2]); anything else -> (annotation, [])."""
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) in ("Annotated", "typing.Annotated"):
        elements = annotation.slice.elts
        return elements[0], list(elements[1:])
    return annotation, []


def node_type(base: ast.expr) -> str | None:
    """The MRML class of ``vtkMRMLX`` or ``Optional[vtkMRMLX]`` (None for other types)."""
    if isinstance(base, ast.Subscript) and ast.unparse(base.value) in ("Optional", "typing.Optional"):
        base = base.slice
    name = ast.unparse(base).split(".")[-1]
    return name if name.startswith("vtkMRML") else None


def call_named(metadata: list[ast.expr], name: str) -> ast.Call | None:
    return next((m for m in metadata if isinstance(m, ast.Call) and ast.unparse(m.func).split(".")[-1] == name),
                None)


def literal(node: ast.expr, constants: dict[str, object]):
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    return ast.literal_eval(node)


def manual_binding_table() -> dict[str, tuple[str, str]]:
    """The MANUAL_BINDINGS table, wherever in the GUI code it lives: parameter -> (widget name, connector class)."""
    found = [node for tree in gui_trees().values() for node in tree.body if isinstance(node, ast.Assign)
             and any(isinstance(t, ast.Name) and t.id == "MANUAL_BINDINGS" for t in node.targets)]
    assert len(found) == 1, f"the GUI code must define MANUAL_BINDINGS once at module level, not {len(found)} times"
    table = found[0].value
    assert isinstance(table, ast.Dict), "MANUAL_BINDINGS must be a dict literal"
    bindings = {}
    for key, value in zip(table.keys, table.values):
        assert isinstance(value, ast.Tuple) and len(value.elts) == 2 and isinstance(value.elts[1], ast.Name), \
            f"MANUAL_BINDINGS[{ast.unparse(key)}] must be (widget name, connector class)"
        bindings[ast.literal_eval(key)] = (ast.literal_eval(value.elts[0]), value.elts[1].id)
    return bindings


def manual_bindings() -> dict[str, str]:
    """MANUAL_BINDINGS: parameter -> widget name."""
    return {parameter: widget for parameter, (widget, _connector) in manual_binding_table().items()}


def gui_classes() -> dict[str, ast.ClassDef]:
    return {node.name: node for tree in gui_trees().values() for node in tree.body if isinstance(node, ast.ClassDef)}


def cmake_lists(path: Path) -> dict[str, list[str]]:
    """set(NAME item item ...) lists of a CMake file, comments removed, ${MODULE_NAME} substituted."""
    text = re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))
    lists = {}
    for match in re.finditer(r"\bset\(\s*(\w+)\s+([^()\"]*?)\)", text, re.S):
        lists[match.group(1)] = [item.replace("${MODULE_NAME}", lists.get("MODULE_NAME", ["CTXAI"])[0])
                                 for item in match.group(2).split()]
    return lists


def requirements() -> list[Requirement]:
    lines = [line.split("#", 1)[0].strip() for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines()]
    return [Requirement(line) for line in lines if line]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---------------------------------------------------------------------------------------------------- the .ui
def test_ui_parses_with_the_module_panel_at_its_top():
    root = ui_root()
    assert root.tag == "ui"
    top = root.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", "CTXAI")
    sections = [w.findtext("property[@name='text']/string") for w in root.iter("widget")
                if w.get("class") == "ctkCollapsibleButton"]
    assert sections == ["Inputs", "Target", "Method", "Output", "Results"]


def test_ui_declares_exactly_the_custom_widgets_it_uses():
    root = ui_root()
    used = {w.get("class") for w in root.iter("widget") if not w.get("class").startswith("Q")}
    declared = {c.findtext("class"): c for c in root.iter("customwidget")}
    assert used <= set(declared), f"custom widgets used but not declared: {sorted(used - set(declared))}"
    assert set(declared) <= used, f"custom widgets declared but not used: {sorted(set(declared) - used)}"
    for name, declaration in declared.items():
        assert declaration.findtext("header") == f"{name}.h"
        assert declaration.findtext("extends")


def test_ui_object_names_are_unique():
    root = ui_root()
    names = [e.get("name") for e in list(root.iter("widget")) + list(root.iter("layout")) if e.get("name")]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates, f"duplicate objectNames in the .ui: {duplicates}"


def test_ui_passes_the_scene_to_every_mrml_widget():
    root = ui_root()
    mrml = {w.get("name") for w in root.iter("widget")
            if w.get("class") in ("qMRMLNodeComboBox", "qMRMLTableView")}
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == "CTXAI" and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert mrml == receivers


# ----------------------------------------------------------------------------------------- code <-> .ui names
def ui_names_used_in_code() -> dict[str, set[str]]:
    """``ui.<name>`` / ``self.ui.<name>`` uses in the GUI code: name -> files."""
    names = {}
    for path, tree in gui_trees().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                holder = node.value
                if (isinstance(holder, ast.Name) and holder.id == "ui") or \
                        (isinstance(holder, ast.Attribute) and holder.attr == "ui"):
                    names.setdefault(node.attr, set()).add(path.relative_to(MODULE_DIR).as_posix())
    return names


def test_every_ui_name_the_code_uses_exists():
    used = ui_names_used_in_code()
    assert len(used) > 10, "the name scan found too few self.ui.<name> uses: is it still parsing the module?"
    missing = {name: sorted(files) for name, files in used.items() if name not in ui_object_names()}
    assert not missing, f"the code uses widgets that CTXAI.ui does not define: {missing}"


def test_manual_bindings_name_existing_widgets_without_slicer_parameter_names():
    widgets = ui_widgets()
    bound_widgets = set(ui_parameter_names().values())
    for parameter, widget in manual_bindings().items():
        assert widget in widgets, f"MANUAL_BINDINGS[{parameter!r}] names a missing widget {widget!r}"
        assert widget not in bound_widgets, f"{widget!r} is bound manually and through SlicerParameterName"


def test_manual_bindings_use_connectors_of_the_gui_code():
    classes = gui_classes()

    def is_connector(name: str) -> bool:
        bases = [ast.unparse(b).split(".")[-1] for b in classes[name].bases] if name in classes else []
        return "GuiConnector" in bases or any(is_connector(b) for b in bases if b != name)

    for parameter, (_widget, connector) in manual_binding_table().items():
        assert connector in classes, f"MANUAL_BINDINGS[{parameter!r}]: no class {connector} in the GUI code"
        assert is_connector(connector), f"MANUAL_BINDINGS[{parameter!r}]: {connector} is not a GuiConnector"


# ------------------------------------------------------------------------------------------- parameter node
def test_every_parameter_is_bound_exactly_once():
    names = set(parameters())
    stock = set(ui_parameter_names())
    manual = set(manual_bindings())
    assert not (stock & manual), f"bound twice (SlicerParameterName and MANUAL_BINDINGS): {sorted(stock & manual)}"
    assert not (stock - names), f"SlicerParameterName names unknown parameters: {sorted(stock - names)}"
    assert not (manual - names), f"MANUAL_BINDINGS names unknown parameters: {sorted(manual - names)}"
    assert not (names - stock - manual), f"parameters without a widget: {sorted(names - stock - manual)}"


def test_stock_bound_widgets_have_a_connector_for_their_parameter_type():
    """Mirror of the stock connectors' canRepresent (slicer/parameterNodeWrapper/guiConnectors.py, 5.8)."""
    params = parameters()
    widgets = ui_widgets()
    enums = enum_members()
    for parameter, widget_name in ui_parameter_names().items():
        widget_class = widgets[widget_name].get("class")
        base, metadata = split_annotation(params[parameter].annotation)
        base_name = ast.unparse(base)
        bounded = call_named(metadata, "WithinRange") or (call_named(metadata, "Minimum")
                                                           and call_named(metadata, "Maximum"))
        accepted = {
            "qMRMLNodeComboBox": node_type(base) is not None,
            "ctkPathLineEdit": base_name in ("Path", "pathlib.Path"),
            "QComboBox": base_name in enums or (base_name in ("str", "int", "float", "bool")
                                                and call_named(metadata, "Choice") is not None),
            "ctkSliderWidget": base_name == "float" and bool(bounded),
            "QDoubleSpinBox": base_name == "float",
            "QSpinBox": base_name == "int",
            "QSlider": base_name == "int" and bool(bounded),
            "QCheckBox": base_name == "bool",
            "QLineEdit": base_name == "str",
        }.get(widget_class, False)
        assert accepted, f"no stock connector binds {widget_class} {widget_name!r} to {parameter}: " \
                         f"{ast.unparse(params[parameter].annotation)}"


def test_parameter_names_are_not_reserved_by_the_wrapper():
    assert not (set(parameters()) & RESERVED)


def test_parameter_defaults_can_be_stored_by_the_wrapper():
    constants = module_constants()
    enums = enum_members()
    for name, statement in parameters().items():
        base, metadata = split_annotation(statement.annotation)
        base_name = ast.unparse(base)
        default_call = call_named(metadata, "Default")
        if statement.value is None:
            if node_type(base) is not None:
                continue  # node references default to None
            if base_name in ("Path", "pathlib.Path"):
                assert default_call is not None, f"{name}: give a Path default through Default(generator=...)"
                continue
            pytest.fail(f"{name}: give an explicit default (the serializer's 0 or '' may violate validators)")
        assert default_call is None, f"{name}: a default both by '=' and by Default()"
        if base_name in enums:
            assert isinstance(statement.value, ast.Attribute) and ast.unparse(statement.value.value) == base_name \
                and statement.value.attr in enums[base_name], f"{name}: default must be a member of {base_name}"
            continue
        value = literal(statement.value, constants)
        expected = {"str": str, "bool": bool, "int": int, "float": (int, float)}.get(base_name)
        assert expected is not None, f"{name}: unexpected parameter type {base_name}"
        assert isinstance(value, expected) and (base_name == "bool" or not isinstance(value, bool)), \
            f"{name}: default {value!r} is not a {base_name}"
        choice = call_named(metadata, "Choice")
        if choice is not None:
            assert value in literal(choice.args[0], constants), f"{name}: default {value!r} is not a choice"
        within = call_named(metadata, "WithinRange")
        if within is not None:
            low, high = (literal(a, constants) for a in within.args)
            assert low <= value <= high, f"{name}: default {value!r} outside [{low}, {high}]"
        if base_name == "str" and name == "methodSettings":
            import json

            assert isinstance(json.loads(value), dict)


# ----------------------------------------------------------------------------------- Python 3.9 / Slicer 5.8
@pytest.mark.parametrize("path", gui_files(), ids=lambda p: p.relative_to(MODULE_DIR).as_posix())
def test_gui_code_compiles_for_python_3_9_and_uses_no_imp(path):
    source = path.read_text(encoding="utf-8")
    compile(source, str(path), "exec")
    tree = ast.parse(source, filename=str(path), feature_version=(3, 9))  # Slicer 5.8's Python
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(alias.name.split(".")[0] != "imp" for alias in node.names), "imp is gone in Python 3.12"
        elif isinstance(node, ast.ImportFrom):
            assert node.module != "imp", "imp is gone in Python 3.12"


@pytest.mark.parametrize("path", gui_files(), ids=lambda p: p.relative_to(MODULE_DIR).as_posix())
def test_no_pep604_unions_in_annotations(path):
    """Slicer 5.8 runs Python 3.9, where ``X | None`` in an evaluated annotation raises TypeError."""
    tree = gui_trees()[path]
    annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.AnnAssign, ast.arg)) and n.annotation]
    annotations += [n.returns for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and n.returns is not None]
    unions = [ast.unparse(a) for a in annotations
              if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(a))]
    assert not unions, f"PEP 604 unions break Slicer 5.8: {unions}"


def test_parameter_node_annotations_are_evaluated_as_written():
    tree = parameter_definition()[0]
    assert not any(isinstance(n, ast.ImportFrom) and n.module == "__future__" for n in tree.body), \
        "no __future__ annotations beside the parameter node class: parameterNodeWrapper evaluates them anyway"


@pytest.mark.parametrize("path", gui_files(), ids=lambda p: p.relative_to(MODULE_DIR).as_posix())
def test_gui_process_never_imports_torch(path):
    """The GUI code imports CTXAILib lazily (inside functions) and only torch-free modules."""
    tree = gui_trees()[path]
    test_class = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CTXAITest"), None)
    in_test = {id(n) for n in ast.walk(test_class)} if test_class is not None else set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.split(".")[0] in ("CTXAILib", "torch") for n in names), \
                f"module-level import of {names}: import CTXAILib lazily, never torch"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "CTXAILib":
            allowed = GUI_ENGINE_MODULES | (TEST_ENGINE_MODULES if id(node) in in_test else set())
            module = node.module.partition(".")[2]  # "from CTXAILib.scene import bridge" imports "scene.bridge"
            imported = [module] if module in allowed else [f"{module}.{a.name}".lstrip(".") for a in node.names]
            assert set(imported) <= allowed, f"{path.name} imports CTXAILib.{imported}: only {sorted(allowed)}"
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            assert node.module.split(".")[0] != "torch", f"{path.name} imports from torch"
        elif isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] == "torch" for a in node.names), f"{path.name} imports torch"


def test_engine_never_imports_the_gui_helpers():
    """Data flows one way: CTXAILib (engine, bridge, worker) runs without Qt, so it must not need CTXAIGuiLib."""
    for path in python_files(MODULE_DIR / "CTXAILib"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not any(n.split(".")[0] == GUI_LIB_DIR.name for n in names), f"{path.name} imports {names}"


def test_module_file_exposes_the_classes_slicer_looks_up_by_name():
    """Slicer finds <Module>, <Module>Widget, <Module>Logic and <Module>Test by name in CTXAI.py's namespace: each is
    defined there or imported from the CTXAIGuiLib file that defines it."""
    classes = {path: {n.name for n in tree.body if isinstance(n, ast.ClassDef)} for path, tree in gui_trees().items()}
    exposed = {n.name: MODULE_PY for n in module_tree().body if isinstance(n, ast.ClassDef)}
    for node in module_tree().body:
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith(GUI_LIB_DIR.name):
            source = MODULE_DIR.joinpath(*node.module.split(".")).with_suffix(".py")
            exposed.update({a.asname or a.name: source for a in node.names if a.name in classes.get(source, ())})
    missing = [name for name in SLICER_LOOKUPS if name not in exposed]
    assert not missing, f"CTXAI.py does not expose {missing}"
    assert [n.name for n in module_tree().body if isinstance(n, ast.ClassDef)] == ["CTXAI"], \
        "CTXAI.py only wires things: the widget, logic, parameter node and self-test live in CTXAIGuiLib"


def test_reload_reloads_every_package_beside_the_module():
    """Slicer's Reload re-executes CTXAI.py only: onReload must re-import each package beside it."""
    widget = gui_classes()["CTXAIWidget"]
    on_reload = next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "onReload")
    reloaded = {a.value for call in ast.walk(on_reload) if isinstance(call, ast.Call)
                and ast.unparse(call.func).split(".")[-1] == "reloadPackages"
                for a in call.args if isinstance(a, ast.Constant)}
    packages = {p.parent.name for p in MODULE_DIR.glob("*/__init__.py")}
    assert packages == reloaded, f"onReload reloads {sorted(reloaded)}, the packages are {sorted(packages)}"


def test_self_test_runs_only_test_methods():
    """ScriptedLoadableModuleTest runs every callable whose name contains 'test'."""
    test_class = gui_classes()["CTXAITest"]
    callables = [n.name for n in test_class.body if isinstance(n, ast.FunctionDef)]
    assert [n for n in callables if "test" in n and not n.startswith("test_")] == []
    assert len([n for n in callables if n.startswith("test_")]) >= 3
    run_test = next(n for n in test_class.body if isinstance(n, ast.FunctionDef) and n.name == "runTest")
    called = {n.func.attr for n in ast.walk(run_test) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert {n for n in callables if n.startswith("test_")} <= called, "runTest must run every test_ method"


def test_module_metadata():
    source = MODULE_PY.read_text(encoding="utf-8")
    assert re.search(r'self\.parent\.title = _\("CTXAI"\)', source)
    assert re.search(r'translate\("qSlicerAbstractCoreModule", "Quantification"\)', source)
    assert re.search(r'self\.parent\.contributors = \["CTXAI engineering"\]', source)


# ---------------------------------------------------------------------------------------------------- CMake
def test_module_cmake_lists_every_python_file():
    listed = set(cmake_lists(MODULE_CMAKE)["MODULE_PYTHON_SCRIPTS"])
    actual = {p.relative_to(MODULE_DIR).as_posix() for p in gui_files() + python_files(MODULE_DIR / "CTXAILib")}
    assert not (actual - listed), f"not listed in CTXAI/CMakeLists.txt (not shipped): {sorted(actual - listed)}"
    assert not (listed - actual), f"listed but missing: {sorted(listed - actual)}"


def test_module_cmake_lists_every_resource():
    listed = set(cmake_lists(MODULE_CMAKE)["MODULE_PYTHON_RESOURCES"])
    actual = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert not (actual - listed), f"resources not listed (not shipped): {sorted(actual - listed)}"
    assert not (listed - actual), f"resources listed but missing: {sorted(listed - actual)}"


def bundled_model_stems() -> set[str]:
    """The stems ``ctxai train`` writes (synthetic/training.py: _save(..., "<stem>"))."""
    source = (MODULE_DIR / "CTXAILib" / "synthetic" / "training.py").read_text(encoding="utf-8")
    stems = set(re.findall(r'_save\([^)]*"(\w+)"\)', source))
    assert stems, "could not find the model names in training.py"
    return stems


def test_module_cmake_lists_the_shipped_models():
    listed = {(MODULE_DIR / item).resolve() for item in cmake_lists(MODULE_CMAKE)["MODULE_MODEL_FILES"]}
    expected = {(MODELS_DIR / f"{stem}{suffix}").resolve() for stem in bundled_model_stems()
                for suffix in (".json", ".pt")}
    expected |= {p.resolve() for p in MODELS_DIR.glob("*") if p.suffix in (".json", ".pt")}
    assert listed == expected, \
        f"missing: {sorted(map(str, expected - listed))}, extra: {sorted(map(str, listed - expected))}"


def test_shipped_models_exist():
    listed = [(MODULE_DIR / item).resolve() for item in cmake_lists(MODULE_CMAKE)["MODULE_MODEL_FILES"]]
    untrained = []
    for path in listed:
        if path.exists():
            continue
        pair = [path.with_suffix(s) for s in (".json", ".pt")]
        assert not any(p.exists() for p in pair), f"{path.name} is missing but its pair exists: an interrupted save?"
        untrained.append(path.stem)
    if untrained:
        pytest.skip(f"bundled model(s) not trained into Resources/Models yet: {sorted(set(untrained))}")


def test_top_level_cmake_declares_the_extension():
    text = TOP_CMAKE.read_text(encoding="utf-8")
    code = re.sub(r"#[^\n]*", "", text)
    assert re.search(r"\bproject\(CTXAI\)", code)
    meta = dict(re.findall(r'\bset\((EXTENSION_\w+)\s+"([^"]*)"\)', code))
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert meta.get(key, "").strip(), f"{key} is not set"
    assert "PyTorch" in meta["EXTENSION_DEPENDS"].split()
    assert meta["EXTENSION_CATEGORY"] == "Quantification"
    assert meta["EXTENSION_HOMEPAGE"] == "https://github.com/ctxai/SlicerCTXAI"
    for statement in (r"find_package\(Slicer REQUIRED\)", r"include\(\$\{Slicer_USE_FILE\}\)",
                      r"add_subdirectory\(CTXAI\)", r"include\(\$\{Slicer_EXTENSION_GENERATE_CONFIG\}\)",
                      r"include\(\$\{Slicer_EXTENSION_CPACK\}\)"):
        assert re.search(statement, code), f"top-level CMakeLists.txt lacks {statement}"


def test_module_cmake_builds_the_scripted_module_with_its_tests():
    code = re.sub(r"#[^\n]*", "", MODULE_CMAKE.read_text(encoding="utf-8"))
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}\s+SCRIPTS \$\{MODULE_PYTHON_SCRIPTS\}"
                     r"\s+RESOURCES \$\{MODULE_PYTHON_RESOURCES\}\s+WITH_GENERIC_TESTS\s*\)", code)
    assert re.search(r"if\(BUILD_TESTING\)\s+slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", code)
    assert re.search(r"install\(FILES .*DESTINATION \$\{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR\}/Resources/Models",
                     code, re.S)


# ------------------------------------------------------------------------------------------------ requirements
def test_requirements_never_touch_slicers_own_packages():
    names = {canonical(r.name) for r in requirements()}
    assert not (names & SLICER_OWNED), f"requirements.txt must not name {sorted(names & SLICER_OWNED)}"


def test_requirements_have_lower_bounds_and_captum_an_upper_bound():
    for requirement in requirements():
        assert any(s.operator in (">=", "~=", "==") for s in requirement.specifier), f"{requirement}: no lower bound"
    captum = next(r for r in requirements() if canonical(r.name) == "captum")
    assert any(s.operator == "<" for s in captum.specifier), "captum's API changes between minor versions: pin '<'"


def test_requirements_cover_the_engine_imports():
    imported = set()
    for path in (MODULE_DIR / "CTXAILib").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "CTXAILib"}
    needed = {canonical(IMPORT_TO_DISTRIBUTION.get(m, m)) for m in third_party - PROVIDED_IMPORTS - OPTIONAL_IMPORTS}
    listed = {canonical(r.name) for r in requirements()}
    assert needed <= listed, f"the engine imports {sorted(needed - listed)}, which requirements.txt does not install"


def test_console_progress_callback_gets_the_event_object():
    """The README's ``progressCallback=lambda e: print(f"{e.fraction:.0%}")``: the logic hands the callback the
    session's event itself, not (fraction, message, eta) arguments."""
    logic = gui_classes()["CTXAILogic"]
    explain = next(n for n in logic.body if isinstance(n, ast.FunctionDef) and n.name == "explain")
    calls = [n for n in ast.walk(explain) if isinstance(n, ast.Call) and ast.unparse(n.func) == "self.session.explain"]
    assert calls and all(ast.unparse(k.value) == "progressCallback" for c in calls for k in c.keywords
                         if k.arg == "progress")
    assert "e.fraction" in (REPO / "README.md").read_text(encoding="utf-8")


def test_module_declares_the_modules_it_uses():
    source = MODULE_PY.read_text(encoding="utf-8")
    declared = re.search(r"self\.parent\.dependencies = \[(.*?)\]", source).group(1)
    assert {"Markups", "SubjectHierarchy", "VolumeRendering"} <= set(re.findall(r'"(\w+)"', declared))


def test_logic_stops_the_worker_when_slicer_quits_without_a_panel():
    logic = gui_classes()["CTXAILogic"]
    init = next(n for n in logic.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    assert 'slicer.app.connect("aboutToQuit()", self.shutdown)' in ast.unparse(init).replace("'", '"')


def test_panel_never_preselects_a_label_map_as_input():
    widget = gui_classes()["CTXAIWidget"]
    initialize = next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "initializeParameterNode")
    assert "IsA('vtkMRMLLabelMapVolumeNode')" in ast.unparse(initialize)
    selector = ui_widgets()["inputVolumeSelector"]
    shows_children = next(p for p in selector.iter("property") if p.get("name") == "showChildNodeTypes")
    assert shows_children.find("bool").text == "false"


def test_requirement_ranges_match_what_slicer_ships():
    """captum 0.8 needs numpy<2, which Slicer >= 5.10 does not ship; captum 0.9 needs torch >= 2.3."""
    captum = next(r for r in requirements() if canonical(r.name) == "captum")
    assert not captum.specifier.contains("0.8.0")
    source = (GUI_LIB_DIR / "dependencies.py").read_text(encoding="utf-8")
    torch = Requirement("torch" + re.search(r'TORCH_REQUIREMENT = "(.*?)"', source).group(1))
    assert not torch.specifier.contains("2.2.2") and torch.specifier.contains("2.3.0")


def test_self_test_skips_model_runs_without_dependencies_and_always_runs_the_rest():
    """Under testing Slicer installs nothing (5.12+) or auto-accepts the install (5.8, 5.10): without torch the
    model runs are skipped with a message, never installed, and the worker-free checks still run."""
    run_test = next(n for n in gui_classes()["CTXAITest"].body
                    if isinstance(n, ast.FunctionDef) and n.name == "runTest")
    order = [ast.unparse(n) for n in ast.walk(run_test) if isinstance(n, ast.Call)]
    first_check = next(i for i, call in enumerate(order) if call.endswith("missingDependencies()"))
    assert "self.test_RunNodesWithoutWorker()" in order[:first_check]
    skip = next(n for n in ast.walk(run_test) if isinstance(n, ast.If) and ast.unparse(n.test) == "missing")
    assert isinstance(skip.body[-1], ast.Return) and "self.delayDisplay(message)" in ast.unparse(skip)
    assert "ensureDependencies" not in ast.unparse(gui_classes()["CTXAITest"])


def test_model_paths_are_kept_in_the_history_and_questions_get_no_wait_cursor():
    """ctkPathLineEdit's settingKey stores only paths added by addCurrentPathToHistory(); the install questions
    asked on Explain must not appear under a busy cursor."""
    widget = gui_classes()["CTXAIWidget"]
    source = ast.unparse(widget)
    assert "self.ui.modelPathLineEdit.addCurrentPathToHistory()" in source
    on_explain = next(n for n in widget.body if isinstance(n, ast.FunctionDef) and n.name == "onExplainButton")
    call = next(n for n in ast.walk(on_explain) if isinstance(n, ast.Call)
                and ast.unparse(n.func) == "self._runWithErrorDisplay")
    assert any(k.arg == "waitCursor" and ast.unparse(k.value) == "False" for k in call.keywords)


def test_extension_metadata_points_at_files_that_exist_and_an_index_entry_agrees():
    """The Extensions Manager shows the icon and the screenshot from their raw URLs in this repository; the
    ExtensionsIndex entry (Utilities/ExtensionsIndex/CTXAI.json) must agree with the CMake metadata."""
    text = (REPO / "CMakeLists.txt").read_text()
    meta = dict(re.findall(r'set\((EXTENSION_\w+) "([^"]*)"', text))
    homepage = meta["EXTENSION_HOMEPAGE"]
    raw = homepage.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in meta[key].split():
            assert url.startswith(raw), f"{key} {url} is not a raw URL of {homepage}"
            path = REPO / url[len(raw):]
            assert path.is_file() and path.stat().st_size > 1000, f"{key}: {path} is missing or empty"
    entry = json.loads((REPO / "Utilities" / "ExtensionsIndex" / "CTXAI.json").read_text())
    assert entry["category"] == meta["EXTENSION_CATEGORY"]
    assert entry["scm_url"].removesuffix(".git") == homepage
    assert entry["build_dependencies"] == meta["EXTENSION_DEPENDS"].split()
