"""What the sign of a map means. Each method declares one of :data:`SIGNS` in its :class:`MethodSpec`, and every
display (the Slicer overlay and its table, the report's pictures) takes its colours and legend from here, so that
a negative voxel is never read as "against the class" when it only says which way the score moves.

Torch-free: the scene bridge imports it in Slicer's GUI process.

>>> SIGNS["magnitude"].colormap, SIGNS["sensitivity"].signed
('heat', True)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Sign", "SIGNS"]


@dataclass(frozen=True)
class Sign:
    """One meaning of a map's sign: the colour map that shows it and the legend that says how to read it."""

    name: str
    colormap: str  # "diverging" (zero in the middle) or "heat" (zero at the bottom)
    legend: str
    what: str

    @property
    def signed(self) -> bool:
        return self.colormap == "diverging"


SIGNS = {sign.name: sign for sign in (
    Sign("attribution", "diverging", "red: for the target, blue: against (relative to the baseline)",
         "a share of the score's change from a baseline: positive supports the target, negative opposes it"),
    # Gradients are d score / d intensity, and every card's normalisation rises with the grey value.
    Sign("sensitivity", "diverging", "red: the score rises as the grey value rises, blue: it rises as the grey "
         "value falls", "the direction in which the voxel's grey value moves the score, not evidence for or "
         "against the target"),
    Sign("magnitude", "heat", "relevance (no sign)", "how much the voxel matters, without a direction"),
)}
