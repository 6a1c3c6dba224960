"""The Slicer side without Qt: the MRML bridge (:mod:`.bridge`) and the module's session logic (:mod:`.session`).
It imports Slicer's MRML (real Slicer or ``slicer-core``) and VTK lazily, and the worker client; never torch."""
