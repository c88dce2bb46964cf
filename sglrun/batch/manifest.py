"""The run manifest beside an output file (``OUTPUT.sglrun.json``), and the output's lock.

Why: an output is a checkpoint only if it can be checked. The manifest says what wrote it:
the input files (path, size, modification time), the program (path, function, a hash of its
source) and the id scheme; each record carries a digest of its own row. ``--resume`` compares
both with what it is given and refuses an output written from another input, program or id
scheme, or by something else than ``sglrun batch``. The manifest is replaced atomically
(written beside it, then renamed), so a kill at any moment leaves the old one or the new one.

The lock (``.OUTPUT.sglrun-lock``, an exclusive ``flock``) is held from a run's start to its
end, so a second process aiming at the same output fails at once, naming the holder's pid.
The holder removes it on release while still holding it; a process that locked a file that
was removed meanwhile notices (the path no longer names the file it holds) and tries again.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any

from sglrun.errors import InputError

__all__ = [
    "KIND",
    "MANIFEST_SUFFIX",
    "OutputLock",
    "manifest_path",
    "program_fingerprint",
    "read_manifest",
    "write_json_atomically",
    "write_manifest",
]

MANIFEST_SUFFIX = ".sglrun.json"
KIND = "sglrun batch output"

try:  # POSIX; elsewhere runs are not locked against each other
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def manifest_path(output: str) -> str:
    return output + MANIFEST_SUFFIX


def lock_path(output: str) -> str:
    directory, name = os.path.split(output)
    return os.path.join(directory, f".{name}.sglrun-lock")


def program_fingerprint(path: str, function: str) -> str:
    """A hash of the program file's source and the function's name."""
    digest = hashlib.sha256(function.encode() + b"\0")
    with open(path, "rb") as handle:
        digest.update(handle.read())
    return digest.hexdigest()[:16]


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_manifest(output: str) -> dict[str, Any] | None:
    """The manifest beside ``output``, or None when there is none (or it is not ours)."""
    try:
        with open(manifest_path(output), "rb") as handle:
            value = json.loads(handle.read())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) and value.get("kind") == KIND else None


def write_manifest(output: str, info: dict[str, Any]) -> None:
    """Replace the manifest atomically (a temporary file beside it, flushed, renamed)."""
    write_json_atomically(manifest_path(output), {"kind": KIND, **info})


def write_json_atomically(path: str, value: Any) -> None:
    """Replace ``path`` with ``value`` as JSON: a kill at any moment leaves the old file or
    the new one, never half of one. InputError names the file when it cannot be written."""
    temp = path + ".tmp"
    data = json.dumps(value, indent=2).encode() + b"\n"
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except OSError as exc:
        raise InputError(f"{path}: cannot write the run manifest ({exc.strerror or exc})") from None


class OutputLock:
    """This process alone writes ``output`` while it holds this (``InputError`` at once if
    another process does)."""

    def __init__(self, output: str) -> None:
        self.output = output
        self.path = lock_path(output)
        self._fd = -1
        for _ in range(20):  # only a lock file removed between open and flock makes it loop
            fd = self._open()
            if fcntl is None:
                self._fd = fd
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _read_pid(fd)
                os.close(fd)
                raise InputError(
                    f"{output}: another sglrun (pid {holder}) is writing this output; wait for "
                    "it to finish or choose another -o"
                ) from None
            if self._still_ours(fd):
                self._fd = fd
                break
            os.close(fd)
        else:  # pragma: no cover - a lock file that keeps vanishing
            raise InputError(f"{self.path}: could not take the output's lock")
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(
                f"{self.path}: cannot create the output's lock ({exc.strerror or exc})"
            ) from None

    def _still_ours(self, fd: int) -> bool:
        try:
            held, named = os.fstat(fd), os.stat(self.path)
        except OSError:
            return False
        return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)

    def release(self) -> None:
        """Remove the lock file (while still holding it) and unlock."""
        if self._fd < 0:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = -1


def _read_pid(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"
