"""Ctrl-C that library code cannot lose, and that ends the process with the status it reports.

Python turns SIGINT into a KeyboardInterrupt in whatever frame the main thread is running. Two things can go wrong,
both seen in the suite's Ctrl-C test (up to one run in six here) when the signal lands while a run imports its
libraries (timm, torchvision, ...):

* the KeyboardInterrupt is lost and the run trains on (seen: still training a minute later; library code that
  catches everything, ``except:`` or ``except BaseException``, while it is imported is the likely cause, not
  pinned down). `install` records that the signal came, and `check` (called by the training loop at every batch)
  raises KeyboardInterrupt again when it did;
* CPython (3.11) marks the interpreter for death by SIGINT when a KeyboardInterrupt leaves code that ``exec`` ran
  from a string (dataclasses build their methods that way), even when the program catches it later: the process
  prints its message, then kills itself with SIGINT at exit (status -2 to its parent instead of 130).
  `handled` clears that mark: any ``exec`` of a string resets it before it runs.
"""

from __future__ import annotations

import signal
import threading

_received = False


def _on_sigint(signum, frame) -> None:
    global _received
    _received = True
    raise KeyboardInterrupt


def install():
    """Handle SIGINT as Python does (a KeyboardInterrupt), remembering that it came; returns the handler it
    replaced (None off the main thread, where Python cannot install one), for `uninstall`."""
    global _received
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None  # another handler (a test runner's, SIG_IGN in a background job) is left as it is
    _received = False
    return signal.signal(signal.SIGINT, _on_sigint)


def uninstall(previous) -> None:
    global _received
    if previous is not None:
        signal.signal(signal.SIGINT, previous)
    _received = False


def check() -> None:
    """Raise KeyboardInterrupt if SIGINT came and its KeyboardInterrupt was lost on the way."""
    if _received:
        raise KeyboardInterrupt


def handled() -> None:
    """The program handled a KeyboardInterrupt: clear CPython's mark that it was unhandled (see above)."""
    exec("None")  # noqa: S102 - a string exec resets _Py_UnhandledKeyboardInterrupt (Python/pythonrun.c)
