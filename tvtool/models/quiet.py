"""Silencing open_clip's root-logger warnings while tvtool builds models it fills itself."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """Raise the root logger to ERROR for the block.

    open_clip logs a root-level warning for every model built without pretrained weights,
    which tvtool does whenever it loads its own weights or builds a skeleton on the meta device.
    """
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
