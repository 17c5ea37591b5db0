"""Errors that the command line maps to exit codes.

Exit codes (documented in docs/cli.md):

* 0 -- success
* 1 -- runtime failure (:class:`TvtoolError`, :class:`NumericalError`, I/O failures)
* 2 -- usage error or invalid input (:class:`InvalidInputError`, :class:`UsageError`)
"""

from __future__ import annotations

MAX_WORD = 160
"""Longest run of non-blank characters an error line keeps whole (a long path still fits)."""

MAX_LINE = 1000
"""Longest error line: a huge value quoted by mistake still prints one short line."""


def bounded_line(text: str) -> str:
    """``text`` on one line, with runs longer than :data:`MAX_WORD` and the line itself cut.

    The last safety net behind the error messages: sources quote values with
    :func:`tvtool.limits.short_repr` already, but a value quoted whole anywhere (a 15 MB YAML
    scalar, a tensor name, a path) must not become a multi-megabyte line. A cut keeps the
    start and the end of what it shortens (the end of a path names the file), joined by ``…``.
    """
    words = []
    for word in text.split():
        if len(word) > MAX_WORD:
            word = f"{word[:MAX_WORD - 61]}…{word[-60:]}"
        words.append(word)
    line = " ".join(words)
    if len(line) > MAX_LINE:
        line = f"{line[:MAX_LINE - 301]}…{line[-300:]}"
    return line


class TvtoolError(Exception):
    """Base class for every error tvtool reports to a user.

    Attributes:
        message: One line saying what went wrong.
        hint: Optional one line saying what to do about it.
        exit_code: Process exit code the CLI uses for this error.
    """

    exit_code: int = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        original = _from_worker(type(self), message)
        if original is not None:
            message, hint = original
        super().__init__(message)
        self.message = message
        self.hint = hint
        if hint and hasattr(self, "add_note"):  # Python >= 3.11
            # The note is part of the formatted traceback, the only thing a DataLoader worker
            # sends back; it lets the main process recover the hint (see _from_worker).
            self.add_note(f"{_HINT_NOTE}{hint}")

    def one_line(self) -> str:
        """Return the message and hint joined on a single line."""
        text = bounded_line(self.message)
        if self.hint:
            text += f" (hint: {bounded_line(self.hint)})"
        return text


_HINT_NOTE = "hint: "


def _from_worker(cls: type, message: str) -> tuple[str, str | None] | None:
    """The original message and hint of an error raised in a DataLoader worker process.

    torch re-raises a worker's exception in the main process as ``cls(text)``, where ``text``
    is "Caught X in DataLoader worker process N. Original Traceback ..." followed by the
    formatted traceback; the error's own message and hint note end it. Recovering them keeps
    the error one line with its hint, as it would be with ``--workers 0``.
    """
    if not message.startswith("Caught ") or "\nOriginal Traceback" not in message:
        return None
    marker = f"\n{cls.__module__}.{cls.__qualname__}: "
    at = message.rfind(marker)
    if at < 0:
        return None
    text, sep, hint = message[at + len(marker):].rstrip("\n").rpartition(f"\n{_HINT_NOTE}")
    if not sep:
        return hint, None
    return text, hint


def worker_error_text(exc: BaseException) -> str:
    """One line describing ``exc``, unwrapped if torch re-raised it from a DataLoader worker.

    For exceptions other than TvtoolError the wrapped text is "Caught X in DataLoader worker
    process N. Original Traceback ..."; its last line (``module.X: message``) is the part
    that says what went wrong.
    """
    text = str(exc)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else text
    return " ".join(text.split())[:200] or type(exc).__name__


class InvalidInputError(TvtoolError):
    """An input file, tensor or value is malformed or does not fit the others."""

    exit_code = 2


class UsageError(TvtoolError):
    """The command line itself is wrong (bad flag combination, bad value)."""

    exit_code = 2


class NumericalError(TvtoolError):
    """A computation produced NaN or Inf (a run diverged, a result overflowed)."""

    exit_code = 1


_INTERRUPTION_ATTRIBUTE = "tvtool_interruption_note"


def note_interruption(exc: BaseException, text: str) -> None:
    """Attach to a Ctrl-C (or SIGTERM) what a user needs to know to carry on.

    The CLI prints it after ``interrupted``: e.g. where a fine-tuning run saved its state
    and how to continue it. A second note replaces the first (the innermost knows best).
    """
    setattr(exc, _INTERRUPTION_ATTRIBUTE, text)


def interruption_note(exc: BaseException) -> str | None:
    """The note :func:`note_interruption` attached to ``exc``, if any."""
    note = getattr(exc, _INTERRUPTION_ATTRIBUTE, None)
    return note if isinstance(note, str) else None
