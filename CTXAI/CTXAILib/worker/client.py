"""The client side of the worker (:mod:`.worker`): start it, send requests, poll replies without blocking.

Used by the Slicer module from its GUI thread (a QTimer calls :meth:`WorkerClient.poll`), by the console API and
by tests. It imports neither torch nor Qt. Replies are read by a background thread into a queue, so ``poll`` only
drains that queue and never waits. A worker that dies is noticed on the next poll: every request it still owed
gets a clear error, and the next request starts a fresh worker. Cancel asks the worker to stop at its next batch
and kills it if it has not answered within a grace period.
"""

from __future__ import annotations

import itertools
import json
import os
import queue
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..engine.geometry import Volume
from ..errors import Cancelled, CTXAIError

__all__ = ["WorkerClient", "WorkerError", "volume_message", "volume_from_message"]

EXCHANGE_PREFIX = "ctxai-"
OWNER_FILE = "owner.json"   # in each exchange folder: the client's and the worker's process ids


class WorkerError(CTXAIError):
    """An error reported by the worker (``kind`` is the engine's error class name) or its crash."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def volume_message(volume: Volume, path: Path) -> dict[str, Any]:
    """Write a volume's voxels to ``path`` (.npy) and describe its geometry for a request."""
    from .server import save_array

    save_array(volume.array, path)
    os.chmod(path, 0o600)  # the finished file gets the umask's permissions; scans stay private
    return {"path": str(path), "spacing": list(volume.spacing), "origin": list(volume.origin),
            "directions": volume.directions.tolist()}


def volume_from_message(message: dict[str, Any]) -> Volume:
    """Read a volume a reply describes. JSON keeps Python floats exactly, so the geometry is bit-identical."""
    return Volume(np.load(message["path"], allow_pickle=False), message["spacing"], message["origin"],
                  message["directions"])


class WorkerClient:
    """Owns one worker process and a private exchange folder.

    >>> client = WorkerClient()                                  # doctest: +SKIP
    >>> client.call("methods")[0]["name"]                        # doctest: +SKIP
    'saliency'
    """

    def __init__(self, command: list[str] | None = None, env: dict[str, str] | None = None,
                 startup_timeout_s: float = 120.0):
        self.command = command or [sys.executable, "-m", "CTXAILib.worker"]
        self.env = env
        self.startup_timeout_s = startup_timeout_s
        self.process: subprocess.Popen | None = None
        self._exchange: Path | None = None
        self._ids = itertools.count(1)
        self._replies: "queue.Queue[dict]" = queue.Queue()
        self._pending: dict[str, str] = {}      # job id -> command, for requests not answered yet
        self._cancel_deadline: dict[str, float] = {}
        self._stderr: deque[str] = deque(maxlen=40)
        self._stdout_noise: deque[str] = deque(maxlen=10)  # stdout lines that are not replies (a library's print)
        self._reader_done = threading.Event()
        self._stderr_done = threading.Event()
        self.starts = 0

    # --------------------------------------------------------------------------------------- exchange
    @property
    def exchange(self) -> Path:
        """The private folder for inputs and results (they may be proprietary scans), checked before every use.

        Created only here, by ``mkdtemp`` (0700, a new unguessable name), never re-created under a known name with
        the umask; :meth:`stop` removes it."""
        if self._exchange is None or not self._exchange.exists():
            self._exchange = Path(tempfile.mkdtemp(prefix=EXCHANGE_PREFIX))
        if os.name == "posix":
            info = os.lstat(self._exchange)
            if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) != 0o700:
                raise CTXAIError(f"The CTXAI exchange folder {self._exchange} is no longer private (mode "
                                 f"{stat.S_IMODE(info.st_mode):o}); CT data is not written there. Close and reopen "
                                 "the scene to get a new folder.")
        return self._exchange

    def _remove_stale_exchanges(self) -> None:
        """Remove exchange folders that earlier clients of this user left behind (Slicer crashed or was killed)."""
        for folder in Path(tempfile.gettempdir()).glob(EXCHANGE_PREFIX + "*"):
            try:
                if folder == self._exchange or (os.name == "posix" and folder.lstat().st_uid != os.getuid()):
                    continue
                owners = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # not ours, not a CTXAI folder, or a client that has not started its worker yet
            if not any(_process_alive(int(pid)) for pid in owners.values()):
                shutil.rmtree(folder, ignore_errors=True)

    def _write_owners(self) -> None:
        owner = self.exchange / OWNER_FILE
        descriptor = os.open(owner, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            json.dump({"client": os.getpid(), "worker": self.process.pid}, handle)

    # ---------------------------------------------------------------------------------------- process
    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.alive:
            return
        environment = dict(os.environ if self.env is None else self.env)
        # The worker must find CTXAILib wherever this client found it (Slicer puts module folders on sys.path).
        package_parent = str(Path(__file__).resolve().parents[2])
        environment["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, environment.get("PYTHONPATH")) if p)
        environment.setdefault("PYTHONUNBUFFERED", "1")
        self._remove_stale_exchanges()
        # Undecodable bytes (a library's message in the console's code page) must not stop a reader: a full
        # stderr pipe would block the worker.
        self.process = subprocess.Popen(
            self.command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            encoding="utf-8", errors="replace", bufsize=1, env=environment, cwd=self.exchange,
            **_process_options(own_group=True))
        self._write_owners()
        self.starts += 1
        self._replies = queue.Queue()
        self._reader_done = threading.Event()
        self._stderr_done = threading.Event()
        threading.Thread(target=self._read_stdout, args=(self.process,), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(self.process,), daemon=True).start()

    def _read_stdout(self, process: subprocess.Popen) -> None:
        for line in process.stdout:
            try:
                self._replies.put(json.loads(line))
            except json.JSONDecodeError:
                self._stdout_noise.append(line.rstrip())
        self._reader_done.set()  # every reply the worker wrote is in the queue now

    def _read_stderr(self, process: subprocess.Popen) -> None:
        for line in process.stderr:
            self._stderr.append(line.rstrip())
        self._stderr_done.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the worker to exit, kill it if it does not, and remove the exchange folder. Requests still
        unanswered get a ``WorkerStopped`` error on the next :meth:`poll`."""
        if self.process is not None:
            if self.alive:
                try:
                    # Runs in flight stop at their next batch, so the worker can read the shutdown soon.
                    for job in list(self._pending):
                        self.process.stdin.write(json.dumps({"cmd": "cancel", "id": job}) + "\n")
                    self.process.stdin.write(json.dumps({"cmd": "shutdown"}) + "\n")
                    self.process.stdin.flush()
                    self.process.wait(timeout_s)
                except (OSError, subprocess.TimeoutExpired):
                    self.kill()
            self.process = None
        if self._exchange is not None:
            shutil.rmtree(self._exchange, ignore_errors=True)
            self._exchange = None

    def kill(self) -> None:
        """Hard stop of the worker and anything it started (Slicer's PythonSlicer is a launcher)."""
        if self.process is None:
            return
        try:
            if os.name == "posix":
                os.killpg(self.process.pid, signal.SIGKILL)
            else:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True,
                               **_process_options())
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait()

    # --------------------------------------------------------------------------------------- requests
    def submit(self, cmd: str, **payload: Any) -> str:
        """Send a request; returns its id. Starts (or restarts) the worker when needed. Never blocks on work."""
        self.start()
        job = str(next(self._ids))
        message = {"id": job, "cmd": cmd, **payload}
        try:
            self.process.stdin.write(json.dumps(message) + "\n")
            self.process.stdin.flush()
        except OSError as exc:
            raise WorkerError("WorkerCrashed", f"Could not reach the CTXAI worker ({exc}); retry to restart "
                                               "it.") from exc
        self._pending[job] = cmd
        return job

    def cancel(self, job: str, grace_s: float = 10.0) -> None:
        """Ask for a cooperative stop; :meth:`poll` kills the worker if it has not stopped after ``grace_s``."""
        if job not in self._pending or not self.alive:
            return
        self.process.stdin.write(json.dumps({"cmd": "cancel", "id": job}) + "\n")
        self.process.stdin.flush()
        self._cancel_deadline[job] = time.monotonic() + grace_s

    def poll(self) -> list[dict[str, Any]]:
        """Replies received since the last call (never waits). Synthesises errors for a dead worker's jobs."""
        messages = []
        while True:
            try:
                message = self._replies.get_nowait()
            except queue.Empty:
                break
            if message.get("type") in ("result", "error", "cancelled"):
                self._pending.pop(str(message.get("id")), None)
                self._cancel_deadline.pop(str(message.get("id")), None)
            messages.append(message)
        now = time.monotonic()
        overdue = [job for job, deadline in self._cancel_deadline.items() if now > deadline]
        if overdue and self.alive:
            self.kill()
            for job in overdue:
                self._pending.pop(job, None)
                self._cancel_deadline.pop(job, None)
                messages.append({"id": job, "type": "cancelled", "forced": True})
        if self._pending and self.process is None:
            for job in list(self._pending):
                messages.append({"id": job, "type": "error", "error": "WorkerStopped",
                                 "message": "The CTXAI worker was stopped before this request finished."})
            self._pending.clear()
            self._cancel_deadline.clear()
        elif self._pending and not self.alive and self._reader_done.is_set() and self._replies.empty():
            code = self.process.returncode
            # The crash's reason is the worker's last stderr line: its reader may still be draining the pipe. A
            # pipe held open by a grandchild must not hang the GUI's poll, hence the bound.
            self._stderr_done.wait(1.0)
            # Stderr says why; stdout noise only when stderr is silent (the two readers race, so one deque would
            # make the reason whichever line came last).
            detail = next((line for lines in (self._stderr, self._stdout_noise) for line in reversed(lines)
                           if line.strip()), "")
            for job in list(self._pending):
                messages.append({"id": job, "type": "error", "error": "WorkerCrashed",
                                 "message": f"The CTXAI worker stopped unexpectedly (exit code {code}) and this run "
                                            f"was lost{': ' + detail if detail else ''}. Run it again: a new "
                                            "worker starts automatically."})
            self._pending.clear()
            self._cancel_deadline.clear()
        return messages

    def call(self, cmd: str, progress: Callable[[dict], None] | None = None, timeout_s: float | None = None,
             cancel: Any = None, **payload: Any) -> Any:
        """Blocking request: returns the result, raises :class:`WorkerError` or :class:`Cancelled`.

        ``progress`` gets each progress reply; ``cancel`` (anything with ``is_set()``) cancels the request.
        """
        job = self.submit(cmd, **payload)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        cancelled = False
        while True:
            for message in self.poll():
                if message.get("id") != job:
                    continue
                kind = message.get("type")
                if kind == "progress" and progress is not None:
                    progress(message)
                elif kind == "result":
                    return message["result"]
                elif kind == "cancelled":
                    raise Cancelled("The run was cancelled; no result was produced.")
                elif kind == "error":
                    raise WorkerError(message.get("error", "Error"), message.get("message", "unknown error"))
            if not cancelled and cancel is not None and cancel.is_set():
                self.cancel(job)
                cancelled = True
            if not cancelled and deadline is not None and time.monotonic() > deadline:
                self.cancel(job, grace_s=0.0)
                cancelled = True
            time.sleep(0.02)

    def stderr_tail(self) -> str:
        return "\n".join([*self._stderr, *self._stdout_noise])


def _process_options(own_group: bool = False) -> dict[str, Any]:
    """Popen options for the worker (``own_group``: its own process tree, files private) and its helpers.

    On Windows no console window, as Slicer's ``slicer.util.launchConsoleProcess`` starts processes: a console
    would appear beside Slicer, and closing it would kill the worker."""
    if os.name == "nt":
        info = subprocess.STARTUPINFO()
        info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
        info.wShowWindow = 0  # SW_HIDE
        return {"startupinfo": info, "creationflags": subprocess.CREATE_NO_WINDOW}
    # A session of its own lets kill() end the worker with what it started (PythonSlicer is a launcher); the
    # umask makes every file the worker writes 0600.
    return {"start_new_session": True, "umask": 0o077} if own_group else {}


def _process_alive(pid: int) -> bool:
    if os.name == "nt":
        import ctypes  # os.kill(pid, 0) would terminate the process on Windows

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        try:
            code = ctypes.c_ulong()
            kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True
