"""Errors raised by the CTXAI engine.

Every error says what is wrong, where, and how to fix it, in one message an analyst can act on. The classes let
callers (the Slicer panel, the worker, the CLI) tell the kinds apart without parsing text.
"""

from __future__ import annotations

__all__ = [
    "CTXAIError",
    "Cancelled",
    "InputError",
    "LayerError",
    "MethodError",
    "ModelError",
    "OutputError",
    "ProtocolError",
    "RegionError",
    "SettingError",
    "TargetError",
    "WorkerLost",
]


class CTXAIError(Exception):
    """Base class of every error the engine raises on purpose."""


class InputError(CTXAIError, ValueError):
    """The volume cannot be explained as given (shape, channels, non-finite voxels, unreadable file)."""


class ModelError(CTXAIError, ValueError):
    """The model file or its model card is missing, corrupt, inconsistent or unsafe to load."""


class OutputError(CTXAIError, OSError):
    """The output folder cannot be written, would replace an input, or holds another run's files."""


class ProtocolError(CTXAIError, ValueError):
    """A worker request is malformed: not a JSON object, an unknown command, a missing field, a path outside the
    exchange folder."""


class LayerError(CTXAIError, ValueError):
    """A layer name does not exist in the model, or cannot be used by the chosen method."""


class TargetError(CTXAIError, ValueError):
    """The target (class, contrast) does not fit the model."""


class RegionError(TargetError):
    """The region of a target (IJK box, mask, clicked voxel) is empty or outside the volume."""


class MethodError(CTXAIError, ValueError):
    """The method is unknown or cannot run on this model (for example: no gradient for a gradient method)."""


class SettingError(MethodError):
    """A method setting is unknown, of the wrong type or out of its range."""


class Cancelled(CTXAIError):
    """The run was cancelled by the caller; nothing was produced."""


class WorkerLost(CTXAIError):
    """A batch worker process died (killed, out of memory); what it finished is kept and a re-run resumes."""
