"""A real Slicer scene without Qt: trame-slicer's SlicerApp (slicer-core MRML, Slicer's logics and displayable
managers) with Red, Green, Yellow and 3-D views rendered offscreen through EGL."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


@pytest.fixture
def slicer_app():
    import vtk
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, NoScheduleRendering, ViewLayoutDefinition

    vtk.vtkObject.GlobalWarningDisplayOff()  # VTK 9.6 deprecation chatter from the interactors
    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    app.vr_logic = app.app_logic.GetModuleLogic("VolumeRendering")
    app.views = {}
    for tag, layout in (("Red", ViewLayoutDefinition.axial_view()), ("Green", ViewLayoutDefinition.coronal_view()),
                        ("Yellow", ViewLayoutDefinition.sagittal_view()),
                        ("ThreeD", ViewLayoutDefinition.threed_view())):
        view = app.view_manager.create_view(layout)
        # Render only when a test asks: re-rendering on every scene event is slow with software OpenGL.
        view.set_scheduled_render(NoScheduleRendering())
        view.render_window().SetSize(320, 320)
        view.interactor().UpdateSize(320, 320)
        app.views[tag] = view
    yield app
