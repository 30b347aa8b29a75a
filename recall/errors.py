"""The one exception type for mistakes in what a user gave (a config value, a file, a protocol string)."""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input. The `recall` command prints it as one line, `recall: error: <message>`, and
    exits with status 2; the message names the offending value or file and what to do."""
