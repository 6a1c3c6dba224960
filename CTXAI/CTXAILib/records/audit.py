"""The audit log: one JSON line per run, hash-chained, appended under an exclusive file lock (seed 002).

Each entry says who ran what on which input with which model, and the sha256 of every file the run wrote; it holds
hashes, never voxels. ``prev`` is the sha256 of the previous line's bytes (the first entry's is :data:`GENESIS`), so
a removed, inserted or reordered entry breaks the chain; ``entry_sha256``, the line's last field, is the digest of
the line's bytes before it, so an edit of the last entry, which no later line vouches for, is caught too. Appending reads the last line, writes the
new one and fsyncs it inside one lock, so that concurrent writers (batch workers, a panel and a console) never
interleave or lose an entry.

Only the standard library: the log is written by the torch worker and checked on machines without torch.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..engine.files import regular_file, sha256_file
from ..errors import InputError, OutputError

__all__ = ["GENESIS", "LOG_NAME", "LOG_ENV", "AuditCheck", "audit_entry", "append_entry", "claim_log", "log_path",
           "user_log_path", "verify_log"]

GENESIS = "0" * 64
LOG_NAME = "ctxai-audit.jsonl"
LOG_ENV = "CTXAI_AUDIT_LOG"
_VERSIONS = ("torch", "captum", "ctxai", "numpy", "python")
_TAIL_CHUNK = 1 << 16


def user_log_path() -> Path:
    """The per-user log of the Slicer panel and console: the platform's user data folder, ``CTXAI/audit.jsonl``."""
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "CTXAI" / "audit.jsonl"


def log_path(given: str | os.PathLike | None = None, out_dir: str | os.PathLike | None = None) -> Path:
    """Where a run logs: ``given``, else ``$CTXAI_AUDIT_LOG``, else beside the outputs (``out_dir``'s parent), else
    the per-user log."""
    if given:
        return Path(given)
    if os.environ.get(LOG_ENV):
        return Path(os.environ[LOG_ENV])
    if out_dir is not None:
        return Path(out_dir).absolute().parent / LOG_NAME
    return user_log_path()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        return str(os.getuid()) if hasattr(os, "getuid") else "unknown"


def audit_entry(record: dict[str, Any], outputs: dict[str, str | os.PathLike]) -> dict[str, Any]:
    """The entry of one run from its run record (:func:`~CTXAILib.records.record.run_record`) and the files it
    wrote (name -> path); the files are hashed now."""
    model = record.get("model", {})
    method = record.get("method", {})
    versions = record.get("versions", {})
    return {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds"),
        "user": _user(), "host": socket.gethostname(),
        "input": {"sha256": record.get("input", {}).get("sha256"),
                  "file_sha256": record.get("sources", {}).get("volume", {}).get("sha256")},
        "model": {"name": model.get("name"), "sha256": model.get("sha256"), "card": model.get("card")},
        "method": method.get("name"), "settings": method.get("settings"), "layer": method.get("layer"),
        "target": record.get("target"), "seed": record.get("seed"),
        "versions": {name: versions.get(name) for name in _VERSIONS},
        "device": record.get("device"), "precision": record.get("precision"),
        "outputs": {name: {"path": str(Path(path).absolute()), "sha256": sha256_file(path)}
                    for name, path in outputs.items()},
        "verdict": (record.get("verdict") or {}).get("verdict"),
    }


_SEALED = re.compile(rb'(\{.*),"entry_sha256":"([0-9a-f]{64})"\}', re.DOTALL)


def _sealed_line(body: dict[str, Any]) -> bytes:
    """The entry as one line: its JSON, then ``entry_sha256`` over exactly those bytes as the last field."""
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()
    return text[:-1] + b',"entry_sha256":"' + hashlib.sha256(text).hexdigest().encode() + b'"}'


def _last_line(handle) -> bytes | None:
    """The last complete line of an open binary file (without its newline); None when the file is empty."""
    end = handle.seek(0, os.SEEK_END)
    if end == 0:
        return None
    handle.seek(end - 1)
    if handle.read(1) != b"\n":
        raise OutputError(f"Audit log {handle.name} ends inside an entry: a writer was stopped mid-line. Run `ctxai "
                          "audit verify` on it, keep it as evidence and log to a new file (--audit-log).")
    tail = b""
    position = end - 1
    while position > 0:
        start = max(0, position - _TAIL_CHUNK)
        handle.seek(start)
        tail = handle.read(position - start) + tail
        newline = tail.rfind(b"\n")
        if newline >= 0:
            return tail[newline + 1:]
        position = start
    return tail


class _locked:
    """An exclusive lock on an open file, held across processes: ``flock`` on POSIX, ``msvcrt`` on Windows."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        if sys.platform == "win32":
            import msvcrt

            self.handle.seek(0)
            while True:
                try:
                    msvcrt.locking(self.handle.fileno(), msvcrt.LK_LOCK, 1)
                    break
                except OSError:  # LK_LOCK gives up after 10 s: a long batch may hold it longer
                    time.sleep(0.05)
        else:
            import fcntl

            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX)
        return self.handle

    def __exit__(self, *exc) -> None:
        if sys.platform == "win32":
            import msvcrt

            self.handle.seek(0)
            msvcrt.locking(self.handle.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)


def _open(log: Path):
    log.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0), 0o644)
    return os.fdopen(fd, "r+b")


def claim_log(log: str | os.PathLike) -> Path:
    """Check before computing that a run can append to ``log`` (created empty when missing); returns it. Raises
    :class:`OutputError` otherwise, so that a long run never ends unlogged."""
    log = Path(log)
    try:
        _open(log).close()
    except OSError as exc:
        raise OutputError(f"Audit log {log} cannot be written ({exc.strerror or exc}). Make it writable or give "
                          f"another one with --audit-log (or ${LOG_ENV}).") from None
    return log


def append_entry(log: str | os.PathLike, entry: dict[str, Any]) -> dict[str, Any]:
    """Append ``entry`` to the log at ``log`` (created with its folder when missing); returns it as written, with
    ``prev`` and ``entry_sha256``. Raises :class:`OutputError` when the log cannot be written."""
    log = Path(log)
    try:
        with _open(log) as handle, _locked(handle):
            last = _last_line(handle)
            body = {**entry, "prev": GENESIS if last is None else hashlib.sha256(last).hexdigest()}
            line = _sealed_line(body)
            handle.write(line + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"Could not append to audit log {log}: {exc.strerror or exc}. Make it writable or "
                          f"give another one with --audit-log (or ${LOG_ENV}).") from None
    return json.loads(line)


@dataclass
class AuditCheck:
    """What :func:`verify_log` found: entries and output files checked, files no longer on disk, and the first
    broken entry (1-based line number and what broke) or None when the log is intact."""

    entries: int = 0
    files_checked: int = 0
    files_missing: list[str] = field(default_factory=list)
    broken_line: int | None = None
    problem: str | None = None

    @property
    def intact(self) -> bool:
        return self.broken_line is None


def _lines(log: Path) -> Iterator[tuple[int, bytes]]:
    with open(log, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            yield number, line


def verify_log(log: str | os.PathLike) -> AuditCheck:
    """Check the chain of ``log`` and every output file it lists that is still on disk, up to the first break."""
    log = regular_file(log, "Audit log", InputError)
    check = AuditCheck()
    expected = GENESIS
    for number, raw in _lines(log):
        def broken(what: str) -> AuditCheck:
            check.broken_line, check.problem = number, what
            return check

        if not raw.endswith(b"\n"):
            return broken("the last line is incomplete (a writer was stopped mid-line)")
        line = raw[:-1]
        sealed = _SEALED.fullmatch(line)
        if sealed is None:
            return broken("the entry does not end with its 'entry_sha256': the line was edited or damaged")
        if hashlib.sha256(sealed[1] + b"}").hexdigest().encode() != sealed[2]:
            return broken("the entry was changed after it was written (its bytes no longer have its sha256)")
        try:
            body = json.loads(line)
        except ValueError as exc:
            return broken(f"not a JSON entry ({exc.msg} at column {exc.colno}): the line was edited or damaged")
        if not isinstance(body, dict) or "prev" not in body:
            return broken("not an audit entry (no 'prev')")
        if body["prev"] != expected:
            return broken("'prev' is not the sha256 of the line before it: an entry before it was removed, "
                          "inserted, reordered or changed" if number > 1 else
                          "the first entry's 'prev' is not the genesis value: entries before it were removed")
        for name, output in (body.get("outputs") or {}).items():
            path = Path(output.get("path", ""))
            if not path.is_file():
                check.files_missing.append(str(path))
                continue
            check.files_checked += 1
            if sha256_file(path) != output.get("sha256"):
                return broken(f"output {name!r} {path} was changed since the run wrote it (sha256 differs)")
        check.entries += 1
        expected = hashlib.sha256(line).hexdigest()
    return check
