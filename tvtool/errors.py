"""Errors that the command line maps to exit codes.

Exit codes (documented in docs/cli.md):

* 0 -- success
* 1 -- runtime failure (:class:`TvtoolError`, :class:`NumericalError`, I/O failures)
* 2 -- usage error or invalid input (:class:`InvalidInputError`, :class:`UsageError`)
"""

from __future__ import annotations


class TvtoolError(Exception):
    """Base class for every error tvtool reports to a user.

    Attributes:
        message: One line saying what went wrong.
        hint: Optional one line saying what to do about it.
        exit_code: Process exit code the CLI uses for this error.
    """

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """Return the message and hint joined on a single line."""
        text = " ".join(self.message.split())
        if self.hint:
            text += f" (hint: {' '.join(self.hint.split())})"
        return text


class InvalidInputError(TvtoolError):
    """An input file, tensor or value is malformed or does not fit the others."""

    exit_code = 2


class UsageError(TvtoolError):
    """The command line itself is wrong (bad flag combination, bad value)."""

    exit_code = 2


class NumericalError(TvtoolError):
    """A computation produced NaN or Inf (a run diverged, a result overflowed)."""

    exit_code = 1
