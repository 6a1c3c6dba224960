"""Input files checked before they are opened: a device, a FIFO or a folder given as a model or a volume would
hang a reader (``/dev/zero`` never ends) or fail deep inside it with a traceback; a damaged archive would load; a
file's digest is what records and cards name it by."""

from __future__ import annotations

import hashlib
import os
import stat
import zipfile
from pathlib import Path

from ..errors import CTXAIError, ModelError

__all__ = ["regular_file", "check_archive", "sha256_file", "sha256_path"]


def regular_file(path: str | os.PathLike, what: str, error: type[CTXAIError]) -> Path:
    """``path`` when it names an existing regular file (after links); else ``error`` saying what it is instead.

    >>> regular_file("/dev", "Volume file", CTXAIError)
    Traceback (most recent call last):
    ...
    CTXAILib.errors.CTXAIError: Volume file /dev is a directory, not a regular file. Give the path of the file itself.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist. Check the path.") from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror}). Check the path and its permissions.") from None
    if stat.S_ISREG(mode):
        return path
    kind = ("a directory" if stat.S_ISDIR(mode) else "a named pipe (FIFO)" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket" if stat.S_ISSOCK(mode) else
            "not a plain file")
    raise error(f"{what} {path} is {kind}, not a regular file. Give the path of the file itself.")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (model weights and run outputs run to gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, or of a folder (a DICOM series, TIFF slices, a MONAI bundle, an nnU-Net results
    folder): of every file's relative name and sha256 in sorted order, so a changed, added or removed file shows."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    digest = hashlib.sha256()
    for member in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{member.relative_to(path).as_posix()}\0{sha256_file(member)}\n".encode())
    return digest.hexdigest()


def check_archive(path: Path) -> None:
    """Refuse a zip archive (TorchScript and torch.save both write one) whose members fail their CRC: torch reads
    tensors without checking it, so a damaged file would load and predict garbage without a word."""
    with open(path, "rb") as handle:
        is_zip = handle.read(4) == b"PK\x03\x04"
    if not is_zip:
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError) as exc:
        raise ModelError(f"Model file {path} is a damaged or truncated archive ({exc}). Copy the file again or "
                         "re-export the model.") from exc
    if damaged is not None:
        raise ModelError(f"Model file {path} is damaged: member {damaged!r} of its archive fails its CRC check. "
                         "Copy the file again or re-export the model.")
