"""File locks (fcntl): one writer per run directory, and one process at a time where two would race.

The operating system releases a lock when its process ends, however it ends (kill -9 included), so a lock never
outlives its holder. Lock files stay behind (removing one would race with a process about to take it); they hold
the pid of the last holder, so a refusal can name the process in the way.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from recall.errors import UserError


def lock_file_of(directory: Path) -> Path:
    """The lock file of a directory: a hidden sibling (`<parent>/.<name>.lock`), outside whatever DVC tracks in
    the directory itself."""
    directory = Path(directory)
    return directory.parent / f".{directory.name}.lock"


class DirectoryLock:
    """An exclusive, non-blocking lock on `directory`, held until `release()` or the end of the process."""

    def __init__(self, directory: Path, what: str = "a `recall run`"):
        self.directory, self.what = Path(directory), what
        self.path = lock_file_of(self.directory)
        self._fd: int | None = None

    def acquire(self) -> DirectoryLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{self.directory} is in use by process {holder} ({self.what} writing there); wait for "
                            "it to finish or stop it, or pass another run_dir=") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
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
