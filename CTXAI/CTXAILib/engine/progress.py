"""Progress reporting and cooperative cancellation for long attribution runs.

Every model evaluation of a run goes through :meth:`RunMonitor.tick`, once per batch. That single place counts the
samples done against the method's estimate (fraction and ETA for the progress bar) and checks the cancel flag, so any
method, Captum's included, stops within one batch of a cancel request without knowing about it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Protocol

from ..errors import Cancelled

__all__ = ["Progress", "ProgressCallback", "CancelToken", "RunMonitor"]


@dataclass(frozen=True)
class Progress:
    """One progress report: ``fraction`` in [0, 1], a short ``message``, ``eta_s`` seconds left (None: unknown)."""

    fraction: float
    message: str
    eta_s: float | None


ProgressCallback = Callable[[Progress], None]


class CancelToken(Protocol):
    """Anything with ``is_set()``: a ``threading.Event``, or the worker's cancel flag."""

    def is_set(self) -> bool: ...


class RunMonitor:
    """Counts evaluated samples against an estimate; reports progress at most every ``interval_s``; cancels.

    >>> reports = []
    >>> monitor = RunMonitor(total=4, callback=reports.append, interval_s=0)
    >>> monitor.tick(2)
    >>> round(reports[-1].fraction, 2)
    0.5
    """

    def __init__(self, total: float = 1.0, callback: ProgressCallback | None = None,
                 cancel: CancelToken | None = None, interval_s: float = 0.2, message: str = "explaining"):
        self.total = max(float(total), 1.0)
        self.done = 0.0
        self.callback = callback
        self.cancel = cancel
        self.interval_s = interval_s
        self.message = message
        self.started = time.perf_counter()
        self._last_report = float("-inf")

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("The run was cancelled; no result was produced and earlier results are unchanged.")

    def tick(self, samples: float = 1.0) -> None:
        """Called before each batch of ``samples`` model evaluations."""
        self.check_cancel()
        self.done += samples
        now = time.perf_counter()
        if self.callback is not None and now - self._last_report >= self.interval_s:
            self._last_report = now
            self.callback(self.snapshot())

    def rewind(self, done: float) -> None:
        """Forget samples counted since ``done`` (a batch retried at a smaller size after running out of memory)."""
        self.done = done

    def snapshot(self, message: str | None = None) -> Progress:
        # The count of samples is an estimate, so the fraction stays below 1 until the run says it is finished.
        fraction = min(self.done / self.total, 0.99)
        elapsed = time.perf_counter() - self.started
        eta = elapsed * (1.0 - fraction) / fraction if fraction > 0.01 else None
        return Progress(fraction, message or self.message, eta)

    def report(self, message: str, fraction: float | None = None) -> None:
        """Report a stage change (loading, predicting, writing) immediately."""
        if self.callback is not None:
            snap = self.snapshot(message)
            if fraction is not None:
                snap = Progress(fraction, message, snap.eta_s if fraction < 1 else 0.0)
            self.callback(snap)
            self._last_report = time.perf_counter()
