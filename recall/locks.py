"""File locks (fcntl): one writer per run directory, and one process at a time where two would race.

The operating system releases a lock when its process ends, however it ends (kill -9 included), so a lock never
outlives its holder. A directory's lock file lives inside the directory it guards (`<dir>/.lock`): a refused
command, which never made the directory, leaves no lock behind. Lock files stay (removing one would race with a
process about to take it); while held they hold the holder's pid, so a refusal can name the process in the way, and
they are emptied when released (a directory DVC caches holds the same empty file after every run).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from recall.errors import UserError


LOCK_NAME = ".lock"


def lock_file_of(directory: Path) -> Path:
    """The lock file of a directory: inside it, `<dir>/.lock`."""
    return Path(directory) / LOCK_NAME


class DirectoryLock:
    """An exclusive, non-blocking lock on `directory` (created if needed), held until `release()` or the end of the
    process."""

    def __init__(self, directory: Path, what: str = "a `recall run`", option: str = "run_dir"):
        self.directory, self.what, self.option = Path(directory), what, option
        self.path = lock_file_of(self.directory)
        self._fd: int | None = None
        self._writable = True

    def acquire(self) -> DirectoryLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            self._writable = True
        except PermissionError:  # a read-only file (e.g. linked from DVC's cache): a lock still, without the pid
            fd = os.open(self.path, os.O_RDONLY)
            self._writable = False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.directory} is in use by process {holder} ({self.what} writing there); wait for "
                            f"it to finish or stop it, or pass another {self.option}=") from None
        if self._writable:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            if self._writable:
                os.ftruncate(self._fd, 0)  # no stale pid: the file is the same after every run
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[None]:
    """Wait for, then hold, an exclusive lock on `path` (created if needed): e.g. the first-time setup of a
    database that two processes must not run at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
