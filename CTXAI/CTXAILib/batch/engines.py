"""Where a batch's tasks run: a local process pool (the embedded default) or a Ray cluster.

Each engine starts its workers with :func:`.work.start_worker` (the model is loaded once per worker process, not
once per task) and hands them :func:`.work.call` tasks; ``map`` yields ``(index, outcome)`` as tasks finish.

- ``local``: :class:`concurrent.futures.ProcessPoolExecutor` (spawned processes), one worker per GPU, else a CPU
  share (a worker per 4 cores, each with its share of torch threads); no server and no port.
- ``ray``: one Ray actor per worker holding the model, ``num_gpus=1`` each when the cluster has GPUs; connects to
  ``--address`` or to a Ray already initialised in this process, else starts a local one.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterator

from ..errors import InputError, WorkerLost
from . import work

__all__ = ["ENGINES", "Engine", "get_engine", "cpu_share", "import_ray"]

_CORES_PER_WORKER = 4


def import_ray(local: bool):
    """The ``ray`` module; ``local``: set up so that a Ray started here binds to the loopback address only.

    On Linux Ray advertises the node's network address even for a one-machine Ray; with its cluster mode off (the
    switch Ray reads when it is imported) it uses 127.0.0.1, so a local batch opens no port beyond this machine."""
    if local:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise InputError("--engine ray needs Ray: pip install 'ray>=2.9' (or ctxai[cluster]), or use "
                         "--engine local.") from None
    return ray


def cpu_share(cores: int, workers: int | None) -> tuple[int, int]:
    """``(workers, torch threads per worker)`` for ``cores`` CPU cores: a worker per 4 cores unless given.

    >>> cpu_share(16, None), cpu_share(2, None), cpu_share(2, 2)
    ((4, 4), (1, 2), (2, 1))
    """
    count = workers or max(1, cores // _CORES_PER_WORKER)
    return count, max(1, cores // count)


class Engine:
    """A pool of workers, each holding the model; a context manager that shuts the workers down on exit."""

    name = ""

    def __init__(self, setup: dict[str, Any], workers: int | None = None, address: str | None = None):
        self.setup = setup
        self.workers = workers or 0
        self.address = address

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        raise NotImplementedError

    def map(self, task: str, payloads: list[dict[str, Any]]) -> Iterator[tuple[int, dict[str, Any]]]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "workers": self.workers, "threads": self.setup.get("threads"),
                "device": self.setup.get("device")}


ENGINES: dict[str, type[Engine]] = {}


def _register(cls: type[Engine]) -> type[Engine]:
    ENGINES[cls.name] = cls
    return cls


def get_engine(name: str) -> type[Engine]:
    if name not in ENGINES:
        raise InputError(f"Unknown batch engine {name!r}. Use one of: {', '.join(ENGINES)}.")
    return ENGINES[name]


def _watch_parent(parent: int) -> None:
    # A batch killed outright (SIGKILL) cannot stop its pool: each worker leaves when its parent is gone.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _start_local(setup: dict[str, Any], devices, parent: int) -> None:
    # Ctrl-C reaches the whole process group: the batch process stops the pool, its workers print no tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    work.start_worker(dict(setup, device=devices.get()))


@_register
class LocalEngine(Engine):
    """Spawned worker processes on this machine (spawned, not forked: the parent holds torch's threads)."""

    name = "local"

    def __init__(self, setup, workers=None, address=None):
        super().__init__(setup, workers, address)
        import torch

        gpus = torch.cuda.device_count() if setup.get("device", "auto") in ("auto", "cuda") else 0
        if gpus:
            self.workers = workers or gpus
            devices = [f"cuda:{n % gpus}" for n in range(self.workers)]
            self.setup = dict(setup, threads=max(1, (os.cpu_count() or 1) // self.workers))
        else:
            self.workers, threads = cpu_share(os.cpu_count() or 1, workers)
            devices = [setup.get("device", "auto")] * self.workers
            self.setup = dict(setup, threads=threads)
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        for device in devices:
            queue.put(device)
        self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=_start_local,
                                         initargs=(self.setup, queue, os.getpid()))

    def map(self, task, payloads):
        from concurrent.futures.process import BrokenProcessPool

        pending = {self._pool.submit(work.call, task, n, p) for n, p in enumerate(payloads)}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    yield future.result()
        except BrokenProcessPool:
            raise WorkerLost("A batch worker process died (killed or out of memory). What finished is kept: run the "
                             "same command again to resume, with fewer --workers if memory ran out.") from None
        finally:
            for future in pending:
                future.cancel()

    def close(self):
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Actor:
    """A Ray worker: the model loaded once in its process, then any number of tasks."""

    def __init__(self, setup: dict[str, Any]):
        work.start_worker(setup)

    def call(self, task: str, index: int, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        return work.call(task, index, payload)


@_register
class RayEngine(Engine):
    """Ray actors, on the cluster at ``address`` or a local Ray."""

    name = "ray"

    def __init__(self, setup, workers=None, address=None):
        super().__init__(setup, workers, address)
        ray = import_ray(local=address is None)
        self._ray = ray
        self._started = not ray.is_initialized()
        if self._started:
            # A remote cluster gets this package with the job; a local Ray finds it on this process's path.
            env = {"py_modules": [str(Path(__file__).resolve().parents[1])]} if address else None
            try:
                ray.init(address=address, include_dashboard=False, runtime_env=env, log_to_driver=False,
                         logging_level="ERROR")
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise InputError(f"Could not start or reach Ray at {address or 'a new local Ray'}: "
                                 f"{' '.join(str(exc).split())}. Check --address (the head node's host:port, or "
                                 "'auto'), or use --engine local.") from None
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if setup.get("device", "auto") in ("auto", "cuda") else 0
        if gpus:
            self.workers = workers or gpus
            options = {"num_gpus": 1, "num_cpus": 1}
            self.setup = dict(setup, device="cuda", threads=None)
        else:
            self.workers, threads = cpu_share(int(resources.get("CPU", 1)), workers)
            options = {"num_cpus": threads}
            self.setup = dict(setup, threads=threads)
        actor = ray.remote(_Actor).options(**options)
        self._actors = [actor.remote(self.setup) for _ in range(self.workers)]

    def map(self, task, payloads):
        ray = self._ray
        queue = list(enumerate(payloads))[::-1]
        running: dict[Any, Any] = {}
        try:
            while queue or running:
                idle = [a for a in self._actors if a not in running.values()]
                while queue and idle:
                    index, payload = queue.pop()
                    actor = idle.pop()
                    running[actor.call.remote(task, index, payload)] = actor
                done, _ = ray.wait(list(running), num_returns=1)
                running.pop(done[0])
                yield ray.get(done[0])
        except ray.exceptions.RayActorError as exc:
            raise WorkerLost(f"A Ray batch worker died ({' '.join(str(exc).split())[:200]}). What finished is kept: "
                             "run the same command again to resume.") from None

    def close(self):
        for actor in self._actors:
            self._ray.kill(actor)
        if self._started:
            self._ray.shutdown()
