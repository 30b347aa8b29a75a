"""The exception types the `recall` command reports in one line (exit 2): mistakes in what a user gave (a config
value, a file, a protocol string), and a training run that diverged."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input. The `recall` command prints it as one line, `recall: error: <message>`, and
    exits with status 2; the message names the offending value or file and what to do."""


class ReplayError(UserError):
    """A problem with a replay source or pool; the message names the offending path or value."""


class Diverged(FloatingPointError):
    """Training met a loss, a gradient or weights that are not finite (nan, inf) and stopped before it saved them.
    An ArithmeticError, not a UserError: `recall tune` fails that trial and goes on (a ValueError stops a study)."""
