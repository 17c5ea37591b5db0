"""Reading the files of image datasets: images and small text lists beside them."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from tvtool.errors import InvalidInputError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                            ".ppm", ".pgm"})
"""File name endings (lowercase) that image-folder datasets treat as images."""


def read_image(path: str | Path) -> Image.Image:
    """Read an image file completely and return it in RGB mode.

    The file is decoded eagerly and closed, so a truncated or corrupt file fails here and
    not later inside a data loader worker.

    Args:
        path: Image file.

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
                return image.convert("RGB")
    except FileNotFoundError:
        raise InvalidInputError(f"image file {str(path)!r} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError,
            Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise InvalidInputError(
            f"cannot read image {str(path)!r}: {reason}",
            hint="remove or replace the file; every file in a class folder must be an image",
        ) from None


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
