"""Qt and Slicer helpers of the CTXAI panel, kept apart from ``CTXAI.py`` so that the module file only wires things.

``connectors``: parameterNodeWrapper connectors for the widgets filled at run time; ``text``: what the panel says;
``dependencies``: installing the worker's Python packages inside Slicer; ``reloading``: re-importing the packages on
Reload. They never import torch, and import ``CTXAILib`` lazily as ``CTXAI.py`` does.
"""
