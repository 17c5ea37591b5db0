"""Directories and removals: the file-system changes other than writing a file's bytes."""

from __future__ import annotations

import contextlib
import shutil
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


def remove_output(path: str) -> bool:
    """Remove an output this command has just written (a file, or a directory it created).

    Used when the command fails after writing, e.g. because its ``--json`` report cannot reach
    stdout. Best effort: errors are ignored.

    Returns:
        Whether something was removed.
    """
    if not path or path == "-":
        return False
    target = Path(path).expanduser()
    try:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        else:
            return False
    except OSError:
        return False
    return True


def confined_path(path: str, folder: Path, what: str) -> Path:
    """``path`` taken relative to ``folder``, refused unless it stays inside ``folder``.

    A file someone else wrote (a merge config from a pull request) may name where tvtool
    writes; such a path must not be absolute (``/...``, ``~/...``) and must not leave the
    folder, neither through ``..`` nor through a symlink inside the folder that points out of
    it: the resolved path must lie inside the resolved folder.

    Args:
        path: The path as written in the file.
        folder: The folder it is relative to (the file's own folder).
        what: How to name the path in errors, e.g. ``"merge config 'm.yaml': output"``.

    Returns:
        The path joined to ``folder`` (not resolved: symlinks inside the folder keep working).

    Raises:
        InvalidInputError: an absolute path, or one that resolves outside ``folder``.
    """
    from tvtool.limits import short_repr

    hint = "give a path relative to the config file's folder, or pass -o on the command line"
    if path.startswith("~") or Path(path).is_absolute():
        raise InvalidInputError(f"{what} {short_repr(path)} is an absolute path; a file may "
                                "only name outputs inside its own folder", hint=hint)
    joined = folder / path
    root = folder.resolve()
    resolved = joined.resolve(strict=False)
    if resolved != root and root not in resolved.parents:
        raise InvalidInputError(f"{what} {short_repr(path)} leads outside the config file's "
                                f"folder (to {short_repr(str(resolved))})", hint=hint)
    return joined


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
