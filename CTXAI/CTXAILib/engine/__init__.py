"""The engine: everything that explains (model cards and loading, targets, the sliding window, exact geometry,
the method registry and its kernels). It imports nothing else of CTXAILib but :mod:`CTXAILib.errors`, and nothing
of Slicer, Qt or VTK, so the same code runs in the worker, the command line and the tests."""
