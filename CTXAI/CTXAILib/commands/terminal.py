"""Progress on a terminal, for the sub-commands that run long."""

from __future__ import annotations

import sys

__all__ = ["TerminalProgress"]


class TerminalProgress:
    """A one-line progress bar with ETA on stderr."""

    def __init__(self, stream=None, width: int = 30):
        # The stream of the moment, not the one at import: a caller (pytest, a log redirect) may have replaced it.
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.active = self.stream.isatty()
        self._last = ""
        self._last_stage = None

    def __call__(self, progress) -> None:
        filled = int(progress.fraction * self.width)
        eta = "" if progress.eta_s is None else f" ETA {progress.eta_s:5.0f}s"
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {progress.fraction * 100:5.1f}% {progress.message}{eta}"
        if self.active:
            self.stream.write("\r" + line.ljust(len(self._last)))
        elif progress.message != self._last_stage:
            self.stream.write(line + "\n")  # a log file gets one line per stage, not a flood
        self.stream.flush()
        self._last = line
        self._last_stage = progress.message

    def close(self) -> None:
        if self.active and self._last:
            self.stream.write("\n")
            self.stream.flush()
