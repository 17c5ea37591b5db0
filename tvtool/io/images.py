"""Reading the files of image datasets: images and small text lists beside them."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, UnidentifiedImageError

from tvtool.errors import InvalidInputError

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
        InvalidInputError: the file is missing or is not a readable image.
    """
    try:
        with warnings.catch_warnings():
            # PIL warns on huge images (decompression-bomb check); treat it as unreadable.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
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
    into pure black and white; dividing by 257 maps 0..65535 onto 0..255 exactly.

    Raises:
        ValueError: an integer image with values outside 0..65535, or a float image.
    """
    if image.mode in _WIDE_MODES:
        values = np.asarray(image, dtype=np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(f"{image.mode} image with values outside 0..65535")
        grey = np.rint(values / 257.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode == "F":
        raise ValueError("floating-point images have no defined brightness range")
    return image.convert("RGB")


def read_text_lines(path: str | Path) -> list[str]:
    """Read a UTF-8 text file as a list of stripped, non-empty lines (``#`` starts a comment).

    Used for ``classnames.txt`` and ``templates.txt`` beside image folders.

    Raises:
        InvalidInputError: the file is missing or not UTF-8 text.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidInputError(f"file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"cannot read {str(path)!r} as UTF-8 text: {exc}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]
