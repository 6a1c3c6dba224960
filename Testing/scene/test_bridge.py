"""The scene bridge against real MRML (slicer-core through trame-slicer's SlicerApp): geometry exactness, ROI and
point conversion, result nodes in one folder, slice layers, colours, volume rendering, and no half-made runs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from CTXAILib import Box, InputError, RegionError, Volume
from CTXAILib.scene.bridge import (add_run, find_runs, ijk_box_from_roi, ijk_from_ras, remove_run, set_opacity,
                            set_render_3d, set_top_percent, volume_from_node)

from mrml_helpers import add_volume_node

EXPLANATION = {"method": "integrated_gradients", "sign": "attribution", "family": "gradient", "model": "unet",
               "settings": {"steps": 32}, "target": {"class": "void", "contrast": None, "score": "logit",
                                                      "region": "IJK box"},
               "layer": None, "timings": {"total_s": 1.5}, "device": "cpu", "warnings": [],
               "prediction": {"task": "segmentation", "class": "void", "region_voxels": 100,
                              "predicted_voxels_in_region": 40, "mean_probability_in_region": 0.4,
                              "max_probability_in_region": 0.99, "predicted_voxels_in_volume": 400}}


def oblique_ct(shape=(20, 24, 28)):
    rng = np.random.default_rng(0)
    directions = Rotation.from_euler("xyz", [5, -12, 30], degrees=True).as_matrix()
    return Volume(rng.normal(1000, 300, shape).astype(np.float32), spacing=(0.3, 0.35, 0.8),
                  origin=(-12.25, 3.5, 40.125), directions=directions)


def attribution_like(volume, signed=True):
    k, j, i = np.indices(volume.shape)
    blob = np.exp(-((k - 10) ** 2 + (j - 12) ** 2 + (i - 14) ** 2) / 8.0)
    values = blob - (0.5 * np.exp(-((k - 5) ** 2 + (j - 5) ** 2 + (i - 5) ** 2) / 4.0) if signed else 0)
    return volume.with_array(values.astype(np.float32))


def matrix(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def node_array(node):
    from vtk.util import numpy_support

    image = node.GetImageData()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(tuple(reversed(image.GetDimensions())))


def test_volume_from_node_is_exact(slicer_app):
    volume = oblique_ct()
    node = add_volume_node(slicer_app.scene, volume)
    back = volume_from_node(node)
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_array_equal(back.ijk_to_ras, matrix(node))  # our matrix equals Slicer's, bit for bit


def test_results_keep_the_input_matrix_exactly(slicer_app):
    scene = slicer_app.scene
    node = add_volume_node(scene, oblique_ct())
    volume = volume_from_node(node)
    run = add_run(scene, node, attribution_like(volume), EXPLANATION, confidence=volume.with_array(
        np.full(volume.shape, 0.5, np.float32)), volume_rendering_logic=slicer_app.vr_logic)
    for node_id in (run.attribution, run.labels, run.confidence):
        np.testing.assert_array_equal(matrix(scene.GetNodeByID(node_id)), matrix(node))


def test_extent_result_has_sub_box_geometry(slicer_app):
    scene = slicer_app.scene
    node = add_volume_node(scene, oblique_ct())
    volume = volume_from_node(node)
    box = Box((3, 4, 5), (13, 14, 15))
    crop = volume.crop(box)
    run = add_run(scene, node, crop.with_array(np.ones(crop.shape, np.float32)), EXPLANATION, render_3d=False)
    result = scene.GetNodeByID(run.attribution)
    expected = matrix(node) @ np.array([3, 4, 5, 1.0])
    np.testing.assert_array_equal(matrix(result)[:3, 3], expected[:3])
    np.testing.assert_array_equal(matrix(result)[:3, :3], matrix(node)[:3, :3])


def test_roi_to_ijk_box(slicer_app):
    scene = slicer_app.scene
    volume = Volume(np.zeros((30, 30, 30), np.float32), spacing=(2.0, 2.0, 2.0), origin=(-10.0, -10.0, -10.0))
    node = add_volume_node(scene, volume)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(0.0, 0.0, 0.0)
    roi.SetSize(10.0, 10.0, 10.0)
    assert ijk_box_from_roi(roi, node) == Box((3, 3, 3), (8, 8, 8))  # voxel centres -4..4 mm lie inside
    # A rotated ROI gives the IJK bounding box of its corners.
    transform = Rotation.from_euler("z", 45, degrees=True).as_matrix()
    import vtk

    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, transform[r, c])
    roi.SetAndObserveObjectToNodeMatrix(m)
    assert ijk_box_from_roi(roi, node) == Box((2, 2, 3), (9, 9, 8))  # corners reach +-7.07 mm in i and j
    roi.SetCenter(500.0, 0.0, 0.0)
    with pytest.raises(RegionError, match="lies outside the volume"):
        ijk_box_from_roi(roi, node)
    roi.SetSize(0.0, 8.0, 8.0)
    with pytest.raises(RegionError, match="zero size"):
        ijk_box_from_roi(roi, node)


def test_point_to_voxel(slicer_app):
    node = add_volume_node(slicer_app.scene, oblique_ct())
    ras = matrix(node) @ np.array([7, 9, 11, 1.0])
    assert ijk_from_ras(node, ras[:3]) == (7, 9, 11)
    ras = matrix(node) @ np.array([7.4, 8.6, 11.2, 1.0])
    assert ijk_from_ras(node, ras[:3]) == (7, 9, 11)


def test_run_nodes_views_and_colours(slicer_app):
    scene = slicer_app.scene
    node = add_volume_node(scene, oblique_ct())
    volume = volume_from_node(node)
    run = add_run(scene, node, attribution_like(volume), EXPLANATION, opacity=0.6, top_percent=2.0,
                  volume_rendering_logic=slicer_app.vr_logic)
    for layout in ("Red", "Green", "Yellow"):
        composite = scene.GetNodeByID(f"vtkMRMLSliceCompositeNode{layout}")
        assert composite.GetBackgroundVolumeID() == node.GetID()
        assert composite.GetForegroundVolumeID() == run.attribution
        assert composite.GetLabelVolumeID() == run.labels
        assert composite.GetForegroundOpacity() == pytest.approx(0.6)
    attribution = scene.GetNodeByID(run.attribution)
    display = attribution.GetDisplayNode()
    assert display.GetColorNode().GetName() == "CTXAI diverging"  # an attribution method
    assert display.GetWindowLevelMin() == pytest.approx(-display.GetWindowLevelMax())
    labels = scene.GetNodeByID(run.labels)
    assert labels.IsA("vtkMRMLLabelMapVolumeNode") and labels.GetDisplayNode().GetColorNode().GetName() == "CTXAI relevance"
    counts = np.bincount(node_array(labels).ravel(), minlength=3)
    assert counts[1] > 0 and counts[2] > 0
    rendering = scene.GetNodeByID(run.volume_rendering)
    assert rendering.IsA("vtkMRMLVolumeRenderingDisplayNode") and rendering.GetVisibility()
    assert rendering.GetVolumeNode() is attribution
    # 3-D colours follow the overlay's table: the see-through middle of the diverging map stays see-through.
    opacity = rendering.GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity()
    top = display.GetWindowLevelMax()
    assert opacity.GetValue(0.0) < 0.05 and opacity.GetValue(top) > 0.3 and opacity.GetValue(-top) > 0.3
    table = scene.GetNodeByID(run.table)
    rows = {table.GetCellText(r, 0): table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())}
    assert rows["Method"] == "integrated_gradients" and rows["Run time"].startswith("1.50 s")
    assert rows["Predicted voxels in region"] == "40 of 100"
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for node_id in (run.attribution, run.labels, run.table):
        assert sh.GetItemParent(sh.GetItemByDataNode(scene.GetNodeByID(node_id))) == run.folder


def test_run_table_shows_the_verdict_and_each_check(slicer_app):
    """What `ctxai explain --checks` and the worker return reaches the panel's table, one row per check."""
    scene = slicer_app.scene
    node = add_volume_node(scene, oblique_ct())
    checks = {"spill": {"value": 0.17, "threshold": 0.69, "pass": False, "controls": {"constant": 0.37},
                        "what": "5% of the map is on the explained region, 25% on other predicted regions"},
              "target_sensitivity": {"value": -0.2, "threshold": 0.8, "pass": True, "controls": {"centre": 1.0},
                                     "what": "the map for another predicted void region differs"}}
    explanation = dict(EXPLANATION, checks=checks, verdict={"verdict": "caution", "reasons": [
        "spill: 5% of the map is on the explained region"], "passed": ["target_sensitivity"], "failed": ["spill"],
        "not_made": []})
    run = add_run(scene, node, attribution_like(volume_from_node(node)), explanation)
    table = scene.GetNodeByID(run.table)
    rows = {table.GetCellText(r, 0): table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())}
    assert rows["Verdict"].startswith("caution; spill: 5% of the map")
    assert rows["Check: spill"].startswith("FAIL: 5% of the map")
    assert rows["Check: target_sensitivity"].startswith("pass: the map for another")
    assert find_runs(scene)[-1].explanation["verdict"]["verdict"] == "caution"


@pytest.mark.parametrize("method, colours, legend", [
    ("integrated_gradients", "CTXAI diverging", "red: for the target, blue: against"),
    ("guided_backprop", "CTXAI diverging", "red: the score rises as the grey value rises, blue: it rises as the "
                                           "grey value falls"),
    ("gradcam", "CTXAI heat", "relevance (no sign)")])
def test_colours_and_legend_follow_the_methods_declared_sign(slicer_app, method, colours, legend):
    from CTXAILib.engine.methods import get_method

    scene = slicer_app.scene
    node = add_volume_node(scene, oblique_ct())
    sign = get_method(method).sign
    run = add_run(scene, node, attribution_like(volume_from_node(node), signed=sign != "magnitude"),
                  {**EXPLANATION, "method": method, "sign": sign}, render_3d=False)
    display = scene.GetNodeByID(run.attribution).GetDisplayNode()
    assert display.GetColorNode().GetName() == colours
    low, high = display.GetWindowLevelMin(), display.GetWindowLevelMax()
    assert low == (-high if colours == "CTXAI diverging" else 0.0)
    table = scene.GetNodeByID(run.table)
    rows = {table.GetCellText(r, 0): table.GetCellText(r, 1) for r in range(table.GetNumberOfRows())}
    assert rows["Colours"].startswith(legend)
    assert find_runs(scene)[-1].sign == sign  # a saved scene keeps the meaning
    assert run.volume_rendering is None
    set_render_3d(scene, run, True, slicer_app.vr_logic)
    assert scene.GetNodeByID(run.volume_rendering).GetVisibility()


def test_threshold_and_opacity_update_without_recomputing(slicer_app):
    scene = slicer_app.scene
    node = add_volume_node(scene, oblique_ct())
    run = add_run(scene, node, attribution_like(volume_from_node(node)), EXPLANATION, top_percent=1.0,
                  render_3d=False)
    attribution_before = node_array(scene.GetNodeByID(run.attribution)).copy()
    few = int((node_array(scene.GetNodeByID(run.labels)) == 1).sum())
    set_top_percent(scene, run, 20.0)
    many = int((node_array(scene.GetNodeByID(run.labels)) == 1).sum())
    assert many > 10 * few
    np.testing.assert_array_equal(node_array(scene.GetNodeByID(run.attribution)), attribution_before)
    set_opacity(scene, run, 0.25)
    assert scene.GetNodeByID("vtkMRMLSliceCompositeNodeGreen").GetForegroundOpacity() == pytest.approx(0.25)
    restored = find_runs(scene)[-1]
    assert restored.top_percent == 20.0 and restored.opacity == 0.25 and restored.attribution == run.attribution
    with pytest.raises(InputError, match="percentage"):
        set_top_percent(scene, run, 0.0)


def test_recolour_without_recomputing(slicer_app):
    from CTXAILib.scene.bridge import set_colormap

    scene = slicer_app.scene
    node = add_volume_node(scene, oblique_ct())
    run = add_run(scene, node, attribution_like(volume_from_node(node)), EXPLANATION,
                  volume_rendering_logic=slicer_app.vr_logic)
    attribution = scene.GetNodeByID(run.attribution)
    before = node_array(attribution).copy()
    set_colormap(scene, run, "heat")
    display = attribution.GetDisplayNode()
    assert display.GetColorNode().GetName() == "CTXAI heat" and display.GetWindowLevelMin() == 0.0
    opacity = scene.GetNodeByID(run.volume_rendering).GetVolumePropertyNode().GetVolumeProperty().GetScalarOpacity()
    assert opacity.GetValue(0.0) == 0.0 and opacity.GetValue(display.GetWindowLevelMax()) > 0.3
    np.testing.assert_array_equal(node_array(attribution), before)
    assert find_runs(scene)[-1].colormap == "heat"
    with pytest.raises(InputError, match="Unknown colour map"):
        set_colormap(scene, run, "plasma-ish")


def test_failed_run_adds_no_node(slicer_app):
    scene = slicer_app.scene
    node = add_volume_node(scene, oblique_ct())
    volume = volume_from_node(node)
    earlier = add_run(scene, node, attribution_like(volume), EXPLANATION, render_3d=False)
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    nodes_before = {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}
    items_before = sh.GetNumberOfItems()
    broken = volume.with_array(np.empty(volume.shape, object))  # VTK cannot hold it: fails midway
    with pytest.raises(Exception):
        add_run(scene, node, attribution_like(volume), EXPLANATION, confidence=broken, render_3d=False)
    assert {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())} == nodes_before
    assert sh.GetNumberOfItems() == items_before
    assert scene.GetNodeByID("vtkMRMLSliceCompositeNodeRed").GetForegroundVolumeID() == earlier.attribution
    with pytest.raises(InputError, match="Unknown colour map"):
        add_run(scene, node, attribution_like(volume), EXPLANATION, colormap="rainbowish")
    assert {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())} == nodes_before


def test_remove_run(slicer_app):
    scene = slicer_app.scene
    node = add_volume_node(scene, oblique_ct())
    first = add_run(scene, node, attribution_like(volume_from_node(node)), EXPLANATION, render_3d=False)
    second = add_run(scene, node, attribution_like(volume_from_node(node)), EXPLANATION,
                     volume_rendering_logic=slicer_app.vr_logic)
    remove_run(scene, second)
    assert scene.GetNodeByID(second.attribution) is None and scene.GetNodeByID(second.volume_rendering) is None
    assert scene.GetNodeByID(first.attribution) is not None
    assert [run.attribution for run in find_runs(scene)] == [first.attribution]


def test_runs_point_at_their_own_nodes_after_a_scene_import(slicer_app):
    """Importing a saved scene into a non-empty one renames clashing IDs; the runs must follow their nodes."""
    import slicer

    scene = slicer_app.scene
    node = add_volume_node(scene, oblique_ct())
    add_run(scene, node, attribution_like(volume_from_node(node)), EXPLANATION,
            volume_rendering_logic=slicer_app.vr_logic)
    scene.SetSaveToXMLString(1)
    scene.Commit()
    saved = scene.GetSceneXMLString()
    scene.SetLoadFromXMLString(1)
    scene.SetSceneXMLString(saved)
    scene.Import()  # the same nodes again: every ID clashes
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    runs = find_runs(scene)
    assert len(runs) == 2
    assert len({run.table for run in runs}) == 2 and len({run.labels for run in runs}) == 2
    for run in runs:
        for node_id in (run.attribution, run.labels, run.table):
            assert sh.GetItemParent(sh.GetItemByDataNode(scene.GetNodeByID(node_id))) == run.folder
        assert scene.GetNodeByID(run.volume_rendering).GetVolumeNode().GetID() == run.attribution
    assert runs[0].input != runs[1].input
