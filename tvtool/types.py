"""Shared types: aliases, the do-nothing logger and progress, the writing commands' result.

The library defaults to the do-nothing logger and progress factory; :class:`WriteResult` is what
every command that writes a tensor file (extract, negate, apply, convert, merge) reports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

StateDict = dict[str, torch.Tensor]
"""A flat mapping from open_clip state-dict names to tensors."""

Logger = Callable[[str], None]
"""Receives one line of notes or warnings (stderr in the CLI)."""

class Advance(Protocol):
    """``advance(n, **fields)``: ``n`` more units of work are done.

    ``fields`` (loss, lr, ...) are shown with the progress.
    """

    def __call__(self, n: int = 1, /, **fields: Any) -> None:
        """Advance by ``n`` units."""

ProgressFactory = Callable[[str, "int | None"], contextlib.AbstractContextManager[Advance]]
"""``progress(description, total)`` -> context manager yielding ``advance(n)``; the CLI passes
a rich progress bar on stderr, the library default does nothing."""


def quiet(_message: str) -> None:
    """A :data:`Logger` that drops every line."""
    return None


def no_advance(_n: int = 1, /, **_fields: Any) -> None:
    """An :data:`Advance` that does nothing."""
    return None


@contextlib.contextmanager
def no_progress(_description: str, _total: int | None) -> Iterator[Advance]:
    """A progress factory that shows nothing."""
    yield no_advance


@dataclass(frozen=True)
class WriteResult:
    """What a command that writes a tensor file produced (or, for a dry run, would produce).

    Attributes:
        output: The path written, or ``-`` for stdout.
        tensors: Number of tensors in the output.
        parameters: Number of scalars in the output.
        notes: Warnings and remarks for the user (stderr in the CLI).
        details: Command-specific facts for the JSON report.
    """

    output: str
    tensors: int
    parameters: int
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return asdict(self)
