"""The module's Qt-free logic end to end: real MRML scene (slicer-core), real worker subprocess, real models."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

from CTXAILib.worker.client import WorkerError
from CTXAILib.scene.bridge import find_runs
from CTXAILib.scene.session import ExplainRequest, ExplainSession

from mrml_helpers import add_volume_node


@pytest.fixture
def session(slicer_app):
    session = ExplainSession(slicer_app.scene, volume_rendering_logic=slicer_app.vr_logic)
    yield session
    session.shutdown()


def node_ids(scene):
    return {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}


def matrix(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_explain_adds_a_shown_run(session, slicer_app, volume, unet_card, tmp_path):
    scene = slicer_app.scene
    ct = add_volume_node(scene, volume)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    centre = matrix(ct) @ np.array([16, 16, 16, 1.0])
    roi.SetCenter(*centre[:3])
    roi.SetSize(2.0, 2.0, 2.0)
    seen = []
    run = session.explain(ExplainRequest(ct.GetID(), str(unet_card), "integrated_gradients", "defect", where="roi",
                                         roi=roi.GetID(), settings={"steps": 8}, device="cpu", opacity=0.4),
                          progress=seen.append)
    assert seen and all(0 <= e.fraction <= 1 for e in seen)
    attribution = scene.GetNodeByID(run.attribution)
    np.testing.assert_array_equal(matrix(attribution), matrix(ct))
    assert scene.GetNodeByID("vtkMRMLSliceCompositeNodeYellow").GetForegroundVolumeID() == run.attribution
    assert run.confidence is not None and run.explanation["target"]["region"].startswith("IJK box")
    assert run.explanation["request"]["where"] == "roi"
    assert not list(session.client.exchange.glob("*.npy")), "exchange files were left behind"
    # The panel's Report button: the page is made in this process from the run's nodes and the worker's record.
    from CTXAILib.records.html import write_record_page
    from CTXAILib.scene.bridge import volume_from_node

    page = write_record_page(run.explanation["record"], volume_from_node(ct), volume_from_node(attribution),
                             tmp_path / "run.html", name="run").read_text(encoding="utf-8")
    assert run.explanation["record"]["input"]["sha256"] in page and 'id="triplanar"' in page


def test_point_picks_the_predicted_component(session, slicer_app, volume, unet_card):
    from CTXAILib import Explainer

    probabilities = Explainer(unet_card, device="cpu").segmentation_probabilities(
        Explainer(unet_card, device="cpu").prepare(volume))
    k, j, i = np.argwhere(probabilities.argmax(axis=0) == 1)[0]
    scene = slicer_app.scene
    ct = add_volume_node(scene, volume)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint((matrix(ct) @ np.array([i, j, k, 1.0]))[:3])
    run = session.explain(ExplainRequest(ct.GetID(), str(unet_card), "gradcam", "defect", where="point",
                                         point=points.GetID(), device="cpu"))
    assert run.explanation["target"]["region"].startswith("predicted component at voxel")


def test_failed_and_cancelled_runs_leave_the_scene_as_it_was(session, slicer_app, volume, classifier_card):
    scene = slicer_app.scene
    ct = add_volume_node(scene, volume)
    first = session.explain(ExplainRequest(ct.GetID(), str(classifier_card), "saliency", "pore", device="cpu"))
    before = node_ids(scene)
    with pytest.raises(WorkerError, match="Class 'void' is not predicted"):
        session.explain(ExplainRequest(ct.GetID(), str(classifier_card), "saliency", "void", device="cpu"))
    assert node_ids(scene) == before
    job = session.start(ExplainRequest(ct.GetID(), str(classifier_card), "integrated_gradients", "pore",
                                       settings={"steps": 1024}, device="cpu"))
    events = []
    while not any(e.kind == "progress" and e.fraction > 0.01 for e in events):
        events += session.poll()
        time.sleep(0.02)
    session.cancel(job)
    while not any(e.kind in ("cancelled", "result", "error") for e in events):
        events += session.poll()
        time.sleep(0.02)
    assert events[-1].kind == "cancelled" and not session.busy
    assert node_ids(scene) == before
    assert [run.attribution for run in find_runs(scene)] == [first.attribution]


def test_missing_inputs_are_refused_before_any_work(session, slicer_app, volume, unet_card):
    from CTXAILib import InputError, RegionError

    scene = slicer_app.scene
    ct = add_volume_node(scene, volume)
    with pytest.raises(InputError, match="No input volume is selected"):
        session.start(ExplainRequest("", str(unet_card), "gradcam"))
    with pytest.raises(InputError, match="No ROI is selected"):
        session.start(ExplainRequest(ct.GetID(), str(unet_card), "gradcam", where="roi"))
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    with pytest.raises(RegionError, match="has no points"):
        session.start(ExplainRequest(ct.GetID(), str(unet_card), "gradcam", where="point", point=points.GetID()))
    assert not session.busy


def test_crashed_worker_is_reported_then_replaced(session, slicer_app, volume, classifier_card):
    scene = slicer_app.scene
    ct = add_volume_node(scene, volume)
    job = session.start(ExplainRequest(ct.GetID(), str(classifier_card), "integrated_gradients", "pore",
                                       settings={"steps": 1024}, device="cpu"))
    events = []
    while not any(e.kind == "progress" for e in events):
        events += session.poll()
        time.sleep(0.02)
    os.kill(session.client.process.pid, signal.SIGKILL)
    while not any(e.kind == "error" for e in events):
        events += session.poll()
        time.sleep(0.02)
    assert events[-1].job == job and events[-1].error_type == "WorkerCrashed"
    run = session.explain(ExplainRequest(ct.GetID(), str(classifier_card), "gradcam", "pore", device="cpu"))
    assert scene.GetNodeByID(run.attribution) is not None and session.client.starts == 2


def test_model_description_comes_from_the_worker(session, unet_card):
    description = session.describe_model(str(unet_card), "cpu")
    assert description["card"]["class_names"] == ["background", "defect"]
    assert session.describe_model(str(unet_card), "cpu") is description  # cached per file version
    assert any(m["name"] == "confidence" and m["segmentation_only"] for m in session.methods())


def test_stopping_the_worker_ends_a_blocking_explain(session, slicer_app, volume, classifier_card):
    """Scene close, module reload and widget cleanup stop the worker while the console waits in explain()."""
    ct = add_volume_node(slicer_app.scene, volume)
    stopped_at = []

    def idle():
        if session.busy and not stopped_at:
            stopped_at.append(time.monotonic())
            session.shutdown()
        assert not stopped_at or time.monotonic() - stopped_at[0] < 30, "explain() never returned"

    with pytest.raises(WorkerError) as info:
        session.explain(ExplainRequest(ct.GetID(), str(classifier_card), "integrated_gradients", "pore",
                                       settings={"steps": 1024}, device="cpu"), idle=idle)
    assert info.value.kind == "WorkerStopped"
    assert not session.busy and session.poll() == []


def test_a_failing_callback_does_not_block_later_runs(session, slicer_app, volume, classifier_card):
    ct = add_volume_node(slicer_app.scene, volume)
    request = ExplainRequest(ct.GetID(), str(classifier_card), "integrated_gradients", "pore",
                             settings={"steps": 256}, device="cpu")

    def broken(event):
        raise ZeroDivisionError("a console callback's own bug")

    with pytest.raises(ZeroDivisionError):
        session.explain(request, progress=broken)
    assert not session.busy
    run = session.explain(ExplainRequest(ct.GetID(), str(classifier_card), "saliency", "pore", device="cpu"))
    assert slicer_app.scene.GetNodeByID(run.attribution) is not None
    assert not list(session.client.exchange.glob("input-*.npy")), "the abandoned run's input was left behind"


def test_a_label_map_is_not_an_input(session, slicer_app, volume, unet_card):
    from CTXAILib import InputError

    labels = add_volume_node(slicer_app.scene, volume.with_array((volume.array > 0).astype(np.uint8)), "mask",
                             cls="vtkMRMLLabelMapVolumeNode")
    with pytest.raises(InputError, match="is a label map, not a CT volume"):
        session.start(ExplainRequest(labels.GetID(), str(unet_card), "gradcam"))
    assert not session.busy
