"""The CTXAI panel's code, kept apart from ``CTXAI.py`` so that the module file only wires things.

``widget``: the panel (``CTXAIWidget``); ``logic``: the console API that the panel uses too (``CTXAILogic``);
``parameters``: the panel's state (``CTXAIParameterNode`` and its enums); ``selftest``: the self-test inside Slicer
(``CTXAITest``); ``connectors``: parameterNodeWrapper connectors for the widgets filled at run time; ``text``: what
the panel says; ``dependencies``: installing the worker's Python packages inside Slicer; ``reloading``: re-importing
the packages on Reload. They never import torch, and import ``CTXAILib`` lazily.
"""
