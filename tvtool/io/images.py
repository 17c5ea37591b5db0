"""Reading the files of image datasets: images and small text lists beside them.

Both readers open only regular files, without blocking (a FIFO named ``x.png`` would
otherwise wait forever for a writer), and bound what they decode: at most
:data:`~tvtool.limits.MAX_IMAGE_PIXELS` pixels per image, decoded without widening, and at most
:data:`~tvtool.limits.MAX_TEXT_LIST_BYTES` per text list.
"""

from __future__ import annotations

import contextlib
import os
import stat
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from tvtool.errors import InvalidInputError
from tvtool.limits import MAX_IMAGE_PIXELS, MAX_TEXT_LIST_BYTES

_ROWS_PER_SLICE = 256
"""Rows of a 16-bit image narrowed to 8 bits at a time (bounds the temporaries)."""


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages (``a FIFO``, ``a device``, ...)."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    return "not a regular file"


def open_regular(path: str | Path, what: str) -> IO[bytes]:
    """Open a regular file for reading without ever blocking on a FIFO or device.

    ``O_NONBLOCK`` makes opening a FIFO return at once; the opened file is then checked to be
    regular, so what was checked is what is read.

    Raises:
        FileNotFoundError: the file does not exist.
        InvalidInputError: not a regular file.
        OSError: unreadable.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise InvalidInputError(
                f"{what} {str(path)!r} is {file_kind(info.st_mode)}, not a regular file",
                hint="tvtool reads only regular files from datasets")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                            ".ppm", ".pgm"})
"""File name endings (lowercase) that image-folder datasets treat as images."""


def read_image(path: str | Path | IO[bytes], *, name: str | None = None) -> Image.Image:
    """Read an image file completely and return it in RGB mode.

    The file is decoded eagerly and closed, so a truncated or corrupt file fails here and
    not later inside a data loader worker.

    Args:
        path: Image file, or an open binary stream (an image stored inside another file).
        name: How to name the image in errors (default: the path).

    Returns:
        A loaded RGB ``PIL.Image``.

    Raises:
        InvalidInputError: the file is missing, not a regular file, not a readable image, or
            larger than :data:`~tvtool.limits.MAX_IMAGE_PIXELS` pixels.
    """
    try:
        with warnings.catch_warnings():
            # PIL warns on huge images (decompression-bomb check); treat it as unreadable.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # A stream (an image stored inside another file) is already open; a path is
            # opened only if it is a regular file.
            opened = (open_regular(path, "image file") if isinstance(path, (str, Path))
                      else contextlib.nullcontext(path))
            with opened as handle, Image.open(handle) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise InvalidInputError(
                        f"image {str(path)!r} has {width} × {height} pixels, more than "
                        f"{MAX_IMAGE_PIXELS:,}; tvtool does not decode it",
                        hint="scale it down first; the models see a few hundred pixels a side")
                image.load()
                return _to_rgb(image)
    except FileNotFoundError:
        raise InvalidInputError(f"image file {name or str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise InvalidInputError(
            f"cannot read image {name or str(path)!r}: {reason}",
            hint="remove or replace the file; every file in a class folder must be an image",
        ) from None


_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert to 8-bit RGB, scaling 16-bit grayscale to 0..255.

    PIL's ``convert("RGB")`` clips integer images to 0..255, which turns a 16-bit grayscale PNG
    into pure black and white; dividing by 257 maps 0..65535 onto 0..255 exactly (rounded to
    nearest: ``(v + 128) // 257`` equals ``rint(v / 257)``, as ``v / 257`` is never a half).
    The image is narrowed a slice of rows at a time, in its own integer width, so the
    temporaries stay a small fraction of the image.

    Raises:
        ValueError: an integer image with values outside 0..65535, or a float image.
    """
    if image.mode in _WIDE_MODES:
        width, height = image.size
        grey = np.empty((height, width), dtype=np.uint8)
        for top in range(0, height, _ROWS_PER_SLICE):
            rows = np.asarray(image.crop((0, top, width, min(height, top + _ROWS_PER_SLICE))))
            if rows.size and (int(rows.min()) < 0 or int(rows.max()) > 65535):
                raise ValueError(f"{image.mode} image with values outside 0..65535")
            wide = rows.astype(np.uint32)
            wide += 128
            wide //= 257
            grey[top:top + rows.shape[0]] = wide
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "F":
        raise ValueError("floating-point images have no defined brightness range")
    if image.mode == "RGB":
        return image  # already what the models take: no copy
    return image.convert("RGB")


def read_text_lines(path: str | Path) -> list[str]:
    """Read a UTF-8 text file as a list of stripped, non-empty lines (``#`` starts a comment).

    Used for ``classnames.txt`` and ``templates.txt`` beside image folders.

    Raises:
        InvalidInputError: the file is missing, not a regular file, larger than
            :data:`~tvtool.limits.MAX_TEXT_LIST_BYTES`, or not UTF-8 text.
    """
    try:
        with open_regular(path, "text file") as handle:
            data = handle.read(MAX_TEXT_LIST_BYTES + 1)
        if len(data) > MAX_TEXT_LIST_BYTES:
            raise InvalidInputError(
                f"{str(path)!r} is larger than {MAX_TEXT_LIST_BYTES // 1024} KiB; tvtool reads "
                "only short lists of class names or templates")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise InvalidInputError(f"file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())[:120]
        raise InvalidInputError(f"cannot read {str(path)!r} as UTF-8 text: {reason}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]
