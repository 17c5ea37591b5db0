"""Plain inputs and outputs: input files, stdin spooling, stdout, atomic bytes and JSON.

Every format module builds on these: safetensors (:mod:`tvtool.io.safetensors_io`), YAML,
model and adapter directories, legacy checkpoints. Output paths are checked by
:func:`tvtool.io.atomic.check_output` first.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from tvtool.errors import InvalidInputError
from tvtool.io.atomic import (
    STDIO,
    atomic_output,
    check_output,
    os_error,
    stdout_closed,
    stdout_error,
)
from tvtool.limits import MAX_DOCUMENT_BYTES, loads_json


def short_text(exc: BaseException) -> str:
    """One line of at most 200 characters describing ``exc`` (for error messages)."""
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def input_file(path: str) -> Path:
    """Check that an input path names a readable regular file.

    Raises:
        InvalidInputError: missing, not a regular file, or unreadable.
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise InvalidInputError(f"input file {path!r} does not exist")
    if not file.is_file():
        raise InvalidInputError(f"input {path!r} is not a regular file")
    if not os.access(file, os.R_OK):
        raise InvalidInputError(f"input file {path!r} is not readable (permission denied)")
    return file


@contextlib.contextmanager
def spooled_stdin(suffix: str = "") -> Iterator[Path]:
    """Copy stdin to a temporary file that is removed when the context exits.

    Readers that need random access (safetensors, zip archives) read the copy, so ``-``
    behaves exactly like a file.

    Yields:
        The temporary file's path.

    Raises:
        InvalidInputError: stdin is a terminal or empty.
        TvtoolError: the temp directory is full.
    """
    if sys.stdin is None or sys.stdin.isatty():
        raise InvalidInputError("input '-' means stdin, but stdin is a terminal",
                                hint="pipe bytes in, e.g. `tvtool extract ... -o - | tvtool ...`")
    try:
        fd, name = tempfile.mkstemp(prefix="tvtool-stdin-", suffix=suffix)
    except OSError as exc:
        raise os_error(exc, "creating a temp file for stdin") from exc
    tmp = Path(name)
    try:
        try:
            with os.fdopen(fd, "wb") as handle:
                shutil.copyfileobj(sys.stdin.buffer, handle, length=16 * 1024 * 1024)
        except OSError as exc:
            raise os_error(exc, "copying stdin to a temp file") from exc
        if tmp.stat().st_size == 0:
            raise InvalidInputError("stdin was empty", hint="did the previous command fail?")
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def write_stdout_from(handle: IO[bytes]) -> None:
    """Copy a binary stream to stdout.

    Raises:
        InvalidInputError: stdout is closed (``>&-``).
        TvtoolError: the write failed: the reader closed the pipe (``-o - | true``: the data
            is lost, so this is a failure, exit 1) or the disk behind stdout is full.
    """
    if stdout_closed():
        raise InvalidInputError("-o - writes to stdout, but stdout is closed",
                                hint="redirect stdout to a file or a pipe, or give -o PATH")
    try:
        shutil.copyfileobj(handle, sys.stdout.buffer, length=16 * 1024 * 1024)
        sys.stdout.buffer.flush()
    except OSError as exc:
        raise stdout_error(exc, "the output") from None


def write_bytes(output: str, data: bytes, *, inputs: Sequence[str] = ()) -> None:
    """Write raw bytes atomically (PNG figures, reports); ``-`` means stdout."""
    check_output(output, inputs)
    if output == STDIO:
        write_stdout_from(io.BytesIO(data))
        return
    with atomic_output(output) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_json(output: str, document: Any, *, inputs: Sequence[str] = ()) -> None:
    """Write a JSON document atomically (``-`` means stdout)."""
    text = json.dumps(document, indent=2, sort_keys=False, default=str) + "\n"
    write_bytes(output, text.encode("utf-8"), inputs=inputs)


def read_json(path: str) -> Any:
    """Read a JSON document from a file or ``-``.

    Raises:
        InvalidInputError: if the file is missing, not valid JSON, larger than
            :data:`~tvtool.limits.MAX_DOCUMENT_BYTES` or nested too deeply.
    """
    limit = MAX_DOCUMENT_BYTES
    try:
        if path == STDIO:
            text = sys.stdin.read(limit + 1)
        else:
            with open(Path(path).expanduser(), encoding="utf-8") as handle:
                text = handle.read(limit + 1)
    except FileNotFoundError:
        raise InvalidInputError(f"input file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read {path!r}: {short_text(exc)}") from exc
    if len(text) > limit:
        raise InvalidInputError(f"{path!r} is larger than {limit // (1024 * 1024)} MiB; "
                                "tvtool reads only small JSON documents")
    return loads_json(text, repr(path))
