"""Where and how a run executes: device choice, mixed precision, memory budget and out-of-memory back-off."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
from torch import nn

from ..errors import InputError

__all__ = ["resolve_device", "autocast", "MemoryBudget", "with_backoff", "is_out_of_memory", "activation_bytes",
           "PRECISIONS"]

PRECISIONS = ("fp32", "bf16", "fp16")
T = TypeVar("T")


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
