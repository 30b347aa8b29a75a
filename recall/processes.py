"""Processes that die with what started them: a DVC stage's command, and the workers it starts, end when `dvc repro`
(or `recall.stage_jobs`) ends, even by kill -9, instead of running on, orphaned, writing outputs nobody records.

On Linux the kernel does it (PR_SET_PDEATHSIG: SIGKILL when the parent ends). A stage's command may run under a
shell that does not exec it (`sh -c`, which DVC uses when $SHELL is not bash): the shell would outlive its own parent,
so a thread watches that the shell keeps the parent it had. Elsewhere `die_with_parent` does nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "fish"})
WATCH_SECONDS = 0.2


def _stat(pid: int) -> tuple[str, int] | None:
    """(command name, parent pid) of `pid` from /proc, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name, rest = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
    return name, int(rest[1])


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent(watch_shell: bool = True) -> None:
    """End this process (SIGKILL) when its parent ends; with `watch_shell`, when the parent is a shell, also when
    the shell's own parent ends. For a stage's command and for the worker processes a command starts."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return
    if os.getppid() != parent:  # the parent ended before the request: nobody will send the signal
        _kill_self()
    stat = _stat(parent)
    if watch_shell and stat is not None and stat[0] in SHELLS and stat[1] > 1:
        threading.Thread(target=_watch, args=(parent, stat[1]), name="die-with-parent", daemon=True).start()


def _watch(shell: int, starter: int) -> None:
    """End this process once `shell` no longer has `starter` as its parent (the starter ended: the shell was handed
    to init or a subreaper)."""
    while True:
        time.sleep(WATCH_SECONDS)
        stat = _stat(shell)
        if stat is None or stat[1] != starter:
            _kill_self()


def in_stage() -> bool:
    """Whether this process is a DVC stage's command (`dvc repro` and `recall.stage_jobs` set DVC_STAGE)."""
    return bool(os.environ.get("DVC_STAGE"))
