"""Shared type aliases, and the do-nothing logger and progress factory the library defaults to."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

StateDict = dict[str, torch.Tensor]
"""A flat mapping from open_clip state-dict names to tensors."""

Logger = Callable[[str], None]
"""Receives one line of notes or warnings (stderr in the CLI)."""

Advance = Callable[[int], None]
"""``advance(n)``: ``n`` more units of work are done."""

ProgressFactory = Callable[[str, "int | None"], contextlib.AbstractContextManager[Advance]]
"""``progress(description, total)`` -> context manager yielding ``advance(n)``; the CLI passes
a rich progress bar on stderr, the library default does nothing."""


def quiet(_message: str) -> None:
    """A :data:`Logger` that drops every line."""
    return None


def no_advance(_n: int = 1) -> None:
    """An :data:`Advance` that does nothing."""
    return None


@contextlib.contextmanager
def no_progress(_description: str, _total: int | None) -> Iterator[Advance]:
    """A progress factory that shows nothing."""
    yield no_advance
