"""Ctrl-C that library code cannot lose (recall/interrupts.py), each case in a process of its own, whose SIGINT
handling is Python's default whatever the test runner's is."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

SWALLOWED = """
import os, signal, sys
from recall import interrupts
previous = interrupts.install()
try:  # library code that swallows everything
    os.kill(os.getpid(), signal.SIGINT)
    for _ in range(10_000_000): pass
except BaseException:
    pass
try:
    interrupts.check()
except KeyboardInterrupt:
    interrupts.uninstall(previous)
    interrupts.check()  # uninstalled: nothing left to raise
    sys.exit(7)
sys.exit(1)
"""

EXEC_INTERRUPTED = """
import sys
from recall import interrupts
try:
    exec("raise KeyboardInterrupt")  # as a Ctrl-C landing in a dataclass's generated method being built
except KeyboardInterrupt:
    {handled}
sys.exit(130)
"""


def run(code: str, tmp_path) -> int:
    """`code` as a module run with `python -m`, as `recall` runs (`-c` would exit at sys.exit before CPython's
    check), SIGINT as a terminal leaves it; its exit status (-2: killed by SIGINT)."""
    def as_from_a_terminal():
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    (tmp_path / "case.py").write_text(code)
    return subprocess.run([sys.executable, "-m", "case"], cwd=tmp_path, timeout=120,
                          preexec_fn=as_from_a_terminal).returncode


def test_a_ctrl_c_that_library_code_swallowed_is_raised_again_by_check(tmp_path):
    assert run(SWALLOWED, tmp_path) == 7


@pytest.mark.parametrize("handled, status", [("pass", -signal.SIGINT), ("interrupts.handled()", 130)])
def test_a_handled_interrupt_of_exec_code_exits_with_the_status_the_program_chose(tmp_path, handled, status):
    """CPython kills the process with SIGINT at exit when a KeyboardInterrupt left exec'd code, caught or not
    (the first case: why `handled` exists); after `handled` it exits with its own status."""
    assert run(EXEC_INTERRUPTED.format(handled=handled), tmp_path) == status
