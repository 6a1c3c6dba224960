"""Helpers for scene tests: volume nodes made the way Slicer's readers make them."""

from __future__ import annotations

import numpy as np


def add_volume_node(scene, volume, name="CT", cls="vtkMRMLScalarVolumeNode"):
    """A volume node made the way Slicer's readers make one: voxels, spacing, origin, directions."""
    import vtk
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass(cls, name)
    image = vtk.vtkImageData()
    k, j, i = volume.shape
    image.SetDimensions(i, j, k)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(np.ascontiguousarray(volume.array).ravel(),
                                                               deep=True))
    node.SetAndObserveImageData(image)
    node.SetSpacing(volume.spacing)
    node.SetOrigin(volume.origin)
    node.SetIJKToRASDirections(volume.directions)
    node.CreateDefaultDisplayNodes()
    return node
