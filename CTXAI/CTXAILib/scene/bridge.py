"""The scene bridge: MRML nodes in and out of the engine's volumes, and the nodes that show a run's results.

Works on the real Slicer scene and on a bare ``slicer-core`` scene (no Qt, no ``slicer.mrmlScene``, no
``slicer.util``): every function takes the scene or the nodes it works on. Slicer and VTK are imported inside the
functions so that the engine package never needs them.

A run's results live in one subject-hierarchy folder: the float attribution volume (the input's exact geometry,
coloured and labelled as the method's sign means: :data:`~CTXAILib.engine.signs.SIGNS`), a label map of the most
relevant voxels, the segmentation model's confidence map when there is one, a table of the prediction and settings,
and a volume rendering of the attribution. The attribution is the foreground and the label map the label layer of the
Red, Green and Yellow views. :func:`add_run` either creates all of it or leaves the scene untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..engine.geometry import Box, Volume
from ..engine.signs import SIGNS
from ..errors import InputError, RegionError

__all__ = ["RunNodes", "volume_from_node", "ijk_box_from_roi", "ijk_from_ras", "add_run", "set_top_percent",
           "set_opacity", "set_colormap", "set_render_3d", "show_run", "remove_run", "find_runs", "COLORMAPS"]

COLORMAPS = ("auto", "heat", "diverging")
_HEAT = "CTXAI heat"
_DIVERGING = "CTXAI diverging"
_RELEVANCE = "CTXAI relevance"
_SLICE_VIEWS = ("Red", "Green", "Yellow")
_ROLE = "CTXAI.role"
_STATE = "CTXAI.run"
# RunNodes fields kept as MRML node references of the attribution node (role "CTXAI.<field>"): Slicer renames
# clashing IDs on scene import and updates references only, never IDs stored as text.
_REFERENCES = ("labels", "table", "input", "confidence", "volume_rendering")


# ------------------------------------------------------------------------------------------------- input side
def _matrix_to_numpy(matrix) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _node_array(node) -> np.ndarray:
    """The node's voxels as a numpy view (k, j, i[, components]), like ``slicer.util.arrayFromVolume``."""
    from vtk.util import numpy_support

    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"Volume {node.GetName()!r} has no voxels loaded. Load the image data first.")
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    shape = tuple(reversed(image.GetDimensions()))
    components = image.GetNumberOfScalarComponents()
    return scalars.reshape(shape + ((components,) if components > 1 else ()))


def volume_from_node(node) -> Volume:
    """A copy of a volume node's voxels (k, j, i) with its exact geometry (spacing, origin, directions)."""
    if node is None:
        raise InputError("No input volume is selected. Pick the CT volume to explain.")
    if node.GetParentTransformNode() is not None and not node.GetParentTransformNode().IsTransformToWorldLinear():
        raise InputError(f"Volume {node.GetName()!r} is under a non-linear transform. Harden or remove the "
                         "transform first (Data module: right-click > Harden transform).")
    array = np.array(_node_array(node))
    if array.ndim == 4:
        array = np.moveaxis(array, -1, 0)  # components first, as the engine wants them
    directions = np.zeros((3, 3))
    node.GetIJKToRASDirections(directions)
    return Volume(array, node.GetSpacing(), node.GetOrigin(), directions)


def ijk_from_ras(volume_node, ras: Sequence[float]) -> tuple[int, int, int]:
    """The voxel (i, j, k) containing a RAS point (world coordinates, the volume's transform included)."""
    import vtk

    ras_to_ijk = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(ras_to_ijk)
    world_to_node = _world_to_node(volume_node)
    local = world_to_node @ np.array([*ras, 1.0])
    ijk = _matrix_to_numpy(ras_to_ijk) @ local
    return tuple(int(np.floor(v + 0.5)) for v in ijk[:3])


def _world_to_node(node) -> np.ndarray:
    import vtk

    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    matrix = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformFromWorld(matrix)
    return _matrix_to_numpy(matrix)


def ijk_box_from_roi(roi_node, volume_node) -> Box:
    """The IJK box of the volume's voxels inside a markups ROI (rotated ROIs: their bounding box in IJK)."""
    shape = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    size = roi_node.GetSize()
    if any(s <= 0 for s in size):
        raise RegionError(f"ROI {roi_node.GetName()!r} has zero size {tuple(size)} mm. Drag its handles to "
                          "enclose the suspected defect.")
    import vtk

    object_to_world = _matrix_to_numpy(roi_node.GetObjectToWorldMatrix())
    ras_to_ijk = vtk.vtkMatrix4x4()
    volume_node.GetRASToIJKMatrix(ras_to_ijk)
    to_ijk = _matrix_to_numpy(ras_to_ijk) @ _world_to_node(volume_node) @ object_to_world
    corners = np.array([[sx * size[0], sy * size[1], sz * size[2], 1.0]
                        for sx in (-0.5, 0.5) for sy in (-0.5, 0.5) for sz in (-0.5, 0.5)])
    ijk = (to_ijk @ corners.T).T[:, :3]
    # Voxel centres are at integer indices: keep those whose centre lies inside the ROI's extent.
    box = Box(np.ceil(ijk.min(axis=0) - 1e-9).astype(int), np.floor(ijk.max(axis=0) + 1e-9).astype(int) + 1)
    box.check_inside(shape, "ROI")
    return box.clip(shape)


# ----------------------------------------------------------------------------------------------- output side
@dataclass
class RunNodes:
    """The nodes of one run (IDs), its subject-hierarchy folder and its display state."""

    folder: int
    attribution: str
    labels: str
    table: str
    input: str
    confidence: str | None = None
    volume_rendering: str | None = None
    sign: str = "magnitude"  # the method's, a key of SIGNS
    top_percent: float = 5.0
    opacity: float = 0.5
    colormap: str = "auto"
    explanation: dict[str, Any] = field(default_factory=dict)

    @property
    def signed(self) -> bool:
        return SIGNS[self.sign].signed


def _color_table(scene, name: str, entries: Sequence[tuple[float, float, float, float]]):
    """A named colour table, created once per scene (shared by all runs)."""
    node = scene.GetFirstNodeByName(name)
    if node is not None and node.IsA("vtkMRMLColorTableNode"):
        return node
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(len(entries))
    for index, (r, g, b, a) in enumerate(entries):
        node.SetColor(index, f"{index}", r, g, b, a)
    node.SetAttribute(_ROLE, "colors")
    return node


def _ramp(stops: Sequence[tuple[float, tuple[float, float, float, float]]], n: int = 256):
    positions = np.array([p for p, _ in stops])
    colours = np.array([c for _, c in stops])
    x = np.linspace(0.0, 1.0, n)
    return [tuple(float(np.interp(v, positions, colours[:, ch])) for ch in range(4)) for v in x]


def _heat_colors(scene):
    # Black-red-yellow-white; the lowest tenth fades out so that weak attribution does not hide the CT.
    return _color_table(scene, _HEAT, _ramp([(0.0, (0.0, 0.0, 0.0, 0.0)), (0.1, (0.5, 0.0, 0.0, 0.0)),
                                             (0.15, (0.6, 0.0, 0.0, 1.0)), (0.5, (1.0, 0.3, 0.0, 1.0)),
                                             (0.8, (1.0, 0.9, 0.1, 1.0)), (1.0, (1.0, 1.0, 0.9, 1.0))]))


def _diverging_colors(scene):
    # Blue (against the class) - transparent - red (for it); the middle fifth is see-through.
    return _color_table(scene, _DIVERGING, _ramp([(0.0, (0.05, 0.2, 0.9, 1.0)), (0.35, (0.4, 0.7, 1.0, 1.0)),
                                                  (0.4, (0.6, 0.8, 1.0, 0.0)), (0.6, (1.0, 0.7, 0.6, 0.0)),
                                                  (0.65, (1.0, 0.5, 0.3, 1.0)), (1.0, (0.85, 0.05, 0.05, 1.0))]))


def _relevance_colors(scene):
    return _color_table(scene, _RELEVANCE, [(0.0, 0.0, 0.0, 0.0), (1.0, 0.85, 0.0, 1.0), (0.0, 0.85, 1.0, 1.0)])


def _add_volume(scene, cls: str, name: str, volume: Volume, like) -> Any:
    """A volume node holding ``volume``'s voxels and geometry, under the same transform as node ``like``.

    Spacing, origin and directions are set as Slicer stores them (not through a 4x4 matrix, whose decomposition
    could round), so a result in the input's geometry has the input's IJK-to-RAS matrix to the last bit."""
    import vtk
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass(cls, name)
    image = vtk.vtkImageData()
    k, j, i = volume.shape
    image.SetDimensions(i, j, k)
    array = np.ascontiguousarray(volume.array)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(array.ravel(), deep=True,
                                                               array_type=numpy_support.get_vtk_array_type(array.dtype)))
    node.SetAndObserveImageData(image)
    node.SetSpacing(volume.spacing)
    node.SetOrigin(volume.origin)
    node.SetIJKToRASDirections(volume.directions)
    if like.GetParentTransformNode() is not None:
        node.SetAndObserveTransformNodeID(like.GetParentTransformNode().GetID())
    node.CreateDefaultDisplayNodes()
    return node


def _relevance_labels(values: np.ndarray, signed: bool, top_percent: float) -> np.ndarray:
    """1 where the value is among the top ``top_percent`` % of positive values; for signed maps 2 likewise for
    the most negative ones. Percentiles are taken over voxels where the map is non-zero."""
    labels = np.zeros(values.shape, np.uint8)
    for sign, label in ((1.0, 1), (-1.0, 2)) if signed else ((1.0, 1),):
        side = values * sign
        positive = side[side > 0]
        if positive.size:
            threshold = np.percentile(positive, 100.0 - top_percent)
            labels[(side >= threshold) & (side > 0)] = label
    return labels


def add_run(scene, input_node, attribution: Volume, explanation: dict[str, Any], confidence: Volume | None = None,
            *, name: str | None = None, opacity: float = 0.5, top_percent: float = 5.0, colormap: str = "auto",
            render_3d: bool = True, volume_rendering_logic=None) -> RunNodes:
    """Create the nodes of one run and show them; on any failure remove what was created and re-raise."""
    if colormap not in COLORMAPS and scene.GetNodeByID(colormap) is None:
        raise InputError(f"Unknown colour map {colormap!r}: use {', '.join(COLORMAPS)} or a colour node ID.")
    if not 0.0 < top_percent <= 100.0:
        raise InputError(f"The top-relevance percentage must be in (0, 100], got {top_percent}.")
    import slicer

    before = {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder = 0
    try:
        sign = SIGNS[explanation.get("sign", "magnitude")]
        target = explanation.get("target", {})
        name = name or f"CTXAI {explanation.get('method', 'run')} {target.get('class', '')}".strip()
        attribution_node = _add_volume(scene, "vtkMRMLScalarVolumeNode", f"{name} attribution", attribution,
                                       input_node)
        labels_volume = attribution.with_array(_relevance_labels(attribution.array, sign.signed, top_percent))
        labels_node = _add_volume(scene, "vtkMRMLLabelMapVolumeNode", f"{name} top {top_percent:g}%",
                                  labels_volume, input_node)
        labels_node.GetDisplayNode().SetAndObserveColorNodeID(_relevance_colors(scene).GetID())
        confidence_node = None
        if confidence is not None:
            confidence_node = _add_volume(scene, "vtkMRMLScalarVolumeNode", f"{name} confidence (model output)",
                                          confidence, input_node)
            display = confidence_node.GetDisplayNode()
            display.SetAndObserveColorNodeID(_heat_colors(scene).GetID())
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(0.0, 1.0)
        _style_attribution(scene, attribution_node, attribution.array, sign.name, colormap)
        table = _run_table(scene, f"{name} summary", explanation)
        run = RunNodes(folder=0, attribution=attribution_node.GetID(), labels=labels_node.GetID(),
                       table=table.GetID(), input=input_node.GetID(),
                       confidence=None if confidence_node is None else confidence_node.GetID(), sign=sign.name,
                       top_percent=top_percent, opacity=opacity, colormap=colormap, explanation=explanation)
        if render_3d:
            run.volume_rendering = _volume_rendering(scene, attribution_node, volume_rendering_logic)
        parent = sh.GetItemParent(sh.GetItemByDataNode(input_node)) if sh.GetItemByDataNode(input_node) else 0
        folder = sh.CreateFolderItem(parent or sh.GetSceneItemID(), name)
        run.folder = folder
        sh.SetItemAttribute(folder, _ROLE, "run")
        _save_state(scene, run)
        for node, role in ((attribution_node, "attribution"), (labels_node, "labels"), (confidence_node, "confidence"),
                           (table, "table")):
            if node is not None:
                node.SetAttribute(_ROLE, role)
                sh.CreateItem(folder, node)
        show_run(scene, run)
        return run
    except Exception:
        _remove_new_nodes(scene, before, sh, folder)
        raise


def _remove_new_nodes(scene, before: set[str], sh, folder: int) -> None:
    created = [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]
    for node in created:
        if node is not None and node.GetID() not in before and node.GetAttribute(_ROLE) != "colors":
            scene.RemoveNode(node)
    if folder:
        sh.RemoveItem(folder, False, True)


def _style_attribution(scene, node, values: np.ndarray, sign: str, colormap: str) -> None:
    display = node.GetDisplayNode()
    if colormap == "auto":
        colormap = SIGNS[sign].colormap
    colour_node = {"heat": _heat_colors, "diverging": _diverging_colors}.get(colormap)
    display.SetAndObserveColorNodeID(colour_node(scene).GetID() if colour_node else colormap)
    display.AutoWindowLevelOff()
    # A robust range: the 99.9th percentile of |values| keeps one hot voxel from washing out the map.
    magnitude = np.abs(values[values != 0])
    top = float(np.percentile(magnitude, 99.9)) if magnitude.size else 1.0
    top = top if top > 0 else 1.0
    # Diverging maps centre zero; a heat map shows positive evidence only, whatever the method's sign.
    symmetric = colormap == "diverging" or (colour_node is None and SIGNS[sign].signed)
    display.SetWindowLevelMinMax(-top if symmetric else 0.0, top)
    display.SetInterpolate(1)


CHECK_STATES = {True: "pass", False: "FAIL", None: "n/a"}


def _run_table(scene, name: str, explanation: dict[str, Any]):
    import vtk

    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    for title in ("Property", "Value"):
        column = vtk.vtkStringArray()
        column.SetName(title)
        table.AddColumn(column)
    for key, value in _summary_rows(explanation):
        row = table.AddEmptyRow()
        table.SetCellText(row, 0, key)
        table.SetCellText(row, 1, value)
    return table


def _summary_rows(explanation: dict[str, Any]) -> list[tuple[str, str]]:
    prediction = explanation.get("prediction", {})
    target = explanation.get("target", {})
    rows = [("Model", str(explanation.get("model", ""))),
            ("Method", str(explanation.get("method", ""))),
            ("Colours", SIGNS[explanation.get("sign", "magnitude")].legend),
            ("Target", f"{target.get('class')}" + (f" minus {target['contrast']}" if target.get("contrast") else "")
             + f" ({target.get('score')}), {target.get('region')}")]
    if prediction.get("task") == "classification":
        best = prediction["predicted_class"]
        rows += [("Prediction", best), ("Confidence", f"{prediction['probabilities'][best]:.3f}"),
                 ("Target probability", f"{prediction['target_probability']:.3f}")]
    elif prediction:
        rows += [("Predicted voxels in region", f"{prediction['predicted_voxels_in_region']} of "
                                                f"{prediction['region_voxels']}"),
                 ("Mean confidence in region", f"{prediction['mean_probability_in_region']:.3f}"),
                 ("Max confidence in region", f"{prediction['max_probability_in_region']:.3f}")]
    if explanation.get("layer"):
        rows.append(("Layer", explanation["layer"]))
    rows += [(f"Setting: {k}", str(v)) for k, v in explanation.get("settings", {}).items()]
    timings = explanation.get("timings", {})
    if "total_s" in timings:
        rows.append(("Run time", f"{timings['total_s']:.2f} s on {explanation.get('device', '?')}"))
    verdict = explanation.get("verdict")
    if verdict:
        rows.append(("Verdict", verdict["verdict"] + "".join(f"; {reason}" for reason in verdict["reasons"])))
    # The panel colours a check's row by its first word (pass / FAIL / n/a).
    rows += [(f"Check: {name}", f"{CHECK_STATES[check['pass']]}: {check['what']}")
             for name, check in (explanation.get("checks") or {}).items()]
    rows += [("Warning", w) for w in explanation.get("warnings", [])]
    return rows


def _volume_rendering_logic(scene):
    """A volume-rendering logic on ``scene`` for callers that have none (Slicer passes its module's logic)."""
    import slicer

    logic = slicer.vtkSlicerVolumeRenderingLogic()
    logic.SetMRMLScene(scene)
    return logic


def _volume_rendering(scene, node, logic) -> str:
    logic = logic or _volume_rendering_logic(scene)
    display = logic.GetFirstVolumeRenderingDisplayNode(node) or logic.CreateDefaultVolumeRenderingNodes(node)
    _sync_volume_rendering(display, node)
    display.SetVisibility(True)
    return display.GetID()


def _sync_volume_rendering(display, node) -> None:
    """3-D colours and opacity taken from the overlay's colour table over its window: the 3-D view shows what
    the slice views show, and the table's see-through entries stay see-through.

    Set explicitly rather than by Slicer's "follow the volume display" link, which rebuilds the opacity from the
    window alone and would hide the negative half of a diverging map."""
    display.SetFollowVolumeDisplayNode(0)
    scalar_display = node.GetDisplayNode()
    colours = scalar_display.GetColorNode()
    lo, hi = scalar_display.GetWindowLevelMin(), scalar_display.GetWindowLevelMax()
    volume_property = display.GetVolumePropertyNode().GetVolumeProperty()
    rgb = volume_property.GetRGBTransferFunction()
    opacity = volume_property.GetScalarOpacity()
    rgb.RemoveAllPoints()
    opacity.RemoveAllPoints()
    n = colours.GetNumberOfColors()
    rgba = [0.0] * 4
    for index in range(n):
        colours.GetColor(index, rgba)
        value = lo + (hi - lo) * index / max(n - 1, 1)
        rgb.AddRGBPoint(value, *rgba[:3])
        opacity.AddPoint(value, 0.6 * rgba[3])


def show_run(scene, run: RunNodes) -> None:
    """Show a run in the Red, Green and Yellow views: input as background, attribution as foreground, labels."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        if composite.GetLayoutName() not in _SLICE_VIEWS:
            continue
        composite.SetBackgroundVolumeID(run.input)
        composite.SetForegroundVolumeID(run.attribution)
        composite.SetForegroundOpacity(run.opacity)
        composite.SetLabelVolumeID(run.labels)
        composite.SetLabelOpacity(min(1.0, run.opacity + 0.3))


def set_opacity(scene, run: RunNodes, opacity: float) -> None:
    if not 0.0 <= opacity <= 1.0:
        raise InputError(f"Overlay opacity must be in [0, 1], got {opacity}.")
    run.opacity = opacity
    show_run(scene, run)
    _save_state(scene, run)


def set_top_percent(scene, run: RunNodes, top_percent: float) -> None:
    """Recompute the label map from the stored attribution: no model evaluation."""
    if not 0.0 < top_percent <= 100.0:
        raise InputError(f"The top-relevance percentage must be in (0, 100], got {top_percent}.")
    attribution = scene.GetNodeByID(run.attribution)
    labels = scene.GetNodeByID(run.labels)
    view = _node_array(labels)
    view[...] = _relevance_labels(_node_array(attribution), run.signed, top_percent)
    labels.GetImageData().GetPointData().GetScalars().Modified()
    labels.GetImageData().Modified()
    labels.Modified()
    labels.SetName(labels.GetName().rsplit(" top ", 1)[0] + f" top {top_percent:g}%")
    run.top_percent = top_percent
    _save_state(scene, run)


def set_colormap(scene, run: RunNodes, colormap: str) -> None:
    """Recolour a run's overlay (and its 3-D rendering) from the stored attribution: no model evaluation."""
    if colormap not in COLORMAPS and scene.GetNodeByID(colormap) is None:
        raise InputError(f"Unknown colour map {colormap!r}: use {', '.join(COLORMAPS)} or a colour node ID.")
    attribution = scene.GetNodeByID(run.attribution)
    _style_attribution(scene, attribution, _node_array(attribution), run.sign, colormap)
    if run.volume_rendering is not None:
        _sync_volume_rendering(scene.GetNodeByID(run.volume_rendering), attribution)
    run.colormap = colormap
    _save_state(scene, run)


def set_render_3d(scene, run: RunNodes, visible: bool, volume_rendering_logic=None) -> None:
    if visible and run.volume_rendering is None:
        run.volume_rendering = _volume_rendering(scene, scene.GetNodeByID(run.attribution), volume_rendering_logic)
    elif run.volume_rendering is not None:
        scene.GetNodeByID(run.volume_rendering).SetVisibility(visible)
    _save_state(scene, run)


def _save_state(scene, run: RunNodes) -> None:
    """Display state and explanation in the folder's attribute; the nodes as references of the attribution."""
    import slicer

    attribution = scene.GetNodeByID(run.attribution)
    for name in _REFERENCES:
        attribution.SetNodeReferenceID(f"CTXAI.{name}", getattr(run, name))
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    state = {"sign": run.sign, "top_percent": run.top_percent, "opacity": run.opacity,
             "colormap": run.colormap, "explanation": run.explanation}
    sh.SetItemAttribute(run.folder, _STATE, json.dumps(state, default=str))


def _restore_run(sh, folder: int) -> RunNodes | None:
    import vtk

    children = vtk.vtkIdList()
    sh.GetItemChildren(folder, children)
    nodes = (sh.GetItemDataNode(children.GetId(n)) for n in range(children.GetNumberOfIds()))
    attribution = next((node for node in nodes if node is not None and node.GetAttribute(_ROLE) == "attribution"),
                       None)
    if attribution is None:
        return None  # its attribution volume was deleted: nothing left to show or relabel
    references = {name: attribution.GetNodeReferenceID(f"CTXAI.{name}") for name in _REFERENCES}
    return RunNodes(folder=folder, attribution=attribution.GetID(), **references,
                    **json.loads(sh.GetItemAttribute(folder, _STATE)))


def find_runs(scene) -> list[RunNodes]:
    """Every run in the scene, oldest first (restored from its folder and node references after a scene load or
    import)."""
    import slicer
    import vtk

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    items = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), items, True)
    runs = []
    for n in range(items.GetNumberOfIds()):
        item = items.GetId(n)
        if sh.GetItemAttribute(item, _ROLE) == "run":
            run = _restore_run(sh, item)
            if run is not None:
                runs.append(run)
    return runs


def remove_run(scene, run: RunNodes) -> None:
    """Remove a run's nodes and folder (in an order that also works without Slicer's Qt plugin logic)."""
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for node_id in (run.volume_rendering, run.attribution, run.labels, run.confidence, run.table):
        node = scene.GetNodeByID(node_id) if node_id else None
        if node is not None:
            scene.RemoveNode(node)
    sh.RemoveItem(run.folder, False, True)
