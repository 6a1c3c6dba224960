"""The package layout stays what CTXAI/CTXAILib/README.md says: wings import one way only and no module imports
itself back through others. Every import is counted, the lazy ones inside functions too: a lazy import still ties
two modules together, and both loops this test guards against were lazy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "CTXAI" / "CTXAILib"

# What each wing may import besides itself (DESIGN.md's table; README.md in the package).
ALLOWED = {
    "errors": set(),
    "engine": {"errors"},
    "checks": {"errors", "engine"},
    "records": {"errors", "engine", "checks"},
    "worker": {"errors", "engine", "checks", "records"},
    "scene": {"errors", "engine", "worker"},
    "synthetic": {"errors", "engine", "checks", "records"},
    "batch": {"errors", "engine", "checks", "records"},
    "bench": {"errors", "engine", "checks", "records", "synthetic", "batch"},
    "commands": {"errors", "engine", "checks", "records", "worker", "synthetic", "batch", "bench"},
    "cli": {"errors", "commands"},
}
# Never imported anywhere in the package (the Slicer module's GUI layer alone uses them), and where vtk/slicer may be.
NEVER = {"qt", "ctk", "PythonQt"}
SLICER_SIDE = {"slicer", "vtk", "mrml"}
# Wings besides the scene bridge that may import some of them, and why. The HTML report draws its 3-D picture with
# VTK offscreen (issue 12), inside the function that draws it, so nothing else in the wing loads VTK.
SLICER_SIDE_ALLOWED = {"scene": SLICER_SIDE, "records": {"vtk"}}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def _resolve(importer: str, is_package: bool, level: int, module: str | None, names: list[str],
             known: dict[str, Path]) -> list[str]:
    base = importer.split(".") if importer else []
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    target = ".".join(base + (module.split(".") if module else []))
    found = [f"{target}.{n}" if target else n for n in names if (f"{target}.{n}" if target else n) in known]
    return found or [target]


def _imports() -> dict[str, list[tuple[str, int]]]:
    """Each module's CTXAILib imports (module name, line) and its external top-level packages as ('!pkg', line)."""
    known = _modules()
    graph: dict[str, list[tuple[str, int]]] = {}
    for name, path in known.items():
        edges = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                names = [a.name for a in node.names]
                if node.level:
                    for target in _resolve(name, path.name == "__init__.py", node.level, node.module, names, known):
                        edges.append((target, node.lineno))
                elif node.module and node.module.split(".")[0] == "CTXAILib":
                    rest = node.module.split(".")[1:]
                    for target in _resolve("", True, 1, ".".join(rest) or None, names, known):
                        edges.append((target, node.lineno))
                elif node.module:
                    edges.append(("!" + node.module.split(".")[0], node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    head = alias.name.split(".")[0]
                    edges.append((".".join(alias.name.split(".")[1:]) if head == "CTXAILib" else "!" + head,
                                  node.lineno))
        graph[name] = edges
    return graph


def _wing(module: str) -> str:
    return module.split(".")[0]


def test_every_module_belongs_to_a_wing():
    strays = sorted(m for m in _modules() if m and _wing(m) not in ALLOWED)
    assert not strays, f"modules outside the wings of README.md: {strays} (add them to a wing, or a wing here)"


def test_no_wing_imports_a_wing_above_it():
    bad = []
    for module, edges in _imports().items():
        if not module:
            continue  # the package's lazy exports name modules as strings, not imports
        for target, line in edges:
            if target.startswith("!"):
                continue
            wing, other = _wing(module), _wing(target)
            if other != wing and other not in ALLOWED[wing]:
                bad.append(f"{module}:{line} imports {target} ({wing} may import {sorted(ALLOWED[wing])})")
    assert not bad, "\n".join(bad)


def test_no_import_loops():
    graph = {m: {t for t, _ in edges if not t.startswith("!") and t != m} for m, edges in _imports().items()}
    index, low, stack, on_stack, loops = {}, {}, [], set(), []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    # A package imports its submodules and they import each other: that is not a loop of the layout.
    for node in list(graph):
        graph[node] = {t for t in graph[node] if not node.startswith(t + ".") and t}
    for node in graph:
        if node not in index:
            visit(node)
    assert not loops, f"import loops: {loops}"


def test_gui_toolkits_and_slicer_stay_out_of_the_engine_side():
    bad = []
    for module, edges in _imports().items():
        for target, line in edges:
            if not target.startswith("!"):
                continue
            package = target[1:]
            if package in NEVER or (package in SLICER_SIDE
                                    and package not in SLICER_SIDE_ALLOWED.get(_wing(module), set())):
                bad.append(f"{module}:{line} imports {package}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", ["CTXAILib.worker.client", "CTXAILib.scene.session", "CTXAILib.scene.bridge",
                                    "CTXAILib.records.html", "CTXAILib.cli"])
def test_light_modules_do_not_load_torch(module):
    """The Slicer GUI process imports the client, the scene side and the HTML report (its Report button);
    ``ctxai --help`` imports the CLI."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False", f"importing {module} loads torch"


def test_a_loop_and_an_upward_import_are_caught(tmp_path, monkeypatch):
    """The checks above can fail: a copy of the package with an engine module importing the CLI back."""
    import shutil

    copy = tmp_path / "CTXAILib"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "engine" / "geometry.py", "a") as f:
        f.write("\n\ndef _back():\n    from ..cli import main\n    return main\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    with pytest.raises(AssertionError, match="engine.geometry:.* imports cli"):
        test_no_wing_imports_a_wing_above_it()
    with pytest.raises(AssertionError, match="import loops"):
        test_no_import_loops()
