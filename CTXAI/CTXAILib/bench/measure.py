"""Measuring inside a benchmark child: wall time with the GPU's queue drained, a process's peak resident memory,
the samples a run pushes through the network, the timed things of a timing child, and the limit (the plain cost of
a run's model passes)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

__all__ = ["elapsed", "rss_mib", "own_peak_mib", "counting", "competing_load", "Measure", "Limit"]


# Stop trying larger batches once one batch takes this long: on a CPU a 3-D network is already compute-bound there,
# and the search would cost more than the run it bounds. Sizes up to _MIN_SEARCH are measured whatever they take:
# on a busy machine each call pays a delay of its own, which makes batch 1 look slow and would stop the search there.
_SEARCH_BATCH_S = 4.0
_MIN_SEARCH = 8


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def elapsed(fn: Callable[[], Any], device) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` (the GPU's queue drained before and after) and its result."""
    _sync(device)
    started = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - started, result


def rss_mib(max_rss: int) -> float:
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return max_rss / (2**20 if sys.platform == "darwin" else 2**10)


def own_peak_mib(field: str = "VmHWM") -> float | None:
    """This process's peak (VmHWM) or current (VmRSS) resident memory from /proc, in MiB.

    Linux carries a parent's high-water mark into ru_maxrss across fork and exec, so a child of a parent that
    generated a 256³ phantom would report the parent's peak; /proc's counters belong to the child's own memory."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    return None


@contextlib.contextmanager
def counting(module, counts: list[int]) -> Iterator[None]:
    """Record the batch size of every call of ``module``: how many samples a run pushed through the network."""
    handle = module.register_forward_hook(lambda _m, inputs, _o: counts.append(int(inputs[0].shape[0])))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def competing_load(processes: int) -> Iterator[None]:
    """``processes`` busy Python processes (each spins one core) for the duration: a machine shared with others."""
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(processes)]
    try:
        yield
    finally:
        for process in busy:
            process.kill()
        for process in busy:
            process.wait()


@dataclass
class Measure:
    """One timed thing of a timing child: ``run()`` returns its seconds; ``warm()`` prepares it untimed."""

    key: str
    run: Callable[[], float]
    warm: Callable[[], Any] | None
    warm_up: str
    repeats: int
    times: list[float] = field(default_factory=list)
    cuda_peaks: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        return {"times_s": self.times, "repeats": self.repeats, "warm_up": self.warm_up,
                "cuda_peak_mib": max(self.cuda_peaks) if self.cuda_peaks else None, **self.extra}


class Limit:
    """The plain cost of a run's model passes: ``passes`` times the raw network's best time per sample."""

    def __init__(self, network, x, class_index: int, gradient: bool, passes: float, batches: Sequence[int],
                 device, precision: str):
        self.network, self.x, self.class_index = network, x, class_index
        self.gradient, self.passes, self.device, self.precision = gradient, passes, device, precision
        self.batches = [b for b in batches if b <= max(1.0, passes)] or [1]
        self.per_sample: dict[int, float] = {}
        self.best = 1

    def _once(self, batch: int) -> float:
        import torch

        from ..engine.runtime import autocast

        x = self.x.expand(batch, *self.x.shape[1:]).clone().requires_grad_(self.gradient)

        def step() -> None:
            with torch.set_grad_enabled(self.gradient), autocast(self.device, self.precision):
                output = self.network(x)
            if self.gradient:
                output[:, self.class_index].float().sum().backward()

        return elapsed(step, self.device)[0]

    def search(self) -> None:
        """Time each batch size (best of two) until one runs out of memory or, from :data:`_MIN_SEARCH` on, takes
        too long."""
        from ..engine.runtime import is_out_of_memory

        for batch in self.batches:
            try:
                seconds = min(self._once(batch), self._once(batch))
            except Exception as exc:  # noqa: BLE001 - out of memory ends the search, anything else is a bug
                if not is_out_of_memory(exc):
                    raise
                break
            self.per_sample[batch] = seconds / batch
            if seconds / batch < self.per_sample.get(self.best, float("inf")):
                self.best = batch
            if seconds > _SEARCH_BATCH_S and batch >= _MIN_SEARCH:
                break

    def run(self) -> float:
        return self._once(self.best) / self.best * self.passes

    def describe(self) -> dict[str, Any]:
        return {"pass": "forward+backward" if self.gradient else "forward", "passes": self.passes,
                "best_batch": self.best, "per_sample_s_by_batch": {str(b): s for b, s in self.per_sample.items()}}
