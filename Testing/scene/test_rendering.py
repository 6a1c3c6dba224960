"""Slicer's own displayable managers render the result offscreen (trame-slicer, EGL): after explaining a phantom
defect, the overlay colour appears at the defect in the Red, Green and Yellow views and in the 3-D view, and not
far away from it."""

from __future__ import annotations

import os

import numpy as np
import pytest

from CTXAILib.synthetic.evaluation import bundled_model
from CTXAILib.synthetic.phantom import generate_phantom
from CTXAILib.scene.session import ExplainRequest, ExplainSession

from mrml_helpers import add_volume_node


def grab(view) -> np.ndarray:
    import vtk
    from vtk.util import numpy_support

    view.render()
    capture = vtk.vtkWindowToImageFilter()
    capture.SetInput(view.render_window())
    capture.SetInputBufferTypeToRGB()
    capture.ReadFrontBufferOff()
    capture.Update()
    image = capture.GetOutput()
    width, height, _ = image.GetDimensions()
    rgb = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return np.flipud(rgb)[..., :3].astype(int)  # row 0 at the top


def slice_pixel(view, ras, height):
    import vtk

    to_xy = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Invert(view.get_view_node().GetXYToRAS(), to_xy)
    x, y, _, _ = to_xy.MultiplyPoint([*ras, 1.0])
    return np.array([height - 1 - y, x])


def threed_pixel(view, ras, height):
    renderer = view.renderer()
    renderer.SetWorldPoint(*ras, 1.0)
    renderer.WorldToDisplay()
    x, y, _ = renderer.GetDisplayPoint()
    return np.array([height - 1 - y, x])


def overlay_pixels(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """(row, column) of every pixel the overlay changed visibly."""
    return np.argwhere(np.abs(after - before).sum(axis=-1) > 30)


@pytest.fixture(scope="module")
def phantom():
    return generate_phantom(900_200, (96, 96, 96))


def test_overlay_at_the_defect_in_all_four_views(slicer_app, phantom, tmp_path):
    scene = slicer_app.scene
    ct = add_volume_node(scene, phantom.ct)
    defect = max((d for d in phantom.defects if d.type == "pore"), key=lambda d: d.voxel_count)
    ijk = np.round(defect.centre).astype(int)
    ras = (phantom.ct.ijk_to_ras @ np.array([*ijk, 1.0]))[:3]
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(ras)
    points.GetDisplayNode().SetVisibility(False)  # only the overlay may change the pictures
    session = ExplainSession(scene, volume_rendering_logic=slicer_app.vr_logic)
    try:
        run = session.explain(ExplainRequest(ct.GetID(), str(bundled_model("unet")), "hirescam", "void",
                                             where="point", point=points.GetID(), device="cpu", opacity=0.8))
    finally:
        session.shutdown()

    for name in ("Red", "Green", "Yellow"):
        view = slicer_app.views[name]
        view.fit_view_to_content()
        view.get_view_node().JumpSliceByOffsetting(*ras)
    threed = slicer_app.views["ThreeD"]
    threed.fit_view_to_content()

    rendering = scene.GetNodeByID(run.volume_rendering)
    composites = [scene.GetNodeByID(f"vtkMRMLSliceCompositeNode{n}") for n in ("Red", "Green", "Yellow")]
    for composite in composites:
        composite.SetForegroundOpacity(0.0)
        composite.SetLabelOpacity(0.0)
    rendering.SetVisibility(False)
    before = {name: grab(view) for name, view in slicer_app.views.items()}
    for composite in composites:
        composite.SetForegroundOpacity(0.8)
    rendering.SetVisibility(True)
    after = {name: grab(view) for name, view in slicer_app.views.items()}
    # The extension's screenshot (EXTENSION_SCREENSHOTURLS) is this picture: `CTXAI_SCREENSHOT=path pytest ...`.
    mosaic = np.vstack([np.hstack([after["Red"], after["ThreeD"]]), np.hstack([after["Green"], after["Yellow"]])])
    from PIL import Image

    Image.fromarray(mosaic.astype(np.uint8)).save(os.environ.get("CTXAI_SCREENSHOT") or tmp_path / "views.png")

    for name, view in slicer_app.views.items():
        height, width, _ = after[name].shape
        changed = overlay_pixels(before[name], after[name])
        assert len(changed) > 20, f"{name}: the overlay is not visible"
        target = threed_pixel(view, ras, height) if name == "ThreeD" else slice_pixel(view, ras, height)
        distance = np.linalg.norm(changed - target, axis=1)
        scale = width / 10.0  # a tenth of the view: the defect's neighbourhood
        assert distance.min() < scale / 2, f"{name}: nothing drawn at the defect"
        assert np.median(distance) < scale, f"{name}: the overlay sits away from the defect"
        assert np.mean(distance > 4 * scale) < 0.05, f"{name}: the overlay spreads far from the defect"
