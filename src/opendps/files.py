"""Atomic file writes, shared by the server (data directory), the CLI and the device SDK (no server imports).

A file is written to a temporary file in the same directory (created 0600, then given its mode), fsynced,
renamed over its final name, and the directory is fsynced: a crash or power cut leaves the old file or
the new one, never a partial one, and a key is never readable by others, even for a moment.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_temp(directory: Path, name: str, data: bytes, mode: int) -> Path:
    """A fully written, fsynced temporary file next to ``name`` (same file system, so it can be renamed over it)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def replace_all(directory: Path, contents: dict[str, tuple[bytes, int]]) -> None:
    """Write every ``name: (data, mode)`` to a temporary file first, then rename them in order, then fsync the
    directory: files that belong together (a key and its certificate) disagree only for a few renames."""
    temps: dict[str, Path] = {}
    try:
        for name, (data, mode) in contents.items():
            temps[name] = write_temp(directory, name, data, mode)
        for name, tmp in temps.items():
            os.replace(tmp, directory / name)
    finally:
        for tmp in temps.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    fsync_dir(directory)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` by ``data`` atomically (its directory is created if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_all(path.parent, {path.name: (data, mode)})


def create_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create ``path`` holding ``data`` unless it exists (``FileExistsError``, as ``O_EXCL``), atomically: the name
    appears only once the whole content is on disk, so a full disk or a crash leaves no file rather than an empty or
    truncated one (an empty master.key stopped every later start until an operator deleted it)."""
    tmp = write_temp(path.parent, path.name, data, mode)
    try:
        try:
            os.link(tmp, path)  # refuses an existing name, as O_EXCL does
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            # a file system without hard links: reserve the name, then put the whole file in its place
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_dir(path.parent)
