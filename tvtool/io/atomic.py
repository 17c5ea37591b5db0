"""Atomic file replacement and output-path safety checks."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tvtool.errors import InvalidInputError, TvtoolError

STDIO = "-"


def _resolved(path: str) -> Path:
    return Path(path).expanduser().resolve(strict=False)


def check_distinct_paths(output: str, inputs: Sequence[str]) -> None:
    """Refuse an output path that names one of the inputs (symlinks and hard links included).

    Args:
        output: The output path, or ``-`` for stdout.
        inputs: Input paths; ``-`` entries are ignored.

    Raises:
        InvalidInputError: if the output resolves to the same file as an input.
    """
    if output == STDIO:
        return
    out = _resolved(output)
    out_stat = out.stat() if out.exists() else None
    for item in inputs:
        if item == STDIO or not item:
            continue
        src = _resolved(item)
        same = src == out
        if not same and out_stat is not None and src.exists():
            st = src.stat()
            same = (st.st_dev, st.st_ino) == (out_stat.st_dev, out_stat.st_ino)
        if same:
            raise InvalidInputError(
                f"output {output!r} is also an input ({item!r})",
                hint="write to a new path; tvtool never overwrites its inputs",
            )


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` on success.

    The temp file is fsynced before the rename and removed if the body raises, so the target
    is either the complete new file or unchanged.

    Args:
        path: Final destination path.

    Yields:
        The temporary path to write.

    Raises:
        TvtoolError: if the directory does not exist or the disk is full.
    """
    target = Path(path).expanduser()
    directory = target.parent if str(target.parent) else Path(".")
    if not directory.is_dir():
        raise InvalidInputError(
            f"output directory {str(directory)!r} does not exist", hint="create it first"
        )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        with contextlib.suppress(OSError):
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise TvtoolError(
                f"no space left on device while writing {path!r}", hint="free disk space"
            ) from exc
        raise TvtoolError(f"cannot write {path!r}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
