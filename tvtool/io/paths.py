"""Directories and removals: the file-system changes other than writing a file's bytes."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tvtool.errors import InvalidInputError


def ensure_directory(path: str) -> Path:
    """Create a directory tvtool owns (a work, cache or output directory) and its parents.

    Raises:
        InvalidInputError: the path exists and is not a directory, or cannot be created.
    """
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise InvalidInputError(f"directory {path!r} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"cannot create directory {path!r}: {exc.strerror}") from exc
    return directory


def remove_file(path: str) -> None:
    """Delete a file tvtool wrote (a damaged cache entry); a missing file is not an error."""
    Path(path).unlink(missing_ok=True)


@contextlib.contextmanager
def scratch_directory(near: str, prefix: str = ".tvtool-") -> Iterator[Path]:
    """A private temporary directory, removed on exit.

    Args:
        near: An output path; the directory is made beside it (same file system, so results
            can be renamed into place) when its folder exists, else in the system temp dir.
        prefix: Name prefix of the directory.
    """
    parent = None
    if near != "-":
        candidate = Path(near).expanduser().parent
        parent = str(candidate) if candidate.is_dir() else None
    with tempfile.TemporaryDirectory(prefix=prefix, dir=parent) as name:
        yield Path(name)
