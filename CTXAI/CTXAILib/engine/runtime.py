"""Where and how a run executes: device choice, mixed precision, memory budget and out-of-memory back-off."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
from torch import nn

from ..errors import InputError

__all__ = ["resolve_device", "autocast", "MemoryBudget", "BatchSearch", "with_backoff", "is_out_of_memory",
           "activation_bytes", "PRECISIONS"]

PRECISIONS = ("fp32", "bf16", "fp16")
T = TypeVar("T")

_MIN_SEARCH = 8     # batch sizes always measured, however slow the machine (a busy CPU makes batch 1 look costly)
_SLOWER = 1.15      # a larger batch is kept unless its time per sample is clearly worse than the best so far


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise InputError(f"Unknown device {spec!r}. Use auto, cpu, cuda or cuda:N.") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"Device {spec!r} was asked for but no CUDA GPU is available to this PyTorch "
                             f"({torch.__version__}). Use --device cpu (or auto).")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"Device {spec!r} does not exist: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    elif device.type != "cpu":
        raise InputError(f"Device {spec!r} is not supported. Use auto, cpu, cuda or cuda:N.")
    return device


@contextlib.contextmanager
def autocast(device: torch.device, precision: str = "fp32") -> Iterator[None]:
    """Mixed precision on GPU only: on CPU, fp32 is both faster and exact enough for gradients."""
    if precision not in PRECISIONS:
        raise InputError(f"Unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}.")
    if precision == "fp32" or device.type != "cuda":
        yield
        return
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast("cuda", dtype=dtype):
        yield


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # CPU allocators and some CUDA paths raise plain RuntimeErrors.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def with_backoff(run: Callable[[int], T], batch_size: int, on_retry: Callable[[int], None] | None = None) -> T:
    """Call ``run(batch_size)``, halving the batch after each out-of-memory error until it fits.

    ``on_retry(new_batch_size)`` lets the caller undo partial bookkeeping before the retry.
    """
    while True:
        try:
            return run(batch_size)
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled, everything else re-raised
            if not is_out_of_memory(exc):
                raise
            if batch_size <= 1:
                raise InputError("Out of memory even with one sample per batch. Use a smaller ROI or patch, a "
                                 "lower memory budget for other programs, or run on the CPU (--device cpu).") from exc
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            batch_size = max(1, batch_size // 2)
            if on_retry is not None:
                on_retry(batch_size)


@dataclass
class MemoryBudget:
    """How many bytes a run may use for activations; batch sizes are derived from it.

    The default takes 60 % of the free GPU memory, or a quarter of the available RAM (capped at 8 GiB) on CPU.
    """

    bytes: int

    @classmethod
    def default(cls, device: torch.device, megabytes: float | None = None) -> MemoryBudget:
        if megabytes is not None:
            return cls(int(megabytes * 2**20))
        if device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(device)
            return cls(int(free * 0.6))
        import psutil

        return cls(int(min(psutil.virtual_memory().available * 0.25, 8 * 2**30)))

    def batch_size(self, per_sample_bytes: int, limit: int) -> int:
        return int(max(1, min(limit, self.bytes // max(per_sample_bytes, 1))))


class BatchSearch:
    """The batch size with the lowest time per sample, searched one timed call at a time, so that the calls can be
    made-up input (:meth:`Explainer._measure_batches`) or a pass's own real batches (the first prediction of a
    volume: its tiles are the measurements, and its progress starts with the first tile).

    Sizes double from 1 up to ``limit``. A new size's first call is not counted (it selects kernels and
    allocates); the best of the next few counts, because a shared machine only ever slows a call down. Sizes up
    to :data:`_MIN_SEARCH` are always measured; beyond, the search may take a tenth of the run it tunes
    (``needed`` samples), or two seconds. A larger batch is kept unless clearly slower per sample.

    >>> search = BatchSearch(limit=2, needed=10)
    >>> while not search.done:
    ...     batch = search.next()
    ...     search.record(batch, 0.01 * batch ** 0.5)   # a larger batch is cheaper per sample
    >>> search.best
    2
    """

    def __init__(self, limit: int, needed: float):
        self.limit, self.needed = max(1, int(limit)), float(needed)
        self.best, self.best_time, self.tried = 1, math.inf, 0
        self.done = self.limit == 1
        self._size, self._times, self._wanted = 1, [], 0
        self._allowed = 2.0
        self.started = time.perf_counter()

    def next(self) -> int:
        """The batch size of the next call: the size being measured, then the choice."""
        return self.best if self.done else self._size

    def record(self, batch: int, seconds: float) -> None:
        """Time of a call of ``batch`` samples; a call of another size (a pass's last, shorter batch) is ignored."""
        if self.done or batch != self._size:
            return
        if not self._wanted:  # the size's first call
            self._wanted = 3 if seconds < 0.1 else 2 if seconds < 1.0 else 1
            return
        self._times.append(seconds)
        if len(self._times) >= self._wanted:
            self._judge(min(self._times) / batch)

    def out_of_memory(self) -> None:
        """The size being measured does not fit: the choice so far stands."""
        self.tried, self.done = self.limit, True

    def _judge(self, per_sample: float) -> None:
        size = self._size
        if size == 1:
            self.best_time = per_sample
            self._allowed = max(2.0, 0.1 * self.needed * per_sample)
        # On a shared machine one measurement is noisy: a larger batch, which needs fewer calls, is kept unless it
        # is clearly slower; the best time so far stays the bar, so small losses cannot add up.
        elif per_sample <= _SLOWER * self.best_time:
            self.best, self.best_time = size, min(self.best_time, per_sample)
        elif size > _MIN_SEARCH and per_sample > 1.5 * self.best_time:
            self.tried, self.done = self.limit, True
            return
        self.tried = size
        self._size, self._times, self._wanted = size * 2, [], 0
        if self._size > self.limit or (self._size > _MIN_SEARCH
                                       and time.perf_counter() - self.started >= self._allowed):
            self.tried, self.done = self.limit, True


def activation_bytes(module: nn.Module, example: torch.Tensor) -> int:
    """Bytes of all leaf-module outputs for one sample: what a backward pass keeps alive, to size batches."""
    total = 0

    def count(_module, _inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output[:1].numel() * output.element_size()

    leaves = [m for m in module.modules() if not list(m.children())]
    if isinstance(module, torch.jit.ScriptModule) or not leaves:
        # Compiled graphs cannot be hooked: assume a deep 3-D net keeps ~64 input-sized maps per sample.
        return int(example[:1].numel() * example.element_size() * 64)
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.no_grad():
            module(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    return int(total)
