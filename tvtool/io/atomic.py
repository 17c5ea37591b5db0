"""Atomic file replacement and output-path safety checks (:func:`check_output`)."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import stat
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from tvtool.errors import InvalidInputError, TvtoolError

STDIO = "-"
"""The path that means stdin (for inputs) or stdout (for outputs)."""


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


def stdout_closed() -> bool:
    """Whether the process was started with stdout closed (``tvtool ... >&-``)."""
    if sys.stdout is None:  # Python's own marker for a closed descriptor 1 at startup
        return True
    try:
        os.fstat(sys.stdout.fileno())
    except (AttributeError, io.UnsupportedOperation):  # before OSError: it is one
        return False  # an in-memory stream (tests, embedding): writable
    except (OSError, ValueError):
        return True  # a bad descriptor, or a closed file object
    return False


_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _special_kind(path: Path) -> str | None:
    """What a non-regular, non-directory file at ``path`` is (symlinks followed), else None."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None  # nothing there (or a dangling link): a new file will be created
    for test, kind in _SPECIAL_KINDS:
        if test(mode):
            return kind
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else "not a regular file"


def silence_stdout() -> None:
    """Point descriptor 1 at ``/dev/null`` after a write to stdout failed.

    Whatever is still buffered then goes nowhere when the interpreter flushes stdout at exit,
    instead of failing a second time with its own "Exception ignored" message.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return  # an in-memory stream (tests, embedding), or already closed
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def stdout_error(exc: OSError, what: str) -> TvtoolError:
    """The one-line error (exit 1) for ``what`` that could not be written to stdout.

    Also silences stdout (see :func:`silence_stdout`), so the error stays one line.

    Args:
        exc: The error of the write or flush.
        what: What was being written, e.g. ``"the output"``.
    """
    silence_stdout()
    if isinstance(exc, BrokenPipeError):
        return TvtoolError(f"stdout was closed by its reader before {what} was written "
                           "(broken pipe)",
                           hint="keep the reading end of the pipe open until tvtool exits")
    return os_error(exc, f"writing {what} to stdout")


def check_output_path(output: str) -> None:
    """Refuse an output path that cannot be written before any work is done.

    Args:
        output: The output path, or ``-`` for stdout.

    Raises:
        InvalidInputError: the directory is missing, the path is a directory or another
            non-regular file (a FIFO, a device node, a socket), or the path is ``-`` and
            stdout is closed.
    """
    if output == STDIO:
        if stdout_closed():
            raise InvalidInputError("-o - writes to stdout, but stdout is closed",
                                    hint="redirect stdout to a file or a pipe, or give -o PATH")
        return
    if not output:
        raise InvalidInputError("empty output path", hint="give -o PATH, or -o - for stdout")
    target = Path(output).expanduser()
    if target.is_dir():
        raise InvalidInputError(f"output {output!r} is a directory", hint="give a file path")
    kind = _special_kind(target)
    if kind is not None:
        # Renaming a new file onto a FIFO or a device node would replace the node itself
        # (as root, -o /dev/null would replace the system's /dev/null): refuse instead.
        raise InvalidInputError(
            f"output {output!r} is not a regular file ({kind})",
            hint="tvtool replaces regular files atomically; to stream, use -o - and redirect "
                 "stdout")
    if not target.parent.is_dir():
        raise InvalidInputError(f"output directory {str(target.parent)!r} does not exist",
                                hint="create it first")


def check_output(output: str, inputs: Sequence[str] = ()) -> None:
    """Refuse an unusable output path before any work is done.

    Commands call this first so that a wrong ``-o`` fails in milliseconds, not after reading
    gigabytes; :func:`write_tensors` repeats the checks.

    Args:
        output: Destination path, or ``-`` for stdout.
        inputs: Paths the command reads.

    Raises:
        InvalidInputError: the output is an input, a directory, or in a missing directory.
    """
    check_output_path(output)
    check_distinct_paths(output, inputs)


def current_umask() -> int:
    """The process's umask (the permission bits new files and directories do not get)."""
    # The umask can only be read by setting it; restore it immediately.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def os_error(exc: OSError, action: str) -> TvtoolError:
    """Turn an ``OSError`` into a one-line :class:`TvtoolError` (exit 1).

    Args:
        exc: The error the operating system reported.
        action: What was being done, e.g. ``"writing 'out.safetensors'"``.
    """
    if exc.errno == errno.ENOSPC:
        return TvtoolError(f"no space left on device while {action}",
                           hint="free disk space or write elsewhere (TMPDIR for stdin/stdout)")
    return TvtoolError(f"failed while {action}: {exc.strerror or exc}")


STALE_AFTER_S = 10 * 60
"""A temp file of a dead process is removed once it is this old (seconds since written)."""

STALE_UNKNOWN_AFTER_S = 24 * 3600
"""A temp file without a process id (older tvtool) is removed once it is this old."""

# mkstemp's random part is 8 characters of this alphabet.
_RANDOM = r"[a-z0-9_]{8}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists (someone else's), or not a pid: never remove on a guess
    return True


def remove_stale_temp_files(target: Path, now: float | None = None) -> list[Path]:
    """Remove temp files that an earlier, killed run left beside ``target``.

    :func:`atomic_output` writes ``.NAME.PID.XXXXXXXX.tmp`` in the target's directory and
    removes it on every exit path except SIGKILL or power loss. Only files of exactly that
    pattern for this target name are considered, only regular files this user owns, and only
    when they are stale: the writing process is gone and the file has not been written for
    :data:`STALE_AFTER_S` (a live writer, possibly on another host of a shared file system,
    keeps its file fresh), or, for the pid-less pattern of older versions,
    :data:`STALE_UNKNOWN_AFTER_S`. Failures are ignored: cleaning up is best effort.

    Args:
        target: The output path about to be written.
        now: Current time (tests).

    Returns:
        The paths removed.
    """
    import re
    import time

    now = time.time() if now is None else now
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:(\d{{1,10}})\.)?{_RANDOM}\.tmp")
    removed: list[Path] = []
    try:
        entries = os.listdir(target.parent)
    except OSError:
        return removed
    for entry in entries:
        match = pattern.fullmatch(entry)
        if match is None:
            continue
        path = target.parent / entry
        try:
            info = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
            continue
        age = now - info.st_mtime
        pid = match.group(1)
        if pid is None:
            stale = age > STALE_UNKNOWN_AFTER_S
        else:
            stale = age > STALE_AFTER_S and int(pid) != os.getpid() and not _pid_alive(int(pid))
        if stale:
            with contextlib.suppress(OSError):
                path.unlink()
                removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; rename it onto ``path`` on success.

    The temp file is fsynced before the rename and removed if the body raises, so the target
    is either the complete new file or unchanged, and no temp file is left behind. A process
    killed outright (SIGKILL) cannot remove its temp file; the next write of the same target
    does (see :func:`remove_stale_temp_files`).

    Args:
        path: Final destination path.

    Yields:
        The temporary path to write.

    Raises:
        InvalidInputError: the directory does not exist, or the path is a directory.
        TvtoolError: the disk is full or the write failed.
    """
    check_output_path(path)
    target = Path(path).expanduser()
    directory = target.parent
    remove_stale_temp_files(target)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp",
                                        dir=directory)
    except OSError as exc:
        raise os_error(exc, f"creating a file in {str(directory)!r}") from exc
    tmp = Path(tmp_name)
    try:
        # mkstemp creates the file 0600; outputs get the permissions a plain open() would give.
        try:
            os.fchmod(fd, 0o666 & ~current_umask())
        finally:
            os.close(fd)
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
        raise os_error(exc, f"writing {path!r}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
